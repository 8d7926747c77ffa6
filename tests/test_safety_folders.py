"""No file in a Hugging Face folder makes compare, from-hf or --init_from run code: every place
transformers takes code from (custom_generate, stray .py files anywhere, auto_map in any
config, hub kernels, quantizers), and special files (FIFOs) that would hang a reader.
Each payload writes a marker file if it runs."""

import json
import os
import tempfile

os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="nanomoe-hf-modules-"))

import pytest  # noqa: E402
import torch  # noqa: E402

import conversion  # noqa: E402
import nanomoe_torch  # noqa: E402
from conversion.init_from import init_arrays  # noqa: E402
from nanomoe.pt_source import Source  # noqa: E402
from conversion.hf_folder import verified_copy  # noqa: E402
from conversion.remote_code import REMOTE_MODELS  # noqa: E402
from conversion.remote_export import write_remote_folder  # noqa: E402
from nanomoe import ConversionError, MoeGPTConfig  # noqa: E402
from helpers import fail_if_blocked  # noqa: E402

MOE = MoeGPTConfig(n_layer=1, n_embd=32, n_head=4, block_size=16, vocab_size=64,
                   moe_dispatch="dense")
PROMPT = [1, 2, 3]


@pytest.fixture(autouse=True)
def _no_hang():
    with fail_if_blocked(120):
        yield


def _payload(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()\n"


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """A clean remote-code export (MoeGPT), copied afresh by each test."""
    tm = nanomoe_torch.create_model(MOE, 0)
    arrays = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    folder = str(tmp_path_factory.mktemp("moe") / "hf")
    write_remote_folder(folder, Source(MOE, arrays, 1, {}), log=None)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = str(tmp_path_factory.mktemp("gpt2") / "hf")
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1,
                               n_head=4)).save_pretrained(folder)
    return folder


def _copy(folder, tmp_path) -> str:
    import shutil

    return shutil.copytree(folder, str(tmp_path / "folder"), symlinks=True)


def _edit_json(path, **fields):
    data = json.load(open(path)) if os.path.exists(path) else {}
    data.update(fields)
    json.dump(data, open(path, "w"))


def _plant(folder, how, marker):
    """Put code (or a FIFO) where transformers would find it."""
    code = _payload(marker)
    if how == "custom_generate":
        os.makedirs(os.path.join(folder, "custom_generate"))
        open(os.path.join(folder, "custom_generate", "generate.py"), "w").write(
            code + "def generate(model, **kw):\n    return None\n")
    elif how == "stray_py":
        open(os.path.join(folder, "helper.py"), "w").write(code)
    elif how == "py_in_subfolder":
        os.makedirs(os.path.join(folder, "a", "b"))
        open(os.path.join(folder, "a", "b", "x.py"), "w").write(code)
    elif how == "py_behind_symlinked_folder":
        outside = folder + "-outside"
        os.makedirs(outside)
        open(os.path.join(outside, "x.py"), "w").write(code)
        os.symlink(outside, os.path.join(folder, "linked"))
    elif how == "hub_auto_map":
        _edit_json(os.path.join(folder, "config.json"),
                   auto_map={"AutoModelForCausalLM": "evil/repo--modeling.Evil"})
    elif how == "tokenizer_auto_map":
        _edit_json(os.path.join(folder, "tokenizer_config.json"),
                   auto_map={"AutoTokenizer": ["tok.EvilTokenizer", None]})
    elif how == "processor_auto_map":
        _edit_json(os.path.join(folder, "preprocessor_config.json"),
                   auto_map={"AutoFeatureExtractor": "fe.Evil"})
    elif how == "hub_kernel":
        _edit_json(os.path.join(folder, "config.json"),
                   attn_implementation="kernels-community/evil-attention")
    elif how == "quantizer":
        _edit_json(os.path.join(folder, "config.json"),
                   quantization_config={"quant_method": "mxfp4"})
    elif how == "generation_custom":
        _edit_json(os.path.join(folder, "generation_config.json"),
                   custom_generate="evil/repo", trust_remote_code=True)
    elif how in ("fifo_generation_config", "fifo_in_subfolder"):
        sub = folder if how == "fifo_generation_config" else os.path.join(folder, "deep")
        os.makedirs(sub, exist_ok=True)
        name = "generation_config.json" if sub == folder else "pipe"
        if os.path.exists(os.path.join(sub, name)):
            os.remove(os.path.join(sub, name))
        os.mkfifo(os.path.join(sub, name))
    else:
        raise AssertionError(how)


HOW = ["custom_generate", "stray_py", "py_in_subfolder", "py_behind_symlinked_folder",
       "hub_auto_map", "tokenizer_auto_map", "processor_auto_map", "hub_kernel", "quantizer",
       "generation_custom", "fifo_generation_config", "fifo_in_subfolder"]


@pytest.mark.parametrize("how", HOW)
def test_compare_of_a_remote_export_runs_nothing_planted(moe_folder, tmp_path, how):
    folder, marker = _copy(moe_folder, tmp_path), tmp_path / "ran"
    _plant(folder, how, marker)
    with pytest.raises(ConversionError) as e:
        conversion.compare(folder, folder + "-unused", tokens=PROMPT, log=lambda *_: None)
    assert "\n" not in str(e.value) and "-unused" not in str(e.value)  # refused A itself
    assert not marker.exists()


@pytest.mark.parametrize("how", HOW)
def test_gpt2_folder_runs_nothing_planted(gpt2_folder, tmp_path, how):
    folder, marker = _copy(gpt2_folder, tmp_path), tmp_path / "ran"
    _plant(folder, how, marker)
    for load in (lambda: conversion.from_hf(folder, str(tmp_path / "out")),
                 lambda: init_arrays(folder),
                 lambda: conversion.compare(folder, folder + "-unused", tokens=PROMPT,
                                            log=lambda *_: None)):
        with pytest.raises(ConversionError) as e:
            load()
        assert "\n" not in str(e.value) and "-unused" not in str(e.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_transformers_itself_would_run_custom_generate(moe_folder, tmp_path):
    """The payload above is live: transformers runs a remote export's custom_generate."""
    from transformers import AutoModelForCausalLM

    folder, marker = _copy(moe_folder, tmp_path), tmp_path / "ran"
    _plant(folder, "custom_generate", marker)
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    assert marker.exists()


def test_the_copy_holds_only_config_code_and_weights(moe_folder, tmp_path):
    folder = _copy(moe_folder, tmp_path)
    with verified_copy(folder, REMOTE_MODELS["moegpt"]) as copy:
        names = sorted(os.listdir(copy))
        assert names == ["config.json", "configuration_moegpt.py", "model.safetensors",
                         "modeling_moegpt.py"]
        assert os.path.realpath(os.path.join(copy, "model.safetensors")) == \
            os.path.realpath(os.path.join(folder, "model.safetensors"))
    assert not os.path.exists(copy)


def test_clean_folders_still_load(moe_folder, gpt2_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    r = conversion.compare(moe_folder + "/", moe_folder, tokens=PROMPT, log=lambda *_: None)
    assert r["ok"] and r["greedy"]
    arrays = init_arrays(gpt2_folder)
    hf = AutoModelForCausalLM.from_pretrained(gpt2_folder).eval()
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(arrays["transformer.wte.weight"]),
                           hf.transformer.wte.weight)


def test_the_command_of_the_report_runs_nothing(moe_folder, tmp_path):
    """``python -m conversion compare LOG HF`` as reported: exit 2, one line, no marker."""
    import subprocess
    import sys

    folder, marker = _copy(moe_folder, tmp_path), tmp_path / "ran"
    _plant(folder, "custom_generate", marker)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "conversion", "compare", folder, folder],
                       capture_output=True, text=True, cwd=repo, timeout=300,
                       env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "custom_generate: custom generation code" in r.stderr and not marker.exists()


def test_a_full_temporary_folder_is_one_sentence(moe_folder, tmp_path, monkeypatch):
    import tempfile as tf

    blocked = tmp_path / "blocked"
    blocked.write_text("a file, so no folder can be made in it")
    monkeypatch.setattr(tf, "tempdir", str(blocked))
    with pytest.raises(ConversionError, match="could not make the verified copy .* TMPDIR"):
        with verified_copy(moe_folder, REMOTE_MODELS["moegpt"]):
            pass

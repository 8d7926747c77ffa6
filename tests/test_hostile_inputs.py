"""Hostile inputs other than code-running pickles (issue 12 follow-up): --force never replaces a
folder or file that the converter did not write, broken symlinks, pickles and tensors past the
size limits (zip bombs, stride-zero terabytes), config fields, steps and dtypes of the wrong
type, and the sampler refusing what conversion refuses."""

import os
import struct
import zipfile

import pytest
import torch

import conversion.cli  # conversion.cli.main below
from conversion import outputs as _outputs
from conversion.checkpoints import load_source, torch_payload
from nanomoe import pt_files as _pt_files
from nanomoe.config import MoeGPTConfig, config_from_dict
from nanomoe.errors import ConfigError, ConversionError
from nanomoe.init import init_params
from nanomoe.pt_files import load_checkpoint_file
from nanomoe.pt_source import Source, parse_step

TINY = dict(block_size=8, vocab_size=256, n_layer=1, n_head=2, n_embd=16, n_experts=3,
            n_shared_experts=1, n_activated_experts=2)


def _tiny_pt(path, edit=None, **payload_edits) -> str:
    config = MoeGPTConfig(**TINY)
    payload = torch_payload(Source(config, init_params(config, 0), 3))
    if edit:
        edit(payload["model"])
    payload.update(payload_edits)
    torch.save(payload, path)
    return str(path)


def _cli(argv, capsys) -> tuple[int, str]:
    rc = conversion.cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def test_force_never_replaces_a_training_log(tmp_path, capsys):
    log = tmp_path / "log"
    (log / "checkpoints").mkdir(parents=True)
    for name in ("run.json", "metrics.jsonl", "model_final.pt", "NOTES.txt"):
        (log / name).write_text("keep me")
    pt = _tiny_pt(tmp_path / "m.pt")
    rc, err = _cli(["from-torch", pt, "--out", str(log), "--force"], capsys)
    assert rc == 2 and "run.json" in err and err.count("\n") == 1
    assert sorted(os.listdir(log)) == ["NOTES.txt", "checkpoints", "metrics.jsonl",
                                       "model_final.pt", "run.json"]
    os.remove(log / "run.json")  # still not an earlier output: it holds the user's notes
    rc, err = _cli(["from-torch", pt, "--out", str(log), "--force"], capsys)
    assert rc == 2 and "NOTES.txt" in err and (log / "NOTES.txt").read_text() == "keep me"


def test_force_replaces_only_what_to_hf_writes(tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "NOTES.txt"):
        (out / name).write_text("{}")
    rc, err = _cli(["to-hf", _tiny_pt(tmp_path / "m.pt"), "--out", str(out), "--force"], capsys)
    assert rc == 2 and "NOTES.txt" in err and len(os.listdir(out)) == 3
    os.remove(out / "NOTES.txt")
    (out / "modeling_moegpt.py").write_text("")
    assert _outputs._unexpected(str(out), "folder") is None
    (tmp_path / "j" / "checkpoints").mkdir(parents=True)
    assert _outputs._unexpected(str(tmp_path / "j"), "jax") is None


def test_force_never_replaces_a_zip_that_torch_did_not_write(tmp_path, capsys):
    docx = tmp_path / "report.docx"
    with zipfile.ZipFile(docx, "w") as z:
        z.writestr("[Content_Types].xml", "<x/>")
        z.writestr("word/document.xml", "<w/>")
    before = docx.read_bytes()
    rc, err = _cli(["to-torch", _tiny_pt(tmp_path / "m.pt"), "--out", str(docx), "--force"],
                   capsys)
    assert rc == 2 and "torch.save" in err and docx.read_bytes() == before
    assert _outputs._unexpected(_tiny_pt(tmp_path / "old.pt"), "pt") is None


def test_broken_symlink_as_out_or_input_says_so(tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    rc, err = _cli(["to-torch", _tiny_pt(tmp_path / "m.pt"), "--out", str(link)], capsys)
    assert rc == 2 and "broken symlink" in err
    rc, err = _cli(["to-torch", str(link), "--out", str(tmp_path / "o.pt")], capsys)
    assert rc == 2 and "broken symlink" in err


def test_a_pickle_past_the_limit_is_refused_before_reading_it(tmp_path, monkeypatch):
    legacy = tmp_path / "bytes8.pt"
    legacy.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2**60) + b"abc")
    with pytest.raises(ConversionError, match="larger than"):
        load_checkpoint_file(str(legacy))
    monkeypatch.setattr(_pt_files, "MAX_PICKLE_BYTES", 2000)  # a zip bomb, in small
    bomb = tmp_path / "bomb.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "pad": "x" * 5000}, bomb)
    with pytest.raises(ConversionError, match="larger than"):
        load_checkpoint_file(str(bomb))


def test_stride_zero_tensors_claiming_terabytes_are_refused(tmp_path):
    path = tmp_path / "expand.pt"
    torch.save({"model": {"w": torch.zeros(1).expand(10**6, 10**6)}}, path)
    assert path.stat().st_size < 10**5
    with pytest.raises(ConversionError, match="GiB"):
        load_checkpoint_file(str(path))


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", "1e4"), ("capacity_factor", None), ("route_scale", [1]),
    ("use_bias", "false"), ("n_layer", "1"), ("n_layer", True), ("moe_dispatch", ["capacity"]),
    ("vocab_size", 10**400), ("block_size", 10**12), ("seed", 2**64)])
def test_config_fields_of_the_wrong_type_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        config_from_dict({**TINY, field: value}, "moegpt")
    with pytest.raises(ConfigError, match="model_type"):
        config_from_dict({"model_type": ["moegpt"]})
    assert config_from_dict({**TINY, "rope_scaling": 500}, "moegpt").rope_scaling == 500.0


def test_bad_configs_in_files_are_one_sentence(tmp_path, capsys):
    rc, err = _cli(["to-torch", _tiny_pt(tmp_path / "m.pt", config={
        "model_type": "moegpt", **TINY, "use_bias": "false"}), "--out", str(tmp_path / "o.pt")],
        capsys)
    assert rc == 2 and "use_bias" in err and err.count("\n") == 1
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ConversionError, match="too deeply"):
        _pt_files.read_config_json(str(deep))


@pytest.mark.parametrize("step", [float("nan"), "abc", [1], -1, "1" + "0" * 5000, True])
def test_bad_steps_are_refused(tmp_path, step):
    with pytest.raises(ConversionError, match="step"):
        parse_step(step, "x")
    assert parse_step("5000", "x") == 5000 and parse_step(None, "x") == 0
    with pytest.raises(ConversionError, match="step"):
        load_source(_tiny_pt(tmp_path / "m.pt", step=step), log=lambda *_: None)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.update({"wte.weight": sd["wte.weight"].to(torch.float8_e4m3fn)}),
     "float8"),
    (lambda sd: sd.update({"wte.weight": sd["wte.weight"].to(torch.complex64)}), "complex"),
    (lambda sd: sd.update({5: torch.zeros(1)}), "not a string")])
def test_weights_must_be_floating_point_under_string_keys(tmp_path, edit, match):
    with pytest.raises(ConversionError, match=match):
        load_checkpoint_file(_tiny_pt(tmp_path / "m.pt", edit))


def _sample(argv, capsys):
    from nanomoe.sampling_cli import main
    from nanomoe_torch.sample import generate, load_for_sampling

    rc = main("sample", load_for_sampling,
              lambda m, ids, a, seed: generate(m, ids, a.max_new_tokens, top_k=a.top_k,
                                               temperature=a.temperature, seed=seed), argv)
    return rc, capsys.readouterr()


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.update({"blocks.0.ln1.weight": torch.zeros(3)}), "do not fit"),
    (lambda sd: sd["blocks.0.ln1.weight"].fill_(float("nan")), "non-finite")])
def test_sampler_refuses_what_conversion_refuses(tmp_path, capsys, edit, match):
    rc, out = _sample(["--checkpoint", _tiny_pt(tmp_path / "m.pt", edit), "--prompt", "ab",
                       "--max_new_tokens", "2"], capsys)
    assert rc == 2 and match in out.err and "Traceback" not in out.err


def test_sampler_tiny_temperature_is_greedy_and_huge_seeds_are_refused(tmp_path, capsys):
    pt = _tiny_pt(tmp_path / "m.pt")
    base = ["--checkpoint", pt, "--prompt", "ab", "--max_new_tokens", "3"]
    rc, out = _sample(base + ["--temperature", "1e-300"], capsys)
    rc0, out0 = _sample(base + ["--temperature", "0"], capsys)
    assert rc == rc0 == 0 and out.out == out0.out
    with pytest.raises(SystemExit) as e:
        _sample(base + ["--seed", "99999999999999999999"], capsys)
    assert e.value.code == 2

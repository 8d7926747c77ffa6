"""A JAX checkpoint folder holding NaN/inf weights is refused by everything that reads one: the
sampler and the conversion verbs say the sentence a .pt file gets, naming the first bad weight
under the original's keys, exit 2, no traceback; nothing is written."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nanomoe_jax
from nanomoe.weight_checks import check_finite_arrays
from nanomoe import GPTConfig, MoeGPTConfig
from nanomoe.errors import NanoMoeError
from nanomoe_jax.checkpoint import load_model, save_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = dict(n_layer=2, n_embd=32, n_head=4, block_size=32, vocab_size=256)  # byte tokenizer


def poison_gpt(model):  # layer 1's fused attention input projection
    kernel = model.blocks.attn.c_qkv.kernel
    kernel[...] = kernel[...].at[1, 0, 5].set(jnp.nan)
    return "transformer.h.1.attn.c_attn.weight"


def poison_moe(model):  # one routed expert's output projection in layer 1
    weight = model.blocks.mlp.proj_weight
    weight[...] = weight[...].at[1, 2, 3, 4].set(-jnp.inf)
    return "blocks.1.mlp.impl.proj_weight"


CASES = {"gpt-nan": (GPTConfig(**SIZE), poison_gpt),
         "moe-inf": (MoeGPTConfig(**SIZE, n_experts=4, n_shared_experts=1,
                                  n_activated_experts=2), poison_moe)}


def make_checkpoints(case, tmp_path):
    """(good log folder, bad log folder, the key the sentence must name): a tiny model saved
    with the project's own save_model, loaded back, one weight made non-finite, saved again
    into a new folder."""
    config, poison = CASES[case]
    model = nanomoe_jax.model_class(config)(config, rngs=nnx.Rngs(0))
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    save_model(model, good, step=2, meta={"tokenizer": "byte"})
    loaded, meta = load_model(good)
    key = poison(loaded)
    save_model(loaded, bad, step=meta["step"], meta={"tokenizer": meta["tokenizer"]})
    return good, bad, key


@pytest.fixture(params=list(CASES))
def checkpoints(request, tmp_path):
    return make_checkpoints(request.param, tmp_path)


def sentence(path, key):
    return (f"error: {path}: the weights hold non-finite values (first: {key}); the file is "
            "damaged or its run diverged: use an earlier checkpoint\n")


def run_all(commands):
    """Each command as ``python -m ...`` from the repository, side by side: (rc, out, err)."""
    procs = [subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv in commands]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append((proc.returncode, out, err))
    return results


def test_sampler_and_conversion_refuse_a_jax_checkpoint_with_non_finite_weights(tmp_path):
    good, bad, key = make_checkpoints("gpt-nan", tmp_path)  # each command costs seconds
    step_folder = os.path.join(bad, "checkpoints", "2")
    sample = ["nanomoe_jax.sample", "--max_new_tokens", "4", "--prompt", "Hi"]
    commands = {
        "sample log folder": ([*sample, "--checkpoint", bad], bad),
        "sample step folder": ([*sample, "--checkpoint", step_folder], step_folder),
        "to-torch": (["conversion", "to-torch", bad, "--out", str(tmp_path / "pt")], bad),
        "to-hf": (["conversion", "to-hf", bad, "--out", str(tmp_path / "hf")], bad),
        "compare": (["conversion", "compare", good, bad, "--tokens", "1,2,3"], bad),
    }
    control = [*sample, "--checkpoint", good]
    results = run_all([argv for argv, _ in commands.values()] + [control])
    for (name, (_, path)), (rc, out, err) in zip(commands.items(), results):
        assert rc == 2, (name, rc, out, err)
        assert err == sentence(path, key), (name, err)  # one sentence, no traceback
        assert "--- sample" not in out, (name, out)
    rc, out, err = results[-1]  # the checkpoint it was made from still samples
    assert rc == 0 and out.startswith("--- sample 0\nHi"), (out, err)
    assert not (tmp_path / "pt").exists() and not (tmp_path / "hf").exists()


def test_load_model_names_the_key_as_a_pt_file_does(checkpoints):
    _, bad, key = checkpoints
    with pytest.raises(NanoMoeError) as e:
        load_model(bad)
    assert str(e.value) == sentence(bad, key)[len("error: "):-1]


def test_the_shared_check_counts_bfloat16_and_skips_integers():
    nan16 = np.asarray(jnp.array([1.0, jnp.nan], jnp.bfloat16))
    with pytest.raises(NanoMoeError, match=r"^x: the weights hold non-finite values \(first: b\)"):
        check_finite_arrays({"a": np.ones(2, np.float32), "b": nan16}, "x")
    check_finite_arrays({"a": np.ones(2, np.float32), "i": np.arange(3)}, "x")

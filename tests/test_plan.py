"""execution_options (which kernels on which device) and the GPU plan's HLO accounting.

Everything here runs on CPU. The fake-device tests cover the choice logic; the compile-only
tests need the CUDA plugin (the ``plan`` extra, CI's plan environment) and run where it is
installed: they compile a tiny train step for an RTX 4090 with no GPU present.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from benchmarks import hlo, plan, plan_cli
from benchmarks.targets import GiB, load_target
from nanomoe import GPTConfig, ModernGPTConfig
from nanomoe_jax import execution_options


@dataclasses.dataclass
class FakeDevice:
    platform: str
    device_kind: str
    compute_capability: str | None = None


RTX4090 = FakeDevice("gpu", "NVIDIA GeForce RTX 4090")
GPT = GPTConfig()


def test_flash_attention_on_recent_nvidia_in_bf16():
    for dev in (RTX4090, FakeDevice("gpu", "NVIDIA A100-SXM4-80GB"),
                FakeDevice("gpu", "NVIDIA H100 80GB HBM3"), FakeDevice("gpu", "x", "9.0")):
        opts = execution_options(dev, GPT)
        assert opts.attention_impl == "cudnn" and opts.dtype == jnp.bfloat16, dev


def test_xla_attention_elsewhere():
    # CPU: the attention with its own backward (nanomoe_jax/attention.py)
    assert execution_options(FakeDevice("cpu", "cpu"), GPT).attention_impl == "custom_vjp"
    cases = [
        (FakeDevice("gpu", "Tesla V100-SXM2-16GB"), {}),  # sm_70: no cuDNN flash
        (FakeDevice("gpu", "NVIDIA A10", "7.5"), {}),  # the runtime's own figure wins
        (FakeDevice("gpu", "AMD Instinct MI250X", "gfx90a"), {}),  # not NVIDIA
        (FakeDevice("tpu", "TPU v5 lite"), {}),
        (RTX4090, {"dtype": "float32"}),  # flash needs bf16/fp16
    ]
    for dev, over in cases:
        assert execution_options(dev, GPT, **over).attention_impl == "xla", dev
    assert execution_options(FakeDevice("cpu", "cpu")).dtype == jnp.float32
    # head sizes cuDNN refuses: not a multiple of 8, or over 128
    for n_embd, n_head in ((48, 4), (1024, 4)):
        cfg = ModernGPTConfig(n_embd=n_embd, n_head=n_head, n_kv_head=1, n_layer=1)
        assert execution_options(RTX4090, cfg).attention_impl == "xla"


def test_overrides_win_and_none_means_decide():
    opts = execution_options(RTX4090, GPT, attention_impl="xla", remat="dots",
                             loss_chunk_tokens=None, scan_layers=None)
    assert (opts.attention_impl, opts.remat, opts.loss_chunk_tokens, opts.scan_layers) == (
        "xla", "dots", 8192, True)
    with pytest.raises(TypeError):
        execution_options(RTX4090, GPT, attn="cudnn")


def test_real_cpu_device():
    opts = execution_options(jax.devices()[0], GPT)
    assert opts.attention_impl == "custom_vjp" and opts.dtype == jnp.float32


HLO = """HloModule m

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %wt = f32[8,8]{1,0} constant({...})
  %d = f32[4,8]{1,0} dot(%x, %wt), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %d)
}

ENTRY %main (a: f32[4,8], b: f32[8,16], q: bf16[2,128,4,64]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,16]{1,0} parameter(1)
  %q = bf16[2,128,4,64]{3,2,1,0} parameter(2)
  %c = s32[] constant(0)
  %t0 = (s32[], f32[4,8]{1,0}) tuple(%c, %a)
  %w = (s32[], f32[4,8]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %g = (f32[4,16]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %f = (bf16[2,4,128,64]{3,1,2,0}, f32[2,4,128]{2,1,0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config":{"mask_type":"CAUSAL"}}
  ROOT %r = f32[4,8]{1,0} get-tuple-element(%w), index=1
}
"""


def test_program_stats_counts_loops_and_custom_calls():
    # (instruction names are unique in a module, as XLA prints them)
    s = hlo.program_stats(HLO)
    loop_dot = 3 * 2 * 4 * 8 * 8  # the while body's dot, times the trip count
    gemm = 2 * 4 * 16 * 8  # cuBLAS: 2 x output x contracted size
    flash = 2 * 2 * (2 * 4 * 128 * 128 * 64) / 2  # two causal matmuls
    assert s.flops_by_kind == {"dot": loop_dot, "cublas": gemm, "flash-attention": flash}
    assert s.flops == loop_dot + gemm + flash
    assert s.loops == [("body", 3)]
    assert s.custom_calls == {"__cublas$gemm": 1, "__cudnn$fmhaSoftmax": 1}
    assert s.gemm_backends == {"cublas": 1}
    # the loop's dot runs 3 times: its bytes (operands + result) count 3 times
    dot = [k for k in s.kernels if k[0] == "d"][0]
    assert dot[3] == 4 * (32 + 64 + 32) and dot[4] == 3


def test_analytic_flops_and_bounds():
    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=256, block_size=64)
    xla, flash = (plan.analytic_flops(cfg, 2, 64, f) for f in (False, True))
    assert xla - flash == 6 * 2 * 64 * 64 * 2 * 64  # 12 L C T (full) vs 6 L C T (causal)
    row = {"model": "gpt", "memory": {"peak": 23 * GiB}, "budget_bytes": 22 * GiB,
           "device_kind": "NVIDIA GeForce RTX 4090", "flash_attention": False,
           "flops_ratio": 1.2}
    broken = plan.broken_bounds(row)
    assert len(broken) == 3 and "23.0 GiB" in broken[0] and "1.200 > 1.10" in broken[2]
    assert plan.broken_bounds(dict(row, memory={"peak": GiB}, flash_attention=True,
                                   flops_ratio=1.05)) == []


def test_targets_hold_the_card_facts():
    t = load_target("rtx4090")
    assert t.memory_bytes == 24 * GiB and t.budget_bytes == 22 * GiB
    assert "major: 8" in t.proto_text and "minor: 9" in t.proto_text
    assert load_target("h100").device_kind == "NVIDIA H100 80GB HBM3"
    with pytest.raises(ValueError):
        load_target("rtx9090")


def test_plan_cli_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        plan_cli.parse_args(["--model", "gpt,nope"])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        plan_cli.parse_args(["--set", "n_layer"])
    assert e.value.code == 2


def _has_cuda_plugin() -> bool:
    try:
        from benchmarks.targets import compile_devices

        compile_devices(load_target("rtx4090"))
        return True
    except RuntimeError:
        return False


def test_plan_without_the_plugin_is_one_sentence(capsys, tmp_path):
    if _has_cuda_plugin():
        pytest.skip("the CUDA plugin is installed here; test_compile_only_plan covers it")
    assert plan_cli.main(["--model", "gpt", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot describe a NVIDIA GeForce RTX 4090")


TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, block_size=64)


@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs the plan extra (CUDA plugin); the "
                    "fake-device tests above cover the option logic")
def test_compile_only_plan():
    """A real deviceless compile for the 4090: the options see a compile-only device and pick
    flash attention, and the plan finds the cuDNN kernels and counts them."""
    from benchmarks.targets import compile_devices

    dev = compile_devices(load_target("rtx4090"))[0][0]
    assert execution_options(dev, GPT).attention_impl == "cudnn"
    row = plan.plan("gpt", "rtx4090", B=2, T=64, overrides=TINY)
    assert row["flash_attention"] and row["custom_calls"]["__cudnn$fmhaSoftmaxBackward"] == 2
    assert 0 < row["memory"]["peak"] < GiB
    assert 0.95 < row["flops_ratio"] < 1.5
    xla = plan.plan("gpt", "rtx4090", B=2, T=64, overrides=TINY,
                    options={"attention_impl": "xla"})
    assert not xla["flash_attention"] and not plan.broken_bounds(row)


def test_moe_dispatch_grouped_on_gpus_unless_asked_or_expert_parallel():
    from nanomoe import GPTConfig, MoeGPTConfig

    gpu = FakeDevice("gpu", "NVIDIA GeForce RTX 4090")
    assert execution_options(gpu, MoeGPTConfig()).moe_dispatch == "grouped"
    assert execution_options(gpu, MoeGPTConfig(), moe_dispatch="capacity").moe_dispatch == "capacity"
    assert execution_options(gpu, MoeGPTConfig(), expert_mesh=object()).moe_dispatch is None
    assert execution_options(gpu, GPTConfig()).moe_dispatch is None
    assert execution_options(FakeDevice("cpu", "cpu"), MoeGPTConfig()).moe_dispatch is None

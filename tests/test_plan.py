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
    # the capacity dispatch drops below capacity_factor = routed experts / k (3 / 2 here)
    from nanomoe import MoeGPTConfig

    assert not plan.may_drop(MoeGPTConfig(), "capacity")  # 2.0 >= 1.5
    assert plan.may_drop(MoeGPTConfig(capacity_factor=1.25), "capacity")
    assert not plan.may_drop(MoeGPTConfig(capacity_factor=1.25), "grouped")
    dropping = dict(row, memory={"peak": GiB}, flash_attention=True, flops_ratio=1.05,
                    may_drop=True, config={"capacity_factor": 1.25})
    assert "can drop" in plan.broken_bounds(dropping)[0]


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
    from nanomoe_jax.ragged_gemm import unavailable_reason

    # tokamax's grouped GEMM where it imports, else the padded tiles (tests/test_moe.py)
    picked = "grouped" if unavailable_reason() else "tokamax"
    assert execution_options(gpu, MoeGPTConfig()).moe_dispatch == picked
    assert execution_options(gpu, MoeGPTConfig(), moe_dispatch="capacity").moe_dispatch == "capacity"
    assert execution_options(gpu, MoeGPTConfig(), expert_mesh=object()).moe_dispatch is None
    assert execution_options(gpu, GPTConfig()).moe_dispatch is None
    assert execution_options(FakeDevice("cpu", "cpu"), MoeGPTConfig()).moe_dispatch is None


# --- the accounting: every custom call counted or named, slices charged as slices ---------

def _module(entry: str, comps: str = "", frames: str = "") -> str:
    return f"HloModule m\n\n{frames}\n{comps}\nENTRY %main {entry}\n"


CUSTOM_CALLS = _module("""(x: bf16[64,16], w: bf16[4,16,32], n: s32[4], dy: bf16[64,32]) -> bf16[64,32] {
  %x = bf16[64,16]{1,0} parameter(0)
  %w = bf16[4,16,32]{2,1,0} parameter(1)
  %n = s32[4]{0} parameter(2)
  %dy = bf16[64,32]{1,0} parameter(3)
  %fwd = bf16[64,32]{1,0} custom-call(%x, %w, %n), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/ragged_dot_fwd/pallas_call"}, backend_config={grid_x = 1 : i32, ir = "ML\\EFR(\\00)", name = "ragged_dot_kernel", num_warps = 4 : i32}
  %dw = bf16[4,16,32]{2,1,0} custom-call(%x, %dy, %n), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(f)/gmm_dw/pallas_call"}, backend_config={kernel_hash = "ab", module = "x"}
  %own = bf16[64,32]{1,0} custom-call(%x, %dy), custom_call_target="__gpu$xla.gpu.triton", backend_config={name = "mine", serialized_metadata = "{\\22flops\\22: \\22123\\22}"}
  %sh = bf16[64,32]{1,0} custom-call(%own), custom_call_target="Sharding"
  %odd = bf16[64,32]{1,0} custom-call(%sh), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(f)/softmax_kernel/pallas_call"}
  ROOT %t = (bf16[64,32]{1,0}, bf16[4,16,32]{2,1,0}, bf16[64,32]{1,0}) tuple(%fwd, %dw, %odd)
}""")


def test_custom_calls_are_counted_or_named():
    s = hlo.program_stats(CUSTOM_CALLS)
    gemm = 2 * 64 * 16 * 32  # rows x the two weight dimensions, forward and weight gradient
    assert s.flops_by_kind == {"grouped-gemm": 2 * gemm, "kernel-metadata": 123}
    assert s.flops == 2 * gemm + 123
    assert s.gemm_backends == {"triton-kernel": 1, "mosaic-gpu": 1}  # the GEMM column counts them
    # the kernel nobody can count is named, not silently 0; the Sharding marker needs no count
    assert s.uncounted == {"mosaic_gpu_v2 (softmax_kernel)": 1}
    row = {"model": "moegpt", "memory": {"peak": GiB}, "budget_bytes": 22 * GiB,
           "device_kind": "x", "flash_attention": True, "flops_ratio": 1.0,
           "uncounted": dict(s.uncounted)}
    broken = plan.broken_bounds(row)
    assert len(broken) == 1 and "mosaic_gpu_v2 (softmax_kernel) x1" in broken[0]
    # bytes of a custom call: its operands and results, from their shapes
    fwd = next(k for k in s.kernels if k.name == "fwd")
    assert fwd.bytes == 2 * (64 * 16 + 4 * 16 * 32 + 64 * 32) + 4 * 4


SCAN = _module("""(a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %c0 = s32[] constant(0)
  %zero = f32[] constant(0)
  %stack0 = f32[4,8,16]{2,1,0} broadcast(%zero), dimensions={}
  %init = (s32[], f32[4,8,16]{2,1,0}) tuple(%c0, %stack0)
  %fw = (s32[], f32[4,8,16]{2,1,0}) while(%init), condition=%cond, body=%fwd_body, backend_config={"known_trip_count":{"n":"4"}}
  %st = f32[4,8,16]{2,1,0} get-tuple-element(%fw), index=1
  %init2 = (s32[], f32[4,8,16]{2,1,0}, f32[8,16]{1,0}) tuple(%c0, %st, %a)
  %bw = (s32[], f32[4,8,16]{2,1,0}, f32[8,16]{1,0}) while(%init2), condition=%cond2, body=%bwd_body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%bw), index=2
}""", """%cond (p: (s32[], f32[4,8,16])) -> pred[] {
  %p = (s32[], f32[4,8,16]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%cond2 (p: (s32[], f32[4,8,16], f32[8,16])) -> pred[] {
  %p.2 = (s32[], f32[4,8,16]{2,1,0}, f32[8,16]{1,0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%p.2), index=0
  %n.2 = s32[] constant(4)
  ROOT %lt.2 = pred[] compare(%i.2, %n.2), direction=LT
}

%fused_dus (q0: f32[4,8,16], q1: f32[1,8,16], q2: s32[]) -> f32[4,8,16] {
  %q0 = f32[4,8,16]{2,1,0} parameter(0)
  %q1 = f32[1,8,16]{2,1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %d = f32[4,8,16]{2,1,0} dynamic-update-slice(%q0, %q1, %q2, %z, %z)
}

%fwd_body (p: (s32[], f32[4,8,16])) -> (s32[], f32[4,8,16]) {
  %p.1 = (s32[], f32[4,8,16]{2,1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %stack = f32[4,8,16]{2,1,0} get-tuple-element(%p.1), index=1
  %one = f32[] constant(1)
  %val = f32[1,8,16]{2,1,0} broadcast(%one), dimensions={}
  %upd = f32[4,8,16]{2,1,0} fusion(%stack, %val, %i.1), kind=kLoop, calls=%fused_dus
  ROOT %t.1 = (s32[], f32[4,8,16]{2,1,0}) tuple(%i.1, %upd)
}

%fused_read (r0: f32[4,8,16], r1: s32[], r2: f32[8,16]) -> f32[8,16] {
  %r0 = f32[4,8,16]{2,1,0} parameter(0)
  %r1 = s32[] parameter(1)
  %r2 = f32[8,16]{1,0} parameter(2)
  %z.1 = s32[] constant(0)
  %flat = f32[4,128]{1,0} bitcast(%r0)
  %s = f32[1,128]{1,0} dynamic-slice(%flat, %r1, %z.1), dynamic_slice_sizes={1,128}
  %s2 = f32[8,16]{1,0} bitcast(%s)
  ROOT %add = f32[8,16]{1,0} add(%s2, %r2)
}

%bwd_body (p: (s32[], f32[4,8,16], f32[8,16])) -> (s32[], f32[4,8,16], f32[8,16]) {
  %p.3 = (s32[], f32[4,8,16]{2,1,0}, f32[8,16]{1,0}) parameter(0)
  %i.3 = s32[] get-tuple-element(%p.3), index=0
  %stack.3 = f32[4,8,16]{2,1,0} get-tuple-element(%p.3), index=1
  %acc = f32[8,16]{1,0} get-tuple-element(%p.3), index=2
  %r = f32[8,16]{1,0} fusion(%stack.3, %i.3, %acc), kind=kLoop, calls=%fused_read
  ROOT %t.3 = (s32[], f32[4,8,16]{2,1,0}, f32[8,16]{1,0}) tuple(%i.3, %stack.3, %r)
}
""")


def test_scan_slices_are_charged_as_slices_and_tagged_residuals():
    s = hlo.program_stats(SCAN)
    read = next(k for k in s.kernels if k.name == "r")
    # the stack is read through bitcast + dynamic-slice: one (8, 16) slice per iteration,
    # not the whole (4, 8, 16) stack every time
    assert read.mult == 4 and [p.bytes for p in read.parts] == [512, 4, 512, 512]
    assert [p.residual for p in read.parts] == [True, False, False, False]
    write = next(k for k in s.kernels if k.name == "upd")
    # in place: the update is read and written, the stack it goes into is not read
    assert [p.bytes for p in write.parts] == [0, 512, 4, 512]
    assert [p.residual for p in write.parts] == [False, False, False, True]


FRAMES = """FileNames
1 "/x/nanomoe_jax/layers.py"
2 "/x/nanomoe_jax/moe.py"

FunctionNames
1 "run_stack"
2 "MoE.__call__"
3 "tile_layout"

FileLocations
1 {file_name_id=1 function_name_id=1 line=1 end_line=1 column=1 end_column=9}
2 {file_name_id=2 function_name_id=2 line=5 end_line=5 column=1 end_column=9}
3 {file_name_id=2 function_name_id=3 line=9 end_line=9 column=1 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}
"""

MOE = _module("""(w: f32[2,6,4], g: s32[5], a: f32[5,6,4], r: f32[40,4], ri: s32[30,1]) -> f32[5,6,6] {
  %w = f32[2,6,4]{2,1,0} parameter(0)
  %g = s32[5]{0} parameter(1)
  %a = f32[5,6,4]{2,1,0} parameter(2)
  %r = f32[40,4]{1,0} parameter(3)
  %ri = s32[30,1]{1,0} parameter(4)
  %rows = f32[5,6,4]{2,1,0} fusion(%r, %ri), kind=kLoop, calls=%fused_rows, metadata={op_name="jit(f)/gather" stack_frame_id=2}
  %tiles = f32[5,6,4]{2,1,0} fusion(%w, %g), kind=kLoop, calls=%fused_gather, metadata={op_name="jit(f)/gather" stack_frame_id=2}
  %h = f32[5,6,4]{2,1,0} fusion(%a), kind=kLoop, calls=%fused_act, metadata={op_name="jit(f)/exp" stack_frame_id=3}
  %hb = f32[5,6,4]{2,1,0} bitcast(%h)
  %mm = f32[5,6,6]{2,1,0} fusion(%tiles, %hb), kind=kCustom, calls=%fused_mm, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %cp = f32[5,6,6]{2,1,0} copy(%mm)
  %other = f32[5,6,4]{2,1,0} fusion(%a), kind=kLoop, calls=%fused_other
  ROOT %t = (f32[5,6,6]{2,1,0}, f32[5,6,4]{2,1,0}, f32[5,6,4]{2,1,0}) tuple(%cp, %other, %rows)
}""", """%fused_rows (r0: f32[40,4], i0: s32[30,1]) -> f32[5,6,4] {
  %r0 = f32[40,4]{1,0} parameter(0)
  %i0 = s32[30,1]{1,0} parameter(1)
  %rg = f32[30,4]{1,0} gather(%r0, %i0), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,4}, metadata={op_name="jit(f)/gather" stack_frame_id=2}
  ROOT %rr = f32[5,6,4]{2,1,0} bitcast(%rg)
}

%fused_gather (w0: f32[2,6,4], g0: s32[5]) -> f32[5,6,4] {
  %w0 = f32[2,6,4]{2,1,0} parameter(0)
  %g0 = s32[5]{0} parameter(1)
  %g1 = s32[5,1]{1,0} bitcast(%g0)
  ROOT %x = f32[5,6,4]{2,1,0} gather(%w0, %g1), offset_dims={1,2}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,6,4}, metadata={op_name="jit(f)/gather" stack_frame_id=2}
}

%fused_act (a0: f32[5,6,4]) -> f32[5,6,4] {
  %a0 = f32[5,6,4]{2,1,0} parameter(0)
  ROOT %e = f32[5,6,4]{2,1,0} exponential(%a0), metadata={op_name="jit(f)/exp" stack_frame_id=3}
}

%fused_mm (t0: f32[5,6,4], h0: f32[5,6,4]) -> f32[5,6,6] {
  %t0 = f32[5,6,4]{2,1,0} parameter(0)
  %h0 = f32[5,6,4]{2,1,0} parameter(1)
  ROOT %d = f32[5,6,6]{2,1,0} dot(%h0, %t0), lhs_batch_dims={0}, rhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_contracting_dims={2}, metadata={op_name="jit(f)/grouped_gemm/dot_general" stack_frame_id=2}
}

%fused_other (o0: f32[5,6,4]) -> f32[5,6,4] {
  %o0 = f32[5,6,4]{2,1,0} parameter(0)
  ROOT %e2 = f32[5,6,4]{2,1,0} exponential(%o0), metadata={op_name="jit(f)/exp" stack_frame_id=1}
}
""", FRAMES)


def test_tile_fusions_count_as_gemm_kernels():
    s = hlo.program_stats(MOE)
    assert s.gemm_backends == {"triton": 1}  # the tile matmul of a grouped GEMM is a GEMM too
    assert s.flops_by_kind == {"grouped-gemm": 2 * 5 * 6 * 6 * 4}


def test_moe_kernels_from_the_python_stack():
    from benchmarks import hlo_moe

    s = hlo.program_stats(MOE)
    assert s.frames[3] == [("/x/nanomoe_jax/moe.py", "tile_layout"),
                           ("/x/nanomoe_jax/moe.py", "MoE.__call__"),
                           ("/x/nanomoe_jax/layers.py", "run_stack")]
    names = {s.kernels[i].name for i in hlo_moe.moe_kernels(s)}
    # mm has no frame of its own but a grouped_gemm op; cp only copies an MoE value
    assert names == {"tiles", "h", "mm", "cp", "rows"}


def test_moe_bytes_split_tile_weights_from_activations_of_the_same_shape():
    from types import SimpleNamespace

    from benchmarks import hlo_moe

    cfg = SimpleNamespace(n_embd=4, expert_hidden=6, n_total_experts=3, n_routed_experts=2,
                          n_shared=1, n_layer=1, n_activated_experts=1)
    m = hlo_moe.moe_bytes(hlo.program_stats(MOE), cfg)
    tile = 5 * 6 * 4 * 4  # one (5 tiles, 6, 4) f32 copy of the weights
    # the gather reads and writes the per-tile copies, the GEMM reads them
    assert m["tile_weights"] == 3 * tile
    # the activation h has the same shape but is no weight: the GEMM's other operand
    assert m["matmul"] == tile + 5 * 6 * 6 * 4
    # exp in and out, the copy in and out, the gather's tile -> expert indices, and a gather
    # of activation rows whose result has a weight tile's shape: it reads no weight tile
    rows = 30 * 4 * 4 + 30 * 4 + tile
    assert m["glue"] == 2 * tile + 2 * 5 * 6 * 6 * 4 + 5 * 4 + rows
    assert m["glue_parts"] == {"gathers/scatters/padding": 5 * 4 + rows,
                               "other": 2 * tile + 2 * 5 * 6 * 6 * 4}
    assert m["residuals"] == 0 and m["total"] == sum(m[p] for p in hlo_moe.PARTS)
    assert m["top_kernels"][0]["kernel"] == "mm"


def test_moe_minimum_bytes_formula():
    from benchmarks import hlo_moe
    from nanomoe import MoeGPTConfig

    # 8 layers; routed: M = 16384 x 2 rows, F = 1024, 3 experts; shared: M = 16384, F = 1024
    routed = 12 * 32768 * (512 + 1024) + 16 * 3 * 1024 * 512
    shared = 12 * 16384 * (512 + 1024) + 16 * 1024 * 512
    assert hlo_moe.min_moe_bytes(MoeGPTConfig(), 16, 1024) == 8 * (routed + shared)
    assert abs(8 * (routed + shared) / 1e9 - 7.52) < 0.01


def test_mfu_ratio_against_gpt():
    rows = [{"model": "gpt", "estimate": {"mfu_bound": 0.5}},
            {"model": "moegpt", "estimate": {"mfu_bound": 0.3}}, {"model": "x", "error": "e"}]
    plan.add_mfu_ratios(rows)
    assert rows[1]["estimate"]["mfu_vs_gpt"] == pytest.approx(0.6)
    assert rows[0]["estimate"]["mfu_vs_gpt"] == 1.0


def test_plan_writes_outside_the_repository_by_default():
    assert plan_cli.parse_args([]).out is None  # main() then writes to results_dir.default_out()
    assert plan_cli.parse_args(["--out", "benchmarks/results"]).out == "benchmarks/results"


@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs the plan extra (CUDA plugin)")
def test_compiled_pallas_triton_kernel_is_counted_from_metadata_or_named():
    """A real Pallas (Triton) kernel compiled for the 4090 without a GPU: the plan reads its
    ``flops`` metadata, and without it names the kernel as uncounted."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    from jax.sharding import SingleDeviceSharding

    from benchmarks.targets import compile_devices

    dev = compile_devices(load_target("rtx4090"))[0][0]

    def kernel(x_ref, y_ref, o_ref):
        o_ref[...] = jnp.dot(x_ref[...], y_ref[...], preferred_element_type=jnp.float32)

    def grouped(x_ref, w_ref, o_ref):  # one group: enough to compile a "ragged_dot" kernel
        o_ref[...] = jnp.dot(x_ref[...], w_ref[0], preferred_element_type=jnp.float32)

    def stats(body, metadata, name, w_shape=(16, 32)):
        call = pl.pallas_call(body, out_shape=jax.ShapeDtypeStruct((64, 32), jnp.float32),
                              compiler_params=plgpu.CompilerParams(num_warps=4),
                              metadata=metadata, name=name)
        args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=SingleDeviceSharding(dev))
                for s in ((64, 16), w_shape)]
        with jax.default_device(dev):
            return hlo.program_stats(jax.jit(call).lower(*args).compile().as_text())

    counted = stats(kernel, {"flops": str(2 * 64 * 32 * 16)}, "tiny_matmul")
    assert counted.flops == 2 * 64 * 32 * 16 and not counted.uncounted
    assert stats(kernel, None, "tiny_matmul").uncounted == {
        "__gpu$xla.gpu.triton (tiny_matmul)": 1}
    # a grouped-GEMM kernel (tokamax's are named ragged_dot...): counted from its shapes
    ragged = stats(grouped, None, "ragged_dot_fwd", (1, 16, 32))
    assert ragged.flops_by_kind == {"grouped-gemm": 2 * 64 * 16 * 32} and not ragged.uncounted


@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs the plan extra (CUDA plugin)")
def test_plan_cli_writes_to_the_user_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOMOE_RESULTS", str(tmp_path / "cache"))
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    assert plan_cli.main(["--model", "gpt", "--B", "2", "--T", "64", "--check", *sets]) == 0
    assert (tmp_path / "cache" / "plan-rtx4090.md").exists()
    assert "uncounted kernels" in (tmp_path / "cache" / "plan-rtx4090.md").read_text()


def test_moe_kernels_include_backward_passes_traced_outside_the_layer():
    """A custom VJP's backward (ragged_gemm.py) and tokamax's kernels have no MoE.__call__
    frame above them: their files say they are the MoE layer's."""
    from benchmarks import hlo_moe

    frames = {1: [("/v/site-packages/tokamax/_src/ops/ragged_dot/pallas_triton.py", "kernel"),
                  ("/r/nanomoe/train.py", "train_step")],
              2: [("/r/nanomoe_jax/ragged_gemm.py", "_mlp_bwd")],
              3: [("/r/nanomoe_jax/attention.py", "causal_attention")]}
    kernels = [hlo.Kernel(f"k{i}", "fusion", 0.0, 1.0, 1, frames=frozenset({i}),
                          ops=frozenset({"multiply"})) for i in (1, 2, 3)]
    stats = hlo.ProgramStats(kernels=kernels, frames=frames)
    assert hlo_moe.moe_kernels(stats) == {0, 1}


def test_op_names_with_escaped_quotes_are_read_whole():
    text = _module("""(x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %y = f32[4]{0} custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/moe_ffn/tokamax:{\\"k\\": 1}/ragged_dot/pallas_call" stack_frame_id=7}
}""")
    y = hlo.parse_module(text)["main"].instrs[-1]
    assert y.op_name == 'jit(f)/moe_ffn/tokamax:{\\"k\\": 1}/ragged_dot/pallas_call'
    assert y.frame == 7

"""The plan's HLO accounting (benchmarks/hlo.py) on hand-written modules: FLOPs of loops, dots
and custom calls (cuBLAS, cuDNN flash attention, grouped-GEMM kernels), every custom call
counted or named, slices of a scanned stack charged as slices, op names read whole."""

from __future__ import annotations

import pytest

from benchmarks import hlo, hlo_text, plan
from benchmarks.targets import GiB


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
    # the GEMM column counts them, and a kernel stating its (matmul) FLOPs: ours (gather_gemm)
    assert s.gemm_backends == {"triton-kernel": 2, "mosaic-gpu": 1}
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


def test_op_names_with_escaped_quotes_are_read_whole():
    text = _module("""(x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %y = f32[4]{0} custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/moe_ffn/tokamax:{\\"k\\": 1}/ragged_dot/pallas_call" stack_frame_id=7}
}""")
    y = hlo_text.parse_module(text)["main"].instrs[-1]
    assert y.op_name == 'jit(f)/moe_ffn/tokamax:{\\"k\\": 1}/ragged_dot/pallas_call'
    assert y.frame == 7


def test_a_gather_through_a_convert_is_charged_its_elements_not_the_table():
    """The loss's target logits: one element per row gathered from the fp32 cast of bf16
    (rows, V) logits, fused, reads those elements; a cast that is also summed reads all."""
    def module(reduced: str) -> str:
        comps = f"""%add (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}}

%fused (p0: bf16[64,1000], p1: s32[64,1]) -> (f32[64,1], f32[64]) {{
  %p0 = bf16[64,1000]{{1,0}} parameter(0)
  %p1 = s32[64,1]{{1,0}} parameter(1)
  %f = f32[64,1000]{{1,0}} convert(%p0)
  %g = f32[64,1]{{1,0}} gather(%f, %p1), offset_dims={{}}, collapsed_slice_dims={{0,1}}, start_index_map={{1}}, index_vector_dim=1, slice_sizes={{1,1}}
  %z = f32[] constant(0)
  %r = f32[64]{{0}} reduce({reduced}, %z), dimensions={{1}}, to_apply=%add
  ROOT %t = (f32[64,1]{{1,0}}, f32[64]{{0}}) tuple(%g, %r)
}}"""
        return _module("""(x: bf16[64,1000], i: s32[64,1]) -> (f32[64,1], f32[64]) {
  %x = bf16[64,1000]{1,0} parameter(0)
  %i = s32[64,1]{1,0} parameter(1)
  ROOT %fus = (f32[64,1]{1,0}, f32[64]{0}) fusion(%x, %i), kind=kLoop, calls=%fused
}""", comps)

    def x_read(text):
        return next(k for k in hlo.program_stats(text).kernels if k.name == "fus").parts[0].bytes

    assert x_read(module("%g")) == 64 * 4  # the gathered elements (as the fp32 they become)
    assert x_read(module("%f")) == 64 * 1000 * 2  # the whole bf16 table


def test_charge_rows_scales_grouped_gemms_rows_not_weights():
    """An expert mesh's grouped GEMMs charged for the rows received, not every slot: FLOPs and
    the row operands scale, the weights and XLA's own kernels (which run every slot) do not."""
    from benchmarks.hlo import Kernel, ProgramStats, charge_rows
    from benchmarks.hlo_bytes import Part

    slots, rows = 1000, 250.0
    rows_in = Part(2.0 * (slots + 128) * 64, [("bf16", (slots + 128, 64))])
    weight = Part(2.0 * 64 * 32 * 4, [("bf16", (4, 64, 32))])
    rows_out = Part(2.0 * (slots + 128) * 32 + 4 * 8 * (slots + 128),
                    [("bf16", (slots + 128, 32)), ("f32", (8, slots + 128))])
    gemm = Kernel("g", "custom-call", 2.0 * (slots + 128) * 64 * 32, 0.0, 3,
                  parts=(rows_in, weight, rows_out), op_names=("jit(step)/received_rows/x",))
    gemm = gemm._replace(bytes=sum(p.bytes for p in gemm.parts))
    fusion = gemm._replace(name="f", op="fusion")
    elsewhere = gemm._replace(name="o", op_names=("jit(step)/moe/x",))
    stats = ProgramStats(flops=3 * 3 * gemm.flops, kernels=[gemm, fusion, elsewhere])
    out = charge_rows(stats, "received_rows", slots, rows)
    share = rows / (slots + 128)
    g, f, o = out.kernels
    assert g.flops == pytest.approx(gemm.flops * share)
    assert g.bytes == pytest.approx((rows_in.bytes + rows_out.bytes) * share + weight.bytes)
    assert (f, o) == (fusion, elsewhere)
    assert out.flops == pytest.approx(stats.flops - 3 * gemm.flops * (1 - share))

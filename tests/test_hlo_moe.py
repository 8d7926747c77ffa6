"""The MoE layers' share of the plan's HLO accounting (benchmarks/hlo_moe.py): which kernels are
the MoE layer's (from the Python stack, backward passes included), the bytes they move by part,
and the minimum bytes formula."""

from __future__ import annotations

from benchmarks import hlo


def _module(entry: str, comps: str = "", frames: str = "") -> str:
    return f"HloModule m\n\n{frames}\n{comps}\nENTRY %main {entry}\n"


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


def test_gathers_from_a_cached_table_are_charged_the_table_once(monkeypatch):
    """A gather reads its rows, but never more than the table when the table fits the cache
    (a bias per expert gathered for every token); above CACHED_BYTES, every row it reads."""
    from benchmarks import hlo_bytes

    def gather_read():
        k = next(k for k in hlo.program_stats(MOE).kernels if k.name == "tiles")
        return k.parts[0].bytes  # (5 tiles, 6, 4) f32 gathered from a (2, 6, 4) table

    assert gather_read() == 2 * 6 * 4 * 4
    monkeypatch.setattr(hlo_bytes, "CACHED_BYTES", 2 * 6 * 4 * 4 - 1)
    assert gather_read() == 5 * 6 * 4 * 4


def test_moe_bytes_split_tile_weights_from_activations_of_the_same_shape(monkeypatch):
    from types import SimpleNamespace

    from benchmarks import hlo_bytes, hlo_moe

    # tables this small would count as cached (read once): the split is what is tested here
    monkeypatch.setattr(hlo_bytes, "CACHED_BYTES", 0)

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


def test_the_optimizer_pass_is_not_the_moe_layer_even_with_a_gradient_cast_fused_in():
    """Unrolled, the last op of an expert weight's gradient (its cast to fp32, traced in
    ragged_gemm.py) fuses into AdamW's pass over that weight: that kernel is the optimizer's."""
    from benchmarks import hlo_moe

    frames = {1: [("/r/nanomoe_jax/ragged_gemm.py", "_bwd")],
              2: [("/v/site-packages/optax/_src/transform.py", "update_fn")]}
    kernels = [hlo.Kernel("grad", "fusion", 0.0, 1.0, 1, frames=frozenset({1}),
                          ops=frozenset({"multiply"})),
               hlo.Kernel("adamw", "fusion", 0.0, 1.0, 1, frames=frozenset({1, 2}),
                          ops=frozenset({"multiply", "select"}))]
    assert hlo_moe.moe_kernels(hlo.ProgramStats(kernels=kernels, frames=frames)) == {0}

"""The GPU plan (python -m benchmarks.plan): analytic FLOPs and the bounds a row must keep, the
card targets, the command line, and where results go.

Everything here runs on CPU. The compile-only tests need the CUDA plugin (the ``plan`` extra,
CI's plan environment) and run where it is installed: they compile a tiny train step for an
RTX 4090 with no GPU present.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks import hlo, plan, plan_cli
from benchmarks.targets import GiB, load_target
from nanomoe import GPTConfig
from nanomoe_jax import execution_options


GPT = GPTConfig()


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
    row = plan.plan("gpt", "rtx4090", B=2, T=64, overrides=TINY, A=1)
    assert row["flash_attention"] and row["custom_calls"]["__cudnn$fmhaSoftmaxBackward"] == 2
    assert 0 < row["memory"]["peak"] < GiB
    assert 0.95 < row["flops_ratio"] < 1.5
    xla = plan.plan("gpt", "rtx4090", B=2, T=64, overrides=TINY,
                    options={"attention_impl": "xla"}, A=1)
    assert not xla["flash_attention"] and not plan.broken_bounds(row)


@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs the plan extra (CUDA plugin)")
def test_plan_compiles_the_recipes_accumulation():
    """By default the plan's step is train.py's on one card: total_batch_size / (B T)
    micro-batches in a loop, then one update; the FLOPs count them all, the MFU is the
    step's, and the per-micro-batch time is the step's over A."""
    assert plan.recipe_accumulation(16, 1024) == 16 and plan.recipe_accumulation(2, 64) == 2048
    one = plan.plan("gpt", "rtx4090", B=2, T=64, overrides=TINY, A=1)
    four = plan.plan("gpt", "rtx4090", B=2, T=64, overrides=TINY, A=4)
    assert four["A"] == 4 and four["compiled_flops"] == pytest.approx(4 * one["compiled_flops"])
    assert four["flops_ratio"] == pytest.approx(one["flops_ratio"])
    e1, e4 = one["estimate"], four["estimate"]
    assert e4["micro_batch_s"] == pytest.approx(e4["step_s"] / 4)
    # the update is paid once: four micro-batches cost less than four one-micro-batch steps
    assert e1["step_s"] < e4["step_s"] < 4 * e1["step_s"]
    assert e4["mfu_bound"] > e1["mfu_bound"]


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
def test_gather_kernels_compile_and_are_charged_their_rows():
    """The MoE layer's row-gathering GEMMs (nanomoe_jax/gather_gemm.py, the one with relu^2's
    gradient in its epilogue too) compile for the 4090 and the h100 without a GPU, and the plan
    counts each: its FLOPs from its metadata, and its gathered operand as the rows it reads
    (P x K), not the table (T x K) it reads them from."""
    from jax.sharding import SingleDeviceSharding

    from benchmarks.targets import compile_devices
    from nanomoe_jax.gather_gemm import gather_dot, gather_dot_relu2_grad, gather_wgrad

    T, K, N, G, P = 256, 64, 128, 3, 1000
    for target in ("rtx4090", "h100"):
        dev = compile_devices(load_target(target))[0][0]

        def sds(shape, dtype=jnp.bfloat16):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(dev))

        def dot(x, idx, w, counts):
            return gather_dot(x, idx, w, counts, jnp.bfloat16, use_kernel=True)

        def wgrad(a, x, idx, counts):
            return gather_wgrad(a, x, idx, counts, "b", colsum=True, use_kernel=True)

        def relu2_grad(x, idx, w, h, gate, counts):
            return gather_dot_relu2_grad(x, idx, w, counts, h, gate, use_kernel=True)

        for fn, args in ((dot, (sds((T, K)), sds((P,), jnp.int32), sds((G, K, N)))),
                         (wgrad, (sds((P, N)), sds((T, K)), sds((P,), jnp.int32))),
                         (relu2_grad, (sds((T, K)), sds((P,), jnp.int32), sds((G, K, N)),
                                       sds((P, N)), sds((P,), jnp.float32)))):
            with jax.default_device(dev):
                text = jax.jit(fn).lower(*args, sds((G,), jnp.int32)).compile().as_text()
            s = hlo.program_stats(text)
            (k,) = [k for k in s.kernels if k.op == "custom-call"]
            assert not s.uncounted and k.flops == 2 * P * K * N
            table = next(p for p in k.parts if p.sliced)
            assert table.bytes == P * K * 2 and table.shapes == [("bf16", (P, K))]


@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs the plan extra (CUDA plugin)")
def test_fused_expert_kernels_compile_at_moegpt64_widths_and_are_counted():
    """The MoE layer's fused kernels (mlp_gemm, dout_gemm, dv_gemm) at MoeGPT-64's widths
    (C 512, H 256) compile for the 4090 and the h100 without a GPU (Triton's shared-memory
    limit is checked there: 99 KiB on sm_89), bf16 rows with fp32 weights (as meshes and
    scanned layers pass them; the MLP also with bf16 ones, as one device's unrolled layers
    do), and the plan counts each: both GEMMs' FLOPs from its metadata,
    its gathered operand as the P x C rows it reads."""
    f32 = jnp.float32
    from jax.sharding import SingleDeviceSharding

    from benchmarks.targets import compile_devices
    from nanomoe_jax.dout_gemm import relu2_grad_wgrad
    from nanomoe_jax.dv_gemm import dv_grads
    from nanomoe_jax.mlp_gemm import expert_mlp

    T, C, H, G, P = 512, 512, 256, 64, 2000  # 64 experts: MoeGPT-64 on one device
    for target in ("rtx4090", "h100"):
        dev = compile_devices(load_target(target))[0][0]

        def sds(shape, dtype=jnp.bfloat16):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(dev))

        idx, counts = sds((P,), jnp.int32), sds((G,), jnp.int32)
        cases = (
            (lambda x, i, w1, b1, w2, n: expert_mlp(x, i, w1, b1, w2, n, use_kernel=True),
             (sds((T, C)), idx, sds((G, H, C), f32), sds((G, H), f32), sds((G, C, H), f32),
              counts)),
            (lambda x, i, w1, b1, w2, n: expert_mlp(x, i, w1, b1, w2, n, use_kernel=True),
             (sds((T, C)), idx, sds((G, H, C)), sds((G, H), f32), sds((G, C, H)), counts)),
            (lambda d, i, w2, h, g, n: relu2_grad_wgrad(d, i, w2, n, h, g, jnp.bfloat16, True),
             (sds((T, C)), idx, sds((G, C, H), f32), sds((P, H)), sds((P,), f32), counts)),
            (lambda dv, x, i, w1, n: dv_grads(dv, x, i, w1, n, jnp.bfloat16, True),
             (sds((P, H)), sds((T, C)), idx, sds((G, H, C), f32), counts)))
        for fn, args in cases:
            with jax.default_device(dev):
                text = jax.jit(fn).lower(*args).compile().as_text()
            s = hlo.program_stats(text)
            (k,) = [k for k in s.kernels if k.op == "custom-call"]
            assert not s.uncounted and k.flops == 4 * P * C * H
            assert s.flops_by_kind == {"grouped-gemm": 4 * P * C * H}  # the plan's column
            table = next(p for p in k.parts if p.sliced)
            assert table.bytes == P * C * 2 and table.shapes == [("bf16", (P, C))]


@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs the plan extra (CUDA plugin)")
def test_moe_experts_compile_for_the_4090_fused_in_bf16_separate_in_fp32():
    """MoeGPT-64's routed experts, forward and backward, compiled for sm_89: bf16 runs the
    fused kernels, fp32 the separate ones (the fused kernels' fp32 blocks overflow its 99 KiB
    of shared memory, which failed the compile before ``ragged_gemm.fused`` checked the
    dtype)."""
    from jax.sharding import SingleDeviceSharding

    from benchmarks.targets import compile_devices
    from nanomoe_jax import ragged_gemm
    from nanomoe_jax.moe import sort_assignments

    dev = compile_devices(load_target("rtx4090"))[0][0]
    N, k, E, C, H = 1024, 8, 64, 512, 256

    def sds(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(dev))

    fused = {"expert_mlp", "dout_gemm", "dv_gemm"}
    for dt in (jnp.bfloat16, jnp.float32):
        def loss(x, gates, idx, params, dt=dt):
            y = ragged_gemm.experts(x.astype(dt), gates, idx, sort_assignments(idx, E), params)
            return jnp.sum(y.astype(jnp.float32))

        args = (sds((N, C)), sds((N, k)), sds((N, k), jnp.int32),
                [sds((E, H, C)), sds((E, H)), sds((E, C, H)), sds((E, C))])
        with ragged_gemm.compiling_for(dev):
            text = jax.jit(jax.grad(loss, argnums=(0, 3))).lower(*args).compile().as_text()
        names = {n for n in fused | {"gather_dot", "gather_wgrad"} if f'name = "{n}' in text}
        assert names == (fused if dt == jnp.bfloat16 else {"gather_dot", "gather_wgrad"}), dt


@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs the plan extra (CUDA plugin)")
def test_plan_cli_writes_to_the_user_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOMOE_RESULTS", str(tmp_path / "cache"))
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    assert plan_cli.main(["--model", "gpt", "--B", "2", "--T", "64", "--check", *sets]) == 0
    assert (tmp_path / "cache" / "plan-rtx4090.md").exists()
    assert "uncounted kernels" in (tmp_path / "cache" / "plan-rtx4090.md").read_text()

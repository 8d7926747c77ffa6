"""Expert parallelism at the routed rows (nanomoe_jax/expert_parallel.py).

On one device: with a capacity that cannot drop, the expert-parallel math equals the MoE's
single-device capacity dispatch. On 8 simulated CPU devices (a subprocess: XLA's device count
is fixed when JAX starts): the mesh's outputs, drops and gradients equal the same function on
one device with ``groups=X`` (its capacity semantics, per slice and destination device, differ
from capacity_dispatch's per-expert slots, so that is the reference), and the compiled program
moves tokens with all-to-all, never gathering expert weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanomoe.config import MoeGPTConfig
from nanomoe_jax.expert_parallel import device_capacity, expert_parallel_dispatch, send_layout
from nanomoe_jax.expert_mlps import gated_sum, shared_experts
from nanomoe_jax.moe import capacity_dispatch, route

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(c: MoeGPTConfig, N: int, seed: int = 0):
    E, H, C = c.n_total_experts, c.expert_hidden, c.n_embd
    ks = jax.random.split(jax.random.key(seed), 6)
    x_NC = jax.random.normal(ks[0], (N, C))
    gate_CE = jax.random.normal(ks[1], (C, E))
    w = [jax.random.normal(ks[2], (E, H, C)) / C ** 0.5, jax.random.normal(ks[3], (E, H)) * 0.1,
         jax.random.normal(ks[4], (E, C, H)) / H ** 0.5, jax.random.normal(ks[5], (E, C)) * 0.1]
    return x_NC, gate_CE, w


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_dropless_equals_single_device_capacity(groups):
    c = MoeGPTConfig(n_embd=16, n_experts=8, n_activated_experts=2, capacity_factor=3.5,
                     expert_dim=24)
    x_NC, gate_CE, w = _inputs(c, 40)
    r = route(x_NC @ gate_CE, c)
    got, dropped = expert_parallel_dispatch(x_NC, r, w, c, groups=groups)
    S = c.n_shared
    want = shared_experts(x_NC, r.gates_NE[:, :S], [a[:S] for a in w])
    want = want + capacity_dispatch(x_NC, r, [a[S:] for a in w], c.capacity(40))[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(dropped) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_sum_keeps_rows_in_their_dtype_and_matches_autodiff(dtype):
    """The gated sum's own VJP (y kept in its dtype, the drop mask per row) against autodiff
    of the plain formula; dropped rows hold huge (finite) values that must reach neither the
    output nor a gradient."""
    N, K, C = 24, 3, 16
    ks = jax.random.split(jax.random.key(3), 4)
    y_AC = jax.random.normal(ks[0], (N * K, C)).astype(dtype)
    kept_A = jax.random.uniform(ks[1], (N * K,)) < 0.7
    y_AC = jnp.where(kept_A[:, None], y_AC, jnp.asarray(3e38, dtype))   # garbage where dropped
    gates_NK = jax.random.uniform(ks[2], (N, K))
    dout_NC = jax.random.normal(ks[3], (N, C))

    def plain(y, g):
        y32 = jnp.where(kept_A[:, None], y.astype(jnp.float32), 0.0).reshape(N, K, C)
        return jnp.einsum("nk,nkc->nc", g, y32)

    def loss(f):
        return lambda y, g: jnp.sum(f(y, g) * dout_NC)

    got = jax.grad(loss(lambda y, g: gated_sum(y, kept_A, g)), argnums=(0, 1))(y_AC, gates_NK)
    want = jax.grad(loss(plain), argnums=(0, 1))(y_AC, gates_NK)
    np.testing.assert_array_equal(gated_sum(y_AC, kept_A, gates_NK), plain(y_AC, gates_NK))
    assert got[0].dtype == dtype and bool(jnp.all(jnp.isfinite(got[1])))
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got[1]).max()) > 0 and bool(jnp.all(got[0][~kept_A] == 0))


def test_gated_sum_saves_the_rows_once_in_their_dtype(capsys):
    """What the backward keeps: the rows as they came (bf16) and a mask per row, not an fp32
    copy of the rows and a mask as wide as a row (autodiff of the plain formula keeps both)."""
    from jax.ad_checkpoint import print_saved_residuals

    y_AC, kept_A = jnp.ones((72, 16), jnp.bfloat16), jnp.ones((72,), bool)
    print_saved_residuals(lambda y, g: gated_sum(y, kept_A, g), y_AC, jnp.ones((24, 3)))
    saved = capsys.readouterr().out
    assert "bf16[72,16]" in saved and "bool[72]" in saved, saved
    assert "f32[72,16]" not in saved and "f32[24,3,16]" not in saved, saved
    assert "bool[72,16]" not in saved, saved


def test_capacity_keeps_earlier_tokens_per_device():
    """Slice of 6 tokens, 4 experts (1 shared), 2 devices of 2 experts, k=1, 2 slots each:
    device 1 (experts 2, 3) gets tokens 0, 1, 3, 5 and keeps the first two; within the chunk
    its rows are ordered by local expert."""
    top_idx_NK = jnp.array([[2], [1], [0], [1], [2], [2]])  # routed ids: global = +1
    lay = send_layout(top_idx_NK, 1, 2, 2, 2)
    assert lay.dev_A.tolist() == [1, 1, 0, 1, 1, 1]
    assert lay.kept_A.tolist() == [True, True, True, False, False, False]
    assert lay.token_XM[1].tolist() == [1, 0]
    assert lay.filled_XM.tolist() == [[True, False], [True, True]]
    assert lay.counts_Xe.tolist() == [[0, 1], [1, 1]]
    assert lay.slot_A[:3].tolist() == [1, 0, 0]
    # the sorted order: device 0's kept row, device 1's kept rows by local expert (token 1
    # to expert 2, token 0 to expert 3), then its dropped ones; what the ragged path sends
    assert lay.order_A[:3].tolist() == [2, 1, 0] and lay.starts_X.tolist() == [0, 1]
    assert lay.sizes_X.tolist() == [1, 2]


def test_device_capacity():
    """MoeGPT-64 on expert=8: 8 routed experts a device (4 on the first), capacity_factor 2.0
    -> 1.05 x the mean; a config that cannot drop on one device cannot drop here either."""
    fine = MoeGPTConfig(n_experts=16, m_sub_experts=4, n_activated_experts=8)
    assert device_capacity(16384, fine, 8) == 18351  # ceil(1.05 x 16384 x 8 x 8 / 60)
    wide = MoeGPTConfig(n_experts=16, m_sub_experts=4, n_activated_experts=8, capacity_factor=4)
    assert device_capacity(16384, wide, 8) == 36701
    dropless = MoeGPTConfig(n_experts=8, capacity_factor=3.5)
    assert device_capacity(64, dropless, 4) == 128  # 64 tokens x min(k=2, 2 experts)
    assert device_capacity(64, MoeGPTConfig(), 4) == 64  # default MoeGPT: one expert a device
    one = MoeGPTConfig(n_experts=8, capacity_factor=2.0)  # 7 routed, one a device on 8
    assert device_capacity(64, one, 8) == one.capacity(64)  # one expert keeps its slack


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """``jax.lax.ragged_all_to_all`` as its docstring states it, from all_gathers (XLA:CPU
    has no ragged kind): source j's rows ``operand_j[input_offsets_j[me] + i]`` for i below
    ``send_sizes_j[me]`` land at ``output[output_offsets_j[me] + i]`` on device ``me``."""
    me = jax.lax.axis_index(axis_name)
    gather = lambda a: jax.lax.all_gather(a, axis_name)  # noqa: E731
    ops_jnC = gather(operand)
    in_j, size_j, out_j = (gather(a)[:, me] for a in (input_offsets, send_sizes, output_offsets))
    rel_jM = jnp.arange(output.shape[0])[None] - out_j[:, None]
    hit_jM = (rel_jM >= 0) & (rel_jM < size_j[:, None])
    src_jM = jnp.clip(in_j[:, None] + rel_jM, 0, operand.shape[0] - 1)
    rows_jMC = ops_jnC[jnp.arange(ops_jnC.shape[0])[:, None], src_jM]
    got_MC = jnp.sum(jnp.where(hit_jM[..., None], rows_jMC, 0), 0)
    return jnp.where(jnp.any(hit_jM, 0)[:, None], got_MC, output)


MESH_SCRIPT = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from jax.sharding import NamedSharding, PartitionSpec as P
from nanomoe.config import MoeGPTConfig
from nanomoe_jax import sharding as shd
from nanomoe_jax.expert_parallel import expert_parallel_dispatch
from nanomoe_jax.moe import route
from tests.test_expert_parallel import _inputs, emulated_ragged_all_to_all

c = MoeGPTConfig(n_embd=16, n_experts=8, n_activated_experts=2, capacity_factor=1.0,
                 expert_dim=24)
mesh = shd.make_mesh(shd.parse_mesh("data=2,expert=4", 8))
RAGGED = {ragged}
GROUPED = {grouped}
SHARED_DENSE = {shared_dense}
D, N = 8, 48
x_NC, gate_CE, w = _inputs(c, D * N, seed=1)
x_DNC = x_NC.reshape(D, N, -1)

if RAGGED:  # the GPU path on CPU: ragged_all_to_all as its docstring states it
    import nanomoe_jax.expert_parallel as ep
    ep.ragged_exchange = lambda mesh: True
    jax.lax.ragged_all_to_all = emulated_ragged_all_to_all


def one_device(x_DNC, w):
    def one(x_NC):
        return expert_parallel_dispatch(x_NC, route(x_NC @ gate_CE, c), w, c, groups=4)
    y, dropped = jax.vmap(one)(x_DNC)
    return jnp.sum(jnp.sin(y)), (y, dropped)


def on_mesh(x_DNC, w):
    def one(x_1NC, w_local):  # one device: its slice, its 2 experts
        x_NC = x_1NC[0]
        y, dropped = expert_parallel_dispatch(x_NC, route(x_NC @ gate_CE, c), w_local, c, mesh,
                                              grouped=GROUPED, shared_dense=SHARED_DENSE)
        return y[None], dropped[None]
    every = P(shd.BATCH_AXES)
    y, dropped = jax.shard_map(one, mesh=mesh, in_specs=(every, P("expert")), out_specs=every,
                               check_vma=False)(x_DNC, w)
    return jnp.sum(jnp.sin(y)), (y, dropped)


ref = jax.jit(jax.value_and_grad(one_device, argnums=(0, 1), has_aux=True))(x_DNC, w)
xs = jax.device_put(x_DNC, NamedSharding(mesh, P(shd.BATCH_AXES)))
ws = jax.device_put(w, NamedSharding(mesh, P("expert")))
step = jax.jit(jax.value_and_grad(on_mesh, argnums=(0, 1), has_aux=True))
got = step(xs, ws)
text = step.lower(xs, ws).compile().as_text()
lines = [l for l in text.splitlines() if " = " in l]
print(json.dumps({
    "y": float(np.max(np.abs(got[0][1][0] - ref[0][1][0]))),
    "scale": float(np.max(np.abs(ref[0][1][0]))),
    "dropped": [np.asarray(got[0][1][1]).tolist(), np.asarray(ref[0][1][1]).tolist()],
    "grad": max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
                for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1]))),
    "all_to_all": sum(" all-to-all(" in l for l in lines),
    "ragged": sum("ragged" in l for l in lines),
    "all_gather": [l.split(" = ", 1)[1].split(" all-gather", 1)[0].strip()
                   for l in lines if " all-gather(" in l],
}))
"""


@pytest.mark.parametrize("ragged,grouped,shared_dense",
                         [(False, False, False), (True, False, False), (True, True, False),
                          (True, True, True)],
                         ids=["all_to_all", "ragged_emulated", "ragged_emulated_grouped_gemm",
                              "ragged_emulated_grouped_gemm_shared_dense"])
def test_mesh_equals_one_device_with_the_same_semantics(ragged, grouped, shared_dense):
    """data=2 x expert=4, 8 slices of 48 tokens, capacity_factor 1 (drops happen): outputs,
    drop counts and gradients of the mesh equal one device's; no expert weight is gathered.
    As CPUs run it (padded all_to_all), and as GPUs do (ragged_all_to_all of the sorted
    rows, emulated here from its documented semantics; the GPU plan compiles the real one),
    each device's experts as tiles or through the grouped GEMM (tokamax's XLA reference on
    CPU), its shared experts as groups or as one dense MLP, against the reference's tiles."""
    script = (MESH_SCRIPT.replace("{ragged}", str(ragged)).replace("{grouped}", str(grouped))
              .replace("{shared_dense}", str(shared_dense)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT,
                                                       "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["y"] <= 1e-5 * got["scale"], got
    assert got["dropped"][0] == got["dropped"][1] and sum(got["dropped"][1]) > 0, got
    assert got["grad"] <= 1e-5, got
    if not ragged:  # the rows there and back, forward and backward
        assert got["all_to_all"] >= 4, got
    # expert weights are (H=24, C=16) a piece: no gathered buffer has both dimensions
    dims = [set(s[s.index("[") + 1:s.index("]")].split(",")) for s in got["all_gather"]]
    assert not any({"24", "16"} <= d for d in dims), got["all_gather"]

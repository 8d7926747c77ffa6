"""tokamax's grouped GEMM path (nanomoe_jax/ragged_gemm.py) on CPU: its Triton kernels in
Pallas interpret mode, and the routed experts' custom VJPs against autodiff of a plain
per-expert reference, with uneven and empty experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tokamax = pytest.importorskip("tokamax")

from nanomoe_jax import ragged_gemm  # noqa: E402
from nanomoe_jax.expert_mlps import shared_experts  # noqa: E402
from nanomoe_jax.moe import sort_assignments  # noqa: E402


def case(seed=0, N=24, K=2, R=5, S=1, C=32, H=64, empty=(1, 3)):
    """N tokens routed to K of R experts (``empty`` never chosen, expert 0 most often),
    random non-zero weights for S shared + R routed experts, random gates."""
    k = jax.random.split(jax.random.key(seed), 7)
    logits = jax.random.normal(k[0], (N, R)).at[:, 0].add(1.0).at[:, list(empty)].add(-1e4)
    top_idx = jax.lax.top_k(logits, K)[1]
    gates = jax.nn.softmax(jax.random.normal(k[1], (N, K)), axis=-1)
    E = S + R
    a, b = 1.1 / C ** 0.5, 1.1 / H ** 0.5  # activations of order 1 at any width
    params = [jax.random.normal(k[2], (E, H, C)) * a, jax.random.normal(k[3], (E, H)) * 0.1,
              jax.random.normal(k[4], (E, C, H)) * b, jax.random.normal(k[5], (E, C)) * 0.1]
    return jax.random.normal(k[6], (N, C)), gates, top_idx, params, S


def reference(x_NC, gates_NK, top_idx_NK, params, S):
    """Every routed expert on every token, masked to its assignments: plain autodiff."""
    w1, b1, w2, b2 = (p[S:] for p in params)
    u = jnp.einsum("nc,rhc->rnh", x_NC, w1) + b1[:, None]
    y = jnp.einsum("rnh,rch->rnc", jnp.square(jax.nn.relu(u)), w2) + b2[:, None]
    R = w1.shape[0]
    weight_NR = jnp.zeros((x_NC.shape[0], R)).at[jnp.arange(x_NC.shape[0])[:, None],
                                                 top_idx_NK].add(gates_NK)
    return jnp.einsum("nr,rnc->nc", weight_NR, y)


def routed(x_NC, gates_NK, top_idx_NK, params, S):
    s = sort_assignments(top_idx_NK, params[0].shape[0] - S)
    return ragged_gemm.experts(x_NC, gates_NK, top_idx_NK, s, [p[S:] for p in params])


def value_and_grads(fn, x, gates, top_idx, params, S, dtype=jnp.float32):
    def loss(x, gates, params):
        y = fn(x.astype(dtype), gates, top_idx, params, S)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, gates, params)


def assert_close(got, want, rtol):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=rtol, atol=rtol * scale)


@pytest.fixture
def triton_interpreted(monkeypatch):
    """tokamax's Triton kernels and ours (gather_gemm.py) run by the Pallas interpreter (no
    GPU needed)."""
    from tokamax._src.pallas import block

    from nanomoe_jax import gather_gemm

    pallas_call = block.pallas_call
    monkeypatch.setattr(block, "pallas_call", lambda *a, **k: pallas_call(*a, interpret=True, **k))
    monkeypatch.setattr(gather_gemm, "INTERPRET", True)
    monkeypatch.setattr(ragged_gemm, "implementation", lambda: "triton")
    with tokamax.config.cross_compile(True):  # its "is there a GPU" check
        yield


def test_uneven_and_empty_experts_match_autodiff():
    x, gates, top_idx, params, S = case()
    counts = np.bincount(np.asarray(top_idx).ravel(), minlength=5)
    assert counts[1] == counts[3] == 0 and counts[0] > counts[2] > 0  # uneven, two empty
    (v, g), (v_ref, g_ref) = (value_and_grads(f, x, gates, top_idx, params, S)
                              for f in (routed, reference))
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    assert_close(g, g_ref, 1e-5)
    # the empty experts and the shared expert get exactly no gradient from the routed path
    for p in g[2]:
        assert float(jnp.abs(p[jnp.array([0, 1 + 1, 1 + 3])]).max()) == 0.0


def test_bf16_within_its_rounding():
    """bf16 against the fp32 reference: the loss to 2e-2, every gradient to 2e-2 in norm and
    nowhere more than twice as far off as plain autodiff of the reference run in bf16 (the
    two round at different points: b1 in bf16 here, h kept in bf16)."""
    x, gates, top_idx, params, S = case(seed=1)
    bf16 = [p.astype(jnp.bfloat16) for p in params]
    v, g = value_and_grads(routed, x, gates, top_idx, params, S, dtype=jnp.bfloat16)
    v_ref, g_ref = value_and_grads(reference, x, gates, top_idx, params, S)
    _, g_bf16 = value_and_grads(reference, x, gates, top_idx, bf16, S, dtype=jnp.bfloat16)
    np.testing.assert_allclose(v, v_ref, rtol=2e-2)
    for a, b, c in zip(*(map(lambda t: np.asarray(t, np.float32), jax.tree.leaves(t))
                         for t in (g, g_ref, g_bf16))):
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)
        assert np.abs(a - b).max() <= 2 * np.abs(c - b).max() + 1e-3 * np.abs(b).max()


def _fuse_at_test_sizes(monkeypatch):
    """The fused kernels wherever their blocks fit: at a test's 5 experts (a GPU wants 256
    programs) and in fp32 (which a GPU runs through the separate kernels: sm_89's shared
    memory), so that fp32's 1e-5 checks them."""
    from nanomoe_jax import dout_gemm

    monkeypatch.setattr(dout_gemm, "MIN_PROGRAMS", 1)
    monkeypatch.setattr(ragged_gemm, "fused", lambda dt: ragged_gemm.uses_kernels())


FUSED = {"mlp_gemm": "_kernel", "dout_gemm": "_kernel", "dv_gemm": "_kernel"}
SEPARATE = {"gather_gemm": ("_gather_dot_kernel", "_relu2_grad_kernel", "_wgrad_kernel")}


@pytest.mark.parametrize("C,H,kernels", [
    (128, 128, {m: (k,) for m, k in FUSED.items()}),
    # widths the fused kernels refuse (no powers of two): the four separate ones and tokamax's
    (384, 384, SEPARATE)], ids=["fused", "separate"])
def test_triton_kernels_interpreted_match_autodiff(triton_interpreted, monkeypatch, C, H,
                                                   kernels):
    """The kernels a GPU runs (tokamax's two, our row-gathering ones), forward and every
    gradient, with an expert that has no rows (its weight gradient must be exactly 0)."""
    import importlib

    _fuse_at_test_sizes(monkeypatch)
    traced = set()
    for module, names in kernels.items():
        mod = importlib.import_module(f"nanomoe_jax.{module}")
        for name in names:
            kernel = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, _k=kernel, _n=f"{module}.{name}", **kw:
                                (traced.add(_n), _k(*a, **kw))[1])
    # sizes the heuristic blocks (128 wide) divide: the interpreter does not mask partial
    # blocks inside a pl.when the way a GPU does
    x, gates, top_idx, params, S = case(seed=2, N=16, R=4, C=C, H=H, empty=(2,))
    (v, g), (v_ref, g_ref) = (value_and_grads(f, x, gates, top_idx, params, S)
                              for f in (routed, reference))
    assert traced == {f"{m}.{n}" for m, names in kernels.items() for n in names}
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    assert_close(g, g_ref, 1e-5)
    for p in g[2]:
        assert float(jnp.abs(p[S + 2]).max()) == 0.0


def _poison_past_groups(monkeypatch):
    """Every kernel output row past the groups (pads, an expert mesh's empty slots) NaN, as
    uninitialised memory may be on a GPU: nothing downstream may read them."""
    def past(out_P, counts):
        rows = jnp.arange(out_P.shape[0]).reshape((-1,) + (1,) * (out_P.ndim - 1))
        return jnp.where(rows < jnp.sum(counts), out_P, jnp.nan).astype(out_P.dtype)

    def poisoned(fn, rows_out, counts_at):
        """``fn`` with its outputs ``rows_out`` (indices; per-row outputs) poisoned."""
        def wrapped(*a, **k):
            out = fn(*a, **k)
            counts = a[counts_at]
            if isinstance(out, tuple):
                return tuple(past(o, counts) if i in rows_out else o for i, o in enumerate(out))
            return past(out, counts)
        return wrapped

    rg = ragged_gemm
    monkeypatch.setattr(rg, "_dot", poisoned(rg._dot, (), 2))
    monkeypatch.setattr(rg, "gather_dot", poisoned(rg.gather_dot, (), 3))
    monkeypatch.setattr(rg, "expert_mlp", poisoned(rg.expert_mlp, (0, 1), 5))
    monkeypatch.setattr(rg, "relu2_grad_wgrad", poisoned(rg.relu2_grad_wgrad, (0, 1), 3))
    monkeypatch.setattr(rg, "dv_grads", poisoned(rg.dv_grads, (0,), 4))


@pytest.mark.parametrize("kernels", ["", "separate", "fused"],
                         ids=["xla", "triton_interpreted", "triton_interpreted_fused"])
def test_assignments_past_every_group_are_skipped_and_read_zero(kernels, monkeypatch, request):
    """An expert mesh's empty receive slots sort after every group: no kernel computes them
    and they must read 0 even where the kernels leave those rows uninitialised (NaN here). The
    rest equals the reference with those assignments gated 0; their own gate gradient is
    unused (the mesh's gates there are constants) but finite. ``separate``: the backward's
    four kernels (a test's few experts are too few programs for the fused ones); ``fused``:
    dout_gemm and dv_gemm too."""
    if kernels:
        request.getfixturevalue("triton_interpreted")
    if kernels == "fused":
        _fuse_at_test_sizes(monkeypatch)
    _poison_past_groups(monkeypatch)
    # sizes the kernels' blocks divide (see the test above)
    x, gates, top_idx, params, S = case(seed=2, N=16, R=4, C=128, H=128, empty=(2,))
    N, K = top_idx.shape
    R = params[0].shape[0] - S
    empty_NK = jax.random.bernoulli(jax.random.key(9), 0.3, (N, K))
    assert 0 < int(empty_NK.sum()) < N * K
    key_NK = jnp.where(empty_NK, R, top_idx)               # R: no expert, sorted last
    expert_NK = jnp.where(empty_NK, 0, top_idx)
    gates_NK = jnp.where(empty_NK, 0.0, gates)

    def past_groups(x, g, idx, params, S):
        s = sort_assignments(key_NK, R + 1)
        s = s._replace(counts_R=s.counts_R[:R])
        return ragged_gemm.experts(x, g, idx, s, [p[S:] for p in params],
                                   past_groups=True)

    v, g = value_and_grads(past_groups, x, gates_NK, expert_NK, params, S)
    v_ref, g_ref = value_and_grads(reference, x, gates_NK, expert_NK, params, S)
    # the loss sums N C sines of either sign: each term's fp32 rounding, not the sum's size,
    # sets its error
    np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-5 * x.size ** 0.5)
    assert_close((g[0], g[2]), (g_ref[0], g_ref[2]), 1e-5)
    assert bool(jnp.isfinite(g[1]).all())
    assert_close(jnp.where(empty_NK, 0, g[1]), jnp.where(empty_NK, 0, g_ref[1]), 1e-5)


@pytest.mark.parametrize("S", [0, 2])
def test_shared_experts_through_the_kernels_match_the_dense_mlp(S):
    """An expert mesh's shared experts through the grouped GEMMs: the XLA MLP's numbers,
    forward and gradients (x, gates, every parameter), fp32."""
    x, _, _, params, _ = case(S=max(S, 1))
    params = [p[:S] for p in params]
    gates_NS = jax.random.uniform(jax.random.key(4), (x.shape[0], S), minval=0.1, maxval=1.0)
    fns = {"kernels": ragged_gemm.shared_experts_grouped, "mlp": shared_experts}
    vg = {}
    for name, fn in fns.items():
        def loss(x, g, p, fn=fn):
            return jnp.sum(jnp.sin(fn(x, g, p)))
        vg[name] = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, gates_NS, params)
    np.testing.assert_allclose(vg["kernels"][0], vg["mlp"][0], rtol=1e-5, atol=1e-5)
    if S:
        assert float(jnp.abs(vg["mlp"][1][0]).max()) > 0
        assert_close(vg["kernels"][1], vg["mlp"][1], 1e-5)

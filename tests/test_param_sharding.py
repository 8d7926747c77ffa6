"""Where each parameter and AdamW moment lives on every mesh, from the logical axes the
parameters declare where they are made (nanomoe_jax/layers.py) and the one rule in
nanomoe_jax/sharding.py. Abstract meshes: only the axis sizes matter, no devices needed.

The tables were recorded before the axes were declared (when param_spec matched path
names) and are unchanged by it. Letters per dimension: ``-`` whole, ``f`` fsdp, ``e`` expert.
"""

from __future__ import annotations

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

import nanomoe_jax
from nanomoe import GPTConfig, ModernGPTConfig, MoeGPTConfig, nGPTConfig
from nanomoe.errors import ConfigError
from nanomoe_jax import sharding as shd
from nanomoe_jax.train import make_optimizer

TINY = dict(n_layer=2, n_embd=32, n_head=4, block_size=32, vocab_size=96)
CONFIGS = {"gpt": GPTConfig(**TINY),
           "moderngpt": ModernGPTConfig(**TINY, n_kv_head=2, use_gate_proj=True),
           "moegpt": MoeGPTConfig(**TINY, n_experts=8), "ngpt": nGPTConfig(**TINY)}
LETTER = {None: "-", "fsdp": "f", "expert": "e"}

ATTN = {"blocks.attn.c_qkv.bias": "--", "blocks.attn.c_qkv.kernel": "--f",
        "blocks.attn.out_proj.bias": "--", "blocks.attn.out_proj.kernel": "-f-"}
# fsdp=8 and data=4,fsdp=2: every matrix on its largest dimension (all divide 8 here), the
# embedding over its vocab rows, vectors and the layer axis whole
FSDP = {
    "gpt": {**ATTN, "blocks.ln1.bias": "--", "blocks.ln1.scale": "--", "blocks.ln2.bias": "--",
            "blocks.ln2.scale": "--", "blocks.mlp.c_fc.bias": "--", "blocks.mlp.c_fc.kernel": "--f",
            "blocks.mlp.c_proj.bias": "--", "blocks.mlp.c_proj.kernel": "-f-",
            "ln_f.bias": "-", "ln_f.scale": "-", "wpe.embedding": "f-", "wte.embedding": "f-"},
    "moderngpt": {**ATTN, "blocks.ln1.scale": "--", "blocks.ln2.scale": "--",
                  "blocks.mlp.down_proj.bias": "--", "blocks.mlp.down_proj.kernel": "-f-",
                  "blocks.mlp.gate_proj.bias": "--", "blocks.mlp.gate_proj.kernel": "--f",
                  "blocks.mlp.up_proj.bias": "--", "blocks.mlp.up_proj.kernel": "--f",
                  "ln_f.scale": "-", "wte.embedding": "f-"},
    "moegpt": {**ATTN, "blocks.attn.k_norm.scale": "--", "blocks.attn.q_norm.scale": "--",
               "blocks.ln1.scale": "--", "blocks.ln2.scale": "--",
               "blocks.mlp.fc_bias": "--f", "blocks.mlp.fc_weight": "--f-",
               "blocks.mlp.gate_linear.bias": "--", "blocks.mlp.gate_linear.kernel": "-f-",
               "blocks.mlp.proj_bias": "--f", "blocks.mlp.proj_weight": "---f",
               "ln_f.scale": "-", "wte.embedding": "f-"},
    "ngpt": {"blocks.attn_alpha": "--", "blocks.attn_out.kernel": "-f-",
             "blocks.c_attn.kernel": "--f", "blocks.c_mlp.kernel": "--f",
             "blocks.mlp_alpha": "--", "blocks.mlp_out.kernel": "-f-",
             "blocks.rms_att.scale": "--", "blocks.rms_mlp.scale": "--", "blocks.sqk": "--",
             "blocks.suv": "--", "wte.embedding": "f-"},
}
# expert=8 and data=2,expert=4: the four (L, E, ...) expert stacks on E, nothing else split
# (the router's E outputs included)
EXPERT = {**{k: v.replace("f", "-") for k, v in FSDP["moegpt"].items()},
          "blocks.mlp.fc_bias": "-e-", "blocks.mlp.fc_weight": "-e--",
          "blocks.mlp.proj_bias": "-e-", "blocks.mlp.proj_weight": "-e--"}
# fsdp=2,expert=4: fsdp takes the largest dimension the expert axis left
BOTH = {**FSDP["moegpt"], "blocks.mlp.fc_bias": "-ef", "blocks.mlp.fc_weight": "-ef-",
        "blocks.mlp.proj_bias": "-ef", "blocks.mlp.proj_weight": "-e-f"}


def mesh(spec: str) -> AbstractMesh:
    sizes = shd.parse_mesh(spec, 8)
    return AbstractMesh(tuple(sizes[a] for a in shd.AXES), shd.AXES,
                        axis_types=(AxisType.Auto,) * len(shd.AXES))


def flat(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=shd._is_variable)[0]
    return {".".join(str(shd._key(k)) for k in path): leaf for path, leaf in leaves}


def letters(shardings) -> dict[str, str]:
    return {k: "".join(LETTER[a] for a in v.get_value().spec) for k, v in flat(shardings).items()}


@pytest.fixture(scope="module")
def params():
    return {name: nnx.split(nanomoe_jax.create_model(c), nnx.Param)[1]
            for name, c in CONFIGS.items()}


CASES = [(m, s, FSDP[m]) for m in FSDP for s in ("fsdp=8", "data=4,fsdp=2")]
CASES += [(m, "data=8", {k: v.replace("f", "-") for k, v in FSDP[m].items()}) for m in FSDP]
CASES += [("moegpt", "expert=8", EXPERT), ("moegpt", "data=2,expert=4", EXPERT),
          ("moegpt", "fsdp=2,expert=4", BOTH)]


@pytest.mark.parametrize("model,spec,expected", CASES, ids=[f"{m}-{s}" for m, s, _ in CASES])
def test_specs_of_params_and_moments(params, model, spec, expected):
    p, config = params[model], CONFIGS[model]
    shardings = shd.tree_shardings(p, mesh(spec), config)
    assert letters(shardings) == expected
    for k, v in flat(shardings).items():  # the stacked layer axis is declared and never split
        axes = shd.declared_axes(v)
        assert (axes[0] == shd.LAYERS) == k.startswith("blocks.") and LAYERS_WHOLE(v, axes)
    opt = jax.eval_shape(make_optimizer(config, p).init, p)
    opt_sh = shd.tree_shardings(opt, mesh(spec), config)
    moments = [s for s in jax.tree.leaves(opt_sh, is_leaf=lambda x: isinstance(x, nnx.State))
               if isinstance(s, nnx.State)]
    assert len(moments) == 2  # AdamW's mu and nu, each its parameters' specs
    for m in moments:
        assert letters(m) == expected
    others = [s for s in jax.tree.leaves(opt_sh) if s not in jax.tree.leaves(moments)]
    assert others and all(s.spec == jax.sharding.PartitionSpec() for s in others)  # count


def LAYERS_WHOLE(var, axes) -> bool:  # noqa: N802 - reads as the property it checks
    return shd.LAYERS not in axes or var.get_value().spec[axes.index(shd.LAYERS)] is None


def test_experts_split_only_when_they_divide(params):
    with pytest.raises(ConfigError, match="4 experts cannot be split over 8 devices"):
        config = MoeGPTConfig(**TINY)  # 4 experts
        _, p = nnx.split(nanomoe_jax.create_model(config), nnx.Param)
        shd.tree_shardings(p, mesh("expert=8"), config)


def test_experts_are_an_ordinary_dimension_without_an_expert_axis():
    """fsdp=8 with no other divisible dimension: the expert stack's E takes the split (as
    path matching did)."""
    config = MoeGPTConfig(n_layer=3, n_embd=24, n_head=3, block_size=20, vocab_size=100,
                          n_experts=8, expert_dim=20)
    _, p = nnx.split(nanomoe_jax.create_model(config), nnx.Param)
    got = letters(shd.tree_shardings(p, mesh("fsdp=8"), config))
    assert got["blocks.mlp.fc_bias"] == "-f-" and got["blocks.mlp.fc_weight"] == "---f"
    assert got["wte.embedding"] == "-f"  # 100 rows do not divide 8


class Extra(nnx.Module):
    def __init__(self, value, **metadata):
        self.w = nnx.Param(value, **metadata)


@pytest.mark.parametrize("metadata", [{}, {"out_sharding": ("embed",), "eager_sharding": False}])
def test_a_parameter_without_its_axes_fails_loudly(params, metadata):
    """A new parameter made without logical axes (or with the wrong count) is an error, not
    a silently replicated array."""
    _, p = nnx.split(Extra(jax.numpy.zeros((16, 8)), **metadata), nnx.Param)
    with pytest.raises(ValueError, match="declares logical axes"):
        shd.tree_shardings(p, mesh("fsdp=8"), None)
    with pytest.raises(ValueError, match="no declared logical axes"):  # a bare array
        shd.tree_shardings({"m": jax.ShapeDtypeStruct((16, 8), "float32")}, mesh("fsdp=8"))


@pytest.mark.parametrize("dispatch", ["dense", "grouped", "ragged"])
def test_an_expert_axis_runs_the_exchange_only(dispatch):
    """Each device holds E/X experts, so only the exchange can run there (capacity: its
    experts as tiles, tokamax: through the grouped GEMM); another dispatch, asked for or in
    the config, is refused with one sentence naming the fix."""
    from types import SimpleNamespace

    from nanomoe_train.jax_mesh import check_mesh_flags

    mesh = AbstractMesh((2, 1, 4), shd.AXES, axis_types=(AxisType.Auto,) * 3)
    args = SimpleNamespace(mesh="data=2,expert=4", moe_dispatch=dispatch)
    with pytest.raises(ConfigError, match=f"drop --moe_dispatch {dispatch}"):
        check_mesh_flags(mesh, CONFIGS["moegpt"], args)
    for fine in (None, "capacity", "tokamax"):  # None: the config's capacity
        args.moe_dispatch = fine
        check_mesh_flags(mesh, CONFIGS["moegpt"], args)
    args.moe_dispatch = None
    with pytest.raises(ConfigError, match="drop --moe_dispatch dense"):
        check_mesh_flags(mesh, MoeGPTConfig(**TINY, n_experts=8, moe_dispatch="dense"), args)

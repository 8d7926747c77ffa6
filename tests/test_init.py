"""The framework-free NumPy init and the torch constructors: names, shapes, distributions."""

import dataclasses

import numpy as np
import pytest
import torch

import nanomoe
import nanomoe_torch
from nanomoe import GPTConfig, ModernGPTConfig, MoeGPTConfig, nGPTConfig

TINY = dict(n_layer=2, n_embd=64, n_head=4, block_size=32, vocab_size=128)
CONFIGS = {
    "gpt": GPTConfig(**TINY),
    "modern-gqa-glu": ModernGPTConfig(**TINY, n_kv_head=2),
    "modern-mqa-gated": ModernGPTConfig(**TINY, n_kv_head=1, use_gate_proj=True),
    "modern-nobias-glu": ModernGPTConfig(**TINY, n_kv_head=4, use_bias=False),
    "modern-nobias-gated": ModernGPTConfig(**TINY, n_kv_head=2, use_bias=False,
                                           use_gate_proj=True),
    "moe": MoeGPTConfig(**TINY),
    "moe-nobias-m2": MoeGPTConfig(**TINY, use_bias=False, m_sub_experts=2, n_activated_experts=3),
    "ngpt": nGPTConfig(**TINY),
}
PARAMS = [pytest.param(c, id=name) for name, c in CONFIGS.items()]

NORM_NAMES = ("ln_1", "ln_2", "ln_f", "ln1", "ln2", "q_norm", "k_norm")


def expected_init(config, name):
    """The original's initialiser of one state_dict entry (docs/original.md): ("normal", std),
    ("zeros",), ("ones",) or ("constant", value)."""
    leaf = name.split(".")[-2]
    if isinstance(config, nGPTConfig):  # base_scale, a constant 1/sqrt(768) whatever n_embd
        s, vector = config.base_scale, name.split(".")[-1]
        if vector in ("attn_alpha", "mlp_alpha", "sqk", "suv"):
            return ("constant", (0.05 if "alpha" in vector else 1.0) * s)
        return ("ones",) if leaf in ("rms_att", "rms_mlp") else ("normal", s)
    if name.endswith("bias"):  # Linear biases, LayerNorm biases, MoE fc_bias and proj_bias
        return ("zeros",)
    if leaf in NORM_NAMES:
        return ("ones",)
    if name.endswith("proj_weight"):  # MoE expert output projection really starts at zero
        return ("zeros",)
    if isinstance(config, GPTConfig) and leaf == "c_proj":
        return ("normal", 0.02 * (2 * config.n_layer) ** -0.5)
    return ("normal", 0.02)


def check_distributions(config, tensors):
    """Zeros and ones exactly; normal tensors grouped by std have that std within 5%."""
    groups = {}
    for name, value in tensors.items():
        value = np.asarray(value)
        assert value.dtype == np.float32, name
        kind = expected_init(config, name)
        if kind == ("zeros",):
            assert not value.any(), name
        elif kind == ("ones",):
            assert (value == 1).all(), name
        elif kind[0] == "constant":
            assert (value == np.float32(kind[1])).all(), name
        else:
            groups.setdefault(kind[1], []).append(value.ravel())
            if value.size >= 10_000:
                assert abs(value.std() / kind[1] - 1) < 0.05, name
    assert groups
    for std, values in groups.items():
        values = np.concatenate(values)
        assert values.size >= 10_000
        assert abs(values.std() / std - 1) < 0.05, std
        assert abs(values.mean()) < 0.02 * std


def embedding_key(config):
    return "transformer.wte.weight" if isinstance(config, GPTConfig) else "wte.weight"


@pytest.mark.parametrize("config", PARAMS)
def test_same_seed_is_bit_identical(config):
    a, b = nanomoe.init_params(config, 5), nanomoe.init_params(config, 5)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("config", PARAMS)
def test_different_seeds_differ_on_normal_tensors(config):
    a, b = nanomoe.init_params(config, 0), nanomoe.init_params(config, 1)
    for name in a:
        if expected_init(config, name)[0] == "normal":
            assert not np.array_equal(a[name], b[name]), name
        else:
            assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("config", PARAMS)
def test_names_and_shapes_match_specs_and_torch(config):
    arrays = nanomoe.init_params(config, 0)
    specs = nanomoe.param_specs(config)
    state = nanomoe_torch.model_class(config)(config).state_dict()
    assert list(arrays) == list(specs)
    assert set(arrays) == set(state)
    for name, arr in arrays.items():
        assert arr.shape == specs[name].shape == tuple(state[name].shape), name


@pytest.mark.parametrize("config", PARAMS)
def test_numpy_init_distributions(config):
    check_distributions(config, nanomoe.init_params(config, 3))


def test_gpt_residual_projections_are_scaled():
    config = GPTConfig(**{**TINY, "n_layer": 8})
    arrays = nanomoe.init_params(config, 0)
    proj = np.concatenate([arrays[f"transformer.h.{i}.{m}.c_proj.weight"].ravel()
                           for i in range(8) for m in ("attn", "mlp")])
    assert abs(proj.std() / (0.02 / 4.0) - 1) < 0.05
    assert abs(arrays["transformer.h.0.mlp.c_fc.weight"].std() / 0.02 - 1) < 0.05


@pytest.mark.parametrize("config", PARAMS)
def test_lm_head_shares_the_embedding_array(config):
    arrays = nanomoe.init_params(config, 0)
    assert arrays["lm_head.weight"] is arrays[embedding_key(config)]


def test_tensor_does_not_depend_on_other_tensors():
    small, deep = CONFIGS["moe"], dataclasses.replace(CONFIGS["moe"], n_layer=3)
    a, b = nanomoe.init_params(small, 9), nanomoe.init_params(deep, 9)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("config", PARAMS)
def test_create_model_loads_the_numpy_arrays(config):
    arrays = nanomoe.init_params(config, 11)
    model = nanomoe_torch.create_model(config, 11)
    state = model.state_dict()
    assert set(state) == set(arrays)
    for name, value in state.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, torch.from_numpy(arrays[name])), name
    embedding = model.transformer.wte if isinstance(config, GPTConfig) else model.wte
    assert model.lm_head.weight is embedding.weight
    assert model.lm_head.weight.data_ptr() == embedding.weight.data_ptr()


@pytest.mark.parametrize("config, seed", [(CONFIGS["gpt"], 1337), (CONFIGS["moe"], 1337),
                                          (dataclasses.replace(CONFIGS["moe"], seed=4), 4)])
def test_create_model_default_seed(config, seed):
    model = nanomoe_torch.create_model(config)
    arrays = nanomoe.init_params(config, seed)
    key = embedding_key(config)
    assert torch.equal(model.state_dict()[key], torch.from_numpy(arrays[key]))


@pytest.mark.parametrize("config", PARAMS)
def test_torch_constructor_distributions(config):
    torch.manual_seed(0)
    model = nanomoe_torch.model_class(config)(config)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    check_distributions(config, state)
    embedding = model.transformer.wte if isinstance(config, GPTConfig) else model.wte
    assert model.lm_head.weight.data_ptr() == embedding.weight.data_ptr()


def test_torch_moe_constructor_seeds_itself():
    config = CONFIGS["moe"]
    torch.manual_seed(0)
    a = nanomoe_torch.MoeGPT(config).state_dict()
    torch.manual_seed(1)
    b = nanomoe_torch.MoeGPT(config).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for name in a:
        if name.endswith("mlp.impl.proj_weight"):
            assert not a[name].any()

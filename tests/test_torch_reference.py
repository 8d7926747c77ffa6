"""The PyTorch reference against the original (docs/original.md): key tables, forward structure, losses, MoE math,
attention by hand, checkpoint key prefixes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nanomoe
import nanomoe_torch
from nanomoe import GPTConfig, ModernGPTConfig, MoeGPTConfig
from nanomoe_torch.layers import Attention
from nanomoe_torch.moe import ParallelMoE, route

TINY = dict(n_layer=2, n_embd=32, n_head=4, block_size=16, vocab_size=96)
CONFIGS = {
    "gpt": GPTConfig(**TINY),
    "modern-mqa-glu": ModernGPTConfig(**TINY, n_kv_head=1),
    "modern-gqa-gated": ModernGPTConfig(**TINY, n_kv_head=2, use_gate_proj=True),
    "modern-gqa-glu-nobias": ModernGPTConfig(**TINY, n_kv_head=2, use_bias=False),
    "modern-mqa-gated-nobias-double": ModernGPTConfig(**TINY, n_kv_head=1, use_gate_proj=True,
                                                      use_bias=False, double_attn_scale=True),
    "moe": MoeGPTConfig(**TINY),
    "moe-nobias": MoeGPTConfig(**TINY, use_bias=False),
    "moe-m2-sigmoid": MoeGPTConfig(**TINY, m_sub_experts=2, n_activated_experts=3,
                                   route_score_func="sigmoid"),
    "moe-s0-scale2": MoeGPTConfig(**TINY, n_experts=5, n_shared_experts=0, route_scale=2.0),
}
PARAMS = [pytest.param(c, id=name) for name, c in CONFIGS.items()]


def random_model(config, seed=0):
    """The reference model with every tensor random and non-zero (MoE proj_weight too)."""
    model = nanomoe_torch.create_model(config, seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def random_tokens(config, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, config.vocab_size, (B, T), generator=g),
            torch.randint(0, config.vocab_size, (B, T), generator=g))


# ---------------------------------------------------------------------------------------------
# state_dict keys and shapes, written out from the original's modules (its names, (out, in))


def gpt_table(c):
    C, V = c.n_embd, c.vocab_size
    t = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (c.block_size, C)}
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        t.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (3 * C, C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (C, 4 * C), p + "mlp.c_proj.bias": (C,),
        })
    t.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,),
              "lm_head.weight": (V, C)})
    return t


def linear(t, name, n_out, n_in, bias):
    t[name + ".weight"] = (n_out, n_in)
    if bias:
        t[name + ".bias"] = (n_out,)


def modern_table(c):
    C, V, H, b = c.n_embd, c.vocab_size, c.ffn_factor * c.n_embd, c.use_bias
    hd = C // c.n_head
    t = {"wte.weight": (V, C)}
    for i in range(c.n_layer):
        p = f"h.{i}."
        t[p + "ln1.weight"] = t[p + "ln2.weight"] = (C,)
        linear(t, p + "attn.c_qkv", (c.n_head + 2 * c.n_kv_head) * hd, C, b)
        linear(t, p + "attn.out_proj", C, C, b)
        if c.use_gate_proj:
            linear(t, p + "mlp.gate_proj", H, C, b)
            linear(t, p + "mlp.up_proj", H, C, b)
            linear(t, p + "mlp.down_proj", C, H, b)
        else:
            linear(t, p + "mlp.c_fc", 2 * H, C, b)
            linear(t, p + "mlp.c_proj", C, H, b)
    t.update({"ln_f.weight": (C,), "lm_head.weight": (V, C)})
    return t


def moe_table(c):
    C, V, H, b = c.n_embd, c.vocab_size, c.ffn_factor * c.n_embd, c.use_bias
    E, hd = c.n_experts * c.m_sub_experts, C // c.n_head
    t = {"wte.weight": (V, C)}
    for i in range(c.n_layer):
        p = f"blocks.{i}."
        t[p + "ln1.weight"] = t[p + "ln2.weight"] = (C,)
        t[p + "attn.q_norm.weight"] = t[p + "attn.k_norm.weight"] = (hd,)
        linear(t, p + "attn.c_qkv", 3 * C, C, b)
        linear(t, p + "attn.out_proj", C, C, b)
        linear(t, p + "mlp.impl.gate_linear", E, C, b)
        t.update({p + "mlp.impl.fc_weight": (E, H, C), p + "mlp.impl.fc_bias": (E, H),
                  p + "mlp.impl.proj_weight": (E, C, H), p + "mlp.impl.proj_bias": (E, C)})
    t.update({"ln_f.weight": (C,), "lm_head.weight": (V, C)})
    return t


def spec_table(c):
    if isinstance(c, GPTConfig):
        return gpt_table(c)
    return modern_table(c) if isinstance(c, ModernGPTConfig) else moe_table(c)


@pytest.mark.parametrize("config", PARAMS)
def test_state_dict_matches_spec_table(config):
    model = nanomoe_torch.model_class(config)(config)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == spec_table(config)
    assert not any("rope_cache" in k for k in got)


def test_spec_table_examples():
    # spot checks of the table functions themselves against literal rows
    gpt = gpt_table(CONFIGS["gpt"])
    assert gpt["transformer.h.1.attn.c_attn.weight"] == (96, 32)
    assert gpt["transformer.h.0.mlp.c_proj.weight"] == (32, 128)
    assert len(gpt) == 2 + 12 * 2 + 3
    mqa = modern_table(CONFIGS["modern-mqa-glu"])
    assert mqa["h.0.attn.c_qkv.weight"] == ((4 + 2) * 8, 32)
    assert mqa["h.1.mlp.c_fc.weight"] == (128, 32)
    moe = moe_table(CONFIGS["moe-m2-sigmoid"])
    assert moe["blocks.0.mlp.impl.fc_weight"] == (8, 64, 32)
    assert moe["blocks.1.mlp.impl.gate_linear.bias"] == (8,)
    nobias = moe_table(CONFIGS["moe-nobias"])
    assert "blocks.0.attn.c_qkv.bias" not in nobias
    assert "blocks.0.mlp.impl.gate_linear.bias" not in nobias
    assert nobias["blocks.0.mlp.impl.proj_bias"] == (4, 32)


@pytest.mark.parametrize("config", PARAMS)
def test_rope_cache_is_a_non_persistent_buffer(config):
    model = nanomoe_torch.model_class(config)(config)
    buffers = dict(model.named_buffers())
    if isinstance(config, GPTConfig):
        assert not buffers
    else:
        assert buffers and all(k.endswith("rope_cache") for k in buffers)


# ---------------------------------------------------------------------------------------------
# parameter counts


# README's sizes of the default configs, exactly
DEFAULT_SIZES = {GPTConfig: 124_439_808, ModernGPTConfig: 96_485_376, MoeGPTConfig: 67_790_368,
                 nanomoe.nGPTConfig: 151_963_392}


@pytest.mark.parametrize("config_class", list(DEFAULT_SIZES), ids=lambda c: c.__name__)
def test_default_parameter_counts(config_class):
    config = config_class()
    with torch.device("meta"):  # shapes only: no memory, no init
        model = nanomoe_torch.model_class(config)(config)
    assert sum(p.numel() for p in model.parameters()) == DEFAULT_SIZES[config_class]
    assert nanomoe.count_params(config) == DEFAULT_SIZES[config_class]


@pytest.mark.parametrize("config", PARAMS)
def test_count_params_agrees_with_torch(config):
    model = nanomoe_torch.model_class(config)(config)
    assert nanomoe.count_params(config) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# forward structure and losses


@pytest.mark.parametrize("config", PARAMS)
def test_forward_structure(config):
    model = random_model(config)
    idx, tgt = random_tokens(config)
    plain = model(idx)
    with_targets = model(idx, tgt)
    assert isinstance(plain, tuple) and isinstance(with_targets, tuple)
    assert with_targets[0].shape == (2, 12, config.vocab_size)
    assert torch.equal(plain[0], with_targets[0])
    losses = with_targets[1]
    if isinstance(config, MoeGPTConfig):
        assert len(plain) == 1
        assert set(losses) == {"loss", "ce_loss", "moe_loss"}
        assert all(v.shape == () for v in losses.values())
        expected = losses["ce_loss"] + config.moe_loss_weight * losses["moe_loss"]
        torch.testing.assert_close(losses["loss"], expected, rtol=1e-6, atol=0)
    else:
        assert len(plain) == 2 and plain[1] == {"loss": None}
        assert set(losses) == {"loss"} and losses["loss"].shape == ()


def test_gpt_loss_is_plain_cross_entropy():
    config = CONFIGS["gpt"]
    model = random_model(config)
    idx, tgt = random_tokens(config)
    logits, out = model(idx, tgt)
    expected = F.cross_entropy(logits.reshape(-1, config.vocab_size), tgt.reshape(-1))
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("config", [p for p in PARAMS if not p.id.startswith("gpt")])
def test_loss_ignores_minus_one(config):
    model = random_model(config)
    idx, tgt = random_tokens(config)
    tgt[0, :5] = -1
    tgt[1, 7] = -1
    logits, out = model(idx, tgt)
    key = "ce_loss" if isinstance(config, MoeGPTConfig) else "loss"
    logp = torch.log_softmax(logits.double(), -1)
    keep = tgt >= 0
    expected = -logp[keep].gather(-1, tgt[keep][:, None]).mean()
    torch.testing.assert_close(out[key].double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        out[key], F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                  ignore_index=-1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("config", [p for p in PARAMS if p.id.startswith("moe")])
def test_moe_loss_is_the_sum_of_layer_balance_losses(config):
    model = random_model(config)
    idx, tgt = random_tokens(config)
    layer_losses = []
    hooks = [b.mlp.register_forward_hook(lambda m, a, o: layer_losses.append(o[1]))
             for b in model.blocks]
    _, out = model(idx, tgt)
    for h in hooks:
        h.remove()
    assert len(layer_losses) == config.n_layer
    torch.testing.assert_close(out["moe_loss"], sum(layer_losses), rtol=1e-6, atol=0)


@pytest.mark.parametrize("config", PARAMS)
def test_sequence_longer_than_block_size(config):
    model = random_model(config)
    model(torch.zeros(1, config.block_size, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, config.block_size + 1, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# the MoE layer against the router's steps 1-7 (docs/original.md#moegpt), by hand in float64

MOE_CASES = {
    "softmax-s1": dict(),
    "sigmoid-s1": dict(route_score_func="sigmoid"),
    "softmax-s0-scale2": dict(n_experts=5, n_shared_experts=0, route_scale=2.0),
    "sigmoid-s2-nobias": dict(n_experts=6, n_shared_experts=2, n_activated_experts=3,
                              use_bias=False, route_scale=0.5),
    "softmax-m2": dict(m_sub_experts=2, n_activated_experts=3, route_scale=1.5),
    "sigmoid-m2-s2": dict(n_experts=5, n_shared_experts=2, m_sub_experts=2,
                          n_activated_experts=2, route_score_func="sigmoid"),
}
MOE_PARAMS = [pytest.param(MoeGPTConfig(n_layer=1, n_embd=32, n_head=4, block_size=16,
                                        vocab_size=64, **kw), id=name)
              for name, kw in MOE_CASES.items()]


def random_moe(config, seed=0):
    torch.manual_seed(seed)
    layer = ParallelMoE(config)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.2)
    return layer


def hand_moe(layer, x):
    """Steps 1-7 (docs/original.md#moegpt) with loops: (output (N, C), balance loss, gates (N, E))."""
    c = layer.config
    E, S, k = c.n_experts * c.m_sub_experts, c.n_shared_experts * c.m_sub_experts, \
        c.n_activated_experts
    W = layer.gate_linear.weight.detach().double().numpy()
    b = (np.zeros(E) if layer.gate_linear.bias is None
         else layer.gate_linear.bias.detach().double().numpy())
    W1, b1, W2, b2 = (t.detach().double().numpy() for t in
                      (layer.fc_weight, layer.fc_bias, layer.proj_weight, layer.proj_bias))
    x = x.double().numpy()
    N = x.shape[0]
    score_sum, usage = np.zeros(E), np.zeros(E)
    gates, out = np.zeros((N, E)), np.zeros_like(x)
    for n in range(N):
        logit = W @ x[n] + b
        if c.route_score_func == "softmax":
            scores = np.exp(logit - logit.max()) / np.exp(logit - logit.max()).sum()
        else:
            scores = 1 / (1 + np.exp(-logit))
        score_sum += scores
        combined = np.zeros(E)
        combined[:S] = scores[:S]
        top = S + np.argsort(-scores[S:])[:k]
        combined[top] = scores[top]
        combined *= c.route_scale
        gates[n] = combined / (combined.sum() + 1e-8)
        usage += combined > 0
        for e in range(E):
            h = np.maximum(W1[e] @ x[n] + b1[e], 0) ** 2
            out[n] += gates[n, e] * (W2[e] @ h + b2[e])
    f = E / ((S + k) * N) * usage
    P = score_sum / N
    return out, float((f * P).sum()), gates


@pytest.mark.parametrize("config", MOE_PARAMS)
def test_moe_layer_matches_hand_computation(config):
    layer = random_moe(config)
    x = torch.randn(24, config.n_embd, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, balance, gates = *layer(x), layer.router(x).gates
    expected_out, expected_balance, expected_gates = hand_moe(layer, x)
    np.testing.assert_allclose(float(balance), expected_balance, rtol=1e-6)
    np.testing.assert_allclose(out.numpy(), expected_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gates.numpy(), expected_gates, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", MOE_PARAMS)
def test_moe_layer_keeps_batch_shape(config):
    layer = random_moe(config)
    x = torch.randn(2, 6, config.n_embd)
    out, balance = layer(x)
    assert out.shape == x.shape and balance.shape == ()
    flat, flat_balance = layer(x.reshape(12, -1))
    torch.testing.assert_close(out.reshape(12, -1), flat)
    torch.testing.assert_close(balance, flat_balance)


@pytest.mark.parametrize("config", MOE_PARAMS)
def test_gates_use_shared_plus_top_k_and_sum_to_one(config):
    S, k = config.n_shared_experts * config.m_sub_experts, config.n_activated_experts
    E = config.n_experts * config.m_sub_experts
    logits = torch.randn(200, E, generator=torch.Generator().manual_seed(2)) * 3
    r = route(logits, config)
    assert r.gates.shape == (200, E) and r.gates.dtype == torch.float32
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(200), rtol=0, atol=1e-6)
    assert ((r.gates != 0).sum(-1) == S + k).all()
    assert (r.gates[:, :S] != 0).all()
    assert torch.equal(r.usage, (r.gates != 0).sum(0))
    assert int(r.usage.sum()) == 200 * (S + k)


# ---------------------------------------------------------------------------------------------
# attention by hand: interleaved RoPE, GQA head mapping, q/k norms, the scale


def hand_rope(x, base):
    """x (heads, T, hd) float64; the original's interleaved rotation (docs/original.md)."""
    _, T, hd = x.shape
    i = np.arange(hd // 2)
    freq = np.arange(T)[:, None] / base ** (2 * i / hd)[None, :]
    sin, cos = np.sin(freq), np.cos(freq)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 1::2] * cos + x[..., 0::2] * sin
    return out


def hand_rmsnorm(x, w):
    return w * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5)


def hand_attention(attn, x, scale, base=10000.0):
    """One sequence x (T, C) through an Attention module's weights, with loops over heads."""
    T, C = x.shape
    nh, nkv, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    W = attn.c_qkv.weight.detach().double().numpy()
    b = 0 if attn.c_qkv.bias is None else attn.c_qkv.bias.detach().double().numpy()
    qkv = x @ W.T + b
    q = qkv[:, :nh * hd].reshape(T, nh, hd).transpose(1, 0, 2)
    k = qkv[:, nh * hd:(nh + nkv) * hd].reshape(T, nkv, hd).transpose(1, 0, 2)
    v = qkv[:, (nh + nkv) * hd:].reshape(T, nkv, hd).transpose(1, 0, 2)
    q, k = hand_rope(q, base), hand_rope(k, base)
    if attn.qk_norm:
        q = hand_rmsnorm(q, attn.q_norm.weight.detach().double().numpy())
        k = hand_rmsnorm(k, attn.k_norm.weight.detach().double().numpy())
    y = np.zeros((T, nh, hd))
    for j in range(nh):
        kv = j // (nh // nkv)
        logits = q[j] @ k[kv].T * scale
        logits[np.triu_indices(T, 1)] = -np.inf
        p = np.exp(logits - logits.max(-1, keepdims=True))
        y[:, j] = (p / p.sum(-1, keepdims=True)) @ v[kv]
    Wo = attn.out_proj.weight.detach().double().numpy()
    bo = 0 if attn.out_proj.bias is None else attn.out_proj.bias.detach().double().numpy()
    return y.reshape(T, C) @ Wo.T + bo


def random_attention(n_kv_head, double_scale, qk_norm, bias=True, base=10000.0):
    torch.manual_seed(n_kv_head)
    attn = Attention(32, 4, n_kv_head, 16, base, bias, qk_norm=qk_norm,
                     double_scale=double_scale)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(std=0.3)
    return attn


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("double_scale", [False, True])
@pytest.mark.parametrize("qk_norm, bias, base", [(False, True, 10000.0), (True, True, 10000.0),
                                                 (False, False, 500.0)])
def test_attention_matches_hand_computation(n_kv_head, double_scale, qk_norm, bias, base):
    attn = random_attention(n_kv_head, double_scale, qk_norm, bias, base)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    hd = 8
    scale = 1 / hd if double_scale else 1 / math.sqrt(hd)
    got = attn(x).detach().numpy()
    for i in range(2):
        want = hand_attention(attn, x[i].double().numpy(), scale, base)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_double_attn_scale_changes_modern_gpt():
    single = CONFIGS["modern-gqa-gated"]
    double = ModernGPTConfig(**{**single.__dict__, "double_attn_scale": True})
    a = random_model(single)
    b = nanomoe_torch.ModernGPT(double)
    b.load_state_dict(a.state_dict(), strict=True)
    idx, _ = random_tokens(single)
    assert not torch.allclose(a(idx)[0], b(idx)[0], atol=1e-3)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    np.testing.assert_allclose(b.h[0].attn(x[None])[0].detach().numpy(),
                               hand_attention(b.h[0].attn, x.double().numpy(), 1 / 8),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.h[0].attn(x[None])[0].detach().numpy(),
                               hand_attention(a.h[0].attn, x.double().numpy(), 1 / math.sqrt(8)),
                               rtol=1e-5, atol=1e-5)


def test_moe_gpt_attention_uses_default_scale_and_qk_norm():
    model = random_model(CONFIGS["moe"])
    attn = model.blocks[0].attn
    assert attn.qk_norm and attn.n_kv_head == attn.n_head
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(attn(x[None])[0].detach().numpy(),
                               hand_attention(attn, x.double().numpy(), 1 / math.sqrt(8)),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# whole models by hand (one sequence, float64)


def np_param(model, name):
    return model.state_dict()[name].double().numpy()


def hand_layernorm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b


def hand_gpt(model, idx):
    c, P = model.config, lambda n: np_param(model, n)
    T, C, nh = len(idx), c.n_embd, c.n_head
    hd = C // nh
    x = P("transformer.wte.weight")[idx] + P("transformer.wpe.weight")[:T]
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        h = hand_layernorm(x, P(p + "ln_1.weight"), P(p + "ln_1.bias"))
        qkv = h @ P(p + "attn.c_attn.weight").T + P(p + "attn.c_attn.bias")
        y = np.zeros((T, C))
        for j in range(nh):
            q, k, v = (qkv[:, s * C + j * hd: s * C + (j + 1) * hd] for s in range(3))
            logits = q @ k.T / math.sqrt(hd)
            logits[np.triu_indices(T, 1)] = -np.inf
            a = np.exp(logits - logits.max(-1, keepdims=True))
            y[:, j * hd:(j + 1) * hd] = (a / a.sum(-1, keepdims=True)) @ v
        x = x + y @ P(p + "attn.c_proj.weight").T + P(p + "attn.c_proj.bias")
        h = hand_layernorm(x, P(p + "ln_2.weight"), P(p + "ln_2.bias"))
        h = h @ P(p + "mlp.c_fc.weight").T + P(p + "mlp.c_fc.bias")
        h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        x = x + h @ P(p + "mlp.c_proj.weight").T + P(p + "mlp.c_proj.bias")
    x = hand_layernorm(x, P("transformer.ln_f.weight"), P("transformer.ln_f.bias"))
    return x @ P("lm_head.weight").T


def silu(z):
    return z / (1 + np.exp(-z))


def hand_linear(model, name, x):
    state = model.state_dict()
    y = x @ state[name + ".weight"].double().numpy().T
    return y + state[name + ".bias"].double().numpy() if name + ".bias" in state else y


def hand_modern(model, idx):
    c = model.config
    hd, H = c.n_embd // c.n_head, c.ffn_factor * c.n_embd
    scale = 1 / hd if c.double_attn_scale else 1 / math.sqrt(hd)
    x = np_param(model, "wte.weight")[idx]
    for i, block in enumerate(model.h):
        p = f"h.{i}."
        x = x + hand_attention(block.attn, hand_rmsnorm(x, np_param(model, p + "ln1.weight")),
                               scale, c.rope_scaling)
        h = hand_rmsnorm(x, np_param(model, p + "ln2.weight"))
        if c.use_gate_proj:
            h = silu(hand_linear(model, p + "mlp.gate_proj", h)) \
                * hand_linear(model, p + "mlp.up_proj", h)
            x = x + hand_linear(model, p + "mlp.down_proj", h)
        else:
            ab = hand_linear(model, p + "mlp.c_fc", h)
            x = x + hand_linear(model, p + "mlp.c_proj", ab[:, :H] * silu(ab[:, H:]))
    return hand_rmsnorm(x, np_param(model, "ln_f.weight")) @ np_param(model, "lm_head.weight").T


def hand_moe_gpt(model, idx):
    c = model.config
    x = np_param(model, "wte.weight")[idx]
    total = 0.0
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        x = x + hand_attention(block.attn, hand_rmsnorm(x, np_param(model, p + "ln1.weight")),
                               1 / math.sqrt(c.n_embd // c.n_head), c.rope_scaling)
        h = hand_rmsnorm(x, np_param(model, p + "ln2.weight"))
        y, balance, _ = hand_moe(block.mlp.impl, torch.from_numpy(h))
        x, total = x + y, total + balance
    logits = hand_rmsnorm(x, np_param(model, "ln_f.weight")) @ np_param(model, "lm_head.weight").T
    return logits, total


@pytest.mark.parametrize("config", PARAMS)
def test_model_matches_hand_written_forward(config):
    model = random_model(config, seed=2)
    idx, tgt = random_tokens(config, B=1, T=10)
    out = model(idx, tgt)
    if isinstance(config, GPTConfig):
        want = hand_gpt(model, idx[0].numpy())
    elif isinstance(config, ModernGPTConfig):
        want = hand_modern(model, idx[0].numpy())
    else:
        want, balance = hand_moe_gpt(model, idx[0].numpy())
        np.testing.assert_allclose(out[1]["moe_loss"].item(), balance, rtol=1e-5)
    np.testing.assert_allclose(out[0][0].detach().numpy(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# checkpoints of the original: torch.compile (`_orig_mod.`) and DDP (`module.`) prefixes


@pytest.mark.parametrize("config", [CONFIGS["gpt"], CONFIGS["modern-gqa-gated"],
                                    CONFIGS["moe-nobias"]], ids=["gpt", "modern", "moe"])
@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module._orig_mod.", "module."])
def test_prefixed_state_dict_round_trip(config, prefix):
    source = random_model(config, seed=1)
    saved = {prefix + k: v.clone() for k, v in source.state_dict().items()}
    idx, _ = random_tokens(config)

    target = nanomoe_torch.create_model(config, 99)
    result = target.load_original_state_dict(saved)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(target(idx)[0], source(idx)[0])

    other = nanomoe_torch.create_model(config, 98)
    other.load_state_dict(nanomoe.strip_wrapper_prefixes(saved), strict=True)
    assert torch.equal(other(idx)[0], source(idx)[0])
    embedding = other.transformer.wte if isinstance(config, GPTConfig) else other.wte
    assert other.lm_head.weight.data_ptr() == embedding.weight.data_ptr()


def test_torch_compile_wrapper_keys_load():
    config = CONFIGS["moe"]
    source = random_model(config, seed=3)
    saved = torch.compile(source).state_dict()  # wrapping only: nothing is compiled
    assert all(k.startswith("_orig_mod.") for k in saved)
    target = nanomoe_torch.create_model(config, 0)
    target.load_original_state_dict(saved)
    idx, _ = random_tokens(config)
    assert torch.equal(target(idx)[0], source(idx)[0])


def test_wrong_keys_still_fail_strictly():
    config = CONFIGS["moe"]
    saved = {"_orig_mod." + k: v for k, v in random_model(config).state_dict().items()}
    saved.pop("_orig_mod.blocks.0.mlp.impl.proj_bias")
    with pytest.raises(RuntimeError, match="proj_bias"):
        nanomoe_torch.create_model(config, 0).load_original_state_dict(saved)

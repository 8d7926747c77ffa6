"""The PyTorch reference against its math written out by hand in float64 (hand_forward.py): the
MoE layer (outputs, balance loss, gates over the shared plus top-k experts), attention
(interleaved RoPE, GQA head mapping, q/k norms, the scale) and whole models."""

import math

import numpy as np
import pytest
import torch

import nanomoe_torch
from hand_forward import hand_attention, hand_gpt, hand_modern, hand_moe, hand_moe_gpt
from nanomoe import GPTConfig, ModernGPTConfig, MoeGPTConfig
from nanomoe_torch.layers import Attention
from nanomoe_torch.moe import ParallelMoE, route
from torch_cases import CONFIGS, PARAMS, random_model, random_tokens


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

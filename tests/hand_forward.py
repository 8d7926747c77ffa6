"""The reference models' math written out by hand in NumPy float64, with loops where the models
vectorise, from the original's modules (docs/original.md): the MoE layer's router steps 1-7,
attention, and the GPT, ModernGPT and MoeGPT forwards of one sequence."""

import math

import numpy as np
import torch

# the MoE layer: the router's steps 1-7 (docs/original.md#moegpt)


def hand_moe(layer, x):
    """Steps 1-7 (docs/original.md#moegpt) with loops: (output (N, C), balance loss,
    gates (N, E))."""
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


# attention: interleaved RoPE, GQA head mapping, q/k norms, the scale


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


# whole models (one sequence)


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

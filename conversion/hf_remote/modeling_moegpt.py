"""nanomoe's MoeGPT for Hugging Face ``transformers``: ``AutoModelForCausalLM`` with
``trust_remote_code=True``, ``generate()`` with a KV cache, left padding and sampling.

Written by ``python -m conversion to-hf`` from nanomoe's PyTorch reference: RoPE, RMSNorm,
the router and the experts are copied from it verbatim; attention adds the cache and the
padding mask around the same math. Parameter names are the original's (``blocks.0.attn.c_qkv``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_moegpt import NanoMoeGPTConfig

# <nanomoe-copied>
from nanomoe.rope import rope_table
from nanomoe_torch.layers import RMSNorm, apply_rope
from nanomoe_torch.moe import MoE
# </nanomoe-copied>

# transformers 5 calls the key/value cache ``cache``, 4.x ``past_key_values``
CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
               else "past_key_values")


def rope_at(x, table, positions):
    """apply_rope at per-row positions (B, T): the rotation is elementwise in (position,
    column), so the rows of every batch row are laid end to end as one sequence."""
    B, H, T, D = x.shape
    flat = x.transpose(0, 1).reshape(H, B * T, D)
    return apply_rope(flat, table[positions.reshape(-1)]).reshape(H, B, T, D).transpose(0, 1)


class Attention(nn.Module):
    """nanomoe_torch's MoeGPT attention (RoPE, then RMSNorm over each head of q and k, scale
    1/sqrt(hd)) reading earlier keys/values from a transformers Cache."""

    def __init__(self, config, layer_idx):
        super().__init__()
        C, self.n_head, self.layer_idx = config.n_embd, config.n_head, layer_idx
        self.head_dim = C // config.n_head
        self.q_norm = RMSNorm(self.head_dim)  # registered first: the original's key order
        self.k_norm = RMSNorm(self.head_dim)
        self.c_qkv = nn.Linear(C, 3 * C, bias=config.use_bias)
        self.out_proj = nn.Linear(C, C, bias=config.use_bias)

    def forward(self, x, table, positions, mask, cache):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for t in self.c_qkv(x).split(C, dim=-1))
        q = self.q_norm(rope_at(q, table, positions))
        k = self.k_norm(rope_at(k, table, positions))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=1.0 / math.sqrt(self.head_dim))
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln1 = RMSNorm(config.n_embd)
        self.attn = Attention(config, layer_idx)
        self.ln2 = RMSNorm(config.n_embd)
        self.mlp = MoE(config)

    def forward(self, x, table, positions, mask, cache):
        x = x + self.attn(self.ln1(x), table, positions, mask, cache)
        y, balance_loss = self.mlp(self.ln2(x))
        return x + y, balance_loss


def attention_mask_4d(attention_mask, past, T, device):
    """(B, 1, T, past + T) bool: causal and not padding. A query may always see itself, so
    a padding row (discarded anyway) never has every key masked, which would give NaN."""
    if past == 0 and (attention_mask is None or bool(attention_mask.all())):
        return None  # plain causal attention: SDPA's is_causal, as nanomoe_torch runs it
    S = past + T
    if attention_mask is None:  # is_causal would align a short query block top-left
        attention_mask = torch.ones(1, S, dtype=torch.bool, device=device)
    q = torch.arange(past, S, device=device)[:, None]
    kv = torch.arange(S, device=device)[None, :]
    keep = (kv <= q)[None] & attention_mask[:, None, -S:].bool()
    return (keep | (kv == q)[None])[:, None]


class NanoMoeGPTPreTrainedModel(PreTrainedModel):
    config_class = NanoMoeGPTConfig
    base_model_prefix = "nanomoe"
    _no_split_modules = ["Block"]
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module):
        # The original's init: N(0, 0.02) linears and embedding, zero biases, unit norms, and
        # first-layer expert weights N(0, 0.02) with zero projections.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif hasattr(module, "fc_weight"):
            module.fc_weight.normal_(0.0, 0.02)
            for p in (module.fc_bias, module.proj_weight, module.proj_bias):
                p.zero_()


class NanoMoeGPTForCausalLM(NanoMoeGPTPreTrainedModel, GenerationMixin):
    # transformers 5 maps each tied key to its source, 4.x lists the tied keys
    _tied_weights_keys = ({"lm_head.weight": "wte.weight"} if CACHE_FIELD == "cache"
                          else ["lm_head.weight"])

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._rope = None
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def rope_table(self, device):
        # Not a buffer: transformers may build the model on the meta device before loading.
        if self._rope is None or self._rope.device != device:
            c = self.config
            table = rope_table(c.block_size, c.n_embd // c.n_head, float(c.rope_base))
            self._rope = torch.from_numpy(table.copy()).to(device)
        return self._rope

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, return_dict=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None and attention_mask is not None:  # left padding: count tokens
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        elif position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        if past + T > self.config.block_size or int(position_ids.max()) >= self.config.block_size:
            raise ValueError(f"sequence length {past + T} is longer than block_size="
                             f"{self.config.block_size}, the longest this model was trained on")
        mask = attention_mask_4d(attention_mask, past, T, x.device)
        table = self.rope_table(x.device).to(x.dtype)
        moe_loss = 0.0
        for block in self.blocks:
            x, balance_loss = block(x, table, position_ids.expand(B, T), mask, cache)
            moe_loss = moe_loss + balance_loss
        x = self.ln_f(x)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:  # next-token loss as transformers computes it, plus the MoE term
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                 labels[:, 1:].reshape(-1), ignore_index=-100)
            loss = ce + self.config.moe_loss_weight * moe_loss
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{CACHE_FIELD: cache if use_cache else None})

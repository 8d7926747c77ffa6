"""nanomoe's nGPT for Hugging Face ``transformers``: ``AutoModelForCausalLM`` with
``trust_remote_code=True``, ``generate()`` with a KV cache, left padding and sampling.

Written by ``python -m conversion to-hf`` from nanomoe's PyTorch reference: justnorm, the
scale vectors' ``eff``, the original's half-split rotary map, RoPE and RMSNorm are copied from
it verbatim; the block adds the cache and the padding mask around the same math. Parameter
names are the original's (``blocks.0.c_attn``, ``blocks.0.attn_alpha``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_ngpt import NanoNGPTConfig

# <nanomoe-copied>
from nanomoe.rope import rope_table
from nanomoe_torch.layers import RMSNorm, apply_rope
from nanomoe_torch.ngpt import ALPHA_TARGET, ROPE_BASE, eff, half_split_rotary, justnorm
# </nanomoe-copied>

# transformers 5 calls the key/value cache ``cache``, 4.x ``past_key_values``
CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
               else "past_key_values")


def rotary_at(x, table, positions, standard):
    """The reference's rotary map at per-row positions (B, T): both maps are elementwise in
    (position, column), so the rows of every batch row are laid end to end as one sequence."""
    B, H, T, D = x.shape
    flat = x.transpose(0, 1).reshape(H, B * T, D)
    rows = table[positions.reshape(-1)]
    out = apply_rope(flat, rows) if standard else half_split_rotary(flat, rows)
    return out.reshape(H, B, T, D).transpose(0, 1)


class NGPTBlock(nn.Module):
    """nanomoe_torch's nGPTBlock (the same parameters, in its order) reading earlier
    keys/values from a transformers Cache."""

    def __init__(self, config, layer_idx):
        super().__init__()
        C, s = config.n_embd, config.base_scale
        self.n_head, self.head_dim, self.layer_idx = config.n_head, C // config.n_head, layer_idx
        self.config = config
        self.attn_alpha = nn.Parameter(torch.full((C,), ALPHA_TARGET * s))
        self.mlp_alpha = nn.Parameter(torch.full((C,), ALPHA_TARGET * s))
        self.sqk = nn.Parameter(torch.full((C,), s))
        self.suv = nn.Parameter(torch.full((8 * C,), s))
        self.c_attn = nn.Linear(C, 3 * C, bias=False)
        self.attn_out = nn.Linear(C, C, bias=False)
        self.c_mlp = nn.Linear(C, 8 * C, bias=False)  # u (first 4C), then the gate g
        self.mlp_out = nn.Linear(4 * C, C, bias=False)
        self.rms_att = RMSNorm(C)
        self.rms_mlp = RMSNorm(C)
        self.act = nn.SiLU()

    def forward(self, x, table, positions, mask, cache):
        B, T, C = x.shape
        nh, hd = self.n_head, self.head_dim
        q, k, v = self.c_attn(self.rms_att(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))
        standard = self.config.standard_rope
        q, k = rotary_at(q, table, positions, standard), rotary_at(k, table, positions, standard)
        s_qk = eff(self.sqk, 1.0)[:hd]  # the first hd entries, shared by every head
        q, k = justnorm(q) * s_qk, justnorm(k) * s_qk
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        scale = math.sqrt(hd) if self.config.paper_attn_scale else None  # None: 1/sqrt(hd)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=scale)
        y = self.attn_out(o.transpose(1, 2).reshape(B, T, C))

        x_hat = justnorm(x)
        h_att = x_hat + eff(self.attn_alpha, ALPHA_TARGET) * (justnorm(y) - x_hat)
        uv = self.c_mlp(self.rms_mlp(h_att)) * eff(self.suv, 1.0)
        u, g = uv.split(4 * C, dim=-1)
        y2 = self.mlp_out(u * self.act(g))  # SiLU on the second half
        h_mlp = h_att + eff(self.mlp_alpha, ALPHA_TARGET) * (justnorm(y2) - h_att)
        return justnorm(h_mlp)


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


class NanoNGPTPreTrainedModel(PreTrainedModel):
    config_class = NanoNGPTConfig
    base_model_prefix = "nanomoe"
    _no_split_modules = ["NGPTBlock"]
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module):
        # The original's init: every Linear and Embedding N(0, base_scale^2); the scale
        # vectors at their starting values.
        s = self.config.base_scale
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, s)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, NGPTBlock):
            module.attn_alpha.fill_(ALPHA_TARGET * s)
            module.mlp_alpha.fill_(ALPHA_TARGET * s)
            module.sqk.fill_(s)
            module.suv.fill_(s)


class NanoNGPTForCausalLM(NanoNGPTPreTrainedModel, GenerationMixin):
    # transformers 5 maps each tied key to its source, 4.x lists the tied keys
    _tied_weights_keys = ({"lm_head.weight": "wte.weight"} if CACHE_FIELD == "cache"
                          else ["lm_head.weight"])

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([NGPTBlock(config, i) for i in range(config.n_layer)])
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
            table = rope_table(c.block_size, c.n_embd // c.n_head, ROPE_BASE)
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
        for block in self.blocks:
            x = block(x, table, position_ids.expand(B, T), mask, cache)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:  # next-token loss as transformers computes it
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{CACHE_FIELD: cache if use_cache else None})

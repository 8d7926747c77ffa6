"""The configuration of nanomoe's nGPT for Hugging Face ``transformers`` (remote code).

Written by ``python -m conversion to-hf``; field names and defaults are nanomoe's
``nGPTConfig`` (a test compares them).
"""

import math

from transformers import PretrainedConfig


class NanoNGPTConfig(PretrainedConfig):
    model_type = "nanomoe_ngpt"
    # the standard names transformers' generation and cache code read
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                     "num_attention_heads": "n_head", "max_position_embeddings": "block_size"}

    def __init__(self, block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768,
                 dropout=0.0, base_scale=1.0 / math.sqrt(768), paper_attn_scale=False,
                 standard_rope=False, use_cache=True, tie_word_embeddings=True, **kwargs):
        self.block_size, self.vocab_size = block_size, vocab_size
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.dropout, self.base_scale = dropout, base_scale
        self.paper_attn_scale, self.standard_rope = paper_attn_scale, standard_rope
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

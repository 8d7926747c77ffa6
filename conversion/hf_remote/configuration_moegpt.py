"""The configuration of nanomoe's MoeGPT for Hugging Face ``transformers`` (remote code).

Written by ``python -m conversion to-hf``; field names and defaults are nanomoe's
``MoeGPTConfig`` (a test compares them), except ``rope_base`` for its ``rope_scaling`` (the
RoPE base): transformers reserves ``rope_scaling`` for a dict.
"""

from transformers import PretrainedConfig


class NanoMoeGPTConfig(PretrainedConfig):
    model_type = "nanomoe_moegpt"
    # the standard names transformers' generation and cache code read
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                     "num_attention_heads": "n_head", "max_position_embeddings": "block_size"}

    def __init__(self, block_size=1024, vocab_size=50304, n_layer=8, n_head=8, n_embd=512,
                 use_bias=True, rope_base=10000.0, n_experts=4, m_sub_experts=1,
                 n_shared_experts=1, n_activated_experts=2, route_score_func="softmax",
                 route_scale=1.0, ffn_factor=2, moe_loss_weight=0.01, expert_dim=None,
                 use_cache=True, tie_word_embeddings=True, **kwargs):
        self.block_size, self.vocab_size = block_size, vocab_size
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.use_bias, self.rope_base = use_bias, rope_base
        self.n_experts, self.m_sub_experts = n_experts, m_sub_experts
        self.n_shared_experts, self.n_activated_experts = n_shared_experts, n_activated_experts
        self.route_score_func, self.route_scale = route_score_func, route_scale
        self.ffn_factor, self.moe_loss_weight, self.expert_dim = (ffn_factor, moe_loss_weight,
                                                                  expert_dim)
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # Derived sizes, as nanomoe's MoeGPTConfig names them (the copied MoE code reads these).
    @property
    def n_total_experts(self):
        return self.n_experts * self.m_sub_experts

    @property
    def n_shared(self):
        return self.n_shared_experts * self.m_sub_experts

    @property
    def n_routed_experts(self):
        return self.n_total_experts - self.n_shared

    @property
    def expert_hidden(self):
        return self.expert_dim if self.expert_dim is not None else self.ffn_factor * self.n_embd

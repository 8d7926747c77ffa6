"""Active parameters and FLOPs per token (nanomoe/flops.py, the MFU's numerator), counted by
hand from the default configs' sizes (README)."""

from nanomoe import GPTConfig, MoeGPTConfig, nGPTConfig
from nanomoe.flops import active_params, flops_per_token


def test_active_params_by_hand():
    # GPT-2 small: every parameter but the learned positions (1024 x 768), the tied head once
    assert active_params(GPTConfig()) == 124_439_808 - 1024 * 768
    # MoeGPT: of E=4 experts per layer, S=1 shared + k=2 routed touch a token, so one expert
    # per layer is idle: fc (H, C) + bias H + proj (C, H) + bias C, H = 1024, C = 512, 8 layers
    idle = 8 * (2 * 1024 * 512 + 1024 + 512)
    assert active_params(MoeGPTConfig()) == 67_790_368 - idle == 59_389_472
    # nGPT: no positions, no experts
    assert active_params(nGPTConfig()) == 151_963_392


def test_flops_per_token_is_6n_plus_attention():
    # 6 N (forward and backward matmuls) + 12 L C T (attention scores and their use)
    assert flops_per_token(GPTConfig(), 1024) == 6 * 123_653_376 + 12 * 12 * 768 * 1024
    assert flops_per_token(MoeGPTConfig(), 256) == 6 * 59_389_472 + 12 * 8 * 512 * 256

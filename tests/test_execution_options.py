"""execution_options: which kernels and dtype on which device (flash attention on recent NVIDIA
GPUs in bf16, the CPU attention, the MoE dispatch), decided from a device's kind alone, so
fake devices cover every case on CPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from nanomoe import GPTConfig, ModernGPTConfig
from nanomoe_jax import execution_options
from nanomoe_jax.execution import describe


@dataclasses.dataclass
class FakeDevice:
    platform: str
    device_kind: str
    compute_capability: str | None = None


RTX4090 = FakeDevice("gpu", "NVIDIA GeForce RTX 4090")
GPT = GPTConfig()


def test_flash_attention_on_recent_nvidia_in_bf16():
    for dev in (RTX4090, FakeDevice("gpu", "NVIDIA A100-SXM4-80GB"),
                FakeDevice("gpu", "NVIDIA H100 80GB HBM3"), FakeDevice("gpu", "x", "9.0")):
        opts = execution_options(dev, GPT)
        assert opts.attention_impl == "cudnn" and opts.dtype == jnp.bfloat16, dev


def test_xla_attention_elsewhere():
    # CPU: the attention with its own backward (nanomoe_jax/attention.py)
    assert execution_options(FakeDevice("cpu", "cpu"), GPT).attention_impl == "custom_vjp"
    cases = [
        (FakeDevice("gpu", "Tesla V100-SXM2-16GB"), {}),  # sm_70: no cuDNN flash
        (FakeDevice("gpu", "NVIDIA A10", "7.5"), {}),  # the runtime's own figure wins
        (FakeDevice("gpu", "AMD Instinct MI250X", "gfx90a"), {}),  # not NVIDIA
        (FakeDevice("tpu", "TPU v5 lite"), {}),
        (RTX4090, {"dtype": "float32"}),  # flash needs bf16/fp16
    ]
    for dev, over in cases:
        assert execution_options(dev, GPT, **over).attention_impl == "xla", dev
    assert execution_options(FakeDevice("cpu", "cpu")).dtype == jnp.float32
    # head sizes cuDNN refuses: not a multiple of 8, or over 128
    for n_embd, n_head in ((48, 4), (1024, 4)):
        cfg = ModernGPTConfig(n_embd=n_embd, n_head=n_head, n_kv_head=1, n_layer=1)
        assert execution_options(RTX4090, cfg).attention_impl == "xla"


def test_overrides_win_and_none_means_decide():
    opts = execution_options(RTX4090, GPT, attention_impl="xla", remat="dots",
                             loss_chunk_tokens=None, scan_layers=None)
    assert (opts.attention_impl, opts.remat, opts.loss_chunk_tokens, opts.scan_layers) == (
        "xla", "dots", 8192, False)
    with pytest.raises(TypeError):
        execution_options(RTX4090, GPT, attn="cudnn")


def test_real_cpu_device():
    opts = execution_options(jax.devices()[0], GPT)
    assert opts.attention_impl == "custom_vjp" and opts.dtype == jnp.float32


def test_moe_dispatch_grouped_on_gpus_unless_asked_or_expert_parallel():
    from nanomoe import GPTConfig, MoeGPTConfig

    gpu = FakeDevice("gpu", "NVIDIA GeForce RTX 4090")
    from nanomoe_jax.ragged_gemm import unavailable_reason

    # tokamax's grouped GEMM where it imports, else the padded tiles (tests/test_moe_grouped.py)
    picked = "grouped" if unavailable_reason() else "tokamax"
    assert execution_options(gpu, MoeGPTConfig()).moe_dispatch == picked
    assert execution_options(gpu, MoeGPTConfig(), moe_dispatch="capacity").moe_dispatch == "capacity"
    # an expert mesh: the exchange, its experts through tokamax where it runs, else tiles
    on_mesh = "capacity" if unavailable_reason() else "tokamax"
    assert execution_options(gpu, MoeGPTConfig(), expert_mesh=object()).moe_dispatch == on_mesh
    assert execution_options(gpu, GPTConfig()).moe_dispatch is None
    assert execution_options(FakeDevice("cpu", "cpu"), MoeGPTConfig()).moe_dispatch is None


def test_ngpt_recomputes_all_but_the_matmuls_where_it_scans_its_layers():
    """nGPT's fp32 residual stream stacked by a layer scan planned 28 GiB on the 4090: there
    it takes remat="dots" (7 GiB planned); unrolled (one GPU, the default) it keeps 10.7 GiB
    without; none on CPU; a --remat flag still wins."""
    from nanomoe import GPTConfig, nGPTConfig

    ngpt = nGPTConfig()
    assert execution_options(RTX4090, ngpt).remat == "none"  # 12 layers: unrolled
    assert execution_options(RTX4090, ngpt, scan_layers=True).remat == "dots"
    assert execution_options(RTX4090, ngpt, mesh_devices=8).remat == "dots"  # a mesh scans
    assert execution_options(FakeDevice("cpu", "cpu"), ngpt, scan_layers=True).remat == "none"
    assert execution_options(RTX4090, GPTConfig(), scan_layers=True).remat == "none"
    assert execution_options(RTX4090, ngpt, scan_layers=True, remat="none").remat == "none"


def test_shared_experts_dense_where_the_grouped_gemms_are_bandwidth_bound():
    """tokamax's dispatch runs the shared experts as one dense MLP on Hopper at MoeGPT-64's
    sizes (C H / (C + H) = 171 FLOPs a byte, under its ridge), not on the 4090, not at
    MoeGPT's H = 2048, not without shared experts; an expert mesh's devices alike; a flag wins."""
    from nanomoe import MoeGPTConfig
    from nanomoe_jax.ragged_gemm import unavailable_reason

    if unavailable_reason():
        pytest.skip("tokamax is not installed: no tokamax dispatch to choose for")
    fine = MoeGPTConfig(n_experts=16, m_sub_experts=4, n_activated_experts=8, expert_dim=256)
    h100 = FakeDevice("gpu", "NVIDIA H100 80GB HBM3")
    assert execution_options(h100, fine).shared_dense
    assert "shared_dense=True" in describe(execution_options(h100, fine))
    assert not execution_options(RTX4090, fine).shared_dense
    assert not execution_options(h100, MoeGPTConfig()).shared_dense
    assert not execution_options(h100, dataclasses.replace(fine, n_shared_experts=0)).shared_dense
    assert execution_options(h100, fine, expert_mesh=object()).shared_dense  # its own slice
    assert not execution_options(h100, fine, shared_dense=False).shared_dense
    assert execution_options(RTX4090, fine, shared_dense=True).shared_dense

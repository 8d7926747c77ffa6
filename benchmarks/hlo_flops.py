"""Matmul FLOPs of one HLO instruction, and which kernel family it is.

* ``dot`` (plain or inside a Triton/cuDNN GEMM fusion) and ``__cublas$gemm`` /
  ``__cublas$lt$matmul`` custom calls: 2 x output elements x contracted size (a dot under the
  ``grouped_gemm`` name scope of ``nanomoe_jax/grouped.py`` is a tile of a grouped GEMM);
* cuDNN flash attention (``__cudnn$fmha...``): the score and value matmuls it performs, half of
  them when causal: 2 in the forward, 5 in the backward (dQ, dK, dV, dP and the recomputed
  scores);
* ``ragged-dot`` and grouped-GEMM kernels (a custom call whose target, kernel name, JAX name
  stack or Python stack says ragged/grouped/gmm, e.g. tokamax's Triton or Mosaic GPU
  ``ragged_dot``): 2 x rows x the two weight dimensions, forward and both backward GEMMs;
* any custom call whose kernel states its FLOPs (``pallas_call(metadata={"flops": ...})``,
  which Triton calls carry as ``serialized_metadata``): that figure, of the ``kind`` it
  states (the MoE's own grouped kernels: ``grouped-gemm``).

Any other custom call that may compute is *uncounted*: returned with a label so the plan names
it and ``--check`` fails, rather than counting it as 0 FLOPs unseen.
"""

from __future__ import annotations

import json
import re

import numpy as np

from .hlo_text import Instr, backend_config, dims, target

# custom calls that move, sort or shard data: no matmul, their bytes are their operands
NO_MATMUL = ("Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "AllocateBuffer",
             "LocalToGlobal", "GlobalToLocal", "MoveToHost", "MoveToDevice", "annotate_device",
             "__gpu$TopK", "TopK", "__cub$DeviceRadixSort", "cu_threefry2x32",
             "xla_ffi_python_cpu_callback", "xla_ffi_python_gpu_callback")
GROUPED_WORDS = ("ragged", "grouped", "gmm")


def kernel_name(ins: Instr) -> str:
    """The name a Triton (Pallas) call gives its kernel (an MLIR dict backend config)."""
    m = re.search(r'\bname = "([^"]*)"', ins.attrs)
    return m.group(1) if m else ""


def kernel_metadata(ins: Instr) -> dict:
    """``pallas_call(metadata=...)`` of a Triton call (hex-escaped JSON), else {}."""
    m = re.search(r'serialized_metadata = "((?:[^"\\]|\\.)*)"', ins.attrs)
    if not m:
        return {}
    text = re.sub(r"\\([0-9A-Fa-f]{2})", lambda h: chr(int(h.group(1), 16)), m.group(1))
    try:
        return json.loads(text)
    except ValueError:
        return {}


def label(ins: Instr) -> str:
    parts = ins.op_name.split("/")  # ".../<pallas_call name>/pallas_call"
    name = kernel_name(ins) or (parts[-2] if len(parts) > 1 else parts[0])
    return f"{target(ins)} ({name})" if name else target(ins)


def grouped_gemm_flops(ins: Instr, shape_of) -> float:
    """2 x M x X x Y for the (G, X, Y) weights and M rows: the forward (rows x weights ->
    rows), the input gradient, and the weight gradient (rows x rows -> (G, X, Y)) alike."""
    shapes = [shape_of(o) for o in ins.operands] + [s for _, s in ins.shapes]
    weights = [s for s in shapes if len(s) == 3]
    rows = [s for s in shapes if len(s) == 2]
    if not weights or not rows:
        return 0.0
    _, X, Y = max(weights, key=lambda s: s[1] * s[2])
    M = max((s[0] for s in rows if s[1] in (X, Y)), default=0)
    return 2.0 * M * X * Y


def instr_flops(ins: Instr, shape_of, where: str = "") -> tuple[float, str | None, str | None]:
    """(matmul FLOPs, kind, uncounted label) of one instruction. ``where``: the Python stack
    of the instruction (file and function names), to recognise a library's kernel."""
    if ins.op == "dot":
        lhs = shape_of(ins.operands[0])
        k = int(np.prod([lhs[d] for d in dims(ins.attrs, "lhs_contracting_dims")]))
        # nanomoe_jax.grouped names its tile matmuls: a grouped GEMM made of dense tiles
        kind = "grouped-gemm" if "grouped_gemm" in ins.op_name else "dot"
        return 2.0 * np.prod(ins.shapes[0][1]) * k, kind, None
    if ins.op == "ragged-dot":
        return grouped_gemm_flops(ins, shape_of), "ragged-dot", None
    if ins.op != "custom-call":
        return 0.0, None, None
    return custom_call_flops(ins, shape_of, where)


def custom_call_flops(ins: Instr, shape_of, where: str) -> tuple[float, str | None, str | None]:
    t = target(ins)
    if t.startswith("__cublas"):
        cfg = backend_config(ins.attrs).get("gemm_backend_config", {})
        lhs = shape_of(ins.operands[0])
        contracting = cfg.get("dot_dimension_numbers", {}).get("lhs_contracting_dimensions", [])
        k = int(np.prod([lhs[int(d)] for d in contracting]))
        kind = "cublasLt" if "$lt$" in t else "cublas"
        return 2.0 * np.prod(ins.shapes[0][1]) * k, kind, None
    if t.startswith("__cudnn$fmha"):
        cfg = backend_config(ins.attrs).get("cudnn_fmha_backend_config", {})
        B, T, N, H = shape_of(ins.operands[0])[:4]
        S = shape_of(ins.operands[1])[1]
        causal = 0.5 if cfg.get("mask_type") == "CAUSAL" else 1.0
        matmuls = 5 if "Backward" in t else 2
        return matmuls * 2.0 * B * N * T * S * H * causal, "flash-attention", None
    if t in NO_MATMUL:
        return 0.0, None, None
    meta = kernel_metadata(ins)
    if "flops" in meta:
        return float(meta["flops"]), meta.get("kind", "kernel-metadata"), None
    text = " ".join((t, kernel_name(ins), ins.op_name, where)).lower()
    if any(w in text for w in GROUPED_WORDS):
        f = grouped_gemm_flops(ins, shape_of)
        if f:
            return f, "grouped-gemm", None
    return 0.0, None, label(ins)

"""Reading optimised HLO text: value shapes, and what a compiled GPU program will run.

:func:`program_stats` walks the scheduled computations (the entry, ``while`` bodies times their
trip count, calls, conditionals) and returns per-kernel FLOPs and bytes. XLA's own cost model
counts custom calls (cuBLAS GEMMs, cuDNN flash attention) as 0 and a ``while`` body once, so the
matmul FLOPs are counted here from operand shapes instead:

* ``dot`` (plain or inside a Triton/cuDNN GEMM fusion) and ``__cublas$gemm`` /
  ``__cublas$lt$matmul`` custom calls: 2 x output elements x contracted size;
* cuDNN flash attention (``__cudnn$fmha...``): the score and value matmuls it performs, half of
  them when causal: 2 in the forward, 5 in the backward (dQ, dK, dV, dP and the recomputed
  scores);
* ``ragged-dot`` / grouped GEMM custom calls: every row times its own group, 2 x M x K x N.

Elementwise work is not counted (it is bandwidth, and shows in the bytes).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|bf16|f16|f32|f64|f8e4m3fn|f8e5m2)"
                    r"\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
# no kernel of their own
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
         "async-done", "async-update", "copy-done", "send-done", "recv-done", "domain",
         "add-dependency"}


def result_type(rhs: str) -> tuple[str, str]:
    """(result type text, rest) of an instruction's right-hand side: a tuple type
    ``(f32[2], s32[])`` or a single ``f32[2,3]{1,0}``."""
    if rhs.startswith("("):
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rhs[: i + 1], rhs[i + 1:].lstrip()
    head, _, rest = rhs.partition(" ")
    return head, rest


def shapes_in(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(text)]


def nbytes(shapes) -> float:
    return float(sum(_DTYPE_BYTES[dt] * int(np.prod(d)) for dt, d in shapes))


def hlo_shapes(hlo_text: str) -> Counter:
    """(dtype, dims) of every value an instruction of the HLO produces, counted."""
    out: Counter = Counter()
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            out.update(shapes_in(result_type(m.group(2))[0]))
    return out


@dataclass
class Instr:
    name: str
    op: str
    shapes: list  # result leaves
    operands: list[str]
    attrs: str
    param_index: int = -1  # parameter(i)


@dataclass
class Computation:
    name: str
    entry: bool
    instrs: list[Instr] = field(default_factory=list)


def parse_module(hlo_text: str) -> dict[str, Computation]:
    comps: dict[str, Computation] = {}
    cur = None
    for line in hlo_text.splitlines():
        h = _HEADER.match(line)
        if h and "=" not in line.split("(")[0]:
            cur = comps.setdefault(h.group(2), Computation(h.group(2), bool(h.group(1))))
            continue
        m = _INSTR.match(line)
        if cur is None or not m:
            continue
        rtype, rest = result_type(m.group(2))
        op, _, args = rest.partition("(")
        depth, end = 1, len(args)
        for i, ch in enumerate(args):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                end = i
                break
        operands = re.findall(r"%([\w.\-]+)", args[:end])
        index = int(args[:end]) if op.strip() == "parameter" else -1
        cur.instrs.append(Instr(m.group(1), op.strip(), shapes_in(rtype), operands,
                                args[end + 1:], index))
    return comps


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


def _callees(attrs: str) -> list[str]:
    names = re.findall(r"\b(?:to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)",
                       attrs)
    m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    return names + (re.findall(r"%?([\w.\-]+)", m.group(1)) if m else [])


def _dims(attrs: str, key: str) -> list[int]:
    m = re.search(rf"{key}=\{{([0-9,]*)\}}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def _backend_config(attrs: str) -> dict:
    i = attrs.find("backend_config=")
    if i < 0 or attrs[i + 15: i + 16] != "{":
        return {}
    try:
        return json.JSONDecoder().raw_decode(attrs[i + 15:])[0]
    except ValueError:
        return {}


def trip_count(ins: Instr) -> int:
    n = _backend_config(ins.attrs).get("known_trip_count", {}).get("n")
    return int(n) if n else 1


def _target(ins: Instr) -> str:
    m = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
    return m.group(1) if m else ""


def instr_flops(ins: Instr, shape_of) -> tuple[float, str | None]:
    """(matmul FLOPs, kind) of one instruction; kind names the kernel family."""
    f, kind = _instr_flops(ins, shape_of)
    return float(f), kind


def _instr_flops(ins: Instr, shape_of) -> tuple[float, str | None]:
    if ins.op == "dot":
        lhs = shape_of(ins.operands[0])
        k = int(np.prod([lhs[d] for d in _dims(ins.attrs, "lhs_contracting_dims")]))
        # nanomoe_jax.grouped names its tile matmuls: a grouped GEMM made of dense tiles
        return 2.0 * np.prod(ins.shapes[0][1]) * k, ("grouped-gemm" if "grouped_gemm" in ins.attrs
                                                    else "dot")
    if ins.op == "ragged-dot":
        lhs, out = shape_of(ins.operands[0]), ins.shapes[0][1]
        return 2.0 * np.prod(out) * lhs[-1], "ragged-dot"
    if ins.op != "custom-call":
        return 0.0, None
    target = _target(ins)
    if target.startswith("__cublas"):
        cfg = _backend_config(ins.attrs).get("gemm_backend_config", {})
        lhs = shape_of(ins.operands[0])
        contracting = cfg.get("dot_dimension_numbers", {}).get("lhs_contracting_dimensions", [])
        k = int(np.prod([lhs[int(d)] for d in contracting]))
        kind = "cublasLt" if "$lt$" in target else "cublas"
        return 2.0 * np.prod(ins.shapes[0][1]) * k, kind
    if target.startswith("__cudnn$fmha"):
        cfg = _backend_config(ins.attrs).get("cudnn_fmha_backend_config", {})
        B, T, N, H = shape_of(ins.operands[0])[:4]
        S = shape_of(ins.operands[1])[1]
        causal = 0.5 if cfg.get("mask_type") == "CAUSAL" else 1.0
        matmuls = 5 if "Backward" in target else 2
        return matmuls * 2.0 * B * N * T * S * H * causal, "flash-attention"
    if "ragged" in target.lower() or "grouped" in target.lower():
        lhs, out = shape_of(ins.operands[0]), ins.shapes[0][1]
        return 2.0 * np.prod(out) * lhs[-1], "grouped-gemm"
    return 0.0, None


def _sliced_params(comp: Computation | None) -> dict[int, float]:
    """Bytes a fusion really reads of each parameter that it only slices (a layer of stacked
    weights inside a scan) or updates in place: the slices, not the whole array."""
    if comp is None:
        return {}
    params = {i.name: i.param_index for i in comp.instrs if i.op == "parameter"}
    users: dict[str, list[Instr]] = {n: [] for n in params}
    for ins in comp.instrs:
        for o in ins.operands:
            if o in users:
                users[o].append(ins)
    out = {}
    for name, uses in users.items():
        idx = params[name]
        if uses and all(u.op in ("dynamic-slice", "slice", "gather") for u in uses):
            out[idx] = sum(nbytes(u.shapes) for u in uses)
        elif uses and all(u.op == "dynamic-update-slice" and u.operands[0] == name for u in uses):
            out[idx] = 0.0
    return out


@dataclass
class ProgramStats:
    flops: float = 0.0  # matmul FLOPs, loops times trip count, custom calls included
    flops_by_kind: Counter = field(default_factory=Counter)
    kernels: list = field(default_factory=list)  # (name, op, flops, bytes, multiplicity)
    fusions: int = 0
    custom_calls: Counter = field(default_factory=Counter)
    gemm_backends: Counter = field(default_factory=Counter)
    loops: list = field(default_factory=list)  # (body, trip count)


def program_stats(hlo_text: str) -> ProgramStats:
    comps = parse_module(hlo_text)
    shapes = {i.name: i.shapes for c in comps.values() for i in c.instrs}

    def shape_of(name):
        leaves = shapes.get(name) or [("f32", ())]
        return leaves[0][1]

    def operand_bytes(ins):
        sliced = _sliced_params(comps.get(_attr(ins.attrs, "calls"))) if ins.op == "fusion" else {}
        return sum(sliced.get(i, nbytes(shapes.get(o, []))) for i, o in enumerate(ins.operands))

    def result_bytes(ins):
        comp = comps.get(_attr(ins.attrs, "calls")) if ins.op == "fusion" else None
        root = comp.instrs[-1] if comp and comp.instrs else None
        if root is not None and root.op == "dynamic-update-slice":  # in place: the update
            return nbytes(shapes.get(root.operands[1], []))
        return nbytes(ins.shapes)

    def fused_flops(comp_name: str, kinds: Counter) -> float:
        total = 0.0
        for ins in comps[comp_name].instrs:
            f, kind = instr_flops(ins, shape_of)
            if kind:
                kinds[kind] += f
            total += f
            callee = _attr(ins.attrs, "calls")
            if callee in comps:
                total += fused_flops(callee, kinds)
        return total

    stats = ProgramStats()

    def walk(comp_name: str, mult: int):
        for ins in comps[comp_name].instrs:
            if ins.op == "while":
                n = trip_count(ins)
                stats.loops.append((_attr(ins.attrs, "body"), n))
                walk(_attr(ins.attrs, "body"), mult * n)
                walk(_attr(ins.attrs, "condition"), mult * n)
                continue
            if ins.op in ("call", "conditional", "async-start"):
                for callee in _callees(ins.attrs):
                    if callee in comps:
                        walk(callee, mult)
                continue
            if ins.op in _FREE:
                continue
            kinds: Counter = Counter()
            f, kind = instr_flops(ins, shape_of)
            if kind:
                kinds[kind] += f
            cfg = json.dumps(_backend_config(ins.attrs))
            if ins.op == "fusion":
                stats.fusions += mult
                f += fused_flops(_attr(ins.attrs, "calls"), kinds)
                if "__triton_gemm" in cfg or "__triton" in cfg and "dot" in kinds:
                    stats.gemm_backends["triton"] += mult
                elif "__cudnn$fusion" in cfg:
                    stats.gemm_backends["cudnn-fusion"] += mult
                elif kinds.get("dot"):
                    stats.gemm_backends["xla-fusion"] += mult
            if ins.op == "custom-call":
                stats.custom_calls[_target(ins)] += mult
                if kind in ("cublas", "cublasLt"):
                    stats.gemm_backends[kind] += mult
            for k, v in kinds.items():
                stats.flops_by_kind[k] += v * mult
            b = operand_bytes(ins) + result_bytes(ins)
            stats.flops += f * mult
            stats.kernels.append((ins.name, ins.op, f, b, mult))

    entry = next(c.name for c in comps.values() if c.entry)
    walk(entry, 1)
    return stats


def roofline_seconds(stats: ProgramStats, peak_flops: float, bandwidth: float) -> float:
    """Sum over kernels of max(compute time, memory time): an estimate, never a measurement
    (no launch overheads, no overlap, every operand read from and result written to HBM)."""
    return float(sum(m * max(f / peak_flops, b / bandwidth) for _, _, f, b, m in stats.kernels))


def bytes_accessed(stats: ProgramStats) -> float:
    return float(sum(m * b for _, _, _, b, m in stats.kernels))

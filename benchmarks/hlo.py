"""Reading optimised HLO text: value shapes, and what a compiled GPU program will run.

:func:`program_stats` walks the scheduled computations (the entry, ``while`` bodies times their
trip count, calls, conditionals) and returns per-kernel FLOPs and bytes. XLA's own cost model
counts custom calls (cuBLAS GEMMs, cuDNN flash attention, Triton and Mosaic kernels) as 0 and a
``while`` body once, so the matmul FLOPs are counted here from operand shapes instead
(``benchmarks/hlo_flops.py``: which kernels, which formula; a custom call it cannot count is
listed in ``ProgramStats.uncounted``, never silently 0). Bytes: every operand read once and
every result written once per kernel run, except what a kernel only slices or updates in place
(``benchmarks/hlo_bytes.py``). ``benchmarks/hlo_moe.py`` splits the bytes of the MoE layers.

Elementwise work is not counted as FLOPs (it is bandwidth, and shows in the bytes).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

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
    frame: int = 0  # metadata stack_frame_id (0: none); see hlo_moe.stack_frames
    op_name: str = ""  # metadata op_name: the JAX name stack


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
        attrs = args[end + 1:]
        frame = re.search(r"stack_frame_id=(\d+)", attrs)
        op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', attrs)  # may hold \" (tokamax's)
        cur.instrs.append(Instr(m.group(1), op.strip(), shapes_in(rtype), operands, attrs,
                                index, int(frame.group(1)) if frame else 0,
                                op_name.group(1) if op_name else ""))
    return comps


def attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


def callees(attrs: str) -> list[str]:
    names = re.findall(r"\b(?:to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)",
                       attrs)
    m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    return names + (re.findall(r"%?([\w.\-]+)", m.group(1)) if m else [])


def dims(attrs: str, key: str) -> list[int]:
    m = re.search(rf"{key}=\{{([0-9,]*)\}}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def backend_config(attrs: str) -> dict:
    i = attrs.find("backend_config=")
    if i < 0 or attrs[i + 15: i + 16] != "{":
        return {}
    try:
        return json.JSONDecoder().raw_decode(attrs[i + 15:])[0]
    except ValueError:
        return {}


def trip_count(ins: Instr) -> int:
    n = backend_config(ins.attrs).get("known_trip_count", {}).get("n")
    return int(n) if n else 1


def target(ins: Instr) -> str:
    m = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
    return m.group(1) if m else ""


class Kernel(NamedTuple):
    name: str
    op: str
    flops: float  # matmul FLOPs of one run
    bytes: float  # bytes of one run
    mult: int  # runs per step (loop trip counts)
    comp: str = ""  # the computation it runs in
    operands: tuple = ()
    parts: tuple = ()  # hlo_bytes.Part per operand, then the result
    ops: frozenset = frozenset()  # its op and, for a fusion, every fused op
    frames: frozenset = frozenset()  # stack frame ids of those ops
    op_names: tuple = ()


@dataclass
class ProgramStats:
    flops: float = 0.0  # matmul FLOPs, loops times trip count, custom calls included
    flops_by_kind: Counter = field(default_factory=Counter)
    kernels: list = field(default_factory=list)  # Kernel per instruction that launches one
    fusions: int = 0
    custom_calls: Counter = field(default_factory=Counter)
    gemm_backends: Counter = field(default_factory=Counter)
    loops: list = field(default_factory=list)  # (body, trip count)
    uncounted: Counter = field(default_factory=Counter)  # custom call label -> runs per step
    frames: dict = field(default_factory=dict)  # stack frame id -> [(file, function)], inner first


def _fused(comps, ins: Instr) -> list[Instr]:
    """The instructions a kernel runs: itself, and for a fusion every fused one (nested)."""
    out = [ins]
    callee = attr(ins.attrs, "calls") if ins.op == "fusion" else None
    for sub in comps[callee].instrs if callee in comps else []:
        out += _fused(comps, sub) if sub.op == "fusion" else [sub]
    return out


def _resolved(defs: dict, name: str) -> str:
    """The kernel or value behind bitcasts and tuple elements (a multi-output fusion's)."""
    while name in defs and defs[name].op in ("bitcast", "get-tuple-element") and defs[
            name].operands:
        name = defs[name].operands[0]
    return name


def _gemm_backend(ins: Instr, kinds: Counter) -> str | None:
    """Which GEMM emitter runs a kernel with matmuls in it (tile GEMMs of a grouped GEMM too)."""
    cfg = json.dumps(backend_config(ins.attrs))
    if ins.op == "custom-call":
        # a kernel library's (tokamax) or our own Pallas kernel (its FLOPs in its metadata)
        if kinds.get("grouped-gemm") or kinds.get("kernel-metadata"):
            t = target(ins)
            return "triton-kernel" if "triton" in t else "mosaic-gpu" if "mosaic" in t else t
        return next((k for k in ("cublasLt", "cublas") if k in kinds), None)
    if ins.op != "fusion" or not (kinds.get("dot") or kinds.get("grouped-gemm")):
        return None
    if "__triton" in cfg:
        return "triton"
    return "cudnn-fusion" if "__cudnn$fusion" in cfg else "xla-fusion"


def program_stats(hlo_text: str) -> ProgramStats:
    from . import hlo_bytes, hlo_flops
    from .hlo_moe import stack_frames

    comps = parse_module(hlo_text)
    shapes = {i.name: i.shapes for c in comps.values() for i in c.instrs}
    res_reads, res_writes = hlo_bytes.residual_stacks(comps)
    stats = ProgramStats(frames=stack_frames(hlo_text))

    def shape_of(name):
        leaves = shapes.get(name) or [("f32", ())]
        return leaves[0][1]

    def count_flops(fused: list[Instr], mult: int) -> tuple[float, Counter]:
        kinds: Counter = Counter()
        for sub in fused:
            where = " ".join(f"{a} {b}" for a, b in stats.frames.get(sub.frame, []))
            f, kind, uncounted = hlo_flops.instr_flops(sub, shape_of, where)
            kinds[kind] += f if kind else 0
            if uncounted:
                stats.uncounted[uncounted] += mult
        kinds.pop(None, None)
        return float(sum(kinds.values())), kinds

    def kernel(comp: Computation, defs: dict, ins: Instr, mult: int):
        fused = _fused(comps, ins)
        f, kinds = count_flops(fused, mult)
        stats.fusions += mult if ins.op == "fusion" else 0
        if ins.op == "custom-call":
            stats.custom_calls[target(ins)] += mult
        backend = _gemm_backend(ins, kinds)
        if backend:
            stats.gemm_backends[backend] += mult
        for k, v in kinds.items():
            stats.flops_by_kind[k] += v * mult
        parts = hlo_bytes.kernel_parts(comps, shapes, defs, ins, res_reads.get(comp.name, ()),
                                       res_writes.get(comp.name, ()))
        stats.flops += f * mult
        stats.kernels.append(Kernel(
            ins.name, ins.op, f, sum(p.bytes for p in parts), mult, comp.name,
            tuple(_resolved(defs, o) for o in ins.operands), tuple(parts),
            frozenset(i.op for i in fused), frozenset(i.frame for i in fused if i.frame),
            tuple(i.op_name for i in fused)))

    def walk(comp_name: str, mult: int):
        comp = comps[comp_name]
        defs = {i.name: i for i in comp.instrs}
        for ins in comp.instrs:
            if ins.op == "while":
                n = trip_count(ins)
                stats.loops.append((attr(ins.attrs, "body"), n))
                walk(attr(ins.attrs, "body"), mult * n)
                walk(attr(ins.attrs, "condition"), mult * n)
            elif ins.op in ("call", "conditional", "async-start"):
                for callee in callees(ins.attrs):
                    if callee in comps:
                        walk(callee, mult)
            elif ins.op not in _FREE:
                kernel(comp, defs, ins, mult)

    walk(next(c.name for c in comps.values() if c.entry), 1)
    return stats


def roofline_seconds(stats: ProgramStats, peak_flops: float, bandwidth: float) -> float:
    """Sum over kernels of max(compute time, memory time): an estimate, never a measurement
    (no launch overheads, no overlap, every operand read from and result written to HBM)."""
    return float(sum(k.mult * max(k.flops / peak_flops, k.bytes / bandwidth)
                     for k in stats.kernels))


def bytes_accessed(stats: ProgramStats) -> float:
    return float(sum(k.mult * k.bytes for k in stats.kernels))

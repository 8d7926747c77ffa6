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
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from . import hlo_bytes, hlo_flops
from .hlo_text import (FREE, Computation, Instr, attr, backend_config, callees, nbytes,
                       parse_module, stack_frames, target, trip_count)

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
            elif ins.op not in FREE:
                kernel(comp, defs, ins, mult)

    walk(next(c.name for c in comps.values() if c.entry), 1)
    return stats


def roofline_seconds(stats: ProgramStats, peak_flops: float, bandwidth: float,
                     skip_ops: tuple[str, ...] = ()) -> float:
    """Sum over kernels of max(compute time, memory time): an estimate, never a measurement
    (no launch overheads, no overlap, every operand read from and result written to HBM).
    ``skip_ops``: kernels whose op starts with one of these are left out (collectives)."""
    return float(sum(k.mult * max(k.flops / peak_flops, k.bytes / bandwidth)
                     for k in stats.kernels if not (skip_ops and k.op.startswith(skip_ops))))


def charge_rows(stats: ProgramStats, scope: str, slots: int, rows: float) -> ProgramStats:
    """The GEMM kernels under JAX name scope ``scope`` charged for ``rows`` of their ``slots``
    rows: a grouped GEMM whose groups cover only some rows (an expert mesh's receive buffer) skips
    the rest, which its static shapes cannot show. Its FLOPs and the bytes of every operand
    or result with a dimension of ``slots`` to ``slots + 2 * 128`` (the rows, and the pad
    ragged_gemm.py adds) scale by rows / that dimension; the weights' do not."""
    def scale(shape) -> float:
        d = next((d for d in shape if slots <= d <= slots + 256), None)
        return min(1.0, rows / d) if d else 1.0

    def charged(k: Kernel) -> Kernel:
        if k.op != "custom-call" or not k.flops or not any(scope in n for n in k.op_names):
            return k  # XLA's own kernels run every row of their static shapes
        row_scale = min((scale(s) for p in k.parts for _, s in p.shapes), default=1.0)
        moved = 0.0
        for p in k.parts:  # a part's bytes shared among its leaves by their sizes
            sizes = [nbytes([leaf]) for leaf in p.shapes]
            total = sum(sizes) or 1.0
            moved += sum(p.bytes * n / total * scale(s) for n, (_, s) in zip(sizes, p.shapes))
        return k._replace(flops=k.flops * row_scale, bytes=moved)

    kernels = [charged(k) for k in stats.kernels]
    flops = stats.flops + sum(k.mult * (a.flops - k.flops) for a, k in zip(kernels,
                                                                          stats.kernels))
    return replace(stats, kernels=kernels, flops=flops)


def bytes_accessed(stats: ProgramStats) -> float:
    return float(sum(k.mult * k.bytes for k in stats.kernels))

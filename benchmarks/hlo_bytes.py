"""Bytes one kernel moves: each operand read once and each result written once per run, except

* an operand the kernel only slices (``dynamic-slice``, ``slice``, ``gather``, also behind
  ``bitcast`` / ``reshape`` / ``get-tuple-element`` / ``convert``, which a fused kernel
  computes per element it reads: the loss's target logits, gathered from a cast of the
  (chunk, V) logits): the slices it reads, not the whole array
  (a layer's weights or residuals out of the stacks a layer scan keeps); but never more than
  the whole array when that is at most ``CACHED_BYTES``: a table that small (a bias per
  expert) stays in the L2 cache (40-72 MB on the targets) while a gather reads its rows over
  and over, so DRAM sees it once;
* an operand the kernel updates in place (``dynamic-update-slice`` of it): the update only;
* an operand a kernel gathers rows from, as its metadata states (``gathered_operand``,
  ``gathered_bytes``: nanomoe_jax/gather_gemm.py): the rows it reads, not the table;
* a cuBLAS / cuDNN workspace result: scratch, not traffic.

Each part is tagged ``residual`` when it reads or writes a *scan residual*: a stack that one
``while`` loop fills slice by slice (dynamic-update-slice of its own carried buffer) and a later
loop of the same computation reads (the forward layer scan's saved activations, read back by
the backward scan).
"""

from __future__ import annotations

from typing import NamedTuple

from .hlo_text import Computation, Instr, attr, nbytes
from .hlo_flops import kernel_metadata

SLICING = ("dynamic-slice", "slice", "gather")
CACHED_BYTES = 4 << 20
PASS_THROUGH = ("bitcast", "reshape", "get-tuple-element")


class Part(NamedTuple):
    bytes: float
    shapes: list  # what was read or written: (dtype, dims) leaves
    residual: bool = False
    sliced: bool = False  # a slice or gather of the operand, not all of it


def _users(comp: Computation) -> dict[str, list[tuple[Instr, int]]]:
    users: dict[str, list] = {}
    for ins in comp.instrs:
        for pos, o in enumerate(ins.operands):
            users.setdefault(o, []).append((ins, pos))
    return users


def terminal_uses(comp: Computation, name: str, users=None) -> list[tuple[Instr, int]]:
    """The (instruction, operand position) uses of ``name``, looking through pass-through ops."""
    users = _users(comp) if users is None else users
    out = []
    for ins, pos in users.get(name, []):
        if ins.op in PASS_THROUGH or ins.op == "convert":  # convert: per element read
            out += terminal_uses(comp, ins.name, users)
        else:
            out.append((ins, pos))
    return out


def sliced_params(comp: Computation | None) -> dict[int, list]:
    """Per parameter a fusion only slices or updates in place: the shapes it really reads."""
    if comp is None:
        return {}
    users = _users(comp)
    out = {}
    for p in (i for i in comp.instrs if i.op == "parameter"):
        uses = terminal_uses(comp, p.name, users)
        sliced = [u for u, pos in uses if u.op in SLICING and pos == 0]
        in_place = [u for u, pos in uses if u.op == "dynamic-update-slice" and pos == 0]
        if uses and len(sliced) + len(in_place) == len(uses):
            out[p.param_index] = [s for u in sliced for s in u.shapes]
    return out


def _through(defs: dict, name: str, ops=("bitcast", "copy")) -> Instr | None:
    ins = defs.get(name)
    while ins is not None and ins.op in ops and ins.operands:
        ins = defs.get(ins.operands[0])
    return ins


def carried_index(defs: dict, name: str) -> int | None:
    """j when ``name`` is (a bitcast of) element j of the computation's tuple parameter."""
    ins = _through(defs, name, ("bitcast",))
    if ins is None or ins.op != "get-tuple-element":
        return None
    src = defs.get(ins.operands[0])
    return int(attr(ins.attrs, "index")) if src is not None and src.op == "parameter" else None


def _fused_root(comps, ins: Instr) -> Instr | None:
    if ins.op != "fusion":
        return ins
    comp = comps.get(attr(ins.attrs, "calls"))
    return comp.instrs[-1] if comp and comp.instrs else None


def stacked_outputs(comps, body: Computation) -> set[int]:
    """Tuple elements a loop body fills in place: root element j a dynamic-update-slice of j."""
    defs = {i.name: i for i in body.instrs}
    root = body.instrs[-1]
    out = set()
    for j, o in enumerate(root.operands if root.op == "tuple" else []):
        ins = _through(defs, o, ("bitcast",))
        fused = _fused_root(comps, ins) if ins is not None else None
        if fused is None or fused.op != "dynamic-update-slice":
            continue
        src = ins.operands[0] if ins.op == "dynamic-update-slice" else _dus_operand(comps, ins)
        if src is not None and carried_index(defs, src) == j:
            out.add(j)
    return out


def _dus_operand(comps, fusion: Instr) -> str | None:
    """The fusion operand that its root dynamic-update-slice updates."""
    comp = comps[attr(fusion.attrs, "calls")]
    defs = {i.name: i for i in comp.instrs}
    p = _through(defs, comp.instrs[-1].operands[0], PASS_THROUGH)
    if p is None or p.op != "parameter" or p.param_index >= len(fusion.operands):
        return None
    return fusion.operands[p.param_index]


def residual_stacks(comps) -> tuple[dict, dict]:
    """({body: tuple indices read as residuals}, {body: tuple indices written as residuals})."""
    reads: dict[str, set] = {}
    writes: dict[str, set] = {}
    for comp in comps.values():
        defs = {i.name: i for i in comp.instrs}
        loops = [i for i in comp.instrs if i.op == "while"]
        filled = {w.name: stacked_outputs(comps, comps[attr(w.attrs, "body")]) for w in loops}
        for w2 in loops:
            init = defs.get(w2.operands[0])
            for j2, o in enumerate(init.operands if init is not None and init.op == "tuple"
                                   else []):
                src = _through(defs, o)
                if src is None or src.op != "get-tuple-element":
                    continue
                j, w = int(attr(src.attrs, "index")), src.operands[0]
                if w != w2.name and j in filled.get(w, ()):
                    reads.setdefault(attr(w2.attrs, "body"), set()).add(j2)
                    writes.setdefault(attr(defs[w].attrs, "body"), set()).add(j)
    return reads, writes


def _gathered(ins: Instr) -> tuple[int, float]:
    """(operand, bytes read) of a custom call that gathers rows from that operand, per its
    metadata; (-1, 0) for any other kernel."""
    meta = kernel_metadata(ins) if ins.op == "custom-call" else {}
    if "gathered_operand" not in meta:
        return -1, 0.0
    return int(meta["gathered_operand"]), float(meta["gathered_bytes"])


def kernel_parts(comps, shapes, defs, ins: Instr, res_reads=(), res_writes=()) -> list[Part]:
    """The bytes of one kernel run, operand by operand, then the result."""
    callee = comps.get(attr(ins.attrs, "calls")) if ins.op == "fusion" else None
    sliced = sliced_params(callee)
    gathered = _gathered(ins)
    parts = []
    for i, o in enumerate(ins.operands):
        full = shapes.get(o, [])
        if i in sliced:
            read = sliced[i]
        elif i == 0 and ins.op in SLICING:
            read = ins.shapes
        elif i == 0 and ins.op == "dynamic-update-slice":
            read = []
        else:
            read = full
        part_of_stack = read is not full and carried_index(defs, o) in res_reads
        n = nbytes(read)
        if read is not full and nbytes(full) <= CACHED_BYTES:
            n = min(n, nbytes(full))
        if i == gathered[0] and full:  # the rows it reads, as (rows, width), not the table
            (dt, dims), = full
            n = gathered[1]
            read = [(dt, (int(n // nbytes([(dt, dims[1:])])), *dims[1:]))]
        parts.append(Part(n, read, part_of_stack, read is not full))
    root = _fused_root(comps, ins)
    if root is not None and root.op == "dynamic-update-slice":  # in place: the update
        written = shapes.get(root.operands[1], [])
        dest = ins.operands[0] if ins.op != "fusion" else _dus_operand(comps, ins)
        parts.append(Part(nbytes(written), written,
                          dest is not None and carried_index(defs, dest) in res_writes))
    else:
        written = ins.shapes
        if ins.op == "custom-call" and ("__cublas" in ins.attrs or "__cudnn" in ins.attrs):
            written = [s for s in written if not (s[0] == "s8" and len(s[1]) == 1)]
        parts.append(Part(nbytes(written), written))
    return parts

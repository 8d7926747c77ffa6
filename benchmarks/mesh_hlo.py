"""Collectives of a compiled multi-device program, and what a layout should ideally send.

Bytes per device per step are the buffer each device hands to a collective (all-reduce operand,
gathered all-gather result, full reduce-scatter input, all-to-all operand, permuted buffer, the
smaller of a ragged all-to-all's operand and output),
times the trip counts of the loops around it. The HLO parsing comes from ``benchmarks.hlo_text``
(used as it is); this module only walks it for collectives and keeps the loop each sits in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jax
import numpy as np

from .hlo_text import nbytes, parse_module, trip_count

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "ragged-all-to-all")


@dataclass
class Collective:
    kind: str
    dtype: str
    shape: tuple
    bytes: float  # per run, per device
    runs: int  # per step: the product of the enclosing loops' trip counts
    loop: str  # innermost enclosing while body ("-": none), with the chain's trip counts
    group: int  # devices in one replica group


def _kind(op: str) -> str | None:
    base = op[:-6] if op.endswith("-start") else op
    return base if base in KINDS else None


def _group_size(attrs: str) -> int:
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)  # iota form [groups,size]
    if m:
        return int(m.group(2))
    # mesh form: replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if not m:
        return 0
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return int(np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2))] or [1]))


def collectives(hlo_text: str) -> list[Collective]:
    comps = parse_module(hlo_text)
    shapes = {i.name: i.shapes for c in comps.values() for i in c.instrs}
    out: list[Collective] = []

    def buffer(ins, kind):
        operands = [s for o in ins.operands for s in shapes.get(o, [])]
        results = ins.shapes
        if kind == "all-gather":  # the gathered results (a start op's tuple holds the inputs too)
            if ins.op.endswith("-start") and len(results) > 1:  # ((inputs), (outputs))
                results = results[len(results) // 2:]
            return max(results, key=lambda s: nbytes([s])), nbytes(results)
        elif kind == "ragged-all-to-all":
            # only the rows its sizes name travel: at most its operand (what a device sends)
            # and its output (what lands); the expert exchange sends the routed rows out and
            # the same rows back, so the smaller of the two is what a device sends on average
            leaf = min((shapes[o][0] for o in ins.operands[:2]), key=lambda s: nbytes([s]))
        elif operands:
            leaf = max(operands, key=lambda s: nbytes([s]))
        else:
            leaf = results[0]
        if kind in ("all-reduce", "all-to-all", "reduce-scatter", "collective-permute"):
            # a variadic (combined) collective moves all its operands
            return leaf, float(sum(nbytes([s]) for s in operands) or nbytes([leaf]))
        return leaf, nbytes([leaf])

    def walk(name: str, mult: int, loop: str, seen: tuple):
        if name not in comps or name in seen:
            return
        for ins in comps[name].instrs:
            callees = []
            if ins.op == "while":
                n = trip_count(ins)
                body = re.search(r"\bbody=%?([\w.\-]+)", ins.attrs).group(1)
                chain = f"{body} x{n}" if loop == "-" else f"{loop} > {body} x{n}"
                walk(body, mult * n, chain, seen + (name,))
                continue
            kind = _kind(ins.op)
            if kind:
                leaf, nbytes = buffer(ins, kind)
                out.append(Collective(kind, leaf[0], leaf[1], nbytes, mult, loop,
                                      _group_size(ins.attrs)))
                continue
            if ins.op in ("call", "conditional", "async-start", "fusion"):
                callees = re.findall(r"\b(?:to_apply|calls|true_computation|false_computation)"
                                     r"=%?([\w.\-]+)", ins.attrs)
                m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                callees += re.findall(r"%?([\w.\-]+)", m.group(1)) if m else []
            for callee in callees:
                walk(callee, mult, loop, seen + (name,))

    entry = next(c.name for c in comps.values() if c.entry)
    walk(entry, 1, "-", ())
    return out


def summarize(colls: list[Collective]) -> dict:
    by_kind: dict[str, float] = {}
    for c in colls:
        by_kind[c.kind] = by_kind.get(c.kind, 0.0) + c.bytes * c.runs
    return {"total_bytes": float(sum(by_kind.values())), "by_kind": by_kind}


def _local_size(x, sharding) -> int:
    return int(np.prod(sharding.shard_shape(x.shape))) if x.shape else 1


def ideal_bytes(params, param_sharding, mesh, config, A: int, B: int, T: int,
                compute_bytes: int = 2) -> dict:
    """What a layout must send per device per step, at best:

    * every gradient reduced once per optimizer step in fp32: an all-reduce of the local shard
      over the devices that hold the same shard (4 bytes x local size);
    * fsdp: each micro-batch gathers a sharded weight in the compute dtype in the forward and
      again in the backward (2 x A x compute bytes x size over fsdp) and reduce-scatters its
      fp32 gradient (A x 4 bytes x size over fsdp): carrying whole gradients through the
      micro-batch loop instead would hold 4 bytes per parameter unsharded, the memory fsdp
      exists to save;
    * expert (MoeGPT): each micro-batch sends the N k routed rows (compute dtype) through 4
      all-to-alls per MoE layer (tokens out and back, forward and backward). Not in the total
      but beside it, ``expert_buffer``: the same 4 exchanges of the padded (X, cap) buffers
      (cap the rows a slice may send one device, ``device_capacity``): what the CPU's
      all_to_all sends; GPUs send only the rows (ragged_all_to_all, expert_parallel.py).
    """
    fsdp, expert = mesh.shape["fsdp"], mesh.shape["expert"]
    n_batch = int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")]))
    reduce = gather = 0.0
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(param_sharding)):
        local = _local_size(x, s)
        spec = [a for part in s.spec for a in (part if isinstance(part, tuple) else (part,))]
        holders = n_batch // int(np.prod([mesh.shape[a] for a in spec if a] or [1]))
        if "fsdp" in spec:
            reduce += 4 * A * local * fsdp
            gather += 2 * A * compute_bytes * local * fsdp
        if holders > 1:
            reduce += 4 * local
    routed = buffer = 0.0
    if expert > 1:
        # the models' package (flax, the model classes) only when experts are split
        from nanomoe_jax.expert_parallel import device_capacity

        k = config.n_activated_experts  # routed experts per token (shared ones stay local)
        per_row = 4 * A * config.n_layer * config.n_embd * compute_bytes
        routed = per_row * B * T * k
        buffer = per_row * expert * device_capacity(B * T, config, expert)
    return {"gradient_reduction": reduce, "fsdp_gather": gather, "expert_all_to_all": routed,
            "expert_buffer": buffer, "total": reduce + gather + routed}

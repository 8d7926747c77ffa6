"""Which kernels of a compiled step belong to the MoE layers, and where their bytes go.

A kernel belongs to an MoE layer when one of its ops was traced inside ``MoE.__call__``, in
``nanomoe_jax/moe.py`` / ``grouped.py`` / ``ragged_gemm.py`` or in tokamax (XLA keeps the
Python stack of every op in the module's stack-frame tables), or when it only moves data
(slices, copies, in-place updates) produced by an MoE kernel or read only by MoE kernels: the
layer scan's copies of the MoE residuals. Their bytes split into:

* ``tile_weights``: per-tile copies of expert weights, shape (tiles, out, in) (a grouped GEMM
  made of dense tiles gathers them, and writes per-tile weight gradients);
* ``residuals``: slices of the stacks the forward layer scan fills and the backward reads;
* ``glue``: the rest of the kernels without a matmul: row gathers and scatters, padding, the
  combine, the router (``glue_parts`` splits it: masks, fp32 per-(token, expert) rows,
  gathers/scatters/padding, other);
* ``matmul``: the rest of the matmul kernels' operands and results (activations, weights).

:func:`min_moe_bytes` is the floor they are measured against (see ``benchmarks/NOTES.md``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .hlo import ProgramStats

MOE_FUNCTIONS = ("MoE.__call__",)
# a custom VJP's backward is traced outside MoE.__call__: its files (and the kernel library's)
# name it; tokamax is used for the routed experts only
MOE_FILES = ("nanomoe_jax/moe.py", "nanomoe_jax/grouped.py", "nanomoe_jax/ragged_gemm.py")
MOE_PACKAGES = ("/tokamax/",)
# the optimizer's kernels are not the layer's, even where an MoE weight gradient's last op
# (its cast to the parameter dtype) fused into AdamW's pass over that weight (unrolled layers)
NOT_MOE_PACKAGES = ("/optax/",)
MOVEMENT = {"parameter", "constant", "bitcast", "reshape", "copy", "transpose", "slice",
            "dynamic-slice", "dynamic-update-slice", "concatenate", "broadcast", "pad",
            "get-tuple-element", "tuple", "convert"}
PARTS = ("tile_weights", "residuals", "glue", "matmul")


def _in_moe(stats: ProgramStats, k) -> bool:
    files = {file for fid in k.frames for file, _ in stats.frames.get(fid, [])}
    if any(p in f for f in files for p in NOT_MOE_PACKAGES):
        return False
    for fid in k.frames:
        for file, func in stats.frames.get(fid, []):
            if (func in MOE_FUNCTIONS or file.endswith(MOE_FILES)
                    or any(p in file for p in MOE_PACKAGES)):
                return True
    return any("grouped_gemm" in n for n in k.op_names)


def moe_kernels(stats: ProgramStats) -> set[int]:
    """Indices into ``stats.kernels`` of the kernels of the MoE layers."""
    ks = stats.kernels
    index = {(k.comp, k.name): i for i, k in enumerate(ks)}
    readers: dict[int, list[int]] = {}
    for i, k in enumerate(ks):
        for o in k.operands:
            if (k.comp, o) in index:
                readers.setdefault(index[(k.comp, o)], []).append(i)
    moe = {i for i, k in enumerate(ks) if _in_moe(stats, k)}
    movers = [i for i, k in enumerate(ks) if k.ops <= MOVEMENT and i not in moe]
    changed = True
    while changed:  # a copy of a copy of an MoE value is MoE too
        changed = False
        for i in movers:
            src = {index.get((ks[i].comp, o)) for o in ks[i].operands}
            used_by = readers.get(i, [])
            if i not in moe and (src & moe or (used_by and all(u in moe for u in used_by))):
                moe.add(i)
                changed = True
    return moe


def _weight_like(shapes, weight_dims, whole, tiles: bool) -> bool:
    """(lead..., out, in) with an expert weight's (out, in): ``tiles``: lead is no expert
    count (per-tile copies); else lead is one (whole weights, a layer's or all layers')."""
    if not shapes:
        return False
    _, d = max(shapes, key=lambda s: np.prod(s[1]))
    if len(d) < 3 or tuple(d[-2:]) not in weight_dims:
        return False
    return (int(np.prod(d[:-2])) in whole) != tiles


def tile_weight_values(stats: ProgramStats, moe: set[int], is_tile, is_weight) -> set:
    """(computation, value) of per-tile weight copies: the results of gathers that read
    weights tile by tile, the tile-shaped operands of scatters that sum tile gradients into
    whole weights, then their copies. Data flow, not shape alone: an activation of (tiles,
    rows, width) or (B, T, C) can have a weight tile's shape."""
    vals = set()
    for i in moe:
        k = stats.kernels[i]
        reads_tiles = any(p.sliced and is_tile(p.shapes) for p in k.parts[:-1])
        if "gather" in k.ops and not k.flops and reads_tiles and is_tile(k.parts[-1].shapes):
            vals.add((k.comp, k.name))
        if "scatter" in k.ops and is_weight(k.parts[-1].shapes):
            vals |= {(k.comp, o) for o, p in zip(k.operands, k.parts) if is_tile(p.shapes)}
    for i in moe:  # copies and conversions of them (one level: what XLA leaves unfused)
        k = stats.kernels[i]
        if k.ops <= MOVEMENT and is_tile(k.parts[-1].shapes) and any(
                (k.comp, o) in vals for o in k.operands):
            vals.add((k.comp, k.name))
    return vals


def _part(k, j, p, vals, is_tile) -> str:
    if p.residual:
        return "residuals"
    value = (k.comp, k.name if j == len(k.operands) else k.operands[j])
    if value in vals or (p.sliced and is_tile(p.shapes)):
        return "tile_weights"
    return "matmul" if k.flops else "glue"


def _glue_part(k, p, assignment_elems: int) -> str:
    """What the glue is: issue 22's list of the MoE bytes beyond the GEMMs."""
    dtype, d = max(p.shapes, key=lambda s: np.prod(s[1])) if p.shapes else ("", ())
    if dtype == "pred":
        return "masks"
    if dtype == "f32" and int(np.prod(d)) == assignment_elems:
        return "fp32 assignment rows"  # a (token, expert) row of width C kept in fp32
    if k.ops & {"gather", "scatter", "pad", "sort"}:
        return "gathers/scatters/padding"
    return "other"  # the router, the combine, bias-gradient sums, layout transposes


def moe_bytes(stats: ProgramStats, config, tokens: int = 0, top: int = 12) -> dict:
    """MoE-layer bytes per step, total and by part (see the module docstring), the glue split
    further (``glue_parts``; ``tokens``: B x T of one micro-batch), and the ``top`` MoE kernels by
    bytes, so a change to the layer shows where it moved traffic."""
    C, H = config.n_embd, config.expert_hidden
    counts = {config.n_total_experts, config.n_routed_experts, config.n_shared, 1}
    whole = counts | {config.n_layer * c for c in counts}

    def is_tile(shapes):
        return _weight_like(shapes, {(H, C), (C, H)}, whole, tiles=True)

    def is_weight(shapes):
        return _weight_like(shapes, {(H, C), (C, H)}, whole, tiles=False)

    moe = moe_kernels(stats)
    vals = tile_weight_values(stats, moe, is_tile, is_weight)
    out: Counter = Counter({p: 0.0 for p in PARTS})
    glue: Counter = Counter()
    per_kernel = []
    for i in moe:
        k, mine = stats.kernels[i], Counter()
        for j, p in enumerate(k.parts):
            part = _part(k, j, p, vals, is_tile)
            mine[part] += p.bytes * k.mult
            if part == "glue":
                glue[_glue_part(k, p, tokens * config.n_activated_experts * C)] += p.bytes * k.mult
        out.update(mine)
        per_kernel.append((sum(mine.values()), k, mine))
    per_kernel.sort(key=lambda x: -x[0])
    out["total"] = sum(out[p] for p in PARTS)
    result = dict(out)
    result["glue_parts"] = dict(glue)
    result["top_kernels"] = [
        {"kernel": k.name, "runs": k.mult, "bytes": b,
         "ops": sorted(k.ops - MOVEMENT - {"fusion"}),
         **{p: v for p, v in mine.items() if v}} for b, k, mine in per_kernel[:top]]
    return result


def min_moe_bytes(config, B: int, T: int, act_bytes: int = 2, grad_bytes: int = 4) -> float:
    """Every MoE matmul operand read once and every result written once, no padding: per layer
    and expert group (M rows, hidden width F, Wt weight elements), forward x@W1, h@W2 and
    backward dh, dW2, dx, dW1, i.e. 12 M (C + F) + 16 Wt bytes with bf16 activations and
    weights and fp32 weight gradients. Routed: M = B T k, F = H, Wt = R H C; shared: M = B T,
    F = S H, Wt = S H C."""
    C, H, N = config.n_embd, config.expert_hidden, B * T
    groups = [(N * config.n_activated_experts, H, config.n_routed_experts * H * C)]
    if config.n_shared:
        groups.append((N, config.n_shared * H, config.n_shared * H * C))
    per_layer = 0.0
    for M, F, Wt in groups:
        activations = 6 * (M * C + M * F)  # each matmul's row operands and row results
        per_layer += act_bytes * (activations + 4 * Wt) + grad_bytes * 2 * Wt
    return float(config.n_layer * per_layer)

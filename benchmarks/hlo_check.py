"""The MoE HLO check: which ops of the compiled train step grow with the expert count E, and
XLA's FLOP count per back end and E (tiny model, on any machine)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np

from nanomoe.config import MoeGPTConfig, config_to_dict
from nanomoe.flops import flops_per_token

from .moe_sweep import sweep_point
from .hlo_text import hlo_shapes
from .timing import jax_train_step


def _symbols(config: MoeGPTConfig, n_tokens: int) -> dict[int, str]:
    """Dimension sizes that depend on E for this config: E, R = E - S, the capacity slots P,
    and their products with the fixed sizes (XLA flattens (R, P, C) to (R*P, C) and the like)."""
    E, R, H, C = config.n_total_experts, config.n_routed_experts, config.expert_hidden, \
        config.n_embd
    syms = {E: "E", R: "R"}
    if config.moe_dispatch == "capacity":
        P = config.capacity(n_tokens)
        syms.setdefault(P, "P")
        syms.setdefault(R * P, "R*P")
    nk = n_tokens * config.n_activated_experts
    for name, v in (("E", E), ("R", R)):
        for fname, f in (("H", H), ("C", C), ("N", n_tokens), ("Nk", nk)):
            syms.setdefault(v * f, f"{name}*{fname}")
    return syms


def _allowed(canon: tuple, fixed: dict[str, int]) -> bool:
    """Expert weights/grads/moments (optionally stacked per layer), the router's arrays and
    O(E) bookkeeping: one expert axis (E or R), and the other axes (size-1 axes and one layer
    axis aside) one of (H, C), (H,), (C,), () for the weights, (N,), (B, T), (C,) for the
    router, or at most 4 L elements in all (per-layer counts and metrics)."""
    L, H, C, N, B, T = (fixed[k] for k in ("L", "H", "C", "N", "B", "T"))
    # a flattened (R*H) axis is an expert axis and an H axis
    expanded = []
    for d in canon:
        if isinstance(d, str) and "*" in d:
            letter, factor = d.split("*")
            expanded += [letter, {"H": H, "C": C, "N": N, "Nk": -1}[factor]]
        else:
            expanded.append(d)
    letters = [d for d in expanded if isinstance(d, str)]
    if letters not in (["E"], ["R"]):
        return False
    rest = sorted(d for d in expanded if not isinstance(d, str) and d != 1)
    if int(np.prod(rest)) <= 4 * L:
        return True
    allowed = [[], [C], [H], sorted([H, C]), [N], sorted([B, T])]
    without_layer = list(rest)
    if L in without_layer:
        without_layer.remove(L)
    return rest in allowed or without_layer in allowed


_COMPILED: dict[str, tuple[float, Counter]] = {}


def compiled_moe_step(config: MoeGPTConfig, B: int, T: int, dtype: str,
                      compiler_options: dict | None = None) -> tuple[float, Counter]:
    """(XLA FLOPs, HLO result shapes) of the compiled MoE train step, layers unrolled: XLA's
    cost analysis counts a ``while`` body (a scanned layer stack) once, so a scan would hide
    L - 1 layers. Cached, since the HLO check and the cost table share compilations."""
    key = json.dumps([config_to_dict(config), B, T, dtype, compiler_options], sort_keys=True)
    if key not in _COMPILED:
        spec = dict(B=B, T=T, dtype=dtype, seed=None,
                    jax_options=dict(scan_layers=False, remat="none", attention_impl=None,
                                     loss_chunk_tokens=B * T, compiler_options=compiler_options,
                                     row_groups=1))  # shapes are read against the whole B*T
        compiled, *_ = jax_train_step(config, spec)
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):  # older jax: one dict per program
            ca = ca[0]
        _COMPILED[key] = (float(ca.get("flops", float("nan"))), hlo_shapes(compiled.as_text()))
    return _COMPILED[key]


def hlo_growth_check(base: MoeGPTConfig, B: int, T: int, experts: tuple[int, int],
                     dispatch: str = "capacity", dtype: str = "float32",
                     compiler_options: dict | None = None) -> dict:
    """Which ops of the compiled train step grow with E (at fixed k and H).

    Each shape of the two compilations is written symbolically (a dimension equal to E, E - S
    or, for ``capacity``, the slot count becomes a letter); a shape with letters grows if its
    size at the larger E exceeds 1.2x its size at the smaller. Growing shapes that are expert
    weights (E, H, C)-like or router (N, E)-like are expected; every other one is reported.
    Shapes that exist only at the larger E (fusion decisions changed) are listed separately."""
    e1, e2 = experts
    cfgs = [sweep_point(dataclasses.replace(base, moe_dispatch=dispatch), e, "fixed", e1)
            for e in (e1, e2)]
    N = B * T
    syms = [_symbols(c, N) for c in cfgs]
    # A product letter (R*H, ...) whose value is also a letter of the other compilation would
    # pair unrelated shapes: drop it (the single letters E, R, P are kept and checked below).
    for i in (0, 1):
        syms[i] = {v: n for v, n in syms[i].items()
                   if "*" not in n or v not in syms[1 - i]}
    shapes = [compiled_moe_step(c, B, T, dtype, compiler_options)[1] for c in cfgs]
    c0 = cfgs[0]
    fixed = dict(L=c0.n_layer, H=c0.expert_hidden, C=c0.n_embd, N=N, B=B, T=T)
    # A letter is only trustworthy if its size never appears where E cannot be involved,
    # i.e. in the other compilation (where that E-dependent size is different).
    collisions = sorted({v for i in (0, 1) for v in syms[i]
                         if any(v in dims for _, dims in shapes[1 - i])})

    def canon(dims, s):
        return tuple(s.get(d, d) for d in dims)

    def size(canon_dims, s):
        inv = {name: v for v, name in s.items()}
        return int(np.prod([inv.get(d, d) if isinstance(d, str) else d for d in canon_dims]))

    seen_small = {(dt, canon(d, syms[0])) for dt, d in shapes[0]}
    grows, allowed, unmatched = [], [], []
    for (dt, dims), count in shapes[1].items():
        cd = canon(dims, syms[1])
        row = {"dtype": dt, "shape": list(dims), "symbolic": [str(d) for d in cd],
               "count": count, "elements": int(np.prod(dims))}
        if (dt, cd) not in seen_small:
            unmatched.append(row)
            continue
        if not any(isinstance(d, str) for d in cd):
            continue
        row["growth"] = size(cd, syms[1]) / max(1, size(cd, syms[0]))
        if row["growth"] > 1.2:
            (allowed if _allowed(cd, fixed) else grows).append(row)
    # Shapes XLA only produced at the larger E: fusion or tiling decisions changed. Small ones
    # (at most 4 elements per expert, e.g. a cumsum over R padded to a power of two) are O(E)
    # bookkeeping; larger ones need a look and are reported with the growing ones.
    small = 4 * cfgs[1].n_total_experts
    by_size = lambda r: -r["elements"]  # noqa: E731
    return {
        "dispatch": dispatch, "experts": [e1, e2], "B": B, "T": T, "dtype": dtype,
        "symbols": [{str(v): k for v, k in s.items()} for s in syms],
        "collisions": collisions,
        "grows_with_E": sorted(grows, key=by_size),
        "expected_growth": sorted(allowed, key=by_size),
        "unmatched": sorted([r for r in unmatched if r["elements"] > small], key=by_size),
        "unmatched_small": sorted([r for r in unmatched if r["elements"] <= small], key=by_size),
    }


def cost_table(base: MoeGPTConfig, B: int, T: int, experts: tuple[int, ...],
               dispatches: tuple[str, ...], dtype: str = "float32",
               compiler_options: dict | None = None) -> list[dict]:
    """XLA's FLOP count of the whole compiled train step per (dispatch, E), at fixed k and H,
    beside the analytic 6 N_active + 12 L C T (times B*T) that MFU uses."""
    rows = []
    for dispatch in dispatches:
        for e in experts:
            c = sweep_point(dataclasses.replace(base, moe_dispatch=dispatch), e, "fixed",
                            experts[0])
            flops = compiled_moe_step(c, B, T, dtype, compiler_options)[0]
            rows.append({"dispatch": dispatch, "E": e, "k": c.n_activated_experts,
                         "H": c.expert_hidden, "xla_flops": flops,
                         "analytic_flops": flops_per_token(c, T) * B * T})
    for r in rows:
        first = next(x for x in rows if x["dispatch"] == r["dispatch"])
        r["vs_first_E"] = r["xla_flops"] / first["xla_flops"]
    return rows



"""The MoE sweep: E routed experts at fixed active compute (or fine-grained), each point's
dense ceiling, and the cells that time them per back end."""

from __future__ import annotations

import dataclasses
import json

from nanomoe.config import MoeGPTConfig, config_to_dict


def sweep_point(base: MoeGPTConfig, E: int, mode: str, E0: int, shared: int = 1,
                capacity_factor: float = 1.25) -> MoeGPTConfig:
    """The MoE with ``E`` routed experts (plus ``shared`` shared ones) at the active compute of
    the base config (k0 = base top-k, H0 = base expert width).

    * ``fixed``: k = k0 and H = H0 for every E. The active expert parameters per token are
      exactly constant (only the router's C x E matrix grows: 0.2 % of the active parameters
      at E = 64, original size); total expert parameters grow with E. This is the sweep that
      tests whether a back end's cost grows with k (it should not move) or with E (dense does).
    * ``fine``: fine-grained experts, k = k0 * E / E0 and H = H0 * E0 / E (E0 = the first E of
      the sweep), so k * H, the routed active width, is constant. The shared expert has the
      same width H (one ``expert_dim`` for all experts), so the active width (S + k) * H
      shrinks slightly as H does; the table reports each point's own active parameters.
    """
    k0, H0 = base.n_activated_experts, base.expert_hidden
    if mode == "fixed":
        k, H = k0, H0
    elif mode == "fine":
        if (k0 * E) % E0 or (H0 * E0) % E:
            raise ValueError(f"--sweep-mode fine: E={E} must give integer k = {k0}*{E}/{E0} "
                             f"and H = {H0}*{E0}/{E}")
        k, H = k0 * E // E0, H0 * E0 // E
    else:
        raise ValueError(f"sweep mode must be 'fixed' or 'fine', got {mode!r}")
    if k > E:
        raise ValueError(f"E={E} routed experts cannot hold top-k={k}")
    return dataclasses.replace(base, n_experts=E + shared, m_sub_experts=1,
                               n_shared_experts=shared, n_activated_experts=k, expert_dim=H,
                               capacity_factor=capacity_factor)


def ceiling_point(point: MoeGPTConfig) -> MoeGPTConfig:
    """The same model with every routed expert active (E = k): a dense feed-forward of exactly
    the active width (S + k) * H, same attention, same router. Under the ``dense`` dispatch it
    runs those S + k experts on every token with no sorting or gathering: the throughput a
    perfect sparse dispatch of ``point`` would reach."""
    k = point.n_activated_experts
    return dataclasses.replace(point, n_experts=point.n_shared + k, n_activated_experts=k)


def sweep_cells(args, base: MoeGPTConfig, add) -> None:
    """``add(config, framework, labels)`` for every sweep point, back end and ceiling."""
    points = [(E, sweep_point(base, E, args.sweep_mode, args.experts[0],
                              capacity_factor=args.capacity_factor))
              for E in args.experts]
    # in the fixed mode every point has the same ceiling: time it once
    ceilings = list({json.dumps(config_to_dict(ceiling_point(p))): ceiling_point(p)
                     for _, p in points}.values())
    if not args.ceiling:
        ceilings = []
    for kind, entries in (("sweep", points), ("ceiling", [(None, c) for c in ceilings])):
        for E, cfg in entries:
            labels = dict(section=kind, model="moegpt", E=E if E is not None else
                          cfg.n_routed_experts, k=cfg.n_activated_experts,
                          H=cfg.expert_hidden, S=cfg.n_shared)
            for fw in args.frameworks:
                if fw == "jax":
                    for backend in args.backends:
                        add(dataclasses.replace(cfg, moe_dispatch=backend), fw,
                            dict(labels, backend=backend))
                else:
                    add(cfg, fw, dict(labels, backend="all-experts"))

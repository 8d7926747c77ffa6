"""The multi-GPU plan: train.py's step compiled for several GPUs, without any GPU.

    JAX_PLATFORMS=cpu python -m benchmarks.plan_mesh --target h100 --topology 1x1x8 \
        --model gpt --mesh data=8 --mesh fsdp=8 --A 1,4

The CUDA plugin (``pip install -e ".[plan]"``) describes ``--topology`` devices of the target
(``1x1x8``: 8 GPUs in one host, ``1x2x8``: 2 hosts x 8). Each layout's step is built as
``JaxBackend`` builds it (its mesh, shardings, execution options and jit) and compiled; per
layout it reports the planned peak per device, every collective (kind, bytes, runs per step
and the loop it sits in), their total against the layout's ideal (``mesh_hlo.ideal_bytes``)
and matmul FLOPs against the analytic count. Results go to ``--out`` (a folder outside the
repository by default); ``--save`` also writes ``benchmarks/results/plan-<target>-<topology>``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import hlo
from .plan_mesh_report import render
from .results_dir import default_out
from .targets import TARGETS, load_target

BOUNDS = dict(collective_ratio=1.15, flops_ratio=1.10)
DEFAULT_OUT = default_out()
RESULTS = Path(__file__).parent / "results"


def topology_devices(target, topology: str):
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=target.proto_text,
                                            topology=topology)
    except Exception as e:  # noqa: BLE001 - no plugin, or a topology it refuses
        raise RuntimeError(f"cannot describe {topology} x {target.device_kind} ({e}); install "
                           "the plan's extra (pip install -e \".[plan]\") and run with "
                           "JAX_PLATFORMS=cpu") from None
    return list(topo.devices)


def build_step(config, devices, mesh_spec: str, A: int, B: int, T: int, options=None):
    """The step JaxBackend.setup builds, with abstract inputs: (jitted step, args, parts)."""
    import jax

    from benchmarks.plan import abstract_step_inputs
    from nanomoe_jax import sharding as shd
    from nanomoe_jax.execution import execution_options
    from nanomoe_train.jax_mesh import check_mesh_flags

    mesh = shd.make_mesh(shd.parse_mesh(mesh_spec, len(devices)), devices=devices)
    flags = SimpleNamespace(mesh=mesh_spec, moe_dispatch=(options or {}).get("moe_dispatch"))
    check_mesh_flags(mesh, config, flags)  # the refusals train.py would print
    expert = mesh.shape["expert"] > 1
    opts = execution_options(devices[0], config, mesh.size,
                             expert_mesh=mesh if expert else None, **(options or {}))
    step, args = abstract_step_inputs(config, opts, mesh, B, T, A)
    state = args[1]
    params = state[0]  # abstract, each leaf carrying its sharding
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    return step, args, dict(mesh=mesh, opts=opts, params=params, param_sh=param_sh, state=state)


def state_bytes_per_device(state) -> int:
    """Parameters + AdamW moments one device holds, plus an fp32 gradient of its shard."""
    import jax

    def local(x):
        return int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize if x.shape else 0

    params, opt = state
    return sum(local(x) for x in jax.tree.leaves(opt)) + 2 * sum(
        local(x) for x in jax.tree.leaves(params))


def plan_layout(model: str, target, topology: str, devices, mesh_spec: str, A: int, B: int,
                T: int, overrides=None, options=None) -> dict:
    from nanomoe_jax.execution import describe
    from nanomoe_jax.ragged_gemm import compiling_for

    from . import mesh_hlo
    from .plan import analytic_flops, model_config, peak_bytes

    row = {"model": model, "mesh": mesh_spec, "A": A, "topology": topology, "B": B, "T": T}
    config = model_config(model, overrides)
    t0 = time.perf_counter()
    try:
        with compiling_for(devices[0]):  # tokamax's kernels for the target, not this machine
            step, args, parts = build_step(config, devices, mesh_spec, A, B, T, options)
            compiled = step.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - a layout that does not compile is a result
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    text = compiled.as_text()
    colls = mesh_hlo.collectives(text)
    stats = hlo.program_stats(text)
    all_slots = stats.flops
    stats = _received_rows(stats, config, parts["mesh"], B * T)
    flash = any("fmha" in k for k in stats.custom_calls)
    ideal = mesh_hlo.ideal_bytes(parts["params"], parts["param_sh"], parts["mesh"], config, A,
                                 B, T)
    total = mesh_hlo.summarize(colls)
    analytic = analytic_flops(config, A * B, T, flash)
    # the per-device kernels' roofline, collectives left out (their time depends on links
    # and overlap this plan does not model): an estimate, as benchmarks/plan.py's
    compute_s = hlo.roofline_seconds(stats, target.peak_bf16, target.bandwidth,
                                     skip_ops=mesh_hlo.KINDS)
    row.update(
        options=describe(parts["opts"]), memory=peak_bytes(compiled),
        state_bytes=state_bytes_per_device(parts["state"]), collectives=_grouped(colls),
        collective_bytes=total["total_bytes"], by_kind=total["by_kind"], ideal=ideal,
        collective_ratio=total["total_bytes"] / ideal["total"] if ideal["total"] else None,
        compiled_flops=stats.flops, analytic_flops=analytic, flops_ratio=stats.flops / analytic,
        flops_ratio_all_slots=all_slots / analytic,
        estimate={"compute_s": compute_s, "mfu_bound": analytic / compute_s / target.peak_bf16})
    return row


def _received_rows(stats, config, mesh, n_tokens: int):
    """An expert mesh's grouped GEMMs charged for the rows the busiest device receives at
    uniform routing, not for every slot of its receive buffer (expert_parallel.py: the empty
    slots are in no group, which the kernels skip). The all-slots figure is the row's
    ``flops_ratio_all_slots``: the bound no routing can exceed."""
    X = mesh.shape["expert"]
    if X == 1:
        return stats
    from nanomoe_jax.expert_parallel import RECEIVED_SCOPE, device_capacity, received_rows

    slots = X * device_capacity(n_tokens, config, X)
    return hlo.charge_rows(stats, RECEIVED_SCOPE, slots, received_rows(n_tokens, config, X))


def _grouped(colls) -> list[dict]:
    """Identical collectives (kind, buffer, loop, group) merged, largest traffic first."""
    merged: dict[tuple, dict] = {}
    for c in colls:
        key = (c.kind, c.dtype, c.shape, c.loop, c.group, c.runs)
        m = merged.setdefault(key, dict(kind=c.kind, buffer=f"{c.dtype}{list(c.shape)}",
                                        bytes=c.bytes, runs=c.runs, loop=c.loop,
                                        group=c.group, count=0))
        m["count"] += 1
    return sorted(merged.values(), key=lambda m: -m["bytes"] * m["runs"] * m["count"])


def broken_bounds(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        name = f"{r['model']} {r['mesh']} A={r['A']} on {r['topology']}"
        if "error" in r:
            out.append(f"{name}: does not compile ({r['error'][:120]})")
        elif r["collective_ratio"] and r["collective_ratio"] > BOUNDS["collective_ratio"]:
            out.append(f"{name}: collectives {r['collective_ratio']:.2f}x the ideal > "
                       f"{BOUNDS['collective_ratio']}")
        elif r["flops_ratio"] > BOUNDS["flops_ratio"]:
            out.append(f"{name}: {r['flops_ratio']:.3f}x the analytic FLOPs > "
                       f"{BOUNDS['flops_ratio']}")
    return out


def parse_args(argv):
    from .plan import MODELS

    p = argparse.ArgumentParser(prog="python -m benchmarks.plan_mesh", description=__doc__
                                .split("\n\n")[0])
    p.add_argument("--target", choices=TARGETS, default="h100")
    p.add_argument("--topology", default="1x1x8", help="hosts layout, e.g. 1x1x8 or 1x2x8")
    p.add_argument("--model", default="gpt", help=f"comma list among {', '.join(MODELS)}")
    p.add_argument("--mesh", action="append", default=[],
                   help="a --mesh of train.py (data=8, fsdp=8, data=2,expert=4); repeatable")
    p.add_argument("--A", default="1", help="micro-batches per step, comma list (default 1)")
    p.add_argument("--B", type=int, default=16, help="rows per device (default 16)")
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder (default {DEFAULT_OUT})")
    p.add_argument("--save", action="store_true",
                   help="also write benchmarks/results/plan-<target>-<topology>.{json,md}")
    p.add_argument("--add", action="store_true",
                   help="add the rows to the plan already in --out (same target and topology), "
                        "replacing rows of the same model, mesh and A; its commands are kept")
    p.add_argument("--check", action="store_true", help="exit 1 when a bound breaks")
    args = p.parse_args(argv)
    args.models = args.model.split(",")
    if bad := [m for m in args.models if m not in MODELS]:
        p.error(f"--model: {', '.join(bad)} unknown")
    args.meshes = args.mesh or ["data=8"]
    args.As = [int(a) for a in args.A.split(",")]
    from .plan_cli import split_sets

    args.overrides, args.options = split_sets(p, args.sets)
    if "moe_dispatch" in args.overrides:  # an execution option here, as train.py's flag
        args.options["moe_dispatch"] = args.overrides.pop("moe_dispatch")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import jax

    target = load_target(args.target)
    try:
        devices = topology_devices(target, args.topology)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for model in args.models:
        for mesh in args.meshes:
            for A in args.As:
                print(f"compiling {model} --mesh {mesh} A={A} for {args.topology} x "
                      f"{target.device_kind} ...", file=sys.stderr, flush=True)
                rows.append(plan_layout(model, target, args.topology, devices, mesh, A, args.B,
                                        args.T, args.overrides, args.options))
    name = f"plan-{target.name}-{args.topology}"
    command = "python -m benchmarks.plan_mesh " + shlex.join(argv)
    if args.add:
        command, rows = _added(Path(args.out) / f"{name}.json", command, rows)
    report = {"meta": {"command": command,
                       "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "target": target.name, "device_kind": target.device_kind,
                       "topology": args.topology, "devices": len(devices), "jax": jax.__version__},
              "rows": rows, "broken": broken_bounds(rows)}
    md = render(report)
    for folder in [Path(args.out)] + ([RESULTS] if args.save else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
        (folder / f"{name}.md").write_text(md)
        print(f"wrote {folder / name}.json and .md", file=sys.stderr)
    print(md)
    if args.check and report["broken"]:
        for line in report["broken"]:
            print(f"bound broken: {line}", file=sys.stderr)
        return 1
    return 0


def _added(path: Path, command: str, rows: list[dict]) -> tuple[str, list[dict]]:
    """The plan in ``path`` with ``rows`` added (a new row replaces one of the same model, mesh
    and A) and ``command`` after its commands ("; "-separated, in the order they ran)."""
    if not path.exists():
        return command, rows
    old = json.loads(path.read_text())

    def key(r):
        return r["model"], r["mesh"], r["A"]

    new = {key(r) for r in rows}
    return (f"{old['meta']['command']}; {command}",
            [r for r in old["rows"] if key(r) not in new] + rows)


if __name__ == "__main__":
    raise SystemExit(main())

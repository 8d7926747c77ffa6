"""Runs training scenarios in a process of its own, on N simulated CPU devices, for
tests/test_distributed.py (XLA's device count is fixed when JAX starts, hence the process).

    python tests/multidevice_worker.py N_DEVICES SCENARIOS.json OUT.json

SCENARIOS: a list of {"name", "argv", optional "checks": ["fsdp_bytes", "expert_hlo"]}. Each
runs ``train.py``'s loop in this process; OUT gets, per name, the per-step losses, the final
weights (saved as .npz beside OUT) and the results of the checks.
"""

from __future__ import annotations

import json
import os
import re
import sys

n_devices = int(sys.argv[1])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={n_devices}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from nanomoe.train_loop import run  # noqa: E402
from nanomoe_jax import sharding as shd  # noqa: E402
from nanomoe_train.jax_backend import JaxBackend  # noqa: E402


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def fsdp_bytes(backend) -> dict:
    """Bytes of params + optimizer state per device against their total size."""
    total = sum(x.nbytes for x in jax.tree.leaves(backend.state))
    per_device = shd.bytes_per_device(backend.state)
    return {"total": total, "max_per_device": max(per_device.values()),
            "devices": len(per_device)}


def expert_hlo(backend) -> dict:
    """Collectives of the compiled train step: all-to-all count and the largest all-gather."""
    x = np.zeros((1, backend.devices_per_process * backend.args.B, backend.args.T), np.int32)
    xs = backend._global(x, backend.batch_sharding, 1)
    text = backend._step.lower(backend.lr_mult, backend.state, xs, xs,
                               np.float32(1e-3)).compile().as_text()
    gathers = []
    for line in text.splitlines():
        if " = " in line and re.search(r" all-gather(-start)?\(", line):
            shape_text = line.split(" = ", 1)[1].split(" all-gather", 1)[0]
            gathers += [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                        for dims in re.findall(r"\[([\d,]*)\]", shape_text)]
    all_to_all = sum(1 for line in text.splitlines()
                     if " = " in line and re.search(r" all-to-all(-start)?\(", line))
    mlp = backend.state[0]["blocks"]["mlp"]
    return {"all_to_all": all_to_all, "largest_all_gather": max(gathers, default=0),
            "expert_weight_elements": int(np.prod(mlp["fc_weight"].value.shape[1:])),
            "local_expert_shape": list(mlp["fc_weight"].value.addressable_shards[0].data.shape)}


def main() -> None:
    scenarios = json.load(open(sys.argv[2]))
    out_path = sys.argv[3]
    results = {}
    for s in scenarios:
        backend = JaxBackend()
        summary = run(s["argv"], backend)
        weights = os.path.join(os.path.dirname(out_path), f"{s['name']}.npz")
        np.savez(weights, **flat(backend.state[0]))
        res = {"losses": {str(k): v for k, v in summary["losses"].items()}, "weights": weights,
               "placement": backend.placement}
        for check in s.get("checks", []):
            res[check] = globals()[check](backend)
        results[s["name"]] = res
    json.dump(results, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()

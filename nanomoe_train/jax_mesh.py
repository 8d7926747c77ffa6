"""The JAX backend's processes and device mesh: joining the other processes of a multi-host
run, and the mesh --mesh asks for, refused where the model or the MoE dispatch cannot use
it."""

from __future__ import annotations

import os

import jax
from jax.sharding import Mesh

from nanomoe.config import MoeGPTConfig
from nanomoe.errors import ConfigError
from nanomoe_jax import sharding as shd


def initialize_distributed() -> None:
    """Multi-host: join the other processes when the environment says there are some
    (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, or SLURM / Open MPI, which
    jax.distributed detects itself). Must run before anything touches a device."""
    env = os.environ
    explicit = bool(env.get("JAX_COORDINATOR_ADDRESS"))
    managed = int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if not (explicit or managed):
        return
    # CPU processes exchange with gloo (GPUs use NCCL whatever this says)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
    else:  # jax.distributed detects SLURM and Open MPI itself
        jax.distributed.initialize()


def make_mesh(config, args, process_count: int) -> tuple[Mesh, str]:
    """The mesh over every device, and how it reads in the run's first line."""
    mesh = shd.make_mesh(shd.parse_mesh(args.mesh, jax.device_count()))
    placement = (" ".join(f"{a}={n}" for a, n in mesh.shape.items())
                 + f" over {jax.device_count()} device(s), {process_count} process(es)")
    check_mesh_flags(mesh, config, args)
    return mesh, placement


def check_mesh_flags(mesh: Mesh, config, args) -> None:
    """Refuse an expert axis the model or the MoE dispatch cannot use."""
    if mesh.shape["expert"] == 1:
        return
    if not isinstance(config, MoeGPTConfig):
        raise ConfigError(f"--mesh {args.mesh}: an expert axis needs --model moegpt")
    dispatch = getattr(args, "moe_dispatch", None) or config.moe_dispatch
    if dispatch not in ("capacity", "tokamax"):
        raise ConfigError(f"--mesh with an expert axis sends the routed rows to the devices "
                          f"holding their experts (capacity semantics; each device's experts "
                          f"as tiles or tokamax's grouped GEMM): drop --moe_dispatch "
                          f"{dispatch} or use --moe_dispatch capacity or tokamax")

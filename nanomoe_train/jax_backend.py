"""The JAX backend of nanomoe.train_loop: the model on the device mesh (jax_mesh.py), the
jitted step and evaluation (nanomoe_jax/train.py), orbax checkpoints, export to the original's
.pt, sampling. train.py calls ``nanomoe_jax.quiet.quiet_checkpoint_echoes`` for its process; this module
changes nothing process-wide."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conversion.init_from import init_arrays
from nanomoe.atomic import (as_os_error, atomic_torch_save, check_free_space, describe,
                            write_advice)
from nanomoe.config import config_to_dict
from nanomoe.errors import CheckpointError, NonFiniteError
from nanomoe_jax import checkpoint as ckpt
from nanomoe_jax import compile_cache, create_model
from nanomoe_jax import sharding as shd
from nanomoe_jax.execution import execution_notes, execution_options, options_kwargs
from nanomoe_jax.ngpt import normalize_weights
from nanomoe_jax.sample import generate
from nanomoe_jax.train import all_finite, is_embedding, jit_eval, jit_train_step, make_optimizer
from nanomoe_jax.weights import load_torch_weights, torch_state_dict

from .jax_mesh import initialize_distributed, make_mesh


class JaxBackend:
    name = "jax"
    async_dispatch = True

    def __init__(self):
        if not jax.distributed.is_initialized():
            initialize_distributed()
        device = jax.devices()[0]
        self.has_accelerator = device.platform != "cpu"
        self.device_name = getattr(device, "device_kind", device.platform)
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.devices_per_process = jax.local_device_count()  # each one a data-parallel rank
        self.manager = None

    def setup(self, config, args) -> None:
        """The mesh, the execution options, the model, its optimizer and sharded state, and
        the compiled functions, in that order (each step reads what the one before set)."""
        self.config, self.args = config, args
        compile_cache.enable(getattr(args, "compile_cache", None))
        self.mesh, self.placement = make_mesh(config, args, self.process_count)
        self.options = self._choose_execution(config, args)
        params = self._build_model(config, args)
        self._build_optimizer(config, args, params)
        self._choose_shardings(config, params)
        self._init_state(params)
        self._compile(args)

    def _choose_execution(self, config, args):
        """execution_options decides per device; flags given on the command line win. What it
        had to choose against is printed once per run, before the run's first line."""
        device = jax.devices()[0]
        expert_parallel = self.mesh.shape["expert"] > 1
        shared = dict(dtype=args.dtype,
                      moe_dispatch=getattr(args, "moe_dispatch", None),
                      expert_mesh=self.mesh if expert_parallel else None)
        options = execution_options(
            device, config, self.mesh.size, scan_layers=args.scan_layers, remat=args.remat,
            attention_impl=args.attention_impl, loss_chunk_tokens=args.loss_chunk_tokens,
            row_groups=args.row_groups, **shared)
        notes = execution_notes(device, config, **shared)
        if self.process_index == 0:
            for note in notes:
                print(f"note: {note}", flush=True)
        return options

    def _build_model(self, config, args):
        """The model as the options say; its parameters, still on the default device."""
        model = create_model(config, args.seed, **options_kwargs(self.options))
        self.graphdef, params = nnx.split(model, nnx.Param)
        return params

    def _build_optimizer(self, config, args, params) -> None:
        """AdamW, and the per-parameter lr multipliers (on every device)."""
        self.tx = make_optimizer(config, params, args.weight_decay, args.beta1, args.beta2)
        lr_mult = shd.per_parameter(
            params, lambda axes: args.embedding_lr_mult if is_embedding(axes) else 1.0)
        self.lr_mult = jax.device_put(lr_mult, jax.tree.map(lambda _: self.replicated, lr_mult))

    def _choose_shardings(self, config, params) -> None:
        """Where the parameters, the optimizer state and the batches live on the mesh."""
        self.param_sharding = shd.tree_shardings(params, self.mesh, config)
        opt_shape = jax.eval_shape(self.tx.init, params)
        self.state_sharding = (self.param_sharding, shd.tree_shardings(opt_shape, self.mesh, config))
        self.batch_sharding = shd.batch_sharding(self.mesh)

    def _compile(self, args) -> None:
        """The four jitted functions: the step, evaluation, gathering the weights, logits."""
        replicated = self.replicated
        post_update = normalize_weights if getattr(args, "ngpt_normalize_weights", False) else None
        self._step = jit_train_step(self.graphdef, self.tx, self.state_sharding,
                                    self.batch_sharding, replicated, post_update)
        self._eval = jit_eval(self.graphdef, self.param_sharding, self.eval_sharding,
                              replicated)
        self._replicate = jax.jit(lambda p: p, out_shardings=jax.tree.map(
            lambda _: replicated, self.param_sharding))  # compiled once, used per sample/export
        self._logits = jax.jit(lambda params, idx: nnx.merge(self.graphdef, params)(idx)[0]
                               .astype(jnp.float32), out_shardings=replicated)

    def device_memory(self) -> int | None:
        """Bytes one device may hold (for the size check before setup), None if unknown."""
        try:
            stats = jax.local_devices()[0].memory_stats() or {}
        except Exception:  # noqa: BLE001 - not every platform reports memory
            return None
        return stats.get("bytes_limit")

    @property
    def eval_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(shd.BATCH_AXES))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def _init_state(self, params) -> None:
        """Parameters placed as the mesh says, AdamW state created in place (never whole on
        one device)."""
        params = jax.device_put(params, self.param_sharding)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding[1])(params)
        self.state = (params, opt_state)

    def _global(self, local: np.ndarray, sharding: NamedSharding, axis: int) -> jax.Array:
        """This process's rows (..., y*B, T), y its devices, as its y slices of the global
        batch (..., Y, B, T); device slices follow the original's rank order."""
        y = self.devices_per_process
        shape = local.shape[:axis] + (y, local.shape[axis] // y) + local.shape[axis + 1:]
        return jax.make_array_from_process_local_data(sharding, local.reshape(shape))

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state[0])

    def replicated_model(self) -> nnx.Module:
        """The model with every weight whole on every device (to export or sample); a
        collective, so every process calls it."""
        return nnx.merge(self.graphdef, self._replicate(self.state[0]))

    def load_weights(self, path: str) -> None:
        """--init_from: see conversion.init_from.init_arrays for what PATH may be."""
        model = load_torch_weights(self.model, init_arrays(path))
        self._init_state(nnx.state(model, nnx.Param))

    def train_step(self, x_WBT, y_WBT, lr):
        x = self._global(x_WBT, self.batch_sharding, 1)
        y = self._global(y_WBT, self.batch_sharding, 1)
        self.state, metrics = self._step(self.lr_mult, self.state, x, y, jnp.float32(lr))
        return metrics

    def fetch(self, handle) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(handle).items()}

    def evaluate(self, batches) -> dict[str, float]:
        totals: dict[str, float] = {}
        for x, y in batches:
            _, metrics = self._eval(self.state[0], self._global(x, self.eval_sharding, 0),
                                    self._global(y, self.eval_sharding, 0))
            for k, v in jax.device_get(metrics).items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
        totals.pop("dropped_fraction", None)
        return totals

    def logits(self, tokens_BT: np.ndarray) -> np.ndarray:
        """fp32 logits; rows padded to a multiple of 64 so few lengths are compiled (causal:
        the padding never changes earlier positions)."""
        B, T = tokens_BT.shape
        padded = min(self.config.block_size, -(-T // 64) * 64)
        tokens = np.zeros((B, padded), np.int32)
        tokens[:, :T] = tokens_BT
        out = self._logits(self.state[0], jnp.asarray(tokens))
        return np.asarray(out)[:, :T].astype(np.float32)

    # checkpoints: orbax, atomic (a step folder appears only once complete), async
    def _manager(self, log_dir: str):
        if self.manager is None:
            self.manager = ckpt.manager(os.path.join(log_dir, ckpt.CHECKPOINTS),
                                        keep=self.args.keep_checkpoints)
        return self.manager

    def save(self, log_dir: str, step: int, meta: dict) -> None:
        if not bool(jax.jit(all_finite)(self.state[0])):
            raise NonFiniteError(f"the weights after step {step} are not finite; "
                                 "not saving them")
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(self.state))
        if self.process_index == 0:  # + the last async save, which may still be writing
            check_free_space(log_dir, 2 * state_bytes + 2**20, f"the checkpoint of step {step}")
        try:
            ckpt.save(self._manager(log_dir), step, self.state[0], meta,
                      opt_state=self.state[1])
        except Exception as e:  # noqa: BLE001 - orbax re-raises a failed async write here
            raise _checkpoint_error(e, f"a checkpoint in {log_dir}") from None

    def latest_checkpoint(self, log_dir: str) -> int | None:
        return self._manager(log_dir).latest_step()

    def restore(self, log_dir: str, step: int) -> dict:
        restored = ckpt.restore(self._manager(log_dir), step, *self.state)
        self.state = (restored["params"], restored["opt_state"])
        return restored["meta"]

    def export_final(self, path: str, step: int) -> None:
        """The original's checkpoint format, readable with torch.load(weights_only=True)."""
        try:  # torch is optional for a JAX run: without it, no .pt export
            import torch  # noqa: F401
        except ImportError:
            print(f"torch is not installed: skipped {path} (pip install torch to write it)")
            return
        model = self.replicated_model()
        if self.process_index == 0:
            payload = {"model": torch_state_dict(model),
                       "config": config_to_dict(self.config), "step": step}
            atomic_torch_save(payload, path)

    def sample(self, prompt, n_tokens, top_k, temperature, seed):
        return generate(self.replicated_model(), prompt, n_tokens, top_k=top_k, temperature=temperature,
                        seed=seed)

    def close(self) -> None:
        """After an error has been reported: stop orbax's writer threads and event loop now,
        rather than leave them to echo "Event loop is closed" at exit."""
        if self.manager is not None:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the error that matters was reported already
                pass
            self.manager = None

    def finish(self) -> None:
        if self.manager is not None:
            try:
                self.manager.wait_until_finished()  # the last async save
            except Exception as e:  # noqa: BLE001 - whatever the writer thread raised
                raise _checkpoint_error(e, "the last checkpoint") from None
            finally:
                self.manager.close()
                self.manager = None


def _checkpoint_error(e: BaseException, what: str) -> CheckpointError:
    cause = as_os_error(e)
    return CheckpointError(f"could not write {what} ({describe(cause)}); {write_advice(cause)}; "
                           "the previous checkpoint is intact")

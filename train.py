"""Train GPT, ModernGPT, MoeGPT or nGPT: ``python train.py --framework jax --model moegpt``.

``python train.py --help`` lists every flag. With no flags on a machine without a GPU, trains
a small MoE on Shakespeare's plays (shipped with the package, no download) for about 2 minutes.
"""

import resource
import signal
import sys

# Ctrl-C or SIGTERM during the imports (seconds for jax/torch) is noted here, not raised: a
# KeyboardInterrupt inside a library callback would be swallowed and the run would go on.
# The run stops before writing anything when it sees a noted signal.
EARLY_SIGNALS: list[str] = []


def _note(signum, frame) -> None:
    EARLY_SIGNALS.append(signal.Signals(signum).name)


def make_backend(argv: list[str]):
    """The backend of --framework; the other framework is never imported (a JAX run without
    torch installed), hence the imports here."""
    if framework_of(argv) == "torch":
        from nanomoe_torch.threads import choose_cpu_threads
        from nanomoe_train.torch_backend import TorchBackend

        choose_cpu_threads()  # on a busy CPU torch's default thread count stalls
        return TorchBackend()
    from nanomoe_jax.quiet import quiet_checkpoint_echoes
    from nanomoe_train.jax_backend import JaxBackend

    quiet_checkpoint_echoes()  # process-wide, so here: a failed write is one sentence
    return JaxBackend()


# Address space the runtime itself reserves before any model exists (measured on a tiny run:
# JAX's CPU client peaks near 2.7 GB and aborts with std::bad_alloc under a 2 GB ulimit -v;
# torch near 1.2 GB). Below these a run dies with SIGSEGV or SIGABRT and no message.
ADDRESS_SPACE_NEEDED = {"jax": 3 * 2**30, "torch": 2 * 2**30}


def address_space_error(framework: str) -> str | None:
    """One sentence when ulimit -v leaves too little address space for the framework."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    need = ADDRESS_SPACE_NEEDED.get(framework, ADDRESS_SPACE_NEEDED["jax"])
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    return (f"error: the address-space limit (ulimit -v) is {soft / 2**30:.1f} GiB, but "
            f"--framework {framework} needs at least {need / 2**30:.0f} GiB before the model "
            f"(its runtime reserves that much); raise it (ulimit -v {need // 1024 + 2**20}, or "
            "unlimited) and run again")


def framework_of(argv: list[str]) -> str:
    framework = "jax"
    for i, arg in enumerate(argv):
        if arg.startswith("--framework="):
            framework = arg.split("=", 1)[1]
        elif arg == "--framework" and i + 1 < len(argv):
            framework = argv[i + 1]
    return framework


def _main(argv: list[str]) -> int:
    error = address_space_error(framework_of(argv))
    if error:  # checked before jax or torch is imported: they would crash without a word
        print(error, file=sys.stderr)
        return 2
    from nanomoe.train_loop import main  # imported once the signal handlers are in place

    return main(argv, lambda: make_backend(argv), early_signals=EARLY_SIGNALS)


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note)
    sys.exit(_main(sys.argv[1:]))

"""Train GPT, ModernGPT, MoeGPT or nGPT: ``python train.py --framework jax --model moegpt``.

``python train.py --help`` lists every flag. With no flags on a machine without a GPU, trains
a small MoE on the Python standard library's source for a few minutes (no download).
"""

import signal
import sys

# Ctrl-C or SIGTERM during the imports (seconds for jax/torch) is noted here, not raised: a
# KeyboardInterrupt inside a library callback would be swallowed and the run would go on.
# The run stops before writing anything when it sees a noted signal.
EARLY_SIGNALS: list[str] = []


def _note(signum, frame) -> None:
    EARLY_SIGNALS.append(signal.Signals(signum).name)


def make_backend(argv: list[str]):
    framework = "jax"
    for i, arg in enumerate(argv):
        if arg.startswith("--framework="):
            framework = arg.split("=", 1)[1]
        elif arg == "--framework" and i + 1 < len(argv):
            framework = argv[i + 1]
    if framework == "torch":
        from nanomoe_torch.train import TorchBackend

        return TorchBackend()
    from nanomoe_jax.backend import JaxBackend

    return JaxBackend()


def _main(argv: list[str]) -> int:
    from nanomoe.train_loop import main

    return main(argv, lambda: make_backend(argv), early_signals=EARLY_SIGNALS)


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note)
    sys.exit(_main(sys.argv[1:]))

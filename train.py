"""Train GPT, ModernGPT, MoeGPT or nGPT: ``python train.py --framework jax --model moegpt``.

``python train.py --help`` lists every flag. With no flags on a machine without a GPU, trains
a small MoE on the Python standard library's source for a few minutes (no download).
"""

import sys


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
    from nanomoe_jax.train import JaxBackend

    return JaxBackend()


def _main(argv: list[str]) -> int:
    from nanomoe.train_loop import main  # imported here so Ctrl-C during imports is caught

    return main(argv, lambda: make_backend(argv))


if __name__ == "__main__":
    try:
        sys.exit(_main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C before the run installed its own handlers
        print("error: stopped by SIGINT before the first step; nothing was written",
              file=sys.stderr)
        sys.exit(130)

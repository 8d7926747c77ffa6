"""Train GPT, ModernGPT or MoeGPT: ``python train.py --framework jax --model moegpt``.

``python train.py --help`` lists every flag. With no flags on a machine without a GPU, trains
a small MoE on the Python standard library's source for a few minutes (no download).
"""

import sys

from nanomoe.train_loop import main


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


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv, lambda: make_backend(argv)))

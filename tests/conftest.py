import os

# Parity tests compare fp32 numbers to 1e-5: no TF32 shortcuts on GPUs, no preallocation.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
except ImportError:  # pragma: no cover - torch is a test dependency
    pass

import os

# Parity tests compare fp32 numbers to 1e-5: no TF32 shortcuts on GPUs, no preallocation.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# One persistent compilation cache for the session, shared with the train.py subprocesses the
# tests start: the same tiny programs are compiled once instead of once per process.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="nanomoe-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

# hypothesis's pytest plugin imports hypothesis in each xdist worker's end-of-session summary.
# In a worker that ran no hypothesis test that import took over 5 s on a busy 2-core machine,
# and execnet SIGINTs a worker still busy 5 s after shutdown: a KeyboardInterrupt lands in
# whatever runs (jax's gc callback) and a passing suite ends with a
# PytestUnraisableExceptionWarning traceback. Importing it here moves that cost to the start.
try:
    import hypothesis.internal.observability  # noqa: E402, F401
except ImportError:  # a venv without the test extra (the plan's): no plugin, nothing to do
    pass

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
except ImportError:  # pragma: no cover - torch is a test dependency
    pass


# No test touches the network: a connection to anything but this machine fails loudly.
import socket  # noqa: E402

_connect = socket.socket.connect


def _local_only(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        raise ConnectionRefusedError(f"a test tried to reach the network ({address})")
    return _connect(self, address)


socket.socket.connect = _local_only

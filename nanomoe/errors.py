"""The project's own error types: one sentence that says what is wrong and how to fix it."""


class NanoMoeError(Exception):
    """Base class for every error this project raises on bad input."""


class ConfigError(NanoMoeError, ValueError):
    """A model or training configuration that cannot work (names the field)."""


class ConversionError(NanoMoeError, ValueError):
    """Weights whose names or shapes do not fit the model they are loaded into."""


class NonFiniteError(NanoMoeError, FloatingPointError):
    """A loss, gradient or weight that is NaN or infinite."""


class CheckpointError(NanoMoeError, OSError):
    """A checkpoint that cannot be written or read."""


class DataError(NanoMoeError, ValueError):
    """Data that cannot be read or does not fit the run (names the file and the fix)."""


class TrainError(NanoMoeError, ValueError):
    """A training setup that cannot work (bad flags, a log folder of another run, ...)."""

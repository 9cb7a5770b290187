"""Every knob of vct.storage the environment sets: the names, their defaults and parsing.

Read at each call, so a changed value takes effect at once; a bad value is a ValueError naming
the variable. This module imports nothing of the package (the bottom layer).
"""

from __future__ import annotations

import os

# The default cap of read_input: far above any photo the model can use (a 64 MP PNG is the
# pixel cap of vct.images), far below what would hurt a worker's memory.
MAX_INPUT_BYTES = 64 * 1024 * 1024
ENV_MAX_INPUT_BYTES = "VCT_MAX_INPUT_BYTES"


# botocore, per S3 call: its default (3 attempts) gives up inside one short burst of SlowDown.
DEFAULT_S3_MAX_ATTEMPTS = 5
DEFAULT_S3_CONNECT_TIMEOUT_S = 10.0
DEFAULT_S3_READ_TIMEOUT_S = 60.0
ENV_S3_MAX_ATTEMPTS = "VCT_S3_MAX_ATTEMPTS"
ENV_S3_CONNECT_TIMEOUT = "VCT_S3_CONNECT_TIMEOUT"
ENV_S3_READ_TIMEOUT = "VCT_S3_READ_TIMEOUT"
# Job level, around each operation (see RetryPolicy).
ENV_STORAGE_ATTEMPTS = "VCT_STORAGE_ATTEMPTS"
ENV_RETRY_BASE = "VCT_STORAGE_RETRY_BASE_S"
ENV_RETRY_MAX = "VCT_STORAGE_RETRY_MAX_S"
ENV_RETRY_DEADLINE = "VCT_STORAGE_RETRY_DEADLINE_S"
# sweep_temp_files: a day is far longer than any single write takes.
DEFAULT_TEMP_MAX_AGE_S = 24 * 3600.0
ENV_TEMP_MAX_AGE = "VCT_TEMP_MAX_AGE_S"


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def _env_float(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not minimum <= value < float("inf"):  # also refuses nan
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {raw!r}")
    return value


def max_input_bytes() -> int:
    """The cap :func:`read_input` applies: ``VCT_MAX_INPUT_BYTES`` or :data:`MAX_INPUT_BYTES`."""
    return _env_int(ENV_MAX_INPUT_BYTES, MAX_INPUT_BYTES, minimum=1)


def temp_max_age_s() -> float:
    """The default age of :func:`sweep_temp_files`: ``VCT_TEMP_MAX_AGE_S`` or a day."""
    return _env_float(ENV_TEMP_MAX_AGE, DEFAULT_TEMP_MAX_AGE_S, minimum=0.0)

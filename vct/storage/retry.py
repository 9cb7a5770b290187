"""The job-level retries around each storage operation: :class:`RetryPolicy` (from the
``VCT_STORAGE_*`` variables) and :func:`retrying`, which also turns every storage failure into
a one-line StorageError."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from vct.storage.env import (
    ENV_RETRY_BASE,
    ENV_RETRY_DEADLINE,
    ENV_RETRY_MAX,
    ENV_STORAGE_ATTEMPTS,
    _env_float,
    _env_int,
)
from vct.storage.errors import _STORAGE_FAILURES, _one_line, _storage_error, is_transient

T = TypeVar("T")
log = logging.getLogger("vct.storage")

@dataclass(frozen=True)
class RetryPolicy:
    """How :func:`retrying` retries a transient failure of one storage operation.

    At most ``attempts`` tries; before try n (n >= 2) it sleeps ``d/2 + uniform(0, d/2)`` with
    ``d = min(max_delay_s, base_delay_s * 2**(n-2))`` (exponential, with jitter so that many
    workers throttled together do not come back together, but never ~0 so throttling is
    actually relieved); no try starts after ``deadline_s`` from the first.
    """

    attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    deadline_s: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The policy the ``VCT_STORAGE_*`` variables describe (defaults as above)."""
        d = cls()
        return cls(attempts=_env_int(ENV_STORAGE_ATTEMPTS, d.attempts, minimum=1),
                   base_delay_s=_env_float(ENV_RETRY_BASE, d.base_delay_s, minimum=0.0),
                   max_delay_s=_env_float(ENV_RETRY_MAX, d.max_delay_s, minimum=0.0),
                   deadline_s=_env_float(ENV_RETRY_DEADLINE, d.deadline_s, minimum=0.0))

    def delay(self, failed_tries: int) -> float:
        """Seconds to wait after ``failed_tries`` failures, before the next try."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (failed_tries - 1))
        return ceiling / 2 + random.uniform(0.0, ceiling / 2)


def retrying(fn: Callable[[], T], *, uri: str, action: str,
             policy: RetryPolicy | None = None) -> T:
    """Call ``fn`` (one whole storage operation on ``uri``), retrying transient failures.

    Why a second level above botocore's own retries: botocore retries one HTTP request a fixed
    number of times within a few seconds, so a longer burst of throttling fails the job, and it
    does not retry at all a failure while a response body streams in, or local I/O errors. Here
    the whole operation is repeated (a GET and the read of its body; a listing from the first
    page), bounded by the policy's attempts and deadline (``RetryPolicy.from_env()`` unless
    given). Permanent failures (:func:`is_transient` false: 403, 404, a full disk, too large)
    are raised at once. Every storage failure leaves as a one-line :class:`StorageError` (the
    original as ``__cause__``); other exceptions (bugs) propagate unchanged and untried.
    """
    policy = policy or RetryPolicy.from_env()
    start = time.monotonic()
    tries = 0
    while True:
        tries += 1
        try:
            return fn()
        except _STORAGE_FAILURES as exc:
            elapsed = time.monotonic() - start
            if is_transient(exc) and tries < policy.attempts:
                pause = policy.delay(tries)
                if elapsed + pause <= policy.deadline_s:
                    log.info("%s %s failed (%s); try %d of %d in %.2f s", action, uri,
                             _one_line(exc), tries + 1, policy.attempts, pause)
                    time.sleep(pause)
                    continue
            error = _storage_error(exc, uri, action, tries, elapsed)
            if error is exc:
                raise
            raise error from exc

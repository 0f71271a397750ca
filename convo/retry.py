"""When to retry a failed API call and how long to wait: the official SDK's contract, as data.

Pure policy, no I/O: the client passes in how to attempt, how to sleep and where randomness
comes from, so tests never really sleep and an async client can reuse every rule.

Matches ``anthropic._base_client`` (``_should_retry``, ``_parse_retry_after_header``,
``_calculate_retry_timeout``) with one deliberate difference: an ``error`` event that arrives in
a stream after the HTTP 200 (``status_code`` None) is retried when its type is transient
(overloaded, api, rate limit, timeout), like the same error sent as an HTTP status would be.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from convo.errors import APIConnectionError, APIError, APIStatusError

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "INITIAL_RETRY_DELAY",
    "MAX_RETRY_AFTER",
    "MAX_RETRY_DELAY",
    "RetryPolicy",
    "parse_retry_after",
    "run_with_retries",
]

T = TypeVar("T")

DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
# A server-suggested wait is trusted only within (0, 60] seconds; beyond that the SDK (and
# convo) fall back to exponential backoff rather than hang or hammer.
MAX_RETRY_AFTER = 60.0

RETRYABLE_STATUSES = frozenset({408, 409, 429})
RETRYABLE_STREAM_ERRORS = frozenset(
    {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}
)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, else ``retry-after``.

    ``retry-after`` is seconds (possibly fractional) or an HTTP date, relative to ``now``
    (``time.time()`` by default). Returns None when neither header parses. The range check is
    the caller's job, so a negative or huge value is returned as is.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return email.utils.mktime_tz(parsed) - (time.time() if now is None else now)


@dataclass(frozen=True)
class RetryPolicy:
    """How many times to retry and the backoff bounds (seconds)."""

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_delay: float = INITIAL_RETRY_DELAY
    max_delay: float = MAX_RETRY_DELAY

    def should_retry(self, error: APIError) -> bool:
        """Whether ``error`` is worth another attempt (ignoring how many were made)."""
        if isinstance(error, APIConnectionError):  # includes APITimeoutError
            return True
        if not isinstance(error, APIStatusError):
            return False
        verdict = error.headers.get("x-should-retry", "").strip().lower()
        if verdict == "true":
            return True
        if verdict == "false":
            return False
        status = error.status_code
        if status is None:
            return error.error_type in RETRYABLE_STREAM_ERRORS
        return status in RETRYABLE_STATUSES or status >= 500

    def delay(self, retries_done: int, error: APIError | None, rand: float) -> float:
        """Seconds to sleep before retry number ``retries_done + 1``; ``rand`` is in [0, 1)."""
        if isinstance(error, APIStatusError):
            suggested = parse_retry_after(error.headers)
            if suggested is not None and 0 < suggested <= MAX_RETRY_AFTER:
                return suggested
        backoff = min(self.initial_delay * 2.0 ** min(retries_done, 1000), self.max_delay)
        return max(backoff * (1 - 0.25 * rand), 0.0)


def run_with_retries(
    attempt: Callable[[int], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], object] = time.sleep,
    rand: Callable[[], float] = random.random,
    on_retry: Callable[[APIError, float], object] | None = None,
) -> T:
    """Call ``attempt(0)``, ``attempt(1)``, ... until one returns or retrying stops.

    Only :class:`APIError` is retried; anything else (a bug, a missing key) propagates at
    once. When retries are exhausted or the error is not retryable, the last error is re-raised
    unchanged. ``on_retry(error, delay)`` runs before each sleep, e.g. to tell the user.
    """
    retries_done = 0
    while True:
        try:
            return attempt(retries_done)
        except APIError as error:
            if retries_done >= policy.max_retries or not policy.should_retry(error):
                raise
            wait = policy.delay(retries_done, error, rand())
            if on_retry is not None:
                on_retry(error, wait)
        sleep(wait)
        retries_done += 1

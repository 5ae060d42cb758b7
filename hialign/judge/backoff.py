"""When to retry an endpoint call and how long to wait: exponential backoff, jitter, Retry-After.

Retried: HTTP 408, 429 and 5xx, timeouts and dropped connections. Any other 4xx is the caller's
mistake (bad key, unknown model, malformed request) and stops the run with the server's message.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class RetryPolicy:
    """How often and how patiently transient failures are retried."""

    max_retries: int = 5  # retries after the first attempt
    base_delay: float = 1.0  # seconds before the first retry; doubles each time
    max_delay: float = 60.0  # cap on one computed wait
    max_retry_after: float = 300.0  # cap on a server's Retry-After, so a typo cannot hang a run
    jitter: float = 0.5  # a wait is scaled by a random factor in [1 - jitter, 1]

    def delay(self, retry: int, retry_after: float | None = None, rng=random) -> float:
        """Seconds to wait before retry number ``retry`` (0-based).

        A server's Retry-After is honoured as a floor: we never come back sooner than asked.
        """
        backoff = min(self.max_delay, self.base_delay * 2**retry)
        backoff *= 1.0 - self.jitter * rng.random()
        if retry_after is not None:
            return max(min(retry_after, self.max_retry_after), backoff)
        return backoff


def is_retryable_status(status: int) -> bool:
    """HTTP statuses worth another try: request timeout, rate limit and server errors."""
    return status in (408, 429) or status >= 500


def retry_after_seconds(
    headers: Mapping[str, str] | None, now: float | None = None
) -> float | None:
    """Seconds from a ``retry-after-ms`` or ``Retry-After`` header (seconds or HTTP date)."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in lowered:
        try:
            return max(0.0, float(lowered["retry-after-ms"]) / 1000.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)

"""A circuit breaker per deployment, so an endpoint that is down is not
hammered by every waiting invocation's retries.

closed → (`threshold` consecutive failed requests) → open for a cool-down:
no request is sent, the items fail at once with `CircuitOpen` (an
`Unreachable`: the invocation waits and retries without counting an attempt,
and its transport budget keeps running, so a long outage still pauses it) →
half-open: the next request is the one probe → its success closes the
circuit, its failure opens it again for twice the cool-down (up to
`max_cooldown`). A request the endpoint answers at all (even refuses) is a
success: the endpoint is there. The clock is injected so the state machine
is tested without sleeping.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("oncely.remote")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
THRESHOLD = 5
COOLDOWN_S = 1.0
MAX_COOLDOWN_S = 30.0


class Breaker:
    """One deployment's circuit; `allow()` before a request, then
    `success()` or `failure()` after it."""

    def __init__(self, name: str, threshold: int = THRESHOLD, cooldown: float = COOLDOWN_S,
                 max_cooldown: float = MAX_COOLDOWN_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.threshold = max(1, threshold)
        self.base_cooldown = cooldown
        self.max_cooldown = max(cooldown, max_cooldown)
        self.clock = clock
        self.state = CLOSED
        self.failures = 0          # consecutive failed requests
        self.cooldown = cooldown   # of the current or next opening
        self.opened_at = 0.0
        self.probing = False       # half-open: the probe is out
        self.opened = 0            # times opened (a counter for metrics)
        self.rejected = 0          # requests not sent because the circuit was open

    def allow(self) -> float:
        """0.0: send the request now; else the seconds until the circuit may
        let a request through (the caller fails its items with that as
        their retry-after)."""
        if self.state == CLOSED:
            return 0.0
        if self.state == OPEN:
            left = self.opened_at + self.cooldown - self.clock()
            if left > 0:
                self.rejected += 1
                return left
            self.state = HALF_OPEN
            self.probing = False
            log.info("circuit of deployment %s half-open: one probe request", self.name)
        if self.probing:
            self.rejected += 1
            return min(self.base_cooldown, 0.1)
        self.probing = True
        return 0.0

    def success(self) -> None:
        if self.state != CLOSED:
            log.warning("circuit of deployment %s closed: the endpoint answers again", self.name)
        self.state = CLOSED
        self.failures = 0
        self.probing = False
        self.cooldown = self.base_cooldown

    def abandoned(self) -> None:
        """The request ended without an answer either way (cancelled): a
        probe that was out may be sent again."""
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN:
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._open("the probe failed")
        elif self.state == CLOSED and self.failures >= self.threshold:
            self._open(f"{self.failures} requests in a row failed")

    def _open(self, why: str) -> None:
        self.state = OPEN
        self.probing = False
        self.opened_at = self.clock()
        self.opened += 1
        log.warning("circuit of deployment %s open for %.1f s: %s; no requests meanwhile", self.name,
                    self.cooldown, why)

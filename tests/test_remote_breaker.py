"""The circuit breaker's state machine, on a hand-driven clock (no broker,
no HTTP): closed → open after the threshold → half-open with one probe →
closed on success, open again for twice as long on failure."""

from __future__ import annotations

import logging

import pytest

from oncely.remote.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_opens_after_consecutive_failures_only() -> None:
    b = Breaker("dp_x", threshold=3, cooldown=2.0, clock=Clock())
    for _ in range(2):
        assert b.allow() == 0.0
        b.failure()
    b.success()  # a success in between resets the count
    for _ in range(2):
        b.failure()
    assert b.state == CLOSED and b.allow() == 0.0
    b.failure()
    assert b.state == OPEN and b.opened == 1


def test_open_rejects_then_one_probe_then_closes(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    b = Breaker("dp_x", threshold=2, cooldown=2.0, clock=clock)
    caplog.set_level(logging.INFO, "oncely.remote")
    b.failure()
    b.failure()
    assert b.allow() == pytest.approx(2.0)
    clock.t += 1.5
    assert b.allow() == pytest.approx(0.5)
    assert b.rejected == 2
    clock.t += 0.5
    assert b.allow() == 0.0 and b.state == HALF_OPEN  # the probe
    assert b.allow() > 0 and b.allow() > 0            # nobody else while it is out
    b.success()
    assert b.state == CLOSED and b.allow() == 0.0 and b.allow() == 0.0
    text = caplog.text
    assert "open for 2.0 s" in text and "half-open" in text and "closed" in text


def test_a_failed_probe_doubles_the_cooldown_up_to_the_cap() -> None:
    clock = Clock()
    b = Breaker("dp_x", threshold=1, cooldown=1.0, max_cooldown=3.0, clock=clock)
    b.failure()
    waits = []
    for _ in range(4):
        clock.t += b.allow()
        assert b.allow() == 0.0  # the probe goes
        b.failure()
        assert b.state == OPEN
        waits.append(b.allow())
    assert waits == [pytest.approx(2.0), pytest.approx(3.0), pytest.approx(3.0), pytest.approx(3.0)]
    clock.t += 3.0
    assert b.allow() == 0.0
    b.success()
    assert b.cooldown == 1.0 and b.opened == 5


def test_an_abandoned_probe_lets_another_through() -> None:
    clock = Clock()
    b = Breaker("dp_x", threshold=1, cooldown=1.0, clock=clock)
    b.failure()
    clock.t += 1.0
    assert b.allow() == 0.0
    assert b.allow() > 0
    b.abandoned()
    assert b.allow() == 0.0 and b.state == HALF_OPEN

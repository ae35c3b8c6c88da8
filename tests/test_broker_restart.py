"""Liveness across broker outages: a processor outlives its broker.

A clean broker stop used to hang the processor for good inside
send_offsets_to_transaction (librdkafka waits on a decommissioned group
coordinator with no timeout), ignoring SIGTERM. Here the broker is stopped
for 10 s and for 60 s, and killed -9 once, while a processor runs and
records keep coming; after each return processing must resume within a
bound, and every key's sum must be exact. Last, SIGTERM during an outage
must end the process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from oncely.local_kafka import LocalKafka
from oncely.testing import unique_name
from support import CounterTraffic, ProcessorProcess, wait_for_app_topics, wait_until

# Resume bound after the broker answers again: the consumer's session
# (10 s) may have expired, a rejoin follows, and a stuck transactional call
# is abandoned after txn_call_timeout + 2 s (7 s); restore and replay on top.
RESUME_BOUND = 45.0


@pytest.mark.slow
def test_processing_resumes_after_broker_stops_and_kills(tmp_path: Path) -> None:
    broker = LocalKafka(data_dir=tmp_path / "broker")
    bootstrap = broker.start().bootstrap
    name = unique_name("bounce")
    proc = ProcessorProcess("tests.apps.counter:app", bootstrap, tmp_path / "state",
                            {"ONCELY_TEST_APP": name, "ONCELY_TEST_PARTITIONS": "4"}, tmp_path / "p.log")
    resumed: dict[str, float] = {}
    restarts: list[str] = []

    def supervise() -> bool:
        """What a deployment's supervisor does: a process that gave up on
        stuck Kafka clients (exit status 75, by design) is started again."""
        if not proc.alive():
            assert proc.proc is not None and proc.proc.returncode == 75, \
                f"the processor exited with {proc.proc.returncode if proc.proc else None}; log: {proc.log}"
            restarts.append(time.strftime("%H:%M:%S"))
            proc.start()
        return True

    try:
        proc.start()
        wait_for_app_topics(bootstrap, name)
        traffic = CounterTraffic(bootstrap, name, keys=60, fresh_client=True)
        traffic.send(1500)
        wait_until(traffic.exact, 90, 0.5, "the first sums")
        for label, down, kill in (("stop 10 s", 10, False), ("kill -9", 3, True), ("stop 60 s", 60, False)):
            traffic.send(300)  # in flight when the broker goes
            info = broker.status()
            assert info is not None
            if kill:
                os.kill(info.pid, signal.SIGKILL)
                wait_until(lambda: broker.status() is None, 30, 0.2, "the broker to die")
            else:
                broker.stop()
            time.sleep(down)
            broker.start()
            back = time.monotonic()
            traffic.send(500)
            wait_until(lambda: supervise() and traffic.exact(), RESUME_BOUND + 60, 0.5,
                       f"exact sums after the broker's {label}")
            resumed[label] = time.monotonic() - back
        print("resumed after the broker came back (s):", {k: round(v, 1) for k, v in resumed.items()},
              f"supervisor restarts (exit 75): {restarts}")
        for label, seconds in resumed.items():
            assert seconds <= RESUME_BOUND, f"processing resumed {seconds:.1f} s after the broker's {label}"

        # SIGTERM while the broker is away: the process must end anyway.
        traffic.send(200)
        broker.stop()
        t0 = time.monotonic()
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        try:
            proc.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"SIGTERM during a broker outage was ignored; log: {proc.log}") from None
        print(f"SIGTERM during the outage: exited in {time.monotonic() - t0:.1f} s")
    finally:
        if proc.alive():
            proc.kill9()
        broker.stop()

"""Failures between the processor and a remote endpoint, on a real broker
with the endpoint (`tests.apps.remote_conf`, steered through files in
REMOTE_CONF_CTL) in its own process; outputs read under read_committed and
state read from the changelog, exactly:

- the processor killed -9 while requests are out at the endpoint;
- answers that arrive after the processor rewound (an aborted transaction);
- answers the processor gave up on (client timeout) but the endpoint
  completed, so the same items are answered twice;
- an endpoint answering 503 or hanging past its deadline: no attempt burnt,
  PAUSED after the transport budget, never dead-lettered, the circuit
  breaker keeps the request count low; then resumed by `oncely invocations resume`, completed once;
- 5 MB of state travels by `need_state` round trips, not eagerly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from test_remote_processor import SECRET, Endpoint, _remote_app

import oncely
from oncely.gateway.paths import located_id
from oncely.processor.invocation import PAUSED
from oncely.remote import transport
from oncely.testing import read_to_end, unique_name
from support import (InProcessProcessor, ProcessorProcess, changelog_state, oncely_cli, wait_for_app_topics,
                     wait_until)


class Ctl:
    """The endpoint's steering files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()

    def mode(self, mode: str) -> None:
        (self.path / "mode").write_text(mode)

    def requests(self) -> list[tuple[int, int]]:
        f = self.path / "requests"
        return [tuple(map(int, line.split())) for line in f.read_text().splitlines()] if f.exists() else []  # type: ignore

    def answered(self) -> int:
        """Items the endpoint answered with 200 (whether or not anyone took the answer)."""
        f = self.path / "answered"
        return sum(int(x) for x in f.read_text().split()) if f.exists() else 0


@pytest.fixture
def ctl(tmp_path: Path) -> Ctl:
    return Ctl(tmp_path / "ctl")


@pytest.fixture
def endpoint(tmp_path: Path, ctl: Ctl, monkeypatch: pytest.MonkeyPatch) -> Iterator[Endpoint]:
    monkeypatch.setenv("ONCELY_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("REMOTE_CONF_CTL", str(ctl.path))
    ep = Endpoint(tmp_path / "endpoint.log")
    yield ep
    ep.kill9()


def _send_tally(kafka: str, name: str, out: str, ids: range, keys: int) -> None:
    client = oncely.Client(kafka, app=name)
    for i in ids:
        client.send("shop", f"k{i % keys}", "tally", {"id": i, "topic": out})
    client.flush()
    client.close()


def _check_tally(kafka: str, name: str, out: str, n: int, keys: int) -> None:
    """Each output exactly once under read_committed; exact per-key counts
    and order in the changelog; nothing dead-lettered."""
    ids = [orjson.loads(r.value or b"")["id"] for r in read_to_end(kafka, out)]
    assert sorted(ids) == list(range(n)), f"duplicates or losses: {len(ids)} outputs of {n}"
    state = changelog_state(kafka, name)
    for k in range(keys):
        assert state[("shop", f"k{k}".encode(), "n")] == len(range(k, n, keys))
        assert state[("shop", f"k{k}".encode(), "seen")] == list(range(k, n, keys))
    assert read_to_end(kafka, f"{name}.dlq") == []


def _stats(runner: InProcessProcessor) -> tuple[int, int]:
    """(attempts retried, invocations paused) over the live partitions."""
    stats = runner.on_loop(lambda: [p.stats for p in runner.processor.partitions.values()])  # type: ignore
    return sum(s.retries for s in stats), sum(s.paused for s in stats)


def test_processor_killed_mid_batch_then_restarted(kafka: str, kafka_topic: Any, tmp_path: Path, ctl: Ctl,
                                                   endpoint: Endpoint) -> None:
    name = unique_name("remote-pkill")
    out = kafka_topic(2, prefix="remote-pkill-out")
    n, keys = 240, 12
    proc = ProcessorProcess("tests.apps.remote_proc:app", kafka, tmp_path / "state",
                            {"REMOTE_CONF_APP": name, "ONCELY_DEPLOYMENTS": endpoint.url,
                             "ONCELY_SIGNING_SECRET": SECRET}, tmp_path / "processor.log").start()
    try:
        wait_for_app_topics(kafka, name)
        ctl.mode("slow 0.4")  # every request stays out a while: the kill finds some in flight
        _send_tally(kafka, name, out, range(n), keys)
        wait_until(lambda: len(read_to_end(kafka, out)) >= n // 5, 120, 0.1, "a fifth of the outputs")
        wait_until(lambda: sum(i for i, _ in ctl.requests()) > ctl.answered(), 60, 0.02, "a request out")
        proc.kill9()  # within the 0.4 s the endpoint holds it (the end checks that work was lost)
        time.sleep(0.6)  # the endpoint answers them to a dead socket
        ctl.mode("")
        proc.start()
        wait_until(lambda: len(read_to_end(kafka, out)) >= n, 120, 0.3, "every output")
        time.sleep(1.0)  # anything doubled would be visible by now
    finally:
        proc.stop()
    _check_tally(kafka, name, out, n, keys)
    assert ctl.answered() > n, "the endpoint never answered an item twice: the kill lost no work"


def test_answers_after_a_rewind_are_dropped(kafka: str, kafka_topic: Any, tmp_path: Path, ctl: Ctl,
                                            endpoint: Endpoint) -> None:
    name = unique_name("remote-rewind")
    out = kafka_topic(2, prefix="remote-rewind-out")
    n, keys = 60, 6
    admin = AdminClient({"bootstrap.servers": kafka})

    def changelog_max_bytes(value: str | None) -> None:
        op = AlterConfigOpType.SET if value else AlterConfigOpType.DELETE
        entry = ConfigEntry("max.message.bytes", value or "", incremental_operation=op)
        r = ConfigResource(ConfigResource.Type.TOPIC, f"{name}.changelog", incremental_configs=[entry])
        admin.incremental_alter_configs([r])[r].result(30)

    runner = InProcessProcessor(_remote_app(kafka, tmp_path, endpoint, name, commit_interval=0.05)).start()
    try:
        ctl.mode("slow 1.5")
        _send_tally(kafka, name, out, range(n // 2), keys)
        wait_until(lambda: ctl.requests(), 60, 0.05, "requests out at the endpoint")
        # The changelog now refuses the processor's batches: its next commit
        # (the queued Invokes of the second half) aborts and every partition
        # rewinds while the requests are still out.
        changelog_max_bytes("200")
        _send_tally(kafka, name, out, range(n // 2, n), keys)
        wait_until(lambda: runner.processor.aborts >= 1, 60, 0.05, "an aborted transaction")  # type: ignore
        answered_at_rewind = ctl.answered()
        changelog_max_bytes(None)
        wait_until(lambda: ctl.answered() > answered_at_rewind, 60, 0.1, "a stale answer after the rewind")
        ctl.mode("")
        wait_until(lambda: len(read_to_end(kafka, out)) >= n, 120, 0.3, "every output")
        time.sleep(1.0)
        retries, paused = _stats(runner)
        rewinds = runner.processor.rewinds  # type: ignore[union-attr]
    finally:
        runner.stop()
    assert rewinds >= 1
    _check_tally(kafka, name, out, n, keys)
    assert ctl.answered() > n, "no answer was dropped"
    assert retries == 0 and paused == 0


def test_answers_given_up_on_then_answered_again_apply_once(kafka: str, kafka_topic: Any, tmp_path: Path, ctl: Ctl,
                                                            endpoint: Endpoint,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique_name("remote-dup")
    out = kafka_topic(1, prefix="remote-dup-out")
    n, keys = 20, 5
    monkeypatch.setattr(transport, "TIMEOUT_SLACK_S", 0.2)  # the client waits deadline (0.6 s) + 0.2 s
    runner = InProcessProcessor(_remote_app(kafka, tmp_path, endpoint, name, remote_deadline_ms=600)).start()
    try:
        ctl.mode("slow 1.2")  # the endpoint completes every item, after the processor stopped waiting
        _send_tally(kafka, name, out, range(n), keys)
        wait_until(lambda: ctl.answered() >= 1 and runner.processor.executor.remote.transport_retries >= 1,  # type: ignore
                   60, 0.1, "an answer the processor no longer waited for")
        ctl.mode("")
        wait_until(lambda: len(read_to_end(kafka, out)) >= n, 120, 0.3, "every output")
        time.sleep(1.0)
        retries, paused = _stats(runner)
    finally:
        runner.stop()
    _check_tally(kafka, name, out, n, keys)
    assert ctl.answered() > n, "no item was answered twice"
    assert retries == 0 and paused == 0


@pytest.mark.parametrize("mode", ["503", "hang"])
def test_endpoint_failing_pauses_without_attempts_or_hammering_then_resumes(
        kafka: str, kafka_topic: Any, tmp_path: Path, ctl: Ctl, endpoint: Endpoint, mode: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """503 answers, or a request hanging past its deadline: PAUSED after the
    4 s budget with attempt 0, no dead letter; the breaker lets only a few
    requests through meanwhile; once the endpoint is healthy and the
    invocations resumed, each completes once."""
    name = unique_name(f"remote-{mode}")
    out = kafka_topic(1, prefix="remote-fail-out")
    n, keys = 12, 12
    monkeypatch.setattr(transport, "TIMEOUT_SLACK_S", 0.2)
    settings = {"remote_transport_budget": 4.0, "remote_deadline_ms": 300}
    ctl.mode(mode)
    runner = InProcessProcessor(_remote_app(kafka, tmp_path, endpoint, name, **settings)).start()
    try:
        _send_tally(kafka, name, out, range(n), keys)

        def paused() -> list[Any]:
            return [(inv.attempt, inv.error, located_id(inv.id, p.partition))
                    for p in runner.processor.partitions.values()  # type: ignore[union-attr]
                    for inv in p.invocations.values() if inv.phase == PAUSED]

        found = wait_until(lambda: (lambda p: p if len(p) == n else None)(runner.on_loop(paused)), 60, 0.2,
                           "every invocation paused")
        breakers = list(runner.processor.executor.remote.breakers.values())  # type: ignore[union-attr]
        assert all(a == 0 and e.startswith("endpoint unreachable: ") for a, e, _ in found), found[:2]
        assert read_to_end(kafka, f"{name}.dlq") == [] and read_to_end(kafka, out) == []
        requests = len(ctl.requests())
        # 5 requests fail in a row, then the open circuit lets one probe through
        # after 1 s and another 2 s later; without it each partition's batch
        # retries on its own every 0.05..0.5 s (about 20 requests in the budget).
        [breaker] = breakers
        assert 5 <= requests <= 9, f"{requests} requests reached the failing endpoint"
        assert breaker.opened >= 1 and breaker.rejected > 0
        # The endpoint is healthy again; an operator resumes the paused invocations
        # once the circuit lets a probe through (the budget here, 4 s, is shorter
        # than a doubled cool-down; the default budget, 300 s, outlasts the longest).
        ctl.mode("")
        wait_until(lambda: breaker.opened_at + breaker.cooldown <= time.monotonic(), 60, 0.1, "the cool-down")
        r = oncely_cli("invocations", "resume", name, *(i for _, _, i in found), "--bootstrap", kafka)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count(": resume applied") == n, r.stdout
        wait_until(lambda: len(read_to_end(kafka, out)) >= n, 60, 0.3, "the outputs once resumed")
        time.sleep(1.0)
        retries, paused_in_all = _stats(runner)
        still_paused = runner.on_loop(paused)
    finally:
        runner.stop()
    _check_tally(kafka, name, out, n, keys)
    assert retries == 0 and paused_in_all == n and still_paused == []


def test_five_megabytes_of_state_take_the_round_trip_path(kafka: str, kafka_topic: Any, tmp_path: Path, ctl: Ctl,
                                                          endpoint: Endpoint) -> None:
    name = unique_name("remote-bigstate")
    out = kafka_topic(1, prefix="remote-big-out")
    runner = InProcessProcessor(_remote_app(kafka, tmp_path, endpoint, name)).start()
    try:
        client = oncely.Client(kafka, app=name)
        client.send("shop", "big", "fill", {"n": 50, "size": 100_000})  # 5 MB in 50 values
        client.flush()
        wait_until(lambda: changelog_state(kafka, name).get(("shop", b"big", "blob049")), 60, 0.3, "the big state")
        before = len(ctl.requests())
        client.send("shop", "big", "peek", {"id": 1, "topic": out, "names": ["blob007", "blob042"]})
        client.flush()
        client.close()
        [rec] = wait_until(lambda: read_to_end(kafka, out), 60, 0.3, "the peek's output")
        retries, paused = _stats(runner)
    finally:
        runner.stop()
    assert orjson.loads(rec.value or b"") == {"id": 1, "lens": {"blob007": 100_000, "blob042": 100_000},
                                               "firsts": "HQ"}
    peeks = ctl.requests()[before:]
    # eager state is capped at 64 KiB: none of the 100 KB values went first,
    # each value read came in its own round trip, the rest never travelled
    assert len(peeks) == 3, peeks
    assert max(size for _, size in peeks) < 300_000, peeks
    state = changelog_state(kafka, name)
    assert sum(len(state[("shop", b"big", f"blob{i:03d}")]) for i in range(50)) == 5_000_000
    assert retries == 0 and paused == 0

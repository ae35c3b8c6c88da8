"""What a user sees when things fail: a misused ctx fails at once and names
the handler's line, tracebacks are logged once, replay says what it did
with dead letters and failed invocations, `oncely invocations retry` runs
failed invocations again, librdkafka's lines are collapsed."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from oncely.client import Client
from oncely.egress import dead_letters as dl
from oncely.logs import KafkaLogRouter, kafka_conf_logging
from oncely.testing import create_topic, produce, read_to_end, unique_name
from support import REPO, ProcessorProcess, changelog_state, oncely_cli, wait_for_app_topics, wait_until

MISUSE = REPO / "tests/apps/misuse.py"


def _line(marker: str) -> int:
    return next(i for i, text in enumerate(MISUSE.read_text().splitlines(), 1) if marker in text)


def test_ctx_misuse_fails_at_once_naming_the_handlers_line(kafka: str, tmp_path: Path) -> None:
    app = unique_name("misuse")
    proc = ProcessorProcess("tests.apps.misuse:app", kafka, tmp_path / "state", {"ONCELY_TEST_APP": app},
                            tmp_path / "p.log").start()
    try:
        wait_for_app_topics(kafka, app)
        with Client(kafka, app=app) as client:
            client.send("keyed", "k1", "set_object", 1)
            client.send("stateless", None, "use_state", 1)
            client.send("keyed", "k2", "always_fails", 1)
        dead = wait_until(lambda: len(d := read_to_end(kafka, f"{app}.dlq")) == 3 and d, 60, 0.5, "3 dead letters")
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    by_target = {d.header(dl.H_TARGET).decode(): d for d in dead}
    for target, marker in (("keyed/set_object", "MISUSE-SET"), ("stateless/use_state", "MISUSE-STATE")):
        d = by_target[target]
        assert (d.header(dl.H_REASON), d.header(dl.H_ATTEMPTS)) == (b"terminal", b"1"), "a bug must not be retried"
        assert d.header(dl.H_ERROR).decode().startswith("UsageError: ctx.")
        assert d.header(dl.H_ERROR).decode().endswith(f"(at {MISUSE}:{_line(marker)})")
    failed = by_target["keyed/always_fails"]
    assert (failed.header(dl.H_REASON), failed.header(dl.H_ATTEMPTS)) == (b"retries-exhausted", b"3")
    assert f"(at {MISUSE}:{_line('FAILS')})" in failed.header(dl.H_ERROR).decode()
    log = proc.log_text()
    # One traceback per invocation, at WARNING, on its first attempt; the two
    # retries of always_fails log theirs at DEBUG (not shown at INFO).
    assert log.count("Traceback (most recent call last)") == 3
    assert len(re.findall(r"WARNING oncely\.executor: inv_\w+ keyed/always_fails attempt 0 raised", log)) == 1
    assert "always_fails attempt 1 raised" not in log


def test_replay_reports_dead_letters_and_failures_and_retry_runs_them(kafka: str, tmp_path: Path) -> None:
    app, source = unique_name("picky"), unique_name("deposits")
    create_topic(kafka, source, 1)
    produce(kafka, source, [("acct", {"amount": 5}), ("acct", b"not json"), ("acct", {"amount": -2})])
    env = {"ONCELY_TEST_APP": app, "ONCELY_TEST_SOURCE": source}
    cli_env = {**env, "ONCELY_KAFKA_BOOTSTRAP": kafka}

    def ok(*args: str) -> str:
        out = oncely_cli(*args, env=cli_env)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def balance() -> object:
        return changelog_state(kafka, app).get(("accounts", b"acct", "balance"))

    proc = ProcessorProcess("tests.apps.picky:app", kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    try:
        wait_for_app_topics(kafka, app)
        wait_until(lambda: len(read_to_end(kafka, f"{app}.dlq")) == 2, 60, 0.5, "the two dead letters")
        assert balance() == 5
        summary = ok("replay", "tests.apps.picky:app", "--topic", source, "--from-offset", "0").strip()
        assert summary == (f"{source}: records read 3, invoked 0, deduplicated 1, dead-lettered 0, already "
                           "dead-lettered 1 (not written again), failed earlier 1 (not invoked: retry them with "
                           "`oncely invocations retry`)")
        assert len(read_to_end(kafka, f"{app}.dlq")) == 2, "the replay wrote a dead letter again"
        assert ok("inspect", "invocations", app, "--paused").strip() == "no invocations"
        failed = ok("inspect", "invocations", app, "--failed").strip().splitlines()
        assert len(failed) == 1 and "accounts/deposit acct FAILED" in failed[0] and "negative deposits" in failed[0]
        failed_id = failed[0].split()[0]
        assert proc.stop() == 0
        # A record the app has not read yet is left to it, not invoked by the replay.
        produce(kafka, source, [("acct", {"amount": 10})])
        summary = ok("replay", "tests.apps.picky:app", "--topic", source, "--from-offset", "0").strip()
        assert summary.startswith(f"{source}: records read 4, invoked 0, deduplicated 1, dead-lettered 0, ")
        assert summary.endswith("not read by the app yet 1 (left to it)"), summary
        proc.env["ONCELY_TEST_FIXED"] = "1"  # the fix is deployed
        proc.start()
        retried = ok("invocations", "retry", app, failed_id).strip()
        assert re.fullmatch(rf"{failed_id} retried as inv_\w+", retried)
        wait_until(lambda: balance() == 13, 60, 0.5, "the retried deposit and the new one")
        listed = wait_until(lambda: "(completed)" in (t := ok("inspect", "invocations", app, "--failed")) and t, 30,
                            0.5, "the failure to show its retry")
        assert f"retried as {retried.split()[-1]} (completed)" in listed
        assert ok("invocations", "retry", app, failed_id).strip() == retried  # the same retry: deduplicated
        assert ok("invocations", "retry", app, "--all").strip() == retried
        time.sleep(2)
        assert balance() == 13, "a repeated retry (or the replay) ran an invocation again"
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()


def test_librdkafka_lines_go_through_logging_with_repeats_collapsed(caplog) -> None:
    """A producer whose broker does not answer: librdkafka's "Connection
    refused" lines reach the `oncely.kafka` logger, once per kind and
    interval instead of once per attempt."""
    from confluent_kafka import Producer

    caplog.set_level(logging.DEBUG, logger="oncely.kafka")
    assert isinstance(kafka_conf_logging()["logger"], KafkaLogRouter)
    errors = []
    producer = Producer({"logger": KafkaLogRouter(), "bootstrap.servers": "127.0.0.1:1", "reconnect.backoff.ms": 10,
                         "reconnect.backoff.max.ms": 50, "error_cb": errors.append})
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        producer.poll(0.1)
    refused = [r for r in caplog.records if r.name == "oncely.kafka" and "Connection refused" in r.getMessage()]
    assert len(refused) == 1 and len(errors) >= 5, ([r.getMessage() for r in refused], len(errors))

    clock = [0.0]
    router = KafkaLogRouter(logging.getLogger("oncely.kafka"), interval=60, clock=lambda: clock[0])
    caplog.clear()
    for i in range(500):
        clock[0] = i * 0.2  # 100 s of a line every 200 ms
        router.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1",
                   f"Connect to ipv4#127.0.0.1:1 failed: Connection refused (after {i % 7}ms in state CONNECT)")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[1].endswith("(last message repeated 299 times in 60 s)"), lines

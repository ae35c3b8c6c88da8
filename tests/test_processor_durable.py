"""Durable execution: journaled side effects across kill -9, non-determinism,
retries, terminal errors and the retry limit."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import oncely
from oncely import schemas
from oncely.egress import dead_letters as dl
from oncely.processor import keys
from oncely.testing import read_to_end, unique_name
from support import ProcessorProcess, changelog_latest, changelog_state, wait_until


def _lines(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split(" ", 1)) for line in path.read_text().splitlines() if line]  # type: ignore[misc]


def _tokens(bootstrap: str, app: str) -> dict[str, str]:
    return {k.decode(): v for (_, k, name), v in changelog_state(bootstrap, app).items() if name == "token"}


def _journaled(bootstrap: str, app: str) -> int:
    """Invocations with a committed journal entry 0 (their ctx.run result)."""
    return sum(1 for k in changelog_latest(bootstrap, app) if k[:1] == keys.JOURNAL and keys.journal_index(k) == 0)


def _wait_topics(client: oncely.Client, app: str) -> None:
    wait_until(lambda: _try_partitions(client, app), 60, 0.3, "the app's topics")


def _try_partitions(client: oncely.Client, app: str) -> bool:
    try:
        client._partition_count(app)
        return True
    except oncely.ConfigError:
        return False


def test_run_results_are_journaled_across_kill9(kafka: str, tmp_path: Path) -> None:
    app = unique_name("effects")
    effects = tmp_path / "effects.txt"
    env = {"ONCELY_TEST_APP": app, "ONCELY_TEST_EFFECT_FILE": str(effects), "ONCELY_TEST_WAIT": "3"}
    proc = ProcessorProcess("tests.apps.effects:app", kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    client = oncely.Client(kafka, app=app)
    try:
        _wait_topics(client, app)
        # Phase 1: every side effect ran and its journal entry was committed
        # (>= 1 s of 100 ms commits) before the kill; the replay must return
        # the journaled tokens and run no effect again.
        first = [f"a{i}" for i in range(200)]
        for k in first:
            client.send("job", k, "work", 0)
        client.flush()
        wait_until(lambda: len(_lines(effects)) >= len(first), 60, 0.1, "the first effects")
        wait_until(lambda: _journaled(kafka, app) >= len(first), 60, 0.2, "their journal entries committed")
        proc.kill9()
        proc.start()
        wait_until(lambda: set(first) <= set(_tokens(kafka, app)), 90, 1.0, "all first tokens in state")
        lines = _lines(effects)
        assert len(lines) == len(first), "a committed ctx.run step was executed again after the crash"
        tokens = _tokens(kafka, app)
        assert {k: tokens[k] for k in first} == dict(lines)

        # Phase 2: kill right after the effects start, before their journal
        # entries are committed. Steps that were not committed run again; the
        # handler must then use the result it journaled last.
        second = [f"b{i}" for i in range(200)]
        for k in second:
            client.send("job", k, "work", 0)
        client.flush()
        wait_until(lambda: any(k.startswith("b") for k, _ in _lines(effects)), 60, 0.01, "the second effects")
        proc.kill9()
        proc.start()
        wait_until(lambda: set(second) <= set(_tokens(kafka, app)), 90, 1.0, "all second tokens in state")
        per_key: dict[str, list[str]] = defaultdict(list)
        for k, tok in _lines(effects):
            per_key[k].append(tok)
        tokens = _tokens(kafka, app)
        for k in first + second:
            assert tokens[k] == per_key[k][-1], f"{k}: the handler did not use the journaled result"
        assert all(len(per_key[k]) == 1 for k in first)
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()


def test_changed_handler_is_paused_not_continued(kafka: str, tmp_path: Path) -> None:
    app = unique_name("nondet")
    effects = tmp_path / "effects.txt"
    env = {"ONCELY_TEST_APP": app, "ONCELY_TEST_EFFECT_FILE": str(effects), "ONCELY_TEST_WAIT": "60"}
    proc = ProcessorProcess("tests.apps.effects:app", kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    client = oncely.Client(kafka, app=app)
    try:
        _wait_topics(client, app)
        ks = [f"n{i}" for i in range(5)]
        for k in ks:
            client.send("job", k, "work", 0)
        client.flush()
        wait_until(lambda: len(_lines(effects)) == len(ks), 60, 0.1, "the effects")
        wait_until(lambda: _journaled(kafka, app) >= len(ks), 60, 0.2, "their journal entries committed")
        proc.kill9()
        proc.env = {**env, "HANDLER_VERSION": "2"}
        proc.start()

        def paused() -> list[dict]:
            latest = changelog_latest(kafka, app)
            sts = [schemas.decode("invocation_status", v) for k, v in latest.items() if k[:1] == keys.STATUS]
            return [s for s in sts if s["phase"] == "PAUSED"]

        found = wait_until(lambda: len(paused()) == len(ks) and paused(), 60, 1.0, "paused invocations")
        for st in found:
            assert "journal index 0" in st["error"]
            assert "run('effect')" in st["error"] and "run('effect-v2')" in st["error"]
        assert len(_lines(effects)) == len(ks), "the changed step ran although the replay diverged"
        assert _tokens(kafka, app) == {}, "a paused invocation must not continue to its state writes"
        assert "paused: non-determinism at journal index 0" in proc.log_text()
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()


def test_retries_terminal_errors_and_retry_limit(kafka: str, tmp_path: Path) -> None:
    app = unique_name("flaky")
    runs = tmp_path / "runs.txt"
    env = {"ONCELY_TEST_APP": app, "ONCELY_TEST_RUNS_FILE": str(runs)}
    proc = ProcessorProcess("tests.apps.flaky:app", kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    client = oncely.Client(kafka, app=app)
    try:
        _wait_topics(client, app)
        ids = {
            "flaky": client.send("svc", "f1", "flaky_twice", 0),
            "terminal": client.send("svc", "t1", "terminal", 0),
            "always": client.send("svc", "a1", "always_fails", 0),
        }
        client.flush()
        dead = wait_until(lambda: (d := read_to_end(kafka, f"{app}.dlq")) and len(d) >= 2 and d, 60, 0.5,
                          "two dead letters")
        wait_until(lambda: changelog_state(kafka, app).get(("svc", b"f1", "done")) == 1, 60, 0.5, "flaky done")
        time.sleep(1.0)  # nothing else may follow
        assert proc.stop() == 0

        state = changelog_state(kafka, app)
        assert state[("svc", b"f1", "done")] == 1 and state[("svc", b"f1", "attempts")] == 3
        assert ("svc", b"t1", "should-not-stick") not in state, "a terminal failure's state writes were kept"

        ran = runs.read_text().splitlines()
        assert sorted(r for r in ran if r.startswith("flaky")) == ["flaky f1 0", "flaky f1 1", "flaky f1 2"]
        assert [r for r in ran if r.startswith("terminal")] == ["terminal t1 0"], "TerminalError was retried"
        assert [r for r in ran if r.startswith("always")] == ["always a1 0", "always a1 1", "always a1 2"]

        dead = read_to_end(kafka, f"{app}.dlq")
        assert len(dead) == 2
        by_id = {d.header(dl.H_INVOCATION).decode(): d for d in dead}
        term = by_id[ids["terminal"]]
        assert term.header(dl.H_REASON) == b"terminal"
        assert term.header(dl.H_ERROR) == b"order rejected: no such customer"
        assert term.header(dl.H_ATTEMPTS) == b"1"
        assert term.key == b"t1" and term.value == b"0"
        limit = by_id[ids["always"]]
        assert limit.header(dl.H_REASON) == b"retries-exhausted"
        assert b"failed 3 attempts" in limit.header(dl.H_ERROR)
        assert b"ValueError: downstream is down" in limit.header(dl.H_ERROR)
        assert limit.header(dl.H_ATTEMPTS) == b"3"
        assert limit.header(dl.H_TARGET) == b"svc/always_fails"
        assert ids["flaky"] not in by_id
    finally:
        if proc.alive():
            proc.kill9()


def test_retry_backoff_survives_kill9(kafka: str, tmp_path: Path) -> None:
    """The attempt count and the retry timer are state: a crash during the
    backoff neither restarts the attempts from 0 nor loses the retry."""
    app = unique_name("backoff")
    runs = tmp_path / "runs.txt"
    env = {"ONCELY_TEST_APP": app, "ONCELY_TEST_RUNS_FILE": str(runs), "ONCELY_TEST_BACKOFF": "3"}
    proc = ProcessorProcess("tests.apps.flaky:app", kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    client = oncely.Client(kafka, app=app)
    try:
        _wait_topics(client, app)
        client.send("svc", "f1", "flaky_twice", 0)
        client.flush()
        wait_until(lambda: runs.exists() and "flaky f1 0" in runs.read_text(), 60, 0.05, "the first attempt")
        wait_until(lambda: any(schemas.decode("invocation_status", v)["phase"] == "BACKING_OFF"
                               for k, v in changelog_latest(kafka, app).items() if k[:1] == keys.STATUS),
                   30, 0.1, "attempt 0's failure and its 3 s backoff committed")
        proc.kill9()
        proc.start()
        wait_until(lambda: changelog_state(kafka, app).get(("svc", b"f1", "done")) == 1, 60, 0.5, "completion")
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    assert runs.read_text().splitlines() == ["flaky f1 0", "flaky f1 1", "flaky f1 2"]
    assert changelog_state(kafka, app)[("svc", b"f1", "attempts")] == 3

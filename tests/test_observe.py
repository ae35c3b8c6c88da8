"""Observability against a real broker: /metrics of a running processor
(counters exact, consumer lag up and back to 0), the dashboard's metric
names, `oncely status`, JSON log lines."""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely.kafka_io import create_topic, unique_name
from oncely.shuffle.routing import partition_for
from support import (REPO, InProcessProcessor, ProcessorProcess, caught_up, oncely_cli, wait_for_app_topics,
                     wait_until)

sys.path.insert(0, str(REPO / "tests"))
from apps.observed import make_app  # noqa: E402

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

ADDS, KEYS, DUPS = 300, 30, 5
DASHBOARD = REPO / "compose" / "grafana" / "dashboards" / "oncely.json"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


@pytest.fixture(scope="module")
def observed(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One processor with --metrics that ran every kind of outcome."""
    import oncely.observe.server as server

    server.LAG_INTERVAL = 1.0
    name = unique_name("observed")
    app = make_app(name, state_dir=str(tmp_path_factory.mktemp("observed")), bootstrap=kafka)
    proc = InProcessProcessor(app, metrics="127.0.0.1:0").start()
    client = oncely.Client(kafka, app=name)
    for i in range(ADDS):
        client.send("acct", f"k{i % KEYS}", "add", 1)
    for i in range(DUPS):
        for _ in range(2):
            client.send("acct", f"dup{i}", "add", 1, idempotency_key=f"dup-{i}")
    ids = {"reject": [client.send("acct", f"r{i}", "reject", 0) for i in range(2)],
           "boom": client.send("acct", "b", "boom", 0), "diverge": client.send("acct", "d", "diverge", 0)}
    client.flush()
    client.close()
    wait_until(lambda: caught_up(kafka, name, [app.log_topic]), 60, what="the group caught up")
    try:
        yield {"name": name, "app": app, "proc": proc, "url": proc.metrics_url, "ids": ids, "bootstrap": kafka}
    finally:
        proc.stop()
        server.LAG_INTERVAL = 5.0


def test_counters_match_the_invocations_exactly(observed: dict) -> None:
    expected = {
        ("add", "completed"): ADDS + DUPS, ("reject", "terminal"): 2, ("boom", "retried"): 2,
        ("boom", "dead-lettered"): 1, ("diverge", "retried"): 1, ("diverge", "paused"): 1,
    }

    def outcomes() -> dict:
        s = scrape(observed["url"])
        return {(dict(ls)["handler"], dict(ls)["outcome"]): v for (n, ls), v in s.items()
                if n == "oncely_invocations_total"}

    wait_until(lambda: outcomes() == expected, 30, 0.3, "the invocation counters")
    s = scrape(observed["url"])
    assert total(s, "oncely_duplicates_total") == DUPS
    assert {dict(ls)["reason"]: v for (n, ls), v in s.items() if n == "oncely_dead_letters_total" and v} == {
        "terminal": 2, "retries-exhausted": 1}
    assert total(s, "oncely_invocations_in_flight", phase="paused") == 1
    assert total(s, "oncely_invocations_in_flight") == 1
    # one handler attempt per add; the latency of every finished invocation
    assert total(s, "oncely_handler_duration_seconds_count", handler="add") == ADDS + DUPS
    assert total(s, "oncely_handler_duration_seconds_count", handler="boom") == 3
    assert total(s, "oncely_end_to_end_latency_seconds_count", handler="add") == ADDS + DUPS
    assert total(s, "oncely_end_to_end_latency_seconds_count") == ADDS + DUPS + 3
    processor = observed["proc"].processor
    commits = observed["proc"].on_loop(lambda: processor.commits)
    assert 0 < total(s, "oncely_commits_total") <= commits
    assert total(s, "oncely_commit_duration_seconds_count") == total(s, "oncely_commits_total")
    assert total(s, "oncely_aborts_total") == 0 and total(s, "oncely_rewinds_total") == 0
    assert total(s, "oncely_partitions_running") == 4
    assert total(s, "oncely_records_committed_total") == ADDS + 2 * DUPS + 4
    assert outcomes() == expected  # nothing counted twice since
    # caught up: no lag on any log partition, though transaction markers end them
    wait_until(lambda: total(scrape(observed["url"]), "kafka_consumergroup_lag_sum") == 0, 30, 0.5, "lag 0")
    s = scrape(observed["url"])
    log = observed["app"].log_topic
    assert {dict(ls)["partition"] for (n, ls), v in s.items() if n == "kafka_consumergroup_lag"
            and dict(ls)["topic"] == log} == {"0", "1", "2", "3"}


def test_dashboard_queries_use_live_metric_names(observed: dict) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][0]["definition"])
    used = {m for e in exprs for m in re.findall(r"\b(?:oncely|kafka)_[a-z_]+\b", e)}
    wait_until(lambda: total(scrape(observed["url"]), "oncely_end_to_end_latency_seconds_count") > 0, 30, 0.3,
               "an end-to-end latency")
    live = {n for n, _ in scrape(observed["url"])}
    assert len(used) >= 15
    assert not used - live, f"dashboard queries use metrics the processor does not export: {sorted(used - live)}"


def test_status_shows_processes_lag_and_dead_letters(observed: dict) -> None:
    name, bootstrap = observed["name"], observed["bootstrap"]
    wait_until(lambda: total(scrape(observed["url"]), "oncely_dead_letters_total") == 3, 30, 0.3, "dead letters")
    out = oncely_cli("status", name, "--bootstrap", bootstrap, "--metrics-url", observed["url"])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"app {name}: group stable, 1 process(es)" in text
    assert f"{name}.log 0,1,2,3" in text
    assert f"  {name}.log: 0  (p0 0, p1 0, p2 0, p3 0)" in text
    assert f"dead letters in {name}.dlq: 3" in text
    assert "paused 1" in text and "completed 305" in text
    st = json.loads(oncely_cli("status", name, "--bootstrap", bootstrap, "--json").stdout)
    assert st["dlq_records"] == 3 and st["dlq_complete"] and len(st["processes"]) == 1
    assert st["last_changelog_write"] > time.time() - 600


def test_status_of_an_app_without_group_or_topics(kafka: str) -> None:
    name = unique_name("nogroup")
    out = oncely_cli("status", name, "--bootstrap", kafka, "--timeout", "5")
    assert out.returncode == 1 and f"app {name!r} has no topics" in out.stderr
    create_topic(kafka, f"{name}.log", 2)
    out = oncely_cli("status", name, "--bootstrap", kafka, "--timeout", "5")
    assert out.returncode == 1 and f"consumer group {name!r} does not exist" in out.stderr, out.stderr


def _parts(proc: InProcessProcessor) -> set[int]:
    return proc.on_loop(lambda: set(proc.processor.partitions))  # type: ignore[union-attr]


def test_lag_rises_while_a_process_is_stopped_and_falls_to_zero(kafka: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process reports the whole group's lag: while one is stopped (a
    static member keeps its partitions until its session times out), the
    other's /metrics shows the lag of the stopped one's partitions grow;
    restarted, it catches up and the lag is 0 again."""
    import oncely.observe.server as server

    monkeypatch.setattr(server, "LAG_INTERVAL", 1.0)
    name = unique_name("lag")
    settings = {"bootstrap": kafka, "session_timeout_ms": 60_000}
    a = InProcessProcessor(make_app(name, state_dir=str(tmp_path / "a"), **settings), metrics="127.0.0.1:0").start()
    b_app = make_app(name, state_dir=str(tmp_path / "b"), **settings)
    b = InProcessProcessor(b_app).start()
    try:
        wait_until(lambda: len(_parts(a)) + len(_parts(b)) == 4 and _parts(b), 60, 0.3, "both processes running")
        mine = _parts(b)
        keys = [k for k in (f"key{i}" for i in range(1000)) if partition_for(k.encode(), 4) in mine][:20]
        client = oncely.Client(kafka, app=name)

        def send(n: int) -> None:
            for i in range(n):
                client.send("acct", keys[i % len(keys)], "add", 1)
            client.flush()

        def lag() -> float:
            return total(scrape(a.metrics_url), "kafka_consumergroup_lag_sum", topic=f"{name}.log")

        send(10)
        wait_until(lambda: lag() == 0 and caught_up(kafka, name, [f"{name}.log"]), 60, 0.5, "caught up")
        b.stop()
        send(100)
        wait_until(lambda: lag() >= 100, 20, 0.3, "lag of the stopped process's partitions")
        send(100)
        wait_until(lambda: lag() >= 200, 20, 0.3, "lag growing")
        assert not _parts(a) & mine
        b = InProcessProcessor(make_app(name, state_dir=str(tmp_path / "b"), **settings)).start()
        wait_until(lambda: lag() == 0, 60, 0.5, "lag back to 0 after the restart")
        client.close()
    finally:
        b.stop()
        a.stop()


def test_json_logs_carry_the_invocation_id(kafka: str, tmp_path: Path) -> None:
    name = unique_name("jsonlog")
    proc = ProcessorProcess("tests.apps.observed:app", kafka, tmp_path / "state",
                            {"ONCELY_TEST_APP": name, "ONCELY_LOG_FORMAT": "json"}, tmp_path / "p.log").start()
    try:
        wait_for_app_topics(kafka, name)
        client = oncely.Client(kafka, app=name)
        rejected = client.send("acct", "r", "reject", 0)
        diverged = client.send("acct", "d", "diverge", 0)
        client.flush()
        client.close()

        def events() -> dict[str, dict]:
            out = {}
            for line in proc.log_text().splitlines():
                if line.startswith("{"):
                    rec = json.loads(line)
                    if "event" in rec:
                        out[f"{rec['event']} {rec['invocation_id']}"] = rec
            return out

        wait_until(lambda: f"paused {diverged}" in events() and f"dead-lettered {rejected}" in events(), 60, 0.5,
                   "the dead-lettered and paused lines")
    finally:
        code = proc.stop()
    assert code == 0
    lines = [ln for ln in proc.log_text().splitlines() if ln and not ln.startswith("=====")]
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    dead = events()[f"dead-lettered {rejected}"]
    assert dead["reason"] == "terminal" and dead["target"] == "acct/reject" and dead["level"] == "WARNING"
    assert events()[f"paused {diverged}"]["level"] == "ERROR"
    messages = [r["message"] for r in records if r["level"] == "INFO"]
    assert any(m.startswith("ready:") for m in messages) and any(m.startswith("stopped:") for m in messages)


def test_metrics_without_the_extra_fail_in_one_sentence(tmp_path: Path) -> None:
    fake = tmp_path / "prometheus_client"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    out = oncely_cli("run", "tests.apps.observed:app", "--metrics", "127.0.0.1:0", "--bootstrap", "127.0.0.1:1",
                     env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1
    assert out.stderr.strip() == ("Error: --metrics needs the prometheus-client package: "
                                  "pip install 'oncely[metrics]'")
    out = oncely_cli("run", "tests.apps.observed:app", "--metrics", "nonsense", "--bootstrap", "127.0.0.1:1")
    assert out.returncode == 1 and "expected HOST:PORT" in out.stderr

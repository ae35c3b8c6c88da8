"""The processor side of remote handlers, on a real broker with the endpoint
(`tests.apps.remote_conf`) in its own process: the same handler module run
in-process and remote gives the same state, emits and dead letters; an
endpoint killed -9 mid-stream costs neither duplicates nor losses; an
endpoint that stays down pauses its invocations (no attempt burnt, no dead
letter) until a restart of the processor resumes them."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest
from apps.remote_conf import build

import oncely
from oncely.processor.invocation import PAUSED
from oncely.testing import read_to_end, unique_name
from support import REPO, InProcessProcessor, changelog_state, wait_until

SECRET = "conformance-secret-of-enough-length"


class Endpoint:
    """`python -m tests.apps.remote_conf PORT`: can be killed -9 and started
    again on the same port."""

    def __init__(self, log: Path, port: int = 0, secret: str | None = SECRET) -> None:
        self.log_path = log
        self.env = {k: v for k, v in os.environ.items() if k not in ("ONCELY_VERIFY_KEYS", "ONCELY_SIGNING_SECRET")}
        if secret is not None:
            self.env["ONCELY_SIGNING_SECRET"] = secret
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.apps.remote_conf", str(self.port)], cwd=REPO,
                                         env=self.env, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline().decode()
                if line.startswith("PORT "):
                    self.port = int(line.split()[1])
                    return
                if not line and self.proc.poll() is not None:
                    break
        raise RuntimeError(f"the endpoint did not start: {self.log_path}")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Endpoint]:
    monkeypatch.setenv("ONCELY_SIGNING_SECRET", SECRET)  # the processor signs its requests
    ep = Endpoint(tmp_path / "endpoint.log")
    yield ep
    ep.kill9()


def _values(kafka: str, topic: str) -> list[tuple[bytes | None, Any, Any]]:
    return [(r.key, orjson.loads(r.value or b"null"), r.headers) for r in read_to_end(kafka, topic)]


def run_scenario(kafka: str, app: oncely.App, out: str) -> dict[str, Any]:
    """Orders through shop.place (two on one key), a rejected one; the
    awakeables resolved through the Client; what the run left behind."""
    name = app.name
    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=name)
        orders = [{"id": "o1", "sku": "s1", "qty": 2, "topic": out}, {"id": "o2", "sku": "s2", "qty": 3, "topic": out},
                  {"id": "o3", "sku": "s1", "qty": 4, "topic": out}]
        for o in orders:
            client.send("shop", "alice" if o["id"] != "o2" else "bob", "place", o)
        client.send("shop", "carol", "reject", {"id": "o4", "sku": "nope", "qty": 1, "topic": out})
        client.flush()
        for o in orders:
            notes = wait_until(lambda: changelog_state(kafka, name).get(("ledger", f"awk-{o['id']}".encode(), "notes")),
                               60, 0.3, f"the awakeable id of {o['id']}")
            client.resolve_awakeable(notes[0], {"ok": o["id"]})
        wait_until(lambda: len(read_to_end(kafka, out)) == 3, 60, 0.3, "three emitted records")
        wait_until(lambda: changelog_state(kafka, name).get(("ledger", b"delayed", "total")) == 3, 60, 0.3,
                   "three delayed sends")
        dead = wait_until(lambda: read_to_end(kafka, f"{name}.dlq"), 60, 0.3, "the rejected order's dead letter")
        client.close()
        stats = runner.on_loop(lambda: [p.stats for p in runner.processor.partitions.values()])  # type: ignore[union-attr]
    finally:
        runner.stop()
    state = {(s, k, n): v for (s, k, n), v in changelog_state(kafka, name).items() if not k.startswith(b"awk-")}
    return {"state": state, "emits": sorted(_values(kafka, out), key=lambda r: r[1]["id"]),
            "dead": [(d.header("oncely.reason"), d.header("oncely.error"), d.header("oncely.target")) for d in dead],
            "retries": sum(s.retries for s in stats), "paused": sum(s.paused for s in stats)}


def test_in_process_and_remote_give_the_same_results(kafka: str, kafka_topic: Any, tmp_path: Path,
                                                     endpoint: Endpoint) -> None:
    local = run_scenario(kafka, build(unique_name("conf-local"), bootstrap=kafka, state_dir=str(tmp_path / "l")),
                         kafka_topic(1, prefix="conf-local-out"))
    remote_app = build(unique_name("conf-remote"), remote=True, bootstrap=kafka, state_dir=str(tmp_path / "r"),
                       deployments=[endpoint.url])
    remote = run_scenario(kafka, remote_app, kafka_topic(1, prefix="conf-remote-out"))
    assert remote_app.services["shop"].deployment is not None and remote_app.services["ledger"].deployment is None
    assert remote == local
    # what both agree on, spelled out
    assert [e[1] for e in local["emits"]] == [
        {"id": "o1", "n": 1, "total": 2, "approved": {"ok": "o1"}, "stock": 7},
        {"id": "o2", "n": 1, "total": 3, "approved": {"ok": "o2"}, "stock": 7},
        {"id": "o3", "n": 2, "total": 4, "approved": {"ok": "o3"}, "stock": 7}]
    assert local["emits"][0][0] == b"o1" and local["emits"][0][2] == [("via", b"shop")]
    assert local["state"][("shop", b"alice", "count")] == 2 and ("shop", b"carol", "touched") not in local["state"]
    assert local["dead"] == [(b"terminal", b"no such product nope", b"shop/reject")]
    assert local["paused"] == 0 and local["retries"] == 0


def _remote_app(kafka: str, tmp_path: Path, endpoint: Endpoint, name: str, **settings: Any) -> oncely.App:
    return build(name, remote=True, bootstrap=kafka, state_dir=str(tmp_path / "state"), deployments=[endpoint.url],
                 **settings)


def test_endpoint_killed_mid_stream_loses_and_duplicates_nothing(kafka: str, kafka_topic: Any, tmp_path: Path,
                                                                 endpoint: Endpoint) -> None:
    name = unique_name("remote-kill")
    out = kafka_topic(2, prefix="remote-kill-out")
    app = _remote_app(kafka, tmp_path, endpoint, name, commit_interval=0.05)
    runner = InProcessProcessor(app).start()
    n, keys = 400, 10
    try:
        client = oncely.Client(kafka, app=name)

        def send(ids: range) -> None:
            for i in ids:
                client.send("shop", f"k{i % keys}", "tally", {"id": i, "topic": out})
            client.flush()

        send(range(n // 2))
        wait_until(lambda: len(read_to_end(kafka, out)) >= n // 4, 120, 0.1, "a quarter of the outputs")
        endpoint.kill9()  # mid-stream, or just after: the second half is sent while it is down
        send(range(n // 2, n))
        time.sleep(1.5)  # requests fail meanwhile: retried, not counted as attempts
        endpoint.start()
        wait_until(lambda: len(read_to_end(kafka, out)) >= n, 180, 0.5, "every output")
        time.sleep(1.0)
        stats = runner.on_loop(lambda: [p.stats for p in runner.processor.partitions.values()])  # type: ignore[union-attr]
        executor = runner.processor.executor  # type: ignore[union-attr]
    finally:
        runner.stop()
    records = read_to_end(kafka, out)
    ids = [orjson.loads(r.value or b"")["id"] for r in records]
    assert len(ids) == n and sorted(ids) == list(range(n)), "duplicates or losses in the read_committed output"
    state = changelog_state(kafka, name)
    for k in range(keys):
        key = f"k{k}".encode()
        assert state[("shop", key, "n")] == n // keys
        assert state[("shop", key, "seen")] == list(range(k, n, keys)), "per-key order or exactly-once broken"
    assert executor.remote.transport_retries > 0, "the kill did not hit a request"
    assert sum(s.retries for s in stats) == 0 and sum(s.paused for s in stats) == 0
    assert read_to_end(kafka, f"{name}.dlq") == []


def test_endpoint_down_pauses_without_burning_attempts_then_a_restart_resumes(
        kafka: str, kafka_topic: Any, tmp_path: Path, endpoint: Endpoint) -> None:
    name = unique_name("remote-down")
    out = kafka_topic(1, prefix="remote-down-out")
    app = _remote_app(kafka, tmp_path, endpoint, name, remote_transport_budget=2.0)
    runner = InProcessProcessor(app).start()
    try:
        endpoint.kill9()
        client = oncely.Client(kafka, app=name)
        client.send("shop", "k", "tally", {"id": 1, "topic": out})
        client.flush()

        def paused() -> list[Any]:
            return [(inv.phase, inv.attempt, inv.error) for p in runner.processor.partitions.values()  # type: ignore
                    for inv in p.invocations.values() if inv.phase == PAUSED]

        [(phase, attempt, error)] = wait_until(lambda: runner.on_loop(paused), 60, 0.2, "the invocation paused")
        assert attempt == 0 and error.startswith("endpoint unreachable: ") and "retried for" in error
    finally:
        runner.stop()
    assert read_to_end(kafka, f"{name}.dlq") == [] and read_to_end(kafka, out) == []
    endpoint.start()
    runner = InProcessProcessor(_remote_app(kafka, tmp_path, endpoint, name, remote_transport_budget=2.0)).start()
    try:
        wait_until(lambda: len(read_to_end(kafka, out)) == 1, 60, 0.3, "the output once resumed")
        time.sleep(1.0)
    finally:
        runner.stop()
    assert [orjson.loads(r.value or b"") for r in read_to_end(kafka, out)] == [{"id": 1, "n": 1}]
    assert changelog_state(kafka, name)[("shop", b"k", "n")] == 1
    assert read_to_end(kafka, f"{name}.dlq") == []

"""Helpers for processor tests: real processor processes that can be killed,
and readers of the state they leave in the changelog and in RocksDB."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from oncely.admin import changelog_latest, read_state as changelog_state, state_of as state_from
from oncely.runtime import ProcessorThread as InProcessProcessor
from oncely.processor.store import PartitionStore

REPO = Path(__file__).resolve().parent.parent

# Read-back helpers the tests take from here.
__all__ = ["REPO", "InProcessProcessor", "feed", "ProcessorProcess", "changelog_latest", "changelog_state", "oncely_cli",
           "state_from", "store_kv", "wait_for_app_topics", "wait_until"]


def oncely_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO, stdin: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `oncely` command (as `python -m oncely`) and capture its output."""
    return subprocess.run([sys.executable, "-m", "oncely", *args], cwd=cwd, env={**os.environ, **(env or {})},
                          input=stdin, capture_output=True, text=True, timeout=timeout)


class ProcessorProcess:
    """`oncely run <spec>` in a subprocess, logging to a file."""

    def __init__(self, spec: str, bootstrap: str, state_dir: Path, env: dict[str, str], log: Path,
                 cwd: Path = REPO) -> None:
        self.spec = spec
        self.cwd = cwd
        self.bootstrap = bootstrap
        self.state_dir = state_dir
        self.env = env
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "ProcessorProcess":
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env.pop("ONCELY_KAFKA_BOOTSTRAP", None)
        self.starts += 1
        with open(self.log, "a") as out:
            out.write(f"\n===== start #{self.starts} =====\n")
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oncely.cli", "run", self.spec, "--bootstrap", self.bootstrap,
                 "--state-dir", str(self.state_dir)],
                cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"processor did not stop within {timeout} s; log: {self.log}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.5, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def wait_for_app_topics(bootstrap: str, app: str, timeout: float = 60) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = [f"{app}.log", f"{app}.changelog", f"{app}.dlq"]
    wait_until(lambda: all(n in admin.list_topics(timeout=5).topics for n in names), timeout, 0.2,
               f"the topics of {app}")


def store_kv(state_dir: Path, app: str, partitions: int) -> dict[bytes, bytes]:
    """Everything the (stopped) processor's RocksDB stores hold."""
    out: dict[bytes, bytes] = {}
    for p in range(partitions):
        path = Path(state_dir) / app / str(p)
        if not path.exists():
            continue
        store = PartitionStore(path, app, partitions, p)
        store.open()
        try:
            for k, v in store._db_range(b"\x01", None):
                out[k] = v
        finally:
            store.close()
    return out


def caught_up(bootstrap: str, group: str, topics: list[str], timeout: float = 30.0) -> bool:
    """No committed record of `topics` lies past the group's committed
    offsets: everything is processed and its output committed (an observable
    point, where a fixed sleep would only hope). Offsets alone cannot say
    it: a transaction's commit marker takes an offset after its last record."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "isolation.level": "read_committed",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        tps = []
        for topic in topics:
            md = c.list_topics(topic, timeout=10).topics[topic]
            tps += [TopicPartition(topic, p) for p in md.partitions]
        starts = [TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                  for tp in c.committed(tps, timeout=10)]
        c.assign(starts)
        pending = {(tp.topic, tp.partition) for tp in starts}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for m in c.consume(100, timeout=0.5):
                if m.error() is None:
                    return False  # a record the group has not committed yet
                if m.error().code() == KafkaError._PARTITION_EOF:
                    pending.discard((m.topic(), m.partition()))
        return not pending
    finally:
        c.close()


class CounterTraffic:
    """Random `counter/add` invocations over `keys` keys, with the exact sum
    each key must reach (state "n" of service "counter")."""

    def __init__(self, bootstrap: str, app: str, keys: int = 50, seed: int = 5, fresh_client: bool = False) -> None:
        import random

        self.bootstrap = bootstrap
        self.app = app
        self.keys = keys
        self.sums: dict[bytes, int] = {}
        self.rng = random.Random(seed)
        # A fresh client per batch survives a broker restart between batches.
        self.fresh_client = fresh_client
        self._client: Any = None

    @property
    def client(self) -> Any:
        import oncely

        if self._client is None:
            self._client = oncely.Client(self.bootstrap, app=self.app)
        return self._client

    def send(self, n: int) -> None:
        client = self.client
        try:
            for _ in range(n):
                key = f"k{self.rng.randrange(self.keys)}"
                amount = self.rng.randint(1, 9)
                client.send("counter", key, "add", amount)
                self.sums[key.encode()] = self.sums.get(key.encode(), 0) + amount
            client.flush(60)
        finally:
            if self.fresh_client:
                client.close()
                self._client = None

    def exact(self) -> bool:
        state = changelog_state(self.bootstrap, self.app)
        return {k: v for (s, k, n), v in state.items() if s == "counter" and n == "n"} == self.sums


def feed(traffic: "CounterTraffic", stop: threading.Event, batch: int = 20, pause: float = 0.05) -> threading.Thread:
    """Sends `batch` records every `pause` s on a daemon thread until `stop` is set."""
    def run() -> None:
        while not stop.is_set():
            traffic.send(batch)
            time.sleep(pause)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Http:
    """A user of an HTTP server at 127.0.0.1:port: (status, lower-cased
    headers, body); the body parsed as JSON with `parse_json`."""

    parse_json = False

    def __init__(self, port: int) -> None:
        self.port = port

    def __call__(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                 timeout: float = 60.0) -> tuple[int, dict[str, str], Any]:
        h = dict(headers or {})
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
            headers_out = {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()
        if self.parse_json:
            try:
                return r.status, headers_out, (json.loads(data) if data else None)
            except ValueError:
                pass
        return r.status, headers_out, data

    def ready(self, timeout: float = 90.0) -> None:
        def up() -> bool:
            try:
                return self("GET", "/restate/health", timeout=5)[0] == 200
            except OSError:
                return False
        wait_until(up, timeout, 0.2, f"the ingress on port {self.port}")


class JsonHttp(Http):
    parse_json = True

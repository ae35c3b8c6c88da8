"""Shared pieces of the peer and failover benchmarks.

Every system under test runs in a child process so its CPU time can be read
from outside (psutil) and so it can be killed -9; this module holds what the
drivers share: the broker, topics, the order records (produced in bulk or at
a paced rate), a read_committed reader of the output topic that timestamps
each record as it becomes visible, child-process bookkeeping that kills every
child on exit, and small formatting helpers.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import psutil
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from oncely.kafka_io import create_topic
from oncely.local_kafka import LocalKafka
from oncely.shuffle.routing import partition_for

BENCH = Path(__file__).resolve().parent


# -- broker -------------------------------------------------------------------


class Broker:
    """The broker to measure against: the one at `bootstrap`, or a local one
    started (and later stopped) here. Knows its pid, so its CPU can be read."""

    def __init__(self, bootstrap: str | None) -> None:
        self.local: LocalKafka | None = None
        if not bootstrap:
            self.local = LocalKafka(data_dir=tempfile.mkdtemp(prefix="oncely-bench-kafka-"))
            bootstrap = self.local.start().bootstrap
        self.bootstrap = bootstrap
        self.process = _listener(int(bootstrap.rsplit(":", 1)[1]))

    def cpu(self) -> float:
        """CPU seconds the broker has used so far (nan if it is not local)."""
        return cpu_seconds(self.process) if self.process else float("nan")

    def settle(self, below: float = 0.1, longest: float = 60.0) -> float:
        """Wait until the broker's CPU over half a second is under `below`
        cores (it compacts and deletes after a throughput run for a while),
        at most `longest` s; returns the seconds waited. A latency run
        measures the system, not what the broker still does for the last one."""
        t0 = time.monotonic()
        if self.process is None:
            return 0.0
        while time.monotonic() - t0 < longest:
            c0 = self.cpu()
            time.sleep(0.5)
            if (self.cpu() - c0) / 0.5 < below:
                break
        return time.monotonic() - t0

    def close(self) -> None:
        if self.local:
            self.local.stop()


def _listener(port: int) -> psutil.Process | None:
    """The local process listening on `port`, if it can be seen."""
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return psutil.Process(c.pid)
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        pass
    return None


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU of `proc` and its live children (0 once it is gone)."""
    total = 0.0
    try:
        for p in [proc, *proc.children(recursive=True)]:
            t = p.cpu_times()
            total += t.user + t.system
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        pass
    return total


def fresh_topics(bootstrap: str, prefix: str, partitions: int, *suffixes: str) -> list[str]:
    """Create one new topic per suffix, named `<prefix>-<random>-<suffix>`."""
    base = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return [create_topic(bootstrap, f"{base}-{s}", partitions) for s in suffixes]


def delete_topics_naming(bootstrap: str, *names: str) -> None:
    """Delete the topics whose names hold any of `names` (a run's own topics
    and those its system made: changelogs, the app's topics). A broker that
    keeps every run's topics slows down: one holding 17,000 partitions gave
    twice the latency of a fresh one (docs/benchmark-log.md)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    doomed = [t for t in admin.list_topics(timeout=10).topics if any(n in t for n in names)]
    if doomed:
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            try:
                future.result(60)
            except Exception as e:  # a benchmark's figures stand without the cleanup
                print(f"  ! could not delete a topic: {e}")


# -- input --------------------------------------------------------------------


def order(i: int, keys: int) -> tuple[bytes, bytes, float]:
    """Record i of the workload: (key, JSON value, timestamp). The value
    carries its sequence number and send time, so a system that copies the
    record into its output lets the reader check counts and latency."""
    ts = time.time()
    k = b"c%d" % (i % keys)
    return k, b'{"customer": "%s", "amount": 1, "i": %d, "ts": %.6f}' % (k, i, ts), ts


def source_producer(bootstrap: str, linger_ms: int = 5) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms, "enable.idempotence": True})


key_partition = functools.lru_cache(maxsize=1 << 16)(partition_for)


def produce(p: Producer, topic: str, i: int, keys: int, partitions: int) -> None:
    """Record i, on the partition a Java producer would choose for its key
    (murmur2), which is also the key's partition in oncely's log."""
    key, value, ts = order(i, keys)
    while True:
        try:
            p.produce(topic, key=key, value=value, timestamp=int(ts * 1000), partition=key_partition(key, partitions),
                      headers=[("Idempotency-Key", b"o%d" % i)])
            return
        except BufferError:
            p.poll(0.01)


def preload(bootstrap: str, topic: str, n: int, keys: int, partitions: int, first: int = 0) -> None:
    """Write records first..first+n-1 to `topic`; wait until all are acknowledged."""
    p = source_producer(bootstrap)
    for i in range(first, first + n):
        produce(p, topic, i, keys, partitions)
        if i % 1000 == 0:
            p.poll(0)
    if p.flush(60):
        raise RuntimeError(f"could not preload {topic}")


class Pacer(threading.Thread):
    """Produces records at `rate`/s (numbered from 0) until stopped; `rate`
    may be changed while it runs. Sends in steps of ~2 ms so pacing holds."""

    def __init__(self, bootstrap: str, topic: str, keys: int, partitions: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.topic, self.keys, self.partitions, self.rate = topic, keys, partitions, rate
        self.producer = source_producer(bootstrap, linger_ms=1)
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        t0, base = time.monotonic(), self.sent  # numbering may start past 0
        rate = self.rate
        while not self.halt.is_set():
            if rate != self.rate:  # restart the schedule at the new rate
                t0, base, rate = time.monotonic(), self.sent, self.rate
            due = base + int((time.monotonic() - t0) * rate)
            while self.sent < due:
                produce(self.producer, self.topic, self.sent, self.keys, self.partitions)
                self.sent += 1
            self.producer.poll(0)
            time.sleep(0.002)
        self.producer.flush(30)

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


# -- output -------------------------------------------------------------------


@dataclass
class Seen:
    """Output records in the order they became visible under read_committed."""

    times: list[float] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)


class OutputReader(threading.Thread):
    """Reads `topic` from the beginning with read_committed and notes when
    each record became visible. Assigned, not subscribed: no group join
    delays the first read. `on_record(t, key, value)` runs on this thread."""

    BATCH = 1000

    def __init__(self, bootstrap: str, topic: str, partitions: int,
                 on_record: Callable[[float, bytes | None, bytes], None] | None = None) -> None:
        super().__init__(daemon=True)
        self.seen = Seen()
        self.on_record = on_record
        self.halt = threading.Event()
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
                                  "isolation.level": "read_committed", "enable.auto.commit": False,
                                  "fetch.wait.max.ms": 5})
        self.consumer.assign([TopicPartition(topic, q, 0) for q in range(partitions)])

    @property
    def count(self) -> int:
        return len(self.seen.times)

    def run(self) -> None:
        s = self.seen
        while not self.halt.is_set():
            # poll() returns as soon as one record is there; consume() would
            # wait for a full batch or its timeout, adding up to that timeout.
            first = self.consumer.poll(0.02)
            if first is None:
                continue
            msgs = [first, *self.consumer.consume(self.BATCH - 1, 0)]
            now = time.time()
            for m in msgs:
                if m.error() is None:
                    s.times.append(now)
                    s.values.append(m.value())
                    s.keys.append(m.key())
                    if self.on_record:
                        self.on_record(now, m.key(), m.value())
        self.consumer.close()

    def wait_count(self, n: int, timeout: float) -> bool:
        """Wait until `n` records were read (False after `timeout` s)."""
        return wait_for(lambda: self.count >= n, timeout)

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


def wait_for(pred: Callable[[], object], timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# -- child processes ----------------------------------------------------------

_children: list["Child"] = []


class Child:
    """A system under test in its own process (and session, so everything it
    starts can be killed with it), logging to a file. Every Child is killed
    when the benchmark exits, however it exits."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path = BENCH) -> None:
        self.name, self.log = name, log
        with open(log, "a") as out:
            out.write(f"\n===== {name}: {' '.join(argv)} =====\n")
            out.flush()
            self.started = time.time()
            self.proc = subprocess.Popen(list(argv), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                         start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)
        _children.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu(self) -> float:
        return cpu_seconds(self.ps)

    def signal(self, sig: int) -> None:
        """Send `sig` to the process and everything in its session."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill9(self) -> None:
        """SIGKILL the process and everything in its session."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def terminate(self, timeout: float = 30.0) -> float:
        """SIGTERM and wait; kill -9 after `timeout` s. Seconds it took to exit."""
        t0 = time.monotonic()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  ! {self.name} ignored SIGTERM for {timeout:.0f} s; killing it (log: {self.log})")
                self.kill9()
        return time.monotonic() - t0

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def kill_all() -> None:
    for c in _children:
        if c.alive():
            c.kill9()


def _on_signal(signum: int, _frame: object) -> None:
    kill_all()
    sys.exit(128 + signum)


atexit.register(kill_all)
signal.signal(signal.SIGTERM, _on_signal)
# The reader and the pacer share this process's GIL: switch often, so a
# record that became visible is timestamped when it did, not 5 ms later.
sys.setswitchinterval(0.0005)


# -- formatting ---------------------------------------------------------------


def pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def median(xs: Sequence[float]) -> float:
    s = sorted(x for x in xs if x == x)
    if not s:
        return float("nan")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def table(headers: Sequence[str], rows: Iterator[Sequence[object]] | Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable as text, pasteable into the README)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def fmt(x: float, digits: int = 0) -> str:
    return "—" if x != x else f"{x:,.{digits}f}"

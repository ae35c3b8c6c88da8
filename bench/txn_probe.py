"""What one small exactly-once commit costs on this broker, and which
librdkafka settings change it: a transactional producer commits one record
(plus consumer offsets, as the processor does) at a time, --gap ms after
the previous commit returned, while a read_committed reader notes when each
record becomes visible. Prints, per setting compared, the durations of
send_offsets_to_transaction and commit_transaction, the time from commit
return to visible, and produce → visible.

    python bench/txn_probe.py --bootstrap HOST:PORT [--n 200] [--gap 0]
        [--producer retry.backoff.ms=10 ...] [--consumer fetch.wait.max.ms=10 ...]

Each `--producer` / `--consumer` adds a variant (KEY=VALUE[,KEY=VALUE]) run
after the baseline (the settings the processor uses), alternating, so a
busy machine affects all alike.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from harness import fresh_topics, pct


class Retries(logging.Handler):
    """Counts the producer's CONCURRENT_TRANSACTIONS answers (librdkafka debug `eos`)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "CONCURRENT_TRANSACTIONS" in msg or "concurrent operation" in msg:
            what = msg.split(" ", 1)[0]
            self.counts[what] = self.counts.get(what, 0) + 1


def settings(text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split(",") if kv)


class Reader(threading.Thread):
    def __init__(self, bootstrap: str, topic: str, conf: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.visible: dict[int, float] = {}
        self.halt = threading.Event()
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:6]}",
                           "isolation.level": "read_committed", "enable.auto.commit": False, **conf})
        self.c.assign([TopicPartition(topic, 0, 0)])

    def run(self) -> None:
        while not self.halt.is_set():
            m = self.c.poll(0.01)
            if m is not None and m.error() is None:
                self.visible[int(m.value())] = time.time()
        self.c.close()


def run(args: argparse.Namespace, pconf: dict[str, Any], cconf: dict[str, Any]) -> dict[str, list[float]]:
    topic, offsets_topic = fresh_topics(args.bootstrap, "txn-probe", 1, "out", "src")
    reader = Reader(args.bootstrap, topic, {"fetch.wait.max.ms": 100, **cconf})
    reader.start()
    group = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:6]}"})
    retries = Retries()
    rdlog = logging.getLogger(f"probe.{uuid.uuid4().hex[:6]}")
    rdlog.setLevel(logging.DEBUG)
    rdlog.propagate = False
    rdlog.addHandler(retries)
    p = Producer({"bootstrap.servers": args.bootstrap, "transactional.id": f"probe-{uuid.uuid4().hex[:6]}",
                  "linger.ms": 5, "compression.type": "lz4", "debug": "eos", "logger": rdlog, **pconf})
    p.init_transactions(30)
    p.begin_transaction()
    out: dict[str, list[float]] = {"send_offsets": [], "commit": [], "return → visible": [],
                                   "produce → visible": []}
    returned: dict[int, float] = {}
    produced: dict[int, float] = {}
    time.sleep(1)  # the reader is positioned
    for i in range(args.n):
        produced[i] = time.time()
        p.produce(topic, str(i).encode(), partition=0)
        t0 = time.time()
        p.send_offsets_to_transaction([TopicPartition(offsets_topic, 0, i + 1)], group.consumer_group_metadata(), 10)
        t1 = time.time()
        p.commit_transaction(10)
        t2 = time.time()
        p.begin_transaction()
        returned[i] = t2
        out["send_offsets"].append(t1 - t0)
        out["commit"].append(t2 - t1)
        time.sleep(args.gap / 1000)
    deadline = time.time() + 10
    while len(reader.visible) < args.n and time.time() < deadline:
        time.sleep(0.05)
    reader.halt.set()
    reader.join()
    for i, t in reader.visible.items():
        out["return → visible"].append(t - returned[i])
        out["produce → visible"].append(t - produced[i])
    p.abort_transaction(10)
    p.poll(0)
    group.close()
    out["retries"] = [float(sum(retries.counts.values()))]
    print(f"  ({retries.counts})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--gap", type=float, default=0.0, help="ms between a commit's return and the next record")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--producer", action="append", default=[])
    ap.add_argument("--consumer", action="append", default=[])
    args = ap.parse_args()
    variants = [("baseline", {}, {})]
    variants += [(f"producer {v}", settings(v), {}) for v in args.producer]
    variants += [(f"consumer {v}", {}, settings(v)) for v in args.consumer]
    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for name, pconf, cconf in variants:
            got = run(args, pconf, cconf)
            for k, v in got.items():
                results.setdefault(name, {}).setdefault(k, []).extend(v)
    for name, got in results.items():
        print(f"{name}: {len(got['produce → visible'])} visible of {args.n * args.rounds}")
        print(f"  CONCURRENT_TRANSACTIONS answers: {sum(got.pop('retries')):.0f} in {args.n * args.rounds} commits")
        for k, v in got.items():
            print(f"  {k:18s} p50 {pct(v, .5) * 1000:7.1f}  p90 {pct(v, .9) * 1000:7.1f}  "
                  f"p99 {pct(v, .99) * 1000:7.1f}  max {max(v) * 1000 if v else float('nan'):7.1f} ms")


if __name__ == "__main__":
    main()

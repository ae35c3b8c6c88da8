"""Where a subscribed record's time goes, in the peer workload (issue 13).

Runs `oncely run peer_oncely:app` (through traced_run.py, so the commit
loop's phases are timestamped) on fresh topics, paces records at --rate,
and watches the app's log and the output topic with side readers, read
uncommitted (create times: when the processor produced the Invoke / the
output) and read_committed (when each became visible). Each record's time
from its source timestamp to its output being visible is split by its path.
Through the log (its Invoke went to the log):
  a. source → Invoke created   (the processor's fetch of the source, its loop)
  b. Invoke created → visible  (waiting for and making commit 1)
  c. Invoke visible → output created (fetch of the log, the handler)
  d. output created → visible  (waiting for and making commit 2)
Started locally (processor/local_start.py: no Invoke on the log):
  a. source → output created   (the fetch of the source, the loop, the handler)
  b. output created → visible  (waiting for and making the commit)
then the commit loop's own figures (commit and client-call durations, the
gaps between commits) and the slowest records, stage by stage.
Create times have ms resolution; the clocks are one machine's.

    python bench/peer_breakdown.py --bootstrap HOST:PORT [--rate 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import orjson
from confluent_kafka import OFFSET_END, Consumer, TopicPartition

from harness import BENCH, Child, Pacer, fresh_topics, pct, wait_for
from oncely import schemas


class Side(threading.Thread):
    """Reads `topics` from their end; notes per record number `i` when it was
    created (read uncommitted) or became visible (read_committed)."""

    def __init__(self, bootstrap: str, topics: list[str], partitions: int, committed: bool,
                 seen: dict[str, dict[int, float]]) -> None:
        super().__init__(daemon=True)
        self.committed, self.seen = committed, seen
        self.halt = threading.Event()
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": "oncely-peer-breakdown",
                           "isolation.level": "read_committed" if committed else "read_uncommitted",
                           "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        self.c.assign([TopicPartition(t, p, OFFSET_END) for t in topics for p in range(partitions)])

    def run(self) -> None:
        while not self.halt.is_set():
            first = self.c.poll(0.01)
            if first is None:
                continue
            now = time.time()
            for m in [first, *self.c.consume(1000, 0)]:
                if m.error() is not None:
                    continue
                log = m.topic().endswith(".log")
                if log:
                    kind, body = schemas.decode("log_record", m.value())["body"]
                    if kind != "oncely.Invoke":
                        continue
                    d = orjson.loads(body["payload"])
                else:
                    d = orjson.loads(m.value())
                i = d["i"]
                self.seen["source"][i] = d["ts"]
                stage = ("invoke" if log else "out") + ("_visible" if self.committed else "_created")
                self.seen[stage][i] = now if self.committed else m.timestamp()[1] / 1000
        self.c.close()


def stats(xs: list[float]) -> str:
    return f"p50 {pct(xs, .5) * 1000:7.1f}  p90 {pct(xs, .9) * 1000:7.1f}  p99 {pct(xs, .99) * 1000:7.1f}  " \
           f"max {max(xs) * 1000 if xs else float('nan'):7.1f} ms"


def trace_report(path: Path, t0: float, t1: float) -> None:
    events = [tuple(json.loads(line)) for line in path.read_text().splitlines()]
    events = [e for e in events if t0 <= e[1] <= t1]
    by: dict[str, list[float]] = defaultdict(list)
    for label, a, b, _n in events:
        by[label].append(b - a)
    print(f"\ncommit loop, {t1 - t0:.1f} s measured:")
    for label, xs in sorted(by.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {label:30s} n {len(xs):5d}  total {sum(xs):6.2f} s  {stats(xs)}")
    starts = sorted(a for label, a, _b, _n in events if label == "commit")
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    if gaps:
        print(f"  {'commit start → next start':30s} n {len(gaps):5d}  {'':16s}{stats(gaps)}")
    ways = sorted((a, b) for label, a, b, _n in events if label == "on its way")
    ends = sorted(a for label, a, _b, _n in events if label == "end_commit")
    noticed = []  # a commit's job done → the loop takes its outcome
    for _a, b in ways:
        later = [e for e in ends if e >= b]
        if later:
            noticed.append(later[0] - b)
    if noticed:
        print(f"  {'job done → end_commit':30s} n {len(noticed):5d}  {'':16s}{stats(noticed)}")
    reads = [n for label, _a, _b, n in events if label == "read"]
    if reads:
        print(f"  records per read: mean {sum(reads) / len(reads):.1f}, reads {len(reads)}")


def window(path: Path, a: float, b: float) -> None:
    """The traced events that overlap [a, b], relative to a (ms)."""
    for line in path.read_text().splitlines():
        label, s, e, n = json.loads(line)
        if e >= a and s <= b:
            print(f"  {(s - a) * 1000:8.1f} → {(e - a) * 1000:8.1f}  {label} {n or ''}")
    print(f"  {(b - a) * 1000:8.1f}  (stage end)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--slowest", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="py-spy on the processor over the measured span; "
                    "top frames")
    ap.add_argument("--kafka-debug", default="", help="librdkafka debug contexts of the processor's producer "
                    "(e.g. eos), logged beside the trace")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oncely-peer-breakdown-"))
    source, out = fresh_topics(args.bootstrap, "peer-bd", args.partitions, "src", "out")
    app = f"peer-bd-{os.urandom(4).hex()}"
    trace = work / "trace.jsonl"
    env = {"BENCH_APP": app, "BENCH_SOURCE": source, "BENCH_OUT": out, "BENCH_PARTITIONS": str(args.partitions),
           "ONCELY_BENCH_TRACE": str(trace), "ONCELY_BENCH_KAFKA_DEBUG": args.kafka_debug}
    child = Child(app, [sys.executable, str(BENCH / "traced_run.py"), "run", "peer_oncely:app", "--bootstrap",
                        args.bootstrap, "--state-dir", str(work / "state"), "--log-level", "WARNING"],
                  work / "child.log", env=env)
    seen: dict[str, dict[int, float]] = defaultdict(dict)
    pacer = Pacer(args.bootstrap, source, args.keys, args.partitions, rate=10)
    pacer.start()
    sides: list[Side] = []
    try:
        probe = Side(args.bootstrap, [out], args.partitions, True, seen)
        probe.c.assign([TopicPartition(out, p, 0) for p in range(args.partitions)])
        probe.start()
        sides.append(probe)
        if not wait_for(lambda: seen["out_visible"], 300, 0.05):
            raise SystemExit(f"no output within 300 s; see {child.log}")
        log = f"{app}.log"
        sides += [Side(args.bootstrap, [log, out], args.partitions, False, seen),
                  Side(args.bootstrap, [log], args.partitions, True, seen)]
        for s in sides[1:]:
            s.start()
        time.sleep(2)
        pacer.rate = args.rate
        time.sleep(2)  # warm-up at the rate
        spy = None
        if args.profile:
            from profile_frames import attach
            spy = attach(child.pid, work / "processor.pyspy.raw", work / "pyspy.log")
        first, t0 = pacer.sent, time.time()
        time.sleep(args.seconds)
        last, t1 = pacer.sent, time.time()
        if spy is not None:
            spy.signal(signal.SIGINT)
            spy.proc.wait(60)
        pacer.stop()
        wait_for(lambda: all(i in seen["out_visible"] for i in range(first, last)), 30, 0.1)
    finally:
        pacer.stop()
        for s in sides:
            s.halt.set()
        child.terminate()
    # Two paths: a record started locally (processor/local_start.py) never
    # has an Invoke on the log; one routed through the log has both hops.
    paths = {
        "through the log": ["a. source → Invoke created", "b. Invoke created → visible",
                            "c. Invoke visible → output created", "d. output created → visible"],
        "started locally": ["a. source → output created", "b. output created → visible"],
    }
    stages: dict[str, dict[str, list[float]]] = {path: defaultdict(list) for path in paths}
    rows: list[tuple[float, int, str, list[float], list[float]]] = []  # total, i, path, parts, points
    for i in range(first, last):
        if i not in seen["out_visible"] or i not in seen["out_created"]:
            continue
        ts = seen["source"][i]  # the pacer stamps its send time into the value
        logged = i in seen["invoke_created"] and i in seen["invoke_visible"]
        path = "through the log" if logged else "started locally"
        points = [ts, seen["invoke_created"][i], seen["invoke_visible"][i]] if logged else [ts]
        points += [seen["out_created"][i], seen["out_visible"][i]]
        parts = [b - a for a, b in zip(points, points[1:])]
        for n, v in zip(paths[path] + ["total"], parts + [points[-1] - ts]):
            stages[path][n].append(v)
        rows.append((points[-1] - ts, i, path, parts, points))
    print(f"{len(rows)} of {last - first} records split, {args.rate:.0f}/s asked for {args.seconds:.0f} s "
          f"(load average {os.getloadavg()[0]:.1f})")
    for path, names in paths.items():
        n = len(stages[path]["total"])
        if n:
            print(f" {path}: {n} records")
            for name in names + ["total"]:
                print(f"  {name:36s} {stats(stages[path][name])}")
    print(f"\nthe {args.slowest} slowest (ms: each stage of its path, total):")
    for total, i, path, parts, _ in sorted(rows, reverse=True)[:args.slowest]:
        print(f"  #{i} at +{(i - first) / args.rate:6.3f} s, {path}: "
              + ", ".join(f"{p * 1000:.0f}" for p in parts) + f"; {total * 1000:.0f}")
    if trace.exists():
        trace_report(trace, t0, t1)
        if rows:
            _, i, path, parts, points = max(rows)
            worst = max(range(len(parts)), key=lambda k: parts[k])
            print(f"\nthe commit loop during stage {'abcd'[worst]} of the slowest record #{i} ({path}):")
            window(trace, points[worst], points[worst + 1])
    else:
        print(f"(no trace written; see {child.log})")
    if args.profile:
        from profile_frames import report
        print(report(work / "processor.pyspy.raw", 25))
    rd = Path(f"{trace}.rdkafka")
    if rd.exists():
        lines = [ln for ln in rd.read_text(errors="replace").splitlines() if t0 <= float(ln.split(" ", 1)[0]) <= t1]
        for what in ("CONCURRENT_TRANSACTIONS", "ADDOFFSETS", "ADDPARTS", "COORDINATOR_LOAD"):
            hits = [ln for ln in lines if what in ln]
            print(f"  librdkafka lines with {what}: {len(hits)}")
        print(f"  (all of them: {rd})")


if __name__ == "__main__":
    main()

"""Failover benchmark (issue 10 item 6): how long committed output stops
when a processor dies or restarts.

`oncely run peer_oncely:app` processes (the peer workload; each output
carries the pid of the process whose handler made it, and each process's
Kafka client.id names its pid) consume a steady paced stream whose records
sit on their key's partition (so source partition = log partition). A
read_committed reader notes when each output became visible; the group's
assignment (which process owns which source and log partitions) is read
with the admin API. Measured `--repeat` times each, with the median:

  (i)   restart after kill -9: one process is killed -9 and started again at
        once with the same --state-dir; time from the kill to the first
        committed output of the new process;
  (iii) clean restart: SIGTERM, wait for the exit, start again; time from the
        SIGTERM to the new process's first committed output (and how long
        the stop itself took);
  (ii)  takeover: two processes; one is killed -9 and not restarted; time
        from the kill to the survivor's first committed output on one of the
        dead process's partitions (a log partition: the survivor ran a
        handler of it; a source partition: the survivor consumed a record
        produced after the kill), and until it has done so on all of them.
        The dead one is then restarted and the group left to settle before
        the next repetition. The victim alternates between the process with
        more log partitions (where handlers run) and the other one.

At the end every input must be in the output exactly once (read_committed).

Usage: python bench/bench_failover.py [--bootstrap HOST:PORT] [--repeat 3]
       [--rate 500] [--timeout 90]
Without --bootstrap (or ONCELY_KAFKA_BOOTSTRAP) a local broker is started.
"""

from __future__ import annotations

import argparse
import bisect
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable

import orjson
from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient

from harness import Broker, Child, OutputReader, Pacer, fmt, fresh_topics, key_partition, median, table, wait_for

Owned = dict[str, set[tuple[str, int]]]  # slot -> (topic, partition)s the group gave its process


class Fleet:
    """The processes of one app (named slots, one state dir each), the
    paced input and the reader of their outputs."""

    def __init__(self, broker: Broker, args: argparse.Namespace) -> None:
        self.args = args
        self.bootstrap = broker.bootstrap
        self.work = Path(tempfile.mkdtemp(prefix="oncely-bench-failover-"))
        self.log = self.work / "processes.log"
        self.app = f"bench-failover-{uuid.uuid4().hex[:8]}"
        self.source, self.out = fresh_topics(self.bootstrap, "failover", args.partitions, "src", "out")
        self.log_topic = f"{self.app}.log"
        # (visible at, handler pid, key partition, input sent at) per output, in order.
        self.events: list[tuple[float, int, int, float]] = []
        self.seqs: Counter[int] = Counter()
        self.lock = threading.Lock()
        self.admin = AdminClient({"bootstrap.servers": self.bootstrap})
        self.reader = OutputReader(self.bootstrap, self.out, args.partitions, self._on_output)
        self.pacer = Pacer(self.bootstrap, self.source, args.keys, args.partitions, args.rate)
        self.procs: dict[str, Child] = {}
        self.slot_of: dict[int, str] = {}  # every pid a slot has had

    def _on_output(self, t: float, _key: bytes | None, value: bytes) -> None:
        d = orjson.loads(value)
        part = key_partition(d["customer"].encode(), self.args.partitions)
        with self.lock:
            self.events.append((t, d["pid"], part, d["ts"]))
            self.seqs[d["i"]] += 1

    def begin(self) -> None:
        self.reader.start()
        self.pacer.start()

    def start(self, slot: str) -> Child:
        """Start (or restart) the process of `slot` on its own state dir."""
        env = {"BENCH_APP": self.app, "BENCH_SOURCE": self.source, "BENCH_OUT": self.out,
               "BENCH_PARTITIONS": str(self.args.partitions), "BENCH_TAG_PID": "1"}
        argv = [sys.executable, "-m", "oncely.cli", "run", "peer_oncely:app", "--bootstrap", self.bootstrap,
                "--state-dir", str(self.work / f"state-{slot}"), "--log-level", "INFO"]
        self.procs[slot] = Child(f"{self.app}/{slot}", argv, self.log, env=env)
        self.slot_of[self.procs[slot].pid] = slot
        return self.procs[slot]

    def live(self) -> set[str]:
        return {slot for slot, c in self.procs.items() if c.alive()}

    def scan(self, since: float, done: Callable[[float, int, int, float], bool], timeout: float) -> bool:
        """Feed each output visible after `since`, in order, to done(visible
        at, pid, partition, sent at) until it returns True (then True) or
        `timeout` s pass (then False)."""
        with self.lock:
            scanned = [bisect.bisect_left(self.events, (since,))]

        def look() -> bool:
            with self.lock:
                new = self.events[scanned[0]:]
            for e in new:
                scanned[0] += 1
                if done(*e):
                    return True
            self._check_alive()
            return False

        return wait_for(look, timeout, 0.002)

    def owned(self) -> tuple[bool, Owned]:
        """(the group is stable, slot -> what its process owns), from the
        admin API. A member is known by the pid in its client.id; a static
        member (group.instance.id) that a restart took over may still show
        the pid of the process before, which belonged to the same slot."""
        try:
            desc = self.admin.describe_consumer_groups([self.app], request_timeout=5)[self.app].result()
        except Exception:  # the coordinator may be moving; ask again
            return False, {}
        out: Owned = {}
        for m in desc.members:
            pid = int(m.client_id.rsplit("-", 1)[1]) if m.client_id.startswith("bench-pid-") else -1
            tps = m.assignment.topic_partitions if m.assignment else []
            out.setdefault(self.slot_of.get(pid, f"pid {pid}"), set()).update((tp.topic, tp.partition) for tp in tps)
        return desc.state == ConsumerGroupState.STABLE, out

    def settle(self, timeout: float) -> Owned:
        """Wait until the group is stable with exactly the live processes,
        every source and log partition is owned, and outputs flow on every
        partition (one visible in the last second); the ownership."""
        every = {(t, p) for t in (self.source, self.log_topic) for p in range(self.args.partitions)}
        got: list[Owned] = []

        def stable() -> bool:
            self._check_alive()
            ok, owned = self.owned()
            now = time.time()
            with self.lock:
                flowing = {part for t, _pid, part, _ts in self.events[-5000:] if t > now - 1.0}
            if ok and set(owned) == self.live() and set().union(*owned.values()) >= every \
                    and len(flowing) == self.args.partitions:
                got.append(owned)
                return True
            return False

        if not wait_for(stable, timeout, 0.5):
            ok, owned = self.owned()
            now = time.time()
            with self.lock:
                quiet = set(range(self.args.partitions)) - {p for t, _pid, p, _ts in self.events[-5000:] if t > now - 5}
            raise TimeoutError(f"the group did not settle within {timeout:.0f} s: group "
                               f"{'stable' if ok else 'unstable'}"
                               f", members {sorted(owned)} (live {sorted(self.live())}), no output for 5 s on "
                               f"partitions {sorted(quiet)}; log {self.log}")
        return got[0]

    def _check_alive(self) -> None:
        for slot, c in self.procs.items():
            if c.proc.returncode is None and c.proc.poll() is not None:
                raise RuntimeError(f"process {slot} exited by itself ({c.proc.returncode}); log {self.log}:\n"
                                   f"{c.tail()}")

    def finish(self, timeout: float) -> str:
        """Stop the input, wait for its outputs, stop everything; the
        exactly-once verdict."""
        self.pacer.stop()
        sent = self.pacer.sent
        wait_for(lambda: len(self.seqs) >= sent, timeout, 0.2)
        for c in self.procs.values():
            c.terminate()
        self.reader.stop()
        dups = sum(n - 1 for n in self.seqs.values() if n > 1)
        missing = sent - len([i for i in self.seqs if i < sent])
        return (f"{sent} inputs: {missing} missing, {dups} duplicated in the committed output"
                + ("" if missing or dups else " (exactly once)"))


def restart(fleet: Fleet, clean: bool, timeout: float) -> tuple[float | None, float]:
    """(i) or (iii): kill -9 (or SIGTERM and wait for the exit), restart at
    once; (seconds to the new process's first output, seconds the stop took)."""
    t0 = time.time()
    if clean:
        fleet.procs["a"].terminate(timeout)
    else:
        fleet.procs["a"].kill9()
    stop = time.time() - t0
    new = fleet.start("a")
    seen: list[float] = []

    def by_new(t: float, pid: int, _p: int, _sent: float) -> bool:
        if pid == new.pid:
            seen.append(t - t0)
        return bool(seen)

    fleet.scan(t0, by_new, timeout)
    return (seen[0] if seen else None), stop


def takeover(fleet: Fleet, prefer_log: bool, timeout: float) -> tuple[str, float | None, float | None, str]:
    """(ii): kill -9 one of two processes (the one with more log partitions,
    or the other); (its slot, seconds to the survivor's first output on one
    of its partitions, seconds until on all of them, what it owned)."""
    owned = fleet.settle(timeout)

    def logs_of(slot: str) -> int:
        return sum(1 for t, _p in owned.get(slot, set()) if t == fleet.log_topic)

    victim, survivor = sorted(("a", "b"), key=logs_of, reverse=prefer_log)
    alive = fleet.procs[survivor].pid
    logs = {p for t, p in owned.get(victim, set()) if t == fleet.log_topic}
    sources = {p for t, p in owned.get(victim, set()) if t == fleet.source}
    left = {("log", p) for p in logs} | {("src", p) for p in sources}
    what = f"{len(logs)} log + {len(sources)} source partitions"
    taken: list[float] = []
    t0 = time.time()
    fleet.procs[victim].kill9()

    def prove(t: float, pid: int, p: int, sent: float) -> bool:
        """Strike off what this output proves the survivor took; True when all is."""
        if pid == alive:
            for item, proven in ((("log", p), p in logs), (("src", p), p in sources and sent > t0)):
                if proven and item in left:
                    left.discard(item)
                    taken.append(t - t0)
        return not left

    complete = fleet.scan(t0, prove, timeout)
    if not complete:
        what += f"; after {timeout:.0f} s still no output from the survivor on " + ", ".join(
            f"{kind} partition {p}" for kind, p in sorted(left))
    return victim, (taken[0] if taken else None), (taken[-1] if complete and taken else None), what


def summary(rows: list[tuple[str, list[float | None]]]) -> str:
    def num(vs: list[float | None], f: Callable[[list[float]], float]) -> str:
        xs = [v for v in vs if v is not None]
        return fmt(f(xs), 2) if xs else "—"

    return table(["failover (s)", "runs", "median", "min", "max"],
                 [(name, ", ".join("timeout" if v is None else f"{v:.2f}" for v in vs),
                   num(vs, median), num(vs, min), num(vs, max)) for name, vs in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default=os.environ.get("ONCELY_KAFKA_BOOTSTRAP"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rate", type=int, default=500, help="paced input records/s")
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=90.0, help="bound on each wait (s)")
    args = ap.parse_args()
    broker = Broker(args.bootstrap)
    fleet = Fleet(broker, args)
    print(f"bootstrap {broker.bootstrap}; app {fleet.app}; {args.rate}/s; logs in {fleet.log}", flush=True)
    kills: list[float | None] = []
    cleans: list[float | None] = []
    stops: list[float | None] = []
    firsts: list[float | None] = []
    alls: list[float | None] = []

    def show(x: float | None) -> str:
        return "timeout" if x is None else f"{x:.2f} s"

    try:
        fleet.begin()
        fleet.start("a")
        fleet.settle(args.timeout)
        for _ in range(args.repeat):
            took, _stop = restart(fleet, clean=False, timeout=args.timeout)
            kills.append(took)
            print(f"(i)   kill -9 -> restarted process's first output: {show(took)}", flush=True)
            fleet.settle(args.timeout)
        for _ in range(args.repeat):
            took, stop = restart(fleet, clean=True, timeout=args.timeout)
            cleans.append(took)
            stops.append(stop)
            print(f"(iii) SIGTERM -> restarted process's first output: {show(took)} (stop took {stop:.2f} s)",
                  flush=True)
            fleet.settle(args.timeout)
        fleet.start("b")
        for n in range(args.repeat):
            victim, first, every, what = takeover(fleet, prefer_log=n % 2 == 0, timeout=args.timeout)
            firsts.append(first)
            alls.append(every)
            print(f"(ii)  kill -9 of {victim} ({what}) -> the survivor's first output on one of them: {show(first)}, "
                  f"on all: {show(every)}", flush=True)
            fleet.start(victim)
        fleet.settle(args.timeout)
        verdict = fleet.finish(args.timeout)
        print()
        print(summary([("(i) kill -9 → first output of the restarted process", kills),
                       ("(iii) SIGTERM → first output of the restarted process", cleans),
                       ("(iii) SIGTERM → process exited", stops),
                       ("(ii) kill -9 → survivor's first output on a partition of the dead one", firsts),
                       ("(ii) kill -9 → survivor's output on all of them", alls)]))
        print(f"\n{verdict}")
    except (TimeoutError, RuntimeError) as e:
        print(f"\n! {e}")
        sys.exit(1)
    finally:
        broker.close()


if __name__ == "__main__":
    main()

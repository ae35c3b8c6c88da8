"""Peer benchmark: oncely next to Quix Streams, Kafka Streams and the raw floor, one broker, one run.

The workload of issue 13: JSON orders over `--keys` keys on `--partitions`
partitions; each system keeps a per-key running total (RocksDB + changelog)
and emits one output per input, exactly once, with 100 ms commits:

  raw     a transactional consume -> produce copy, no state (rawcopy.py): the floor
  quix    Quix Streams 3.x, processing_guarantee="exactly-once", commit_interval=0.1 (peer_quix.py)
  streams Kafka Streams (the broker's release), exactly_once_v2, 1 stream thread, commit.interval.ms=100,
          record cache off, a persistent key-value store with its changelog (java/PeerStreams.java,
          built and started by peer_streams.py)
  oncely  subscription -> keyed handler -> ctx.emit (peer_oncely.py, under `oncely run`)

Each system runs in its own process, so its CPU time is its own. Measured
from outside, by a read_committed reader of the output topic:

  first output  seconds from process start to the first committed output
                of a trickle (20 records/s) on empty topics: startup, group
                join, restore;
  records/s     once warmed up and idle, the process is stopped (SIGSTOP),
                `--records` records are preloaded, and it is let go
                (SIGCONT): records / seconds from then until the last output
                is visible as committed;
  CPU s / 1k    the process's user+system CPU over the same span, per 1,000
                records; the broker's CPU over it likewise;
  latency       at a paced `--rate` records/s (after a 2 s warm-up), from the
                source record's timestamp to its output being read under
                read_committed, p50 / p99;
  exact         every input appears once in the output, and each key's final
                running total equals its number of records.

Ratios oncely/quix, oncely/streams and oncely/raw come from the same run; on a shared
2-core machine only those are worth quoting.

--profile runs only oncely's throughput run, with py-spy attached from the
SIGCONT on, and prints the top frames by own and cumulative time
(profile_frames.py).

Usage: python bench/bench_peers.py [--bootstrap HOST:PORT] [--records 100000]
       [--systems raw,quix,streams,oncely] [--repeat 1] [--rate 1000] [--latency-seconds 10]
       [--quix-python PATH] [--profile] [--top 25]
Without --bootstrap (or ONCELY_KAFKA_BOOTSTRAP) a local broker is started.
Quix Streams pins confluent-kafka<2.13, so it lives in its own virtualenv:
--quix-python, $ONCELY_BENCH_QUIX_PYTHON, this interpreter if it has
quixstreams, else <oncely cache>/bench-quix-venv, created on first use from
the `bench-quix` extra of pyproject.toml.
Kafka Streams needs a JDK (17+) and Maven: peer_streams.py resolves its jars
into <oncely cache>/bench-streams-<version> and compiles the peer there,
once, before anything is measured (without them streams is skipped). Its
JIT is still compiling in the first tens of thousands of records, so short
--records runs understate it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

import peer_streams
from harness import (BENCH, Broker, Child, OutputReader, Pacer, delete_topics_naming, fmt, fresh_topics, median, pct,
                     preload, table, wait_for)
from oncely.kafka_jars import LocalKafkaError
from oncely.local_kafka import default_cache_dir

SYSTEMS = {
    "raw": "raw transactional copy (no state)",
    "quix": "Quix Streams, exactly-once, commit 0.1 s",
    "streams": f"Kafka Streams {peer_streams.KAFKA_VERSION}, exactly_once_v2, 1 thread, cache off",
    "oncely": "oncely subscription → keyed handler → emit",
}


@dataclass
class Result:
    system: str
    rate: float = float("nan")
    cpu_per_1k: float = float("nan")
    broker_per_1k: float = float("nan")
    first_output: float = float("nan")
    p50: float = float("nan")
    p99: float = float("nan")
    samples: str = "—"
    exact: str = "—"
    notes: list[str] = field(default_factory=list)


class Bench:
    """One run: the broker, the work directory and the choices of the command line."""

    def __init__(self, args: argparse.Namespace, broker: Broker, quix_python: str | None,
                 streams_jvm: list[str] | None = None) -> None:
        self.args, self.broker, self.quix_python, self.streams_jvm = args, broker, quix_python, streams_jvm
        self.work = Path(tempfile.mkdtemp(prefix="oncely-bench-peers-"))
        self.log = self.work / "children.log"

    def spawn(self, system: str, source: str, out: str) -> Child:
        """Start `system` on `source` -> `out` with its own group and state."""
        run = f"peer-{system}-{uuid.uuid4().hex[:8]}"
        b = self.broker.bootstrap
        state = self.work / run
        if system == "raw":
            argv = [sys.executable, str(BENCH / "rawcopy.py"), "--bootstrap", b, "--source", source, "--out", out,
                    "--group", run]
            return Child(run, argv, self.log)
        if system == "quix":
            assert self.quix_python
            argv = [self.quix_python, str(BENCH / "peer_quix.py"), "--bootstrap", b, "--source", source,
                    "--out", out, "--group", run, "--state-dir", str(state)]
            return Child(run, argv, self.log)
        if system == "streams":
            assert self.streams_jvm
            argv = peer_streams.command(self.streams_jvm, b, source, out, run, state)
            return Child(run, argv, self.log)
        env = {"BENCH_APP": run, "BENCH_SOURCE": source, "BENCH_OUT": out,
               "BENCH_PARTITIONS": str(self.args.partitions),
               "BENCH_IDEMPOTENCY": "1" if self.args.oncely_idempotency else "0"}
        argv = [sys.executable, "-m", "oncely.cli", "run", "peer_oncely:app", "--bootstrap", b,
                "--state-dir", str(state), "--log-level", "WARNING"]
        return Child(run, argv, self.log, env=env)

    def throughput(self, system: str, res: Result, profile: Path | None = None) -> None:
        """Start the system on an empty topic and warm it up with a trickle
        (the time to its first output is its startup); stop it (SIGSTOP),
        preload --records records, let it go (SIGCONT) and time until the
        last of them is visible as committed output. CPU is read at both ends."""
        a = self.args
        source, out = fresh_topics(self.broker.bootstrap, f"peer-{system}", a.partitions, "src", "out")
        reader = OutputReader(self.broker.bootstrap, out, a.partitions)
        reader.start()
        child = self.spawn(system, source, out)
        pacer = Pacer(self.broker.bootstrap, source, a.keys, a.partitions, rate=20)
        pacer.start()
        spy = None
        total = a.records
        try:
            if not reader.wait_count(1, a.timeout):
                raise TimeoutError(f"no output within {a.timeout:.0f} s")
            res.first_output = reader.seen.times[0] - child.started
            time.sleep(1.0)
            pacer.stop()
            warm = pacer.sent
            total = warm + a.records
            if not reader.wait_count(warm, a.timeout):
                raise TimeoutError(f"{reader.count} of {warm} warm-up outputs within {a.timeout:.0f} s")
            child.signal(signal.SIGSTOP)  # a few seconds: well within session and transaction timeouts
            preload(self.broker.bootstrap, source, a.records, a.keys, a.partitions, first=warm)
            t0, cpu0, broker0 = time.time(), child.cpu(), self.broker.cpu()
            threads0 = {t.id: t.user_time + t.system_time for t in child.ps.threads()}  # (CPU per thread)
            child.signal(signal.SIGCONT)
            if profile is not None:
                from profile_frames import attach
                spy = attach(child.pid, profile, self.log)
            if not reader.wait_count(total, a.timeout):
                raise TimeoutError(f"{reader.count - warm} of {a.records} outputs within {a.timeout:.0f} s")
            t_n, cpu, broker_cpu = reader.seen.times[total - 1], child.cpu(), self.broker.cpu()
            # Whether the busiest thread (the loop) is CPU-bound, or waits.
            busy = sorted((t.user_time + t.system_time - threads0.get(t.id, 0.0) for t in child.ps.threads()),
                          reverse=True)
            print(f"  {system}: CPU of its busiest threads over the run's wall time: "
                  f"{', '.join(f'{b / (t_n - t0):.2f}' for b in busy[:3])}")
            res.rate = a.records / (t_n - t0)
            res.cpu_per_1k = (cpu - cpu0) / a.records * 1000
            res.broker_per_1k = (broker_cpu - broker0) / a.records * 1000
        except TimeoutError as e:
            res.notes.append(f"{system} throughput: {e}; log {self.log}:\n{child.tail()}")
        finally:
            pacer.stop()
            child.signal(signal.SIGCONT)
            child.terminate()
            if spy is not None:
                spy.proc.wait(60)
            time.sleep(1.0)  # the reader sees anything (wrongly) committed late
            reader.stop()
            shutil.rmtree(self.work / child.name, ignore_errors=True)
            delete_topics_naming(self.broker.bootstrap, child.name, source, out)
        res.exact = exactly_once(reader.seen.values, total, a.keys, stateful=system != "raw")

    def latency(self, system: str, res: Result) -> None:
        """Pace records at --rate and time source timestamp -> committed output read."""
        a = self.args
        waited = self.broker.settle()
        if waited > 1:
            print(f"  (waited {waited:.1f} s for a quiet broker)", flush=True)
        source, out = fresh_topics(self.broker.bootstrap, f"peer-lat-{system}", a.partitions, "src", "out")
        arrivals: list[tuple[int, float]] = []

        def on_record(t: float, _k: bytes | None, v: bytes) -> None:
            d = orjson.loads(v)
            arrivals.append((d["i"], t - d["ts"]))

        reader = OutputReader(self.broker.bootstrap, out, a.partitions, on_record)
        reader.start()
        child = self.spawn(system, source, out)
        pacer = Pacer(self.broker.bootstrap, source, a.keys, a.partitions, rate=10)  # a trickle until it answers
        pacer.start()
        try:
            if not wait_for(lambda: arrivals, a.timeout, 0.01):
                raise TimeoutError(f"no output within {a.timeout:.0f} s")
            pacer.rate = a.rate
            time.sleep(2.0)  # warm-up, not measured
            first = pacer.sent
            time.sleep(a.latency_seconds)
            last = pacer.sent
            pacer.stop()
            n = last - first

            def measured() -> list[float]:
                return [lat for i, lat in list(arrivals) if first <= i < last]

            wait_for(lambda: len(measured()) >= n, 30, 0.1)
            lat = measured()
            res.p50, res.p99 = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000
            res.samples = f"{len(lat)}/{n}"
        except TimeoutError as e:
            res.notes.append(f"{system} latency: {e}; log {self.log}:\n{child.tail()}")
        finally:
            pacer.stop()
            child.terminate()
            reader.stop()
            shutil.rmtree(self.work / child.name, ignore_errors=True)
            delete_topics_naming(self.broker.bootstrap, child.name, source, out)


def exactly_once(values: list[bytes], records: int, keys: int, stateful: bool) -> str:
    """'yes' when each input is in the output once and (stateful) every
    key's last running total equals its record count; else what is off."""
    seqs: Counter[int] = Counter()
    last_total: dict[str, int] = {}
    for v in values:
        d = orjson.loads(v)
        seqs[d["i"]] += 1
        if stateful:
            last_total[d["customer"]] = max(last_total.get(d["customer"], 0), d["total"])
    problems = []
    if len(values) != records or len(seqs) != records:
        problems.append(f"{len(values)} outputs, {len(seqs)} distinct inputs of {records}")
    if stateful:
        per_key = Counter(f"c{i % keys}" for i in range(records))
        wrong = sum(1 for k, n in per_key.items() if last_total.get(k) != n)
        if wrong:
            problems.append(f"{wrong} keys with a wrong total")
    return "yes" if not problems else "NO: " + "; ".join(problems)


def find_quix_python(explicit: str | None, install: bool) -> str | None:
    """An interpreter that can import quixstreams (see the module docstring)."""
    venv = default_cache_dir() / "bench-quix-venv"
    candidates = [explicit, os.environ.get("ONCELY_BENCH_QUIX_PYTHON"), sys.executable, str(venv / "bin" / "python")]
    for py in filter(None, candidates):
        if Path(py).exists() and subprocess.run([py, "-c", "import quixstreams"], capture_output=True).returncode == 0:
            return py
    if not install:
        return None
    extras = tomllib.loads((BENCH.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    print(f"installing {extras['bench-quix']} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *extras["bench-quix"]], check=True)
    return str(venv / "bin" / "python")


def ratio(a: float, b: float) -> str:
    return "—" if a != a or b != b or not b else f"{a / b:.2f}"


def combine(runs: list[Result]) -> Result:
    """The medians of repeated runs of one system."""
    r = Result(runs[0].system)
    for f in ("rate", "cpu_per_1k", "broker_per_1k", "first_output", "p50", "p99"):
        setattr(r, f, median([getattr(x, f) for x in runs]))
    r.samples = ", ".join(x.samples for x in runs)
    r.exact = next((x.exact for x in runs if x.exact != "yes"), "yes")
    r.notes = [n for x in runs for n in x.notes]
    return r


def print_results(results: dict[str, Result], args: argparse.Namespace, title: str = "") -> None:
    rows = [(SYSTEMS[s], fmt(r.rate), fmt(r.cpu_per_1k, 3), fmt(r.broker_per_1k, 3), fmt(r.first_output, 1),
             f"{fmt(r.p50)} / {fmt(r.p99)}", r.samples, r.exact) for s, r in results.items()]
    print(f"\n{title}{args.records:,} records, {args.keys:,} keys, {args.partitions} partitions; "
          f"latency at {args.rate:,}/s for {args.latency_seconds:g} s\n")
    print(table(["system", "records/s", "CPU s/1k", "broker CPU s/1k", "first output s",
                 f"e2e p50 / p99 ms at {args.rate:,}/s", "latency samples", "exact"], rows))
    on = results.get("oncely")
    if on:
        ratios = []
        for peer in ("quix", "streams", "raw"):
            p = results.get(peer)
            if p:
                ratios.append((f"oncely/{peer}", ratio(on.rate, p.rate), ratio(on.cpu_per_1k, p.cpu_per_1k),
                               ratio(on.p50, p.p50), ratio(on.p99, p.p99)))
        if ratios:
            print()
            print(table(["ratio", "records/s", "CPU s/1k", "p50", "p99"], ratios))
    if not title:
        for r in results.values():
            for n in r.notes:
                print(f"\n! {n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default=os.environ.get("ONCELY_KAFKA_BOOTSTRAP"))
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--systems", default="raw,quix,streams,oncely",
                    help="comma-separated subset of raw,quix,streams,oncely")
    ap.add_argument("--repeat", type=int, default=1, help="runs of everything; the table shows medians")
    ap.add_argument("--rate", type=int, default=1000, help="paced rate of the latency runs (records/s)")
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--no-latency", action="store_true", help="throughput runs only")
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on each wait for outputs (s)")
    ap.add_argument("--oncely-idempotency", action="store_true",
                    help="oncely deduplicates by the Idempotency-Key header (default: by source offset, like Quix)")
    ap.add_argument("--quix-python", default=None)
    ap.add_argument("--no-quix-install", action="store_true", help="skip quix rather than create its virtualenv")
    ap.add_argument("--profile", action="store_true", help="oncely's throughput run under py-spy; top frames")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    systems = ["oncely"] if args.profile else [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        ap.error(f"unknown systems {sorted(unknown)}")
    quix = find_quix_python(args.quix_python, not args.no_quix_install) if "quix" in systems else None
    if "quix" in systems and not quix:
        print("quixstreams not found (and --no-quix-install): skipping quix")
        systems.remove("quix")
    streams_jvm = None
    if "streams" in systems:
        try:
            streams_jvm = peer_streams.prepare()
        except (peer_streams.StreamsPeerError, LocalKafkaError) as e:
            print(f"Kafka Streams peer not built: skipping streams\n{e}")
            systems.remove("streams")
    broker = Broker(args.bootstrap)
    bench = Bench(args, broker, quix, streams_jvm)
    print(f"bootstrap {broker.bootstrap}; logs and state in {bench.work}; quix python {quix or '—'}", flush=True)
    runs: dict[str, list[Result]] = {s: [] for s in SYSTEMS if s in systems}
    try:
        if args.profile:
            raw = bench.work / "oncely.pyspy.raw"
            runs["oncely"].append(Result("oncely"))
            bench.throughput("oncely", runs["oncely"][0], profile=raw)
            print_results({"oncely": runs["oncely"][0]}, args)
            print("\n(records/s and CPU above are under the profiler)\n")
            from profile_frames import report
            print(report(raw, args.top))
            return
        # The raw copy first (it also warms up the broker's JVM); then the
        # latency runs on a quiet broker; then the throughput runs, whose
        # changelogs the broker compacts for a while afterwards.
        order = [("throughput", "raw")] if "raw" in systems else []
        if not args.no_latency:
            order += [("latency", s) for s in systems]
        order += [("throughput", s) for s in systems if s != "raw"]
        for rep in range(args.repeat):
            results = {s: Result(s) for s in runs}
            for kind, s in order:
                print(f"{kind} {s} ...", flush=True)
                getattr(bench, kind)(s, results[s])
            for s, r in results.items():
                runs[s].append(r)
            if args.repeat > 1:
                print_results(results, args, title=f"Run {rep + 1} of {args.repeat}: ")
        print_results({s: combine(rs) for s, rs in runs.items()}, args)
        if args.repeat > 1:
            print(f"\n(medians of {args.repeat} runs; ratios of the medians)")
    finally:
        broker.close()


if __name__ == "__main__":
    main()

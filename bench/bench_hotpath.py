"""The engine's per-record CPU, without Kafka's noise: issue 13's workload
through the real hot path, in one process, deterministic.

bench_peers.py measures the whole system on a broker, where the same code
varies 1.7x between runs. This one measures only what oncely's own Python
spends per subscribed record, so a change to the hot path shows in one run:
the peer app (peer_oncely.py: subscription -> keyed `customers` handler ->
ctx.get/set -> ctx.emit) over 8 log partitions on real RocksDB stores; each
source record (with bench_peers' one header) goes through `dispatch.source_record` (route, local start,
handler, outcome), its output and every changelog record through a real
confluent-kafka producer's `produce` (into librdkafka's queue; no broker is
reached), and every `--batch` records the partitions commit as a Kafka
transaction would have them (prepare, changelog, freeze, RocksDB write).

It prints CPU µs per record (process time, best and median of `--repeat`
runs of `--records` records each, after a warm-up run; on a busy machine the
best is the figure to compare). `--profile` runs once under
cProfile and prints the top functions with their call counts per record,
which says what the path does per record, not only where the time goes.

`--instructions` counts instead of timing: it runs itself under valgrind's
cachegrind at two sizes and prints the instructions per record (the slope
between them, so start-up cancels out). The count is the same from run to
run to within about 0.1 %, on a machine whose timings vary by 10 %: the
figure to compare two versions of the hot path by (it counts the whole
process, the records' making included, which is the same for both).

Usage: python bench/bench_hotpath.py [--records 50000] [--repeat 5] [--batch 500] [--profile] [--top 30]
       python bench/bench_hotpath.py --instructions [--records 2500] [--batch 500]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

BENCH = Path(__file__).resolve().parent
os.environ.setdefault("BENCH_APP", "hotpath")
os.environ.setdefault("BENCH_SOURCE", "hotpath-src")
os.environ.setdefault("BENCH_OUT", "hotpath-out")
sys.path.insert(0, str(BENCH))

import peer_oncely  # noqa: E402  (the app, with the names set above)

from oncely.driver import _Message as DriverMessage  # noqa: E402
from oncely.egress.sinks import Sinks  # noqa: E402
from oncely.processor import dispatch  # noqa: E402
from oncely.processor.local_start import LocalStarts  # noqa: E402
from oncely.processor.partition import PartitionProcessor  # noqa: E402
from oncely.processor.store import PartitionStore  # noqa: E402
from oncely.remote.executor import executor_for  # noqa: E402
from oncely.sdk.protocol import CLIENT_MAX_BYTES, limits_for  # noqa: E402

KEYS = 1000
SOURCE_PARTITIONS = 8
SOURCE = os.environ["BENCH_SOURCE"]


class _Message(DriverMessage):
    """A source record as the commit loop reads it: the TestDriver's log
    record plus what a subscription's route reads besides."""

    __slots__ = ("_headers",)

    def __init__(self, topic: str, partition: int, offset: int, key: bytes, value: bytes) -> None:
        super().__init__(topic, partition, offset, key, value)
        # bench_peers' records carry one (harness.produce), which the route copies into the Invoke's source.
        self._headers = [("Idempotency-Key", b"o%d" % offset)]

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000 + self._offset)

    def error(self) -> None:
        return None


class _Output:
    """The open transaction's producer, as the partitions see it: records go
    into a real librdkafka queue (never sent: the bootstrap is unreachable)."""

    metrics = None

    def __init__(self) -> None:
        self.producer = Producer({"bootstrap.servers": "127.0.0.1:9", "queue.buffering.max.messages": 10_000_000,
                                  "queue.buffering.max.kbytes": 2_000_000, "message.timeout.ms": 0,
                                  "log_level": 0})
        self.produced = 0

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
                owner: bytes | None = None) -> None:
        part = -1 if partition is None else partition
        if not headers:
            self.producer.produce(topic, value, key, part)
        else:
            self.producer.produce(topic, value, key, part, headers=headers)
        self.produced += 1

    def fault(self, inv_id: bytes, why: str) -> None:
        raise AssertionError(f"fault: {why}")

    def purge(self) -> None:
        self.producer.purge(in_queue=True, in_flight=True)
        self.producer.poll(0)


class _Engine:
    """Eight log partitions, all local and caught up, as after a start."""

    def __init__(self, root: Path) -> None:
        app = peer_oncely.app
        self.app = app
        self.sub = app.subscriptions[0]
        self.out = _Output()
        executor = executor_for(app)
        self.executor = executor.in_process
        sinks = Sinks(app.sinks, lambda topic: True)
        limits = limits_for(app.changelog_topic, app.log_topic, {}, CLIENT_MAX_BYTES)
        self.partitions: dict[int, PartitionProcessor] = {}
        for p in range(app.partitions):
            store = PartitionStore(root / str(p), app.name, app.partitions, p)
            store.open()
            part = PartitionProcessor(app, p, store, executor, self.out, True, sinks=sinks, limits=limits)
            part.load()
            self.partitions[p] = part
        self.local = LocalStarts(self.partitions)
        self.changelog_offset = 0

    def catch_up(self) -> None:
        """Open each partition's gate as reading back its own marker would."""
        for p, part in self.partitions.items():
            self.local.start(_Routed(p), self.out)  # produces the marker
            self.local.on_mark(part, {"epoch": self.local.epoch, "token": self.local.token})
            assert self.local.caught_up(p)

    def commit(self) -> None:
        changelog = self.app.changelog_topic
        for part in self.partitions.values():
            part.prepare_commit()
            for key, value in part.store.overlay.items():
                self.out.produce(changelog, key, value, partition=part.partition)
                self.changelog_offset += 1
            part.freeze()
        for part in self.partitions.values():
            part.after_commit(self.changelog_offset)


class _Routed:
    """Only what LocalStarts.start reads before a gate exists."""

    def __init__(self, partition: int) -> None:
        self.partition = partition


def _records(n: int, start: int) -> list[_Message]:
    msgs = []
    for i in range(start, start + n):
        k = b"c%d" % (i % KEYS)
        msgs.append(_Message(SOURCE, i % SOURCE_PARTITIONS, i // SOURCE_PARTITIONS, k,
                             b'{"customer": "%s", "amount": 1, "i": %d, "ts": %.6f}' % (k, i, 1.7e9 + i)))
    return msgs


async def _feed(engine: _Engine, msgs: list[_Message], batch: int) -> None:
    app, sub, out, local = engine.app, engine.sub, engine.out, engine.local
    source_record = dispatch.source_record
    for i in range(0, len(msgs), batch):
        # As the commit loop handles a poll's records (CommitLoop._handle_all).
        engine.executor.enter_batch()
        try:
            for m in msgs[i:i + batch]:
                source_record(app, sub, m, out, local)
        finally:
            engine.executor.end_batch()
        await asyncio.sleep(0)  # anything the handlers left for the loop
        engine.commit()
        out.purge()


def _run(engine: _Engine, msgs: list[_Message], batch: int, profiler: cProfile.Profile | None = None) -> float:
    t0 = time.process_time()
    if profiler is not None:
        profiler.enable()
    asyncio.run(_feed(engine, msgs, batch))
    if profiler is not None:
        profiler.disable()
    return time.process_time() - t0


def _check(engine: _Engine, total: int) -> None:
    """Every record ran and committed: the keys' totals add up."""
    done = sum(p.stats.completed for p in engine.partitions.values())
    assert done == total, f"{done} invocations completed, {total} records fed"
    assert not any(p.invocations for p in engine.partitions.values()), "invocations left in flight"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=500, help="records per commit")
    ap.add_argument("--profile", action="store_true", help="one run under cProfile: top functions, calls per record")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--instructions", action="store_true",
                    help="instructions per record under cachegrind (valgrind), not CPU time")
    args = ap.parse_args()
    if args.instructions:
        _count_instructions(args.records if args.records != ap.get_default("records") else 2500, args.batch)
        return
    with tempfile.TemporaryDirectory(prefix="oncely-hotpath-") as tmp:
        engine = _Engine(Path(tmp))
        asyncio.run(_catch_up(engine))
        fed = 0
        warm = _records(min(args.records, 10_000), fed)
        _run(engine, warm, args.batch)
        fed += len(warm)
        if args.profile:
            msgs = _records(args.records, fed)
            prof = cProfile.Profile()
            _run(engine, msgs, args.batch, prof)
            fed += len(msgs)
            _check(engine, fed)
            _print_profile(prof, args.records, args.top)
            return
        per_record = []
        for _ in range(args.repeat):
            msgs = _records(args.records, fed)
            cpu = _run(engine, msgs, args.batch)
            fed += len(msgs)
            per_record.append(cpu / len(msgs) * 1e6)
        _check(engine, fed)
        print(f"hot path: {min(per_record):.1f} µs CPU per record at best, {statistics.median(per_record):.1f} "
              f"median ({args.repeat} runs of {args.records:,}: {', '.join(f'{x:.1f}' for x in per_record)}), "
              f"{engine.out.produced / fed:.2f} records produced per record")


def _count_instructions(records: int, batch: int) -> None:
    """Instructions per record: this script under cachegrind at `records`
    and 3x `records` (one run each after its warm-up), the difference
    divided by the records fed in between."""
    if shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind (apt-get install valgrind)")
    counts = []
    fed = []
    for n in (records, 3 * records):
        cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", sys.executable,
               __file__, "--records", str(n), "--repeat", "1", "--batch", str(batch)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
        if done.returncode != 0 or found is None:
            sys.exit(f"cachegrind run failed ({done.returncode}):\n{done.stderr[-2000:]}")
        counts.append(int(found.group(1).replace(",", "")))
        fed.append(min(n, 10_000) + n)  # the warm-up, then the run
    per_record = (counts[1] - counts[0]) / (fed[1] - fed[0])
    print(f"hot path: {per_record:,.0f} instructions per record (cachegrind; {fed[0]:,} and {fed[1]:,} records "
          f"fed, batch {batch})")


async def _catch_up(engine: _Engine) -> None:
    engine.catch_up()
    engine.commit()
    engine.out.purge()


def _print_profile(prof: cProfile.Profile, records: int, top: int) -> None:
    stats = pstats.Stats(prof)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, f"{func} ({_short(file)}:{line})"))
    calls = sum(nc for (_, nc, _, _, _) in stats.stats.values())  # type: ignore[attr-defined]
    print(f"cProfile, {records:,} records: {calls / records:.0f} function calls and "
          f"{total / records * 1e6:.1f} µs per record under the profiler")
    print("| own % | cum % | calls/record | function |")
    print("|---|---|---|---|")
    for tt, ct, nc, name in sorted(rows, reverse=True)[:top]:
        print(f"| {tt / total * 100:5.1f} | {ct / total * 100:5.1f} | {nc / records:6.2f} | {name} |")


def _short(file: str) -> str:
    parts = Path(file).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else file


if __name__ == "__main__":
    main()

"""`oncely run` with the commit loop's phases timestamped, for latency work.

Runs the command line (`python traced_run.py run APP ...`, the same
arguments as `oncely run`) after wrapping a few engine functions so that
each call's start and end land in a list, written as JSON lines to
$ONCELY_BENCH_TRACE when the process exits (it must stop cleanly, e.g. on
SIGTERM). The wrappers live here, not in the engine: the engine pays
nothing for them when it is not traced.

Events: `commit` (CommitLoop.start_commit, the loop's half: drain
excluded, flush of the changelog, freeze, the commit sent on its way),
`on its way` (the commit's job on the producer's worker:
send_offsets_to_transaction and commit_transaction, while the loop goes
on), `end_commit` (taking its outcome: begin_transaction, the held records,
the RocksDB writes), `flush_changelog` (each partition's prepare_commit and
changelog records), `after_commit` (one partition's RocksDB write after a
commit), `gc genN` (each garbage collection), each blocking client call by
its name (Worker.call's `during`), `drain`, and one `read` per poll that
returned records (with the count). With
$ONCELY_BENCH_KAFKA_DEBUG (e.g. `eos`), the transactional producer's
librdkafka debug lines go to $ONCELY_BENCH_TRACE.rdkafka, stamped when
Python gets them (librdkafka hands log lines over in batches, so count
them; do not time by them).
"""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import os
import sys
import time
from typing import Any

import orjson

from oncely.processor import clients, commit_loop, pacing, partition, producer, transaction, txn_state, worker

EVENTS: list[tuple[str, float, float, int]] = []


def _dump() -> None:
    path = os.environ.get("ONCELY_BENCH_TRACE")
    if path:
        with open(path, "wb") as f:
            for e in EVENTS:
                f.write(orjson.dumps(e) + b"\n")


def _timed(label: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.time()
        try:
            return fn(*a, **k)
        finally:
            EVENTS.append((label, t0, time.time(), 0))
    return timed


def install() -> None:
    loop = commit_loop.CommitLoop
    loop.start_commit = _timed("commit", loop.start_commit)  # type: ignore[method-assign]
    loop.end_commit = _timed("end_commit", loop.end_commit)  # type: ignore[method-assign]
    start_commit = producer.TxnProducer.start_commit

    def traced_start_commit(self: Any, offsets: Any, group_metadata: Any) -> Any:
        t0 = time.time()
        started = start_commit(self, offsets, group_metadata)
        if isinstance(started, txn_state.Committing):  # timed until its job is done, on the worker thread
            started.pending.future.add_done_callback(lambda _: EVENTS.append(("on its way", t0, time.time(), 0)))
        return started

    producer.TxnProducer.start_commit = traced_start_commit  # type: ignore[method-assign]
    txn = transaction.Transaction
    txn._flush_changelog = _timed("flush_changelog", txn._flush_changelog)  # type: ignore[method-assign]
    part = partition.PartitionProcessor
    part.after_commit = _timed("after_commit", part.after_commit)  # type: ignore[method-assign]
    call = worker.Worker.call

    def traced_call(self: worker.Worker, fn: Any, bound: float, during: str) -> Any:
        t0 = time.time()
        try:
            return call(self, fn, bound, during)
        finally:
            EVENTS.append((during, t0, time.time(), 0))

    worker.Worker.call = traced_call  # type: ignore[method-assign]
    drain = pacing.Pacing._drain

    async def traced_drain(self: Any) -> None:
        t0 = time.time()
        await drain(self)
        EVENTS.append(("drain", t0, time.time(), 0))

    pacing.Pacing._drain = traced_drain  # type: ignore[method-assign]
    handle = loop._handle

    def traced_handle(self: Any, m: Any) -> None:
        t = time.time()
        last = EVENTS[-1] if EVENTS else None
        if last is not None and last[0] == "read" and t - last[2] < 0.0005:
            EVENTS[-1] = ("read", last[1], t, last[3] + 1)
        else:
            EVENTS.append(("read", t, t, 1))
        handle(self, m)

    loop._handle = traced_handle  # type: ignore[method-assign]
    atexit.register(_dump)
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.time())
        elif started:
            EVENTS.append((f"gc gen{info['generation']}", started.pop(), time.time(), info.get("collected", 0)))

    gc.callbacks.append(on_gc)
    debug = os.environ.get("ONCELY_BENCH_KAFKA_DEBUG")
    if debug:
        rdlog = logging.getLogger("bench.rdkafka")
        rdlog.propagate = False
        rdlog.setLevel(logging.DEBUG)
        handler = logging.FileHandler(os.environ["ONCELY_BENCH_TRACE"] + ".rdkafka")
        handler.setFormatter(logging.Formatter("%(created).4f %(message)s"))
        rdlog.addHandler(handler)
        conf = clients.KafkaClients.producer_conf

        def debugged(self: Any, tid: str) -> dict[str, Any]:
            return {**conf(self, tid), "debug": debug, "logger": rdlog}

        clients.KafkaClients.producer_conf = debugged  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    from oncely.cli import main

    sys.argv = ["oncely", *sys.argv[1:]]
    main()

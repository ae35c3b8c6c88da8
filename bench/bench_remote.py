"""Remote handlers benchmark: the enrichment of `oncely demo` run in-process
and behind an HTTP endpoint on loopback, in one run on one broker.

The remote endpoint is `oncely.examples.remote_enrichment` (aiohttp) in its
own process; the processor runs in this process (a `ProcessorThread`) with
the subscription's target named "customers/add_order". The in-process run
uses the same handler code. Each configuration gets fresh topics and:

- throughput: after a warm-up of `--warmup` orders, `--records` orders are
  produced at once; records/s from the first produce to the last enriched
  record visible to a read_committed consumer;
- latency: orders at `--rate`/s for `--latency-seconds` (after one second
  not measured); p50/p99 from produce to the enriched record visible
  (read_committed).

A first in-process run warms the broker up and is not used. Remote runs
cover max batch 1, 8, 32 and 64 (linger `--linger-ms`), each
unsigned and HMAC-signed. The table gives the ratio to in-process
throughput and the p50 the endpoint adds.

Usage: python bench/bench_remote.py [--records 2000] [--partitions 4]
       [--keys 200] [--rate 30] [--latency-seconds 5] [--batches 1,8,32,64]
       [--bootstrap HOST:PORT]
Without --bootstrap (or ONCELY_KAFKA_BOOTSTRAP) a local broker is started.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

import oncely
from harness import BENCH, Broker, Child, OutputReader, Pacer, fmt, fresh_topics, pct, preload, table, wait_for
from oncely.examples.enrichment import tier
from oncely.runtime import ProcessorThread

SECRET = "bench-remote-secret-of-enough-length"
REPO = BENCH.parent


def inprocess_app(name: str, bootstrap: str, partitions: int, state: str, source: str, out: str) -> oncely.App:
    """The example's handler, defined here (the example reads its topics from
    the environment at import)."""
    app = oncely.App(name, partitions=partitions, bootstrap=bootstrap, state_dir=state)
    customers = app.keyed("customers")
    app.sink(out)

    @customers.handler
    async def add_order(ctx: oncely.KeyedContext, order: dict) -> int:
        total = ctx.get("total", 0) + order["amount"]
        ctx.set("total", total)
        ctx.set("orders", ctx.get("orders", 0) + 1)
        ctx.emit(out, {**order, "running_total": total, "tier": tier(total)}, key=ctx.key,
                 headers={"source": "oncely"})
        return total

    app.subscribe(source, add_order, key=lambda rec: rec.value["customer"], value="json",
                  idempotency="header:Idempotency-Key")
    return app


def remote_app(name: str, bootstrap: str, partitions: int, state: str, source: str, out: str, url: str,
               batch: int, linger: float) -> oncely.App:
    app = oncely.App(name, partitions=partitions, bootstrap=bootstrap, state_dir=state, deployments=[url],
                     remote_max_batch=batch, remote_linger=linger)
    app.sink(out)
    app.subscribe(source, "customers/add_order", key=lambda rec: rec.value["customer"], value="json",
                  idempotency="header:Idempotency-Key")
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """The example endpoint in its own process, emitting to `out`."""

    def __init__(self, name: str, out: str, signed: bool, log: Path) -> None:
        self.port = free_port()
        env = {"ENRICH_APP": name, "ENRICHED_TOPIC": out, "ONCELY_SIGNING_SECRET": SECRET if signed else ""}
        self.child = Child("endpoint", [sys.executable, "-m", "oncely.examples.remote_enrichment", "--port",
                                        str(self.port)], log, env=env, cwd=REPO)
        if not wait_for(lambda: "serving app" in log.read_text(errors="replace"), 30, 0.05):
            raise RuntimeError(f"the endpoint did not start: {self.child.tail()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.child.terminate(10)


def run(bootstrap: str, args: argparse.Namespace, batch: int | None, signed: bool, log: Path) -> dict:
    """One configuration (batch None: in-process): throughput, then latency."""
    name = f"bench-rem-{uuid.uuid4().hex[:8]}"
    source, out = fresh_topics(bootstrap, name, args.partitions, "src", "out")
    state = tempfile.mkdtemp(prefix="oncely-bench-")
    os.environ["ONCELY_SIGNING_SECRET"] = SECRET if signed else ""  # the processor signs when set
    endpoint = None
    if batch is None:
        app = inprocess_app(name, bootstrap, args.partitions, state, source, out)
    else:
        endpoint = Endpoint(name, out, signed, log.parent / f"endpoint-{name}.log")
        app = remote_app(name, bootstrap, args.partitions, state, source, out, endpoint.url, batch,
                         args.linger_ms / 1000)
    lat: list[float] = []
    measure_from = [float("inf")]

    def on_record(now: float, _key: bytes | None, value: bytes) -> None:
        ts = orjson.loads(value)["ts"]
        if ts >= measure_from[0]:
            lat.append(now - ts)

    reader = OutputReader(bootstrap, out, args.partitions, on_record)
    reader.start()
    runner = ProcessorThread(app)
    try:
        runner.start()
        preload(bootstrap, source, args.warmup, args.keys, args.partitions)
        if not wait_for(lambda: reader.count >= args.warmup, 120, 0.05):  # polls cost the processor CPU
            raise RuntimeError(f"warm-up did not finish ({reader.count} of {args.warmup})")
        executor = getattr(runner.processor, "executor", None)
        remote = getattr(executor, "remote", None)
        before = sum(b.requests for b in remote.batchers.values()) if remote else 0
        t0 = time.time()
        preload(bootstrap, source, args.records, args.keys, args.partitions, first=args.warmup)
        total = args.warmup + args.records
        if not wait_for(lambda: reader.count >= total, 600, 0.05):
            raise RuntimeError(f"throughput run did not finish ({reader.count} of {total})")
        rate = args.records / (reader.seen.times[total - 1] - t0)
        requests = sum(b.requests for b in remote.batchers.values()) - before if remote else 0
        # latency: paced, one second not measured
        pacer = Pacer(bootstrap, source, args.keys, args.partitions, args.rate)
        pacer.sent = total  # numbering continues (idempotency keys stay distinct)
        pacer.start()
        time.sleep(1.0)
        measure_from[0] = time.time()
        time.sleep(args.latency_seconds)
        pacer.stop()
        wait_for(lambda: reader.count >= pacer.sent, 60, 0.05)
        if remote:
            requests_lat = sum(b.requests for b in remote.batchers.values()) - requests - before
    finally:
        runner.stop()
        reader.stop()
        if endpoint is not None:
            endpoint.stop()
        shutil.rmtree(state, ignore_errors=True)
    items_per_req = args.records / requests if batch is not None and requests else float("nan")
    return {"rate": rate, "p50": pct(lat, 0.5) * 1000, "p99": pct(lat, 0.99) * 1000, "samples": len(lat),
            "per_request": items_per_req,
            "lat_per_request": (pacer.sent - total) / requests_lat if batch is not None and requests_lat else
            float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--rate", type=int, default=30, help="offered rate of the latency runs (records/s)")
    ap.add_argument("--latency-seconds", type=float, default=5.0)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--linger-ms", type=float, default=2.0)
    ap.add_argument("--bootstrap", default=os.environ.get("ONCELY_KAFKA_BOOTSTRAP"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    broker = Broker(args.bootstrap)
    log = Path(tempfile.mkdtemp(prefix="oncely-bench-remote-")) / "endpoint.log"  # one per run beside it
    try:
        print(f"records={args.records} partitions={args.partitions} keys={args.keys} rate={args.rate}/s "
              f"linger={args.linger_ms} ms bootstrap={broker.bootstrap} (endpoint logs in {log.parent})", flush=True)
        warm = run(broker.bootstrap, args, None, False, log)  # the broker's JVM and coordinators warm up
        print(f"in-process (warm-up, not used): {warm['rate']:.0f}/s p50 {warm['p50']:.1f} ms", flush=True)
        base = run(broker.bootstrap, args, None, False, log)
        print(f"in-process: {base['rate']:.0f}/s p50 {base['p50']:.1f} ms p99 {base['p99']:.1f} ms", flush=True)
        rows = [["in-process", "—", "—", fmt(base["rate"]), "1.00", fmt(base["p50"], 1), fmt(base["p99"], 1), "—",
                 "—"]]
        for batch in [int(b) for b in args.batches.split(",")]:
            for signed in (False, True):
                r = run(broker.bootstrap, args, batch, signed, log)
                row = ["remote", str(batch), "HMAC" if signed else "no", fmt(r["rate"]),
                       f"{r['rate'] / base['rate']:.2f}", fmt(r["p50"], 1), fmt(r["p99"], 1),
                       fmt(r["p50"] - base["p50"], 1), f"{r['per_request']:.1f} / {r['lat_per_request']:.1f}"]
                print("  " + " ".join(row), flush=True)
                rows.append(row)
        print()
        print(table(["handler", "max batch", "signed", "records/s", "× in-process", "p50 ms", "p99 ms",
                     "added p50 ms", "items/request (thr / lat)"], rows))
    finally:
        broker.close()


if __name__ == "__main__":
    main()

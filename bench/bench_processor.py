"""Processor benchmark: oncely's exactly-once counter next to the raw floor.

In one run, on one broker, with the same record count and partitions:

(a) raw floor: a confluent-kafka transactional consume -> produce copy with
    no processing (read_committed, one transaction per 100 ms with
    send_offsets_to_transaction), records/s;
(b) oncely's keyed counter handler, exactly-once, records/s; with net effects
    on (default) and off, and the changelog records each wrote;
(c) the ratio b/a;
(d) latency p50/p99 from a record's produce to its state change being
    committed, at a fixed offered rate below saturation, after a one-second
    warm-up that is not measured;
(e) a subscription (JSON source topic -> keyed counter, with an idempotency
    header, exactly-once) records/s, and e/a;
(f) latency p50/p99 from a source record's produce to its committed state;
(g) the enrichment pipeline (source -> keyed handler with state -> emit to
    an output topic, exactly-once) records/s and g/a;
(h) its latency p50/p99 from source produce to the output record being
    visible to a read_committed consumer;
(i) one-way sends: --records/2 Invokes of a stateless forwarder, each doing
    `ctx.send` to the keyed counter of another service (keys over all
    partitions); records/s = counter invocations completed and committed per
    second, i/a, and the changelog records written; and
(j) a call round trip: a keyed caller handler awaits `ctx.call` to a keyed
    handler of another service on a key of another log partition; p50/p99
    of the time from before the call to its result in the caller, at a
    fixed offered rate of caller Invokes, after a one-second warm-up that is
    not measured. (The clock is read in the handler, not journaled: a
    caller replayed after a crash would be timed twice; none happens here.)

The raw copy runs first (it also warms up the broker's JVM), then the latency
runs (d, f, h, j), on a quiet broker (after the oncely throughput runs it
compacts their changelogs for a while, on the same cores), then the other
throughput runs.

Usage: python bench/bench_processor.py [--records 100000] [--partitions 8]
       [--keys 1000] [--rate 2000] [--latency-seconds 10] [--bootstrap HOST:PORT]
Without --bootstrap (or ONCELY_KAFKA_BOOTSTRAP) a local broker is started.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

import oncely
from oncely.local_kafka import LocalKafka
from oncely.runtime import ProcessorThread
from oncely.kafka_io import create_topic, read_to_end
from oncely.shuffle.routing import partition_for
from rawcopy import transactional_copy


def raw_copy(bootstrap: str, records: int, partitions: int) -> float:
    """Transactional consume->produce copy of `records` records; records/s."""
    src = f"bench-src-{uuid.uuid4().hex[:8]}"
    dst = f"bench-dst-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, src, partitions)
    create_topic(bootstrap, dst, partitions)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    payload = b'{"amount": 1}'
    for i in range(records):
        while True:
            try:
                p.produce(src, key=f"key-{i % 1000}".encode(), value=payload)
                break
            except BufferError:
                p.poll(0.01)
    p.flush()
    elapsed = transactional_copy(bootstrap, src, dst, f"bench-raw-{uuid.uuid4().hex[:8]}", records)
    return records / elapsed


def counter_app(name: str, bootstrap: str, partitions: int, state_dir: str, net_effects: bool) -> oncely.App:
    app = oncely.App(name, partitions=partitions, bootstrap=bootstrap, state_dir=state_dir)
    app.config.net_effects = net_effects
    counter = app.keyed("counter")

    @counter.handler
    async def add(ctx: oncely.Context, amount: int) -> int:
        n = ctx.get("n", 0) + amount
        ctx.set("n", n)
        return n

    return app


class Running(ProcessorThread):
    """A processor thread that has its partitions, with benchmark timings."""

    def start(self, timeout: float = 60.0) -> "Running":
        super().start(timeout)
        while not self.processor.partitions:
            time.sleep(0.01)
        return self

    def completed(self) -> int:
        return sum(p.stats.completed for p in list(self.processor.partitions.values()))

    def time_until_committed(self, records: int) -> float:
        """Start, wait until `records` invocations completed and the commit
        that makes the last one durable returned; the elapsed seconds."""
        t0 = time.monotonic()
        self.start()
        while self.completed() < records:
            time.sleep(0.005)
        commits = self.processor.commits
        while self.processor.commits == commits:
            time.sleep(0.001)
        elapsed = time.monotonic() - t0
        self.stop()
        return elapsed


def oncely_counter(bootstrap: str, records: int, partitions: int, keys: int, net_effects: bool) -> tuple[float, int]:
    """Pre-load `records` Invokes, then time the processor; (records/s, changelog records)."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    state = tempfile.mkdtemp(prefix="oncely-bench-")
    app = counter_app(name, bootstrap, partitions, state, net_effects)
    runner = Running(app).start()  # creates the topics; nothing to process yet
    client = oncely.Client(bootstrap, app=name)
    runner.stop()
    for i in range(records):
        client.send("counter", f"key-{i % keys}", "add", 1)
    client.flush()
    elapsed = Running(counter_app(name, bootstrap, partitions, state, net_effects)).time_until_committed(records)
    changelog = len(read_to_end(bootstrap, f"{name}.changelog"))
    shutil.rmtree(state, ignore_errors=True)
    return records / elapsed, changelog


def latency(bootstrap: str, partitions: int, keys: int, rate: int, seconds: float) -> list[float]:
    """Produce at `rate`/s; latency from produce to the commit of its state change."""
    name = f"bench-lat-{uuid.uuid4().hex[:8]}"
    state = tempfile.mkdtemp(prefix="oncely-bench-")
    app = oncely.App(name, partitions=partitions, bootstrap=bootstrap, state_dir=state)
    counter = app.keyed("counter")
    done_since_commit: list[float] = []
    samples: list[float] = []

    @counter.handler
    async def add(ctx: oncely.Context, sent_at: float) -> None:
        ctx.set("n", ctx.get("n", 0) + 1)
        done_since_commit.append(sent_at)

    runner = Running(app).start()

    measure_from = [float("inf")]

    def committed() -> None:
        now = time.time()
        samples.extend(now - t for t in done_since_commit if t >= measure_from[0])
        done_since_commit.clear()

    runner.processor.on_commit = committed
    client = oncely.Client(bootstrap, app=name)
    for i in range(rate):  # one second of warm-up, not measured
        client.send("counter", f"key-{i % keys}", "add", time.time())
        time.sleep(1 / rate)
    client.flush()
    measure_from[0] = time.time()
    n = int(rate * seconds)
    t0 = time.monotonic()
    for i in range(n):
        target = t0 + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        client.send("counter", f"key-{i % keys}", "add", time.time())
    client.flush()
    return _collect(samples, n, runner, state)


def subscription_app(name: str, bootstrap: str, partitions: int, state_dir: str, source: str,
                     sink: list[float] | None = None) -> oncely.App:
    app = oncely.App(name, partitions=partitions, bootstrap=bootstrap, state_dir=state_dir)
    counter = app.keyed("counter")

    @counter.handler
    async def add(ctx: oncely.Context, order: dict) -> None:
        ctx.set("n", ctx.get("n", 0) + order["amount"])
        if sink is not None:
            sink.append(order["sent_at"])

    app.subscribe(source, add, key=lambda rec: rec.value["customer"], idempotency="header:Idempotency-Key")
    return app


def _produce_orders(bootstrap: str, source: str, n: int, keys: int, rate: float | None = None,
                    first: int = 0, producer: Producer | None = None) -> None:
    p = producer or Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    t0 = time.monotonic()
    for i in range(n):
        if rate:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        body = b'{"customer": "c%d", "amount": 1, "sent_at": %f}' % (i % keys, time.time())
        while True:
            try:
                p.produce(source, key=b"c%d" % (i % keys), value=body,
                          headers=[("Idempotency-Key", b"o%d" % (first + i))])
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    p.flush()


def subscription(bootstrap: str, records: int, partitions: int, keys: int) -> float:
    """Pre-load the source topic, then time source -> committed state; records/s."""
    name = f"bench-sub-{uuid.uuid4().hex[:8]}"
    source = f"{name}-src"
    create_topic(bootstrap, source, partitions)
    _produce_orders(bootstrap, source, records, keys)
    state = tempfile.mkdtemp(prefix="oncely-bench-")
    elapsed = Running(subscription_app(name, bootstrap, partitions, state, source)).time_until_committed(records)
    shutil.rmtree(state, ignore_errors=True)
    return records / elapsed


def subscription_latency(bootstrap: str, partitions: int, keys: int, rate: int, seconds: float) -> list[float]:
    name = f"bench-sublat-{uuid.uuid4().hex[:8]}"
    source = f"{name}-src"
    create_topic(bootstrap, source, partitions)
    state = tempfile.mkdtemp(prefix="oncely-bench-")
    done: list[float] = []
    samples: list[float] = []
    runner = Running(subscription_app(name, bootstrap, partitions, state, source, done)).start()

    measure_from = [float("inf")]

    def committed() -> None:
        now = time.time()
        samples.extend(now - t for t in done if t >= measure_from[0])
        done.clear()

    runner.processor.on_commit = committed
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    _produce_orders(bootstrap, source, rate, keys, rate, first=10**9, producer=producer)  # warm-up
    measure_from[0] = time.time()
    n = int(rate * seconds)
    _produce_orders(bootstrap, source, n, keys, rate, producer=producer)
    return _collect(samples, n, runner, state)


def enrichment_app(name: str, bootstrap: str, partitions: int, state_dir: str, source: str,
                   out: str) -> oncely.App:
    app = oncely.App(name, partitions=partitions, bootstrap=bootstrap, state_dir=state_dir)
    customers = app.keyed("customers")
    app.sink(out)

    @customers.handler
    async def enrich(ctx: oncely.Context, order: dict) -> None:
        total = ctx.get("total", 0) + order["amount"]
        ctx.set("total", total)
        ctx.emit(out, {**order, "running_total": total}, key=ctx.key)

    app.subscribe(source, enrich, key=lambda rec: rec.value["customer"], idempotency="header:Idempotency-Key")
    return app


def enrichment(bootstrap: str, records: int, partitions: int, keys: int) -> float:
    name = f"bench-enr-{uuid.uuid4().hex[:8]}"
    source, out = f"{name}-src", f"{name}-out"
    create_topic(bootstrap, source, partitions)
    create_topic(bootstrap, out, partitions)
    _produce_orders(bootstrap, source, records, keys)
    state = tempfile.mkdtemp(prefix="oncely-bench-")
    elapsed = Running(enrichment_app(name, bootstrap, partitions, state, source, out)).time_until_committed(records)
    shutil.rmtree(state, ignore_errors=True)
    return records / elapsed


def enrichment_latency(bootstrap: str, partitions: int, keys: int, rate: int, seconds: float) -> list[float]:
    """Source produce -> enriched record read by a read_committed consumer."""
    import orjson

    name = f"bench-enrlat-{uuid.uuid4().hex[:8]}"
    source, out = f"{name}-src", f"{name}-out"
    create_topic(bootstrap, source, partitions)
    create_topic(bootstrap, out, partitions)
    state = tempfile.mkdtemp(prefix="oncely-bench-")
    runner = Running(enrichment_app(name, bootstrap, partitions, state, source, out)).start()
    samples: list[float] = []
    stop = threading.Event()
    measure_from = [float("inf")]

    def read() -> None:
        # Assigned, not subscribed: no group join delays the first reads.
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{name}-reader",
                      "isolation.level": "read_committed", "fetch.wait.max.ms": 10})
        c.assign([TopicPartition(out, q, 0) for q in range(partitions)])
        while not stop.is_set():
            for m in c.consume(500, 0.05):
                if m.error() is None:
                    sent = orjson.loads(m.value())["sent_at"]
                    if sent >= measure_from[0]:
                        samples.append(time.time() - sent)
        c.close()

    reader = threading.Thread(target=read)
    reader.start()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    _produce_orders(bootstrap, source, rate, keys, rate, first=10**9, producer=producer)  # warm-up
    measure_from[0] = time.time()
    n = int(rate * seconds)
    _produce_orders(bootstrap, source, n, keys, rate, producer=producer)
    deadline = time.monotonic() + 30
    while len(samples) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    reader.join()
    runner.stop()
    shutil.rmtree(state, ignore_errors=True)
    return samples


def send_app(name: str, bootstrap: str, partitions: int, state_dir: str, callee_runs: list[int]) -> oncely.App:
    app = oncely.App(name, partitions=partitions, bootstrap=bootstrap, state_dir=state_dir)
    counter = app.keyed("counter")
    forwarder = app.service("forwarder")

    @counter.handler
    async def add(ctx: oncely.Context, amount: int) -> int:
        n = ctx.get("n", 0) + amount
        ctx.set("n", n)
        callee_runs[0] += 1
        return n

    @forwarder.handler
    async def forward(ctx: oncely.Context, msg: dict) -> None:
        ctx.send(add, msg["key"], msg["amount"])

    return app


def sends(bootstrap: str, records: int, partitions: int, keys: int) -> tuple[float, int]:
    """Pre-load `records` Invokes of the forwarder, then time until each has
    sent one Invoke, the counter has completed them all, and the commit after
    the last one returned; (callee invocations/s, changelog records)."""
    name = f"bench-send-{uuid.uuid4().hex[:8]}"
    state = tempfile.mkdtemp(prefix="oncely-bench-")
    runs = [0]
    app = send_app(name, bootstrap, partitions, state, runs)
    Running(app).start().stop()  # creates the topics; nothing to process yet
    client = oncely.Client(bootstrap, app=name)
    for i in range(records):
        client.send("forwarder", None, "forward", {"key": f"key-{i % keys}", "amount": 1})
    client.flush()
    runs[0] = 0
    runner = Running(send_app(name, bootstrap, partitions, state, runs))
    elapsed = runner.time_until_committed(2 * records)  # the forwarders' invocations and the counters'
    changelog = len(read_to_end(bootstrap, f"{name}.changelog"))
    shutil.rmtree(state, ignore_errors=True)
    if runs[0] != records:
        raise RuntimeError(f"(i): {runs[0]} counter invocations ran for {records} sends")
    return records / elapsed, changelog


def call_pairs(keys: int, partitions: int) -> list[tuple[str, str]]:
    """(caller key, callee key) for each of `keys` callers, the callee's key
    on another log partition than the caller's."""
    def part(k: str) -> int:
        return partition_for(k.encode(), partitions)

    pairs = []
    for j in range(keys):
        caller = f"key-{j}"
        m = 1
        while part(f"key-{(j + m) % keys}") == part(caller):
            m += 1
        pairs.append((caller, f"key-{(j + m) % keys}"))
    return pairs


def call_latency(bootstrap: str, partitions: int, keys: int, rate: int, seconds: float) -> list[float]:
    """Offer caller Invokes at `rate`/s; each caller times `await ctx.call` to
    a key on another partition, in the handler."""
    name = f"bench-call-{uuid.uuid4().hex[:8]}"
    state = tempfile.mkdtemp(prefix="oncely-bench-")
    app = oncely.App(name, partitions=partitions, bootstrap=bootstrap, state_dir=state)
    callee = app.keyed("callee")
    caller = app.keyed("caller")
    samples: list[float] = []

    @callee.handler
    async def add(ctx: oncely.Context, amount: int) -> int:
        n = ctx.get("n", 0) + amount
        ctx.set("n", n)
        return n

    @caller.handler
    async def ask(ctx: oncely.Context, req: dict) -> None:
        t0 = time.perf_counter()  # not journaled: a bench handler, never replayed here
        await ctx.call(add, req["other"], 1)
        if req["measured"]:
            samples.append(time.perf_counter() - t0)

    runner = Running(app).start()
    pairs = call_pairs(keys, partitions)
    client = oncely.Client(bootstrap, app=name)

    def offer(n: int, measured: bool) -> None:
        t0 = time.monotonic()
        for i in range(n):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            me, other = pairs[i % keys]
            client.send(ask, me, {"other": other, "measured": measured})
        client.flush()

    offer(rate, False)  # one second of warm-up, not measured
    n = int(rate * seconds)
    offer(n, True)
    return _collect(samples, n, runner, state)


def _collect(samples: list[float], n: int, runner: ProcessorThread, state: str) -> list[float]:
    """Wait (up to 30 s) for `n` samples, then stop the processor."""
    deadline = time.monotonic() + 30
    while len(samples) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    runner.stop()
    shutil.rmtree(state, ignore_errors=True)
    return samples


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=2000, help="offered rate for the latency run (records/s)")
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--bootstrap", default=os.environ.get("ONCELY_KAFKA_BOOTSTRAP"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        broker = LocalKafka(data_dir=tempfile.mkdtemp(prefix="oncely-bench-kafka-"))
        bootstrap = broker.start().bootstrap
    try:
        print(f"records={args.records} partitions={args.partitions} keys={args.keys} bootstrap={bootstrap}")
        # The raw copy first: it also warms up the broker's JVM. Then the
        # latencies, on a warm but quiet broker (after the oncely throughput
        # runs it compacts their changelogs for a while, on the same cores).
        raw = raw_copy(bootstrap, args.records, args.partitions)
        lat = latency(bootstrap, args.partitions, args.keys, args.rate, args.latency_seconds)
        slat = subscription_latency(bootstrap, args.partitions, args.keys, args.rate, args.latency_seconds)
        elat = enrichment_latency(bootstrap, args.partitions, args.keys, args.rate, args.latency_seconds)
        clat = call_latency(bootstrap, args.partitions, args.keys, args.rate, args.latency_seconds)
        print(f"(a) raw transactional copy           {raw:10.0f} records/s")
        on, on_cl = oncely_counter(bootstrap, args.records, args.partitions, args.keys, net_effects=True)
        print(f"(b) oncely counter, net effects on   {on:10.0f} records/s   changelog records {on_cl}")
        off, off_cl = oncely_counter(bootstrap, args.records, args.partitions, args.keys, net_effects=False)
        print(f"    oncely counter, net effects off  {off:10.0f} records/s   changelog records {off_cl}")
        print(f"(c) ratio b/a                        {on / raw:10.2f}   (net effects off: {off / raw:.2f})")
        print(f"(d) produce -> committed state at {args.rate}/s: p50 {pct(lat, 0.5) * 1000:.1f} ms, "
              f"p99 {pct(lat, 0.99) * 1000:.1f} ms ({len(lat)} samples)")
        sub = subscription(bootstrap, args.records, args.partitions, args.keys)
        print(f"(e) subscription -> keyed counter      {sub:10.0f} records/s   e/a {sub / raw:.2f}")
        print(f"(f) source produce -> committed state at {args.rate}/s: p50 {pct(slat, 0.5) * 1000:.1f} ms, "
              f"p99 {pct(slat, 0.99) * 1000:.1f} ms ({len(slat)} samples)")
        enr = enrichment(bootstrap, args.records, args.partitions, args.keys)
        print(f"(g) enrichment source -> state -> emit {enr:10.0f} records/s   g/a {enr / raw:.2f}")
        print(f"(h) source produce -> output visible (read_committed) at {args.rate}/s: "
              f"p50 {pct(elat, 0.5) * 1000:.1f} ms, p99 {pct(elat, 0.99) * 1000:.1f} ms ({len(elat)} samples)")
        sent, sent_cl = sends(bootstrap, args.records // 2, args.partitions, args.keys)
        print(f"(i) ctx.send forwarder -> keyed counter {sent:9.0f} records/s   i/a {sent / raw:.2f}   "
              f"({args.records // 2} sends, changelog records {sent_cl})")
        print(f"(j) ctx.call round trip to another partition at {args.rate} calls/s: "
              f"p50 {pct(clat, 0.5) * 1000:.1f} ms, p99 {pct(clat, 0.99) * 1000:.1f} ms "
              f"({len(clat)} samples of {int(args.rate * args.latency_seconds)} calls)")
    finally:
        if broker:
            broker.stop()
            shutil.rmtree(broker.data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""What `--metrics` costs: the exactly-once keyed counter of
bench_processor.py, with metrics off and on, in one run on one broker.

Each round pre-loads `--records` Invokes for a fresh app and times its
processor from start until every invocation is completed and committed,
once without metrics and once with `--metrics` while a scraper reads
/metrics every `--scrape-every` seconds (Prometheus scrapes every 10-15 s:
this is harsher). Rounds alternate which goes first; the medians are
compared. Goal: at most 5 % fewer records/s with metrics on. The CPU time
of this process (the processor thread and librdkafka's threads) per record
is shown too: on a machine shared with other work it is the steadier
figure. Last, what the hooks cost alone per invocation (timed in a loop,
no Kafka), and what one scrape costs the event loop.

Usage: python bench/bench_metrics.py [--records 100000] [--rounds 3]
       [--partitions 8] [--keys 1000] [--scrape-every 1] [--bootstrap HOST:PORT]
Without --bootstrap (or ONCELY_KAFKA_BOOTSTRAP) a local broker is started.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
import uuid

import oncely
from bench_processor import Running, counter_app
from oncely.local_kafka import LocalKafka


def timed_run(bootstrap: str, records: int, partitions: int, keys: int, metrics: bool,
              scrape_every: float) -> tuple[float, float, int]:
    """(records/s, CPU µs per record, scrapes made) for one fresh app."""
    name = f"benchm-{uuid.uuid4().hex[:8]}"
    state = tempfile.mkdtemp(prefix="oncely-benchm-")
    Running(counter_app(name, bootstrap, partitions, state, True)).start().stop()  # topics
    client = oncely.Client(bootstrap, app=name)
    for i in range(records):
        client.send("counter", f"key-{i % keys}", "add", 1)
    client.flush()
    client.close()
    runner = Running(counter_app(name, bootstrap, partitions, state, True),
                     metrics="127.0.0.1:0" if metrics else None)
    scrapes = [0]
    done = threading.Event()

    def scrape() -> None:
        while not done.wait(scrape_every):
            try:
                with urllib.request.urlopen(runner.metrics_url, timeout=10) as resp:
                    resp.read()
                scrapes[0] += 1
            except Exception as e:  # the bench goes on; the count shows it
                print(f"scrape failed: {e}")

    t0, cpu0 = time.monotonic(), time.process_time()
    runner.start()
    scraper = threading.Thread(target=scrape, daemon=True)
    if metrics:
        scraper.start()
    while runner.completed() < records:
        time.sleep(0.005)
    commits = runner.processor.commits
    while runner.processor.commits == commits:
        time.sleep(0.001)
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    done.set()
    if metrics:
        print(f"  one scrape costs the loop {scrape_cost(runner):.2f} ms")
    runner.stop()
    shutil.rmtree(state, ignore_errors=True)
    return records / elapsed, cpu / records * 1e6, scrapes[0]


def hook_cost(n: int = 200_000) -> float:
    """µs of metric hooks per completed invocation (start, end, outcome, and
    its share of a commit of 1000)."""
    from oncely.observe.metrics import COMPLETED, Metrics

    class Inv:
        started = 0.0
        invoke = {"service": "counter", "handler": "add", "source": None, "created_at_ms": int(time.time() * 1000)}

    m, inv = Metrics(), Inv()
    t0 = time.perf_counter()
    for i in range(n):
        m.started(inv)
        m.attempt_ended(inv)
        m.outcome(inv, COMPLETED)
        if i % 1000 == 999:
            m.committed(0.01, 1000)
    return (time.perf_counter() - t0) / n * 1e6


def scrape_cost(runner: Running) -> float:
    """ms the event loop spends on one scrape's collect and encoding."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from oncely.observe.collector import ProcessorCollector

    server = runner.metrics_server
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProcessorCollector(runner.processor, server.metrics, server.lag))

    def timed() -> float:
        t0 = time.perf_counter()
        generate_latest(registry)
        return (time.perf_counter() - t0) * 1000

    return min(runner.on_loop(timed) for _ in range(5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--scrape-every", type=float, default=1.0)
    ap.add_argument("--bootstrap", default=os.environ.get("ONCELY_KAFKA_BOOTSTRAP"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        broker = LocalKafka(data_dir=tempfile.mkdtemp(prefix="oncely-benchm-kafka-"))
        bootstrap = broker.start().bootstrap
    try:
        print(f"records={args.records} rounds={args.rounds} partitions={args.partitions} keys={args.keys} "
              f"scrape every {args.scrape_every} s, bootstrap={bootstrap}")
        timed_run(bootstrap, min(args.records, 5000), args.partitions, args.keys, False, 1.0)  # warm-up
        off: list[float] = []
        on: list[float] = []
        cpu_off: list[float] = []
        cpu_on: list[float] = []
        for r in range(args.rounds):
            for metrics in ((False, True) if r % 2 == 0 else (True, False)):
                rate, cpu, scrapes = timed_run(bootstrap, args.records, args.partitions, args.keys, metrics,
                                               args.scrape_every)
                (on if metrics else off).append(rate)
                (cpu_on if metrics else cpu_off).append(cpu)
                print(f"round {r + 1}: metrics {'on ' if metrics else 'off'} {rate:9.0f} records/s  "
                      f"{cpu:6.0f} CPU µs/record" + (f"  ({scrapes} scrapes)" if metrics else ""))
        m_off, m_on = statistics.median(off), statistics.median(on)
        c_off, c_on = statistics.median(cpu_off), statistics.median(cpu_on)
        print(f"median: metrics off {m_off:.0f} records/s, on {m_on:.0f} records/s: "
              f"{(m_off - m_on) / m_off * 100:+.1f} % fewer records/s with metrics")
        print(f"median: metrics off {c_off:.0f} CPU µs/record, on {c_on:.0f}: "
              f"{(c_on - c_off) / c_off * 100:+.1f} % more CPU per record with metrics")
        print(f"hooks alone: {hook_cost():.2f} µs per completed invocation")
    finally:
        if broker:
            broker.stop()
            shutil.rmtree(broker.data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

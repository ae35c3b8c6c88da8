"""`oncely demo`: a subscription, exactly once, shown by killing the processor.

Orders arrive on a Kafka topic (10 % of them sent twice with the same
Idempotency-Key, a few malformed). The app below subscribes a keyed
`customers.add_order` handler to the topic, keyed by the customer, and keeps
a running total per customer. The demo runs the app in a separate
`oncely run` process, kills it with SIGKILL twice in the middle of the stream
and restarts it, then reads the committed state and the dead letters back and
checks every customer's total against the distinct orders sent.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from typing import Callable

import orjson

import oncely

app = oncely.App(os.environ.get("ONCELY_DEMO_APP", "oncely-demo"), partitions=8)
customers = app.keyed("customers")


@customers.handler
async def add_order(ctx: oncely.Context, order: dict) -> int:
    """Add an order to its customer's running total."""
    total = ctx.get("total", 0) + order["amount"]
    ctx.set("total", total)
    ctx.set("orders", ctx.get("orders", 0) + 1)
    return total


app.subscribe(
    os.environ.get("ONCELY_DEMO_TOPIC", "orders"),
    add_order,
    key=lambda rec: rec.value["customer"],
    value="json",
    idempotency="header:Idempotency-Key",
)


def _sample(n: int, customers_n: int, rng: random.Random) -> tuple[list[tuple], dict, dict, int, int]:
    """(records, totals, counts, duplicates, malformed) of a sample stream."""
    records: list[tuple] = []
    totals: dict[bytes, int] = defaultdict(int)
    counts: dict[bytes, int] = defaultdict(int)
    sent: list[tuple] = []
    dups = bad = 0
    for i in range(n):
        cust = f"customer-{rng.randrange(customers_n)}"
        order = {"id": f"order-{i}", "customer": cust, "amount": rng.randint(1, 100)}
        rec = (cust.encode(), orjson.dumps(order), [("Idempotency-Key", order["id"].encode())])
        records.append(rec)
        sent.append(rec)
        totals[cust.encode()] += order["amount"]
        counts[cust.encode()] += 1
        if rng.random() < 0.1:          # a retrying producer sends it again, now or later
            records.insert(rng.randrange(max(0, len(records) - 500), len(records) + 1), rec)
            dups += 1
        if i % (n // 5 or 1) == 0:      # malformed: broken JSON, or no customer to key by
            records.append((b"x", b'{"id": "broken", "amount": ', []))
            records.append((b"y", orjson.dumps({"id": f"nocust-{i}", "amount": 3}), []))
            bad += 2
    return records, totals, counts, dups, bad


def run_demo(bootstrap: str | None, records_n: int, customers_n: int, kills: int,
             echo: Callable[[str], None]) -> bool:
    from confluent_kafka import Producer

    from oncely.admin import read_state
    from oncely.local_kafka import LocalKafka
    from oncely.testing import create_topic, read_to_end

    broker = None
    if not bootstrap:
        local = LocalKafka()
        if local.status() is None:
            echo("starting a local Apache Kafka broker (as `oncely kafka start` would)...")
            broker = local
        bootstrap = local.start().bootstrap
    name = f"demo-{uuid.uuid4().hex[:8]}"
    topic = f"{name}-orders"
    state_dir = tempfile.mkdtemp(prefix="oncely-demo-")
    log_path = os.path.join(tempfile.gettempdir(), f"oncely-{name}.log")
    env = {**os.environ, "ONCELY_DEMO_APP": name, "ONCELY_DEMO_TOPIC": topic, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "oncely.cli", "run", "oncely.demo:app", "--bootstrap", bootstrap,
           "--state-dir", state_dir]

    def start() -> subprocess.Popen:
        with open(log_path, "a") as log:
            return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    proc = None
    try:
        create_topic(bootstrap, topic, 3)
        echo(f"app {name!r} subscribes customers/add_order to topic {topic!r} (3 partitions) on {bootstrap}")
        echo(f"processor log: {log_path}")
        proc = start()
        rng = random.Random()
        records, totals, counts, dups, bad = _sample(records_n, customers_n, rng)
        producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
        t0 = time.monotonic()
        chunks = 10
        kill_after = {round(chunks * (i + 1) / (kills + 1)) - 1 for i in range(kills)}
        step = len(records) // chunks + 1
        for c in range(chunks):
            for key, value, headers in records[c * step:(c + 1) * step]:
                while True:
                    try:
                        producer.produce(topic, key=key, value=value, headers=headers)
                        break
                    except BufferError:
                        producer.poll(0.05)
            producer.flush(60)
            if c in kill_after:
                time.sleep(rng.uniform(1.0, 2.0))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                echo(f"  kill -9 the processor after {min(len(records), (c + 1) * step)} records; restarting it")
                proc = start()
        echo(f"produced {len(records)} records: {records_n} orders, {dups} duplicates, {bad} malformed; "
             "waiting for the processor...")
        deadline = time.monotonic() + 300
        got_totals: dict = {}
        got_counts: dict = {}
        while time.monotonic() < deadline:
            try:
                state = read_state(bootstrap, name)
            except ValueError:  # the changelog does not exist yet
                state = {}
            got_totals = {k: v for (_, k, n), v in state.items() if n == "total"}
            got_counts = {k: v for (_, k, n), v in state.items() if n == "orders"}
            if got_totals == totals and got_counts == counts:
                break
            time.sleep(1.0)
        elapsed = time.monotonic() - t0
        dead = read_to_end(bootstrap, f"{name}.dlq")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        missing = sum(max(0, counts[k] - got_counts.get(k, 0)) for k in counts)
        doubled = sum(max(0, got_counts.get(k, 0) - counts[k]) for k in counts)
        wrong = sum(1 for k in totals if got_totals.get(k) != totals[k])
        echo("")
        echo("customer        orders  total sent  total committed")
        for k in sorted(totals, key=lambda k: -counts[k])[:5]:
            echo(f"{k.decode():<15} {counts[k]:>6}  {totals[k]:>10}  {got_totals.get(k, 0):>15}")
        reasons = Counter(d.header("oncely.reason").decode() for d in dead)
        echo("")
        echo(f"dead letters in {name}.dlq: {len(dead)} ({', '.join(f'{r}: {n}' for r, n in sorted(reasons.items()))})")
        if dead:
            d = dead[0]
            echo(f"  e.g. {d.header('oncely.source.topic').decode()}[{d.header('oncely.source.partition').decode()}]"
                 f"@{d.header('oncely.source.offset').decode()}: {d.header('oncely.error').decode()}")
        echo(f"processor killed {kills} times; {len(records)} records in {elapsed:.1f} s")
        ok = missing == doubled == wrong == 0 and len(dead) == bad
        echo(f"exactly-once check (read_committed): orders missing {missing}, counted twice {doubled} "
             f"(of {dups} duplicates sent), wrong totals {wrong} of {len(totals)} customers, dead letters "
             f"{len(dead)} of {bad} malformed -> {'OK' if ok else 'FAILED'}")
        if ok:
            os.unlink(log_path)
        return ok
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(state_dir, ignore_errors=True)
        if broker is not None:
            broker.stop()

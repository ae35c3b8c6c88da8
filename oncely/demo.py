"""`oncely demo`: the order enrichment example, exactly once, shown by
killing the processor.

Orders arrive on a Kafka topic (about 10 % of them sent twice with the same
Idempotency-Key, a few malformed). `oncely.examples.enrichment` subscribes a
keyed `customers.add_order` handler to the topic; it keeps each customer's
running total and emits every order, enriched with that total and a tier, to
an output topic. The demo runs the app in a separate `oncely run` process,
kills it with SIGKILL twice in the middle of the stream and restarts it, then
reads the output topic (read_committed), the state and the dead letters, and
checks them against a sequential computation over the distinct orders.

`--remote` runs the same handler behind an HTTP endpoint
(`oncely.examples.remote_enrichment`, aiohttp, HMAC-signed requests) in a
process of its own; the processor runs only the subscription and applies
what the endpoint answers. At each kill point both are killed -9 (the
endpoint first, mid-request) and restarted; the checks are the same.
"""

from __future__ import annotations

import os
import random
import secrets
import select
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

from oncely.examples.enrichment import tier


def _sample(n: int, customers_n: int, rng: random.Random) -> tuple[list[tuple], dict, dict, int, int]:
    """(records, totals, counts, duplicates, malformed) of a sample stream."""
    records: list[tuple] = []
    totals: dict[bytes, int] = defaultdict(int)
    counts: dict[bytes, int] = defaultdict(int)
    dups = bad = 0
    for i in range(n):
        cust = f"customer-{rng.randrange(customers_n)}"
        order = {"id": f"order-{i}", "customer": cust, "amount": rng.randint(1, 100)}
        rec = (cust.encode(), orjson.dumps(order), [("Idempotency-Key", order["id"].encode())])
        records.append(rec)
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


def _sequential(records: list[tuple]) -> dict[str, tuple[int, str]]:
    """order id -> (running total, tier) as one process would compute them:
    each customer's orders in the order sent (one customer's orders share a
    source partition), the first copy of a duplicate counted, bad ones skipped."""
    seen: set[str] = set()
    running: dict[str, int] = defaultdict(int)
    out = {}
    for _key, value, headers in records:
        try:
            order = orjson.loads(value)
            customer = order["customer"]
        except (orjson.JSONDecodeError, KeyError):
            continue
        if order["id"] in seen:
            continue
        seen.add(order["id"])
        running[customer] += order["amount"]
        out[order["id"]] = (running[customer], tier(running[customer]))
    return out


def _produce_killing(bootstrap: str, topic: str, records: list[tuple], kills: int, rng: random.Random,
                     restart: Callable[[], None], echo: Callable[[str], None], what: str) -> None:
    """Produce the records in ten chunks, killing the processor -9 after
    `kills` of them (`restart` kills and starts it again). The producer is
    gone when this returns, so it says nothing when the broker stops."""
    from confluent_kafka import Producer

    from oncely.logs import kafka_conf_logging

    producer = Producer({**kafka_conf_logging(), "bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "linger.ms": 5})
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
            restart()
            echo(f"  kill -9 {what} after {min(len(records), (c + 1) * step)} records; restarting")


class _Endpoint:
    """`python -m oncely.examples.remote_enrichment` in its own process; it
    comes back on the same port after a kill -9."""

    def __init__(self, env: dict[str, str], log_path: str) -> None:
        self.env = env
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "oncely.examples.remote_enrichment", "--port",
                                          str(self.port)], env=self.env, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        end = time.monotonic() + 60
        while time.monotonic() < end and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline().decode()
                if " on http://" in line:
                    self.port = int(line.split(" on http://", 1)[1].split()[0].rsplit(":", 1)[1])
                    return
        raise RuntimeError(f"the endpoint did not start; see {self.log_path}")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def run_demo(bootstrap: str | None, records_n: int, customers_n: int, kills: int,
             echo: Callable[[str], None], remote: bool = False) -> bool:
    from oncely.admin import read_state
    from oncely.errors import ConfigError
    from oncely.kafka_io import create_topic, read_to_end
    from oncely.local_kafka import KAFKA_VERSION, LocalKafka, check_java

    broker = None
    if not bootstrap:
        local = LocalKafka()
        if local.status() is None:
            if not local.jars_cached():
                check_java()
                echo(f"downloading Apache Kafka {KAFKA_VERSION} (first run only)...")
            echo("starting a local Apache Kafka broker (as `oncely kafka start` would)...")
            broker = local
        bootstrap = local.start().bootstrap
    name = f"demo-{uuid.uuid4().hex[:8]}"
    topic, enriched = f"{name}-orders", f"{name}-enriched-orders"
    state_dir = tempfile.mkdtemp(prefix="oncely-demo-")
    log_path = os.path.join(tempfile.gettempdir(), f"oncely-{name}.log")
    env = {**os.environ, "ENRICH_APP": name, "ORDERS_TOPIC": topic, "ENRICHED_TOPIC": enriched,
           "PYTHONUNBUFFERED": "1"}
    spec = "oncely.examples.remote_enrichment:processor" if remote else "oncely.examples.enrichment:app"
    cmd = [sys.executable, "-m", "oncely", "run", spec, "--bootstrap", bootstrap, "--state-dir", state_dir]
    endpoint = None
    if remote:
        env["ONCELY_SIGNING_SECRET"] = secrets.token_urlsafe(32)  # the processor signs, the endpoint checks
        endpoint = _Endpoint(dict(env), os.path.join(tempfile.gettempdir(), f"oncely-{name}-endpoint.log"))

    def start() -> subprocess.Popen:
        with open(log_path, "a") as log:
            return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    proc = None
    try:
        create_topic(bootstrap, topic, 3)
        create_topic(bootstrap, enriched, 3)
        echo(f"app {name!r} (oncely.examples.enrichment): {topic!r} -> customers/add_order -> {enriched!r}, "
             f"on {bootstrap}")
        if endpoint is not None:
            endpoint.start()
            env["ONCELY_DEPLOYMENTS"] = endpoint.url
            echo(f"handler behind an HTTP endpoint at {endpoint.url} (oncely.examples.remote_enrichment, "
                 f"signed requests); endpoint log: {endpoint.log_path}")
        echo(f"processor log: {log_path}")
        proc = start()
        rng = random.Random()
        records, totals, counts, dups, bad = _sample(records_n, customers_n, rng)
        t0 = time.monotonic()

        def restart() -> None:
            nonlocal proc
            if endpoint is not None:  # mid-request: the processor retries without counting an attempt
                endpoint.kill9()
                time.sleep(0.5)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if endpoint is not None:
                endpoint.start()  # first: the processor discovers it at start
            proc = start()

        _produce_killing(bootstrap, topic, records, kills, rng, restart, echo,
                         "the endpoint and the processor" if remote else "the processor")
        echo(f"produced {len(records)} records: {records_n} orders, {dups} duplicates, {bad} malformed; "
             "waiting for the processor...")
        deadline = time.monotonic() + 300
        got_totals: dict = {}
        got_counts: dict = {}
        while time.monotonic() < deadline:
            try:
                state = read_state(bootstrap, name)
            except ConfigError:  # the changelog does not exist yet
                state = {}
            got_totals = {k: v for (_, k, n), v in state.items() if n == "total"}
            got_counts = {k: v for (_, k, n), v in state.items() if n == "orders"}
            if got_totals == totals and got_counts == counts:
                break
            time.sleep(1.0)
        expected = _sequential(records)
        out = []
        while time.monotonic() < deadline:
            out = read_to_end(bootstrap, enriched)
            if len(out) >= len(expected):
                break
            time.sleep(1.0)
        elapsed = time.monotonic() - t0
        dead = read_to_end(bootstrap, f"{name}.dlq")
        aborted = len(read_to_end(bootstrap, enriched, isolation="read_uncommitted")) - len(out)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        missing = sum(max(0, counts[k] - got_counts.get(k, 0)) for k in counts)
        doubled = sum(max(0, got_counts.get(k, 0) - counts[k]) for k in counts)
        wrong = sum(1 for k in totals if got_totals.get(k) != totals[k])
        enriched_orders = [orjson.loads(r.value) for r in out]
        ids = Counter(o["id"] for o in enriched_orders)
        twice = sum(n - 1 for n in ids.values() if n > 1)
        absent = len(set(expected) - set(ids))
        off = sum(1 for o in enriched_orders
                  if expected.get(o["id"]) != (o["running_total"], o["tier"]))
        echo("")
        echo(f"a few of the {len(out)} enriched orders in {enriched!r} (read_committed):")
        for o in enriched_orders[-4:]:
            echo(f"  {orjson.dumps(o).decode()}")
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
        echo(f"{'endpoint and processor' if remote else 'processor'} killed {kills} times; {len(records)} records in {elapsed:.1f} s; "
             f"{aborted} enriched records of aborted transactions visible only to read_uncommitted")
        ok = missing == doubled == wrong == 0 and len(dead) == bad and twice == absent == off == 0
        echo(f"exactly-once check (read_committed): orders in {len(expected)}, enriched out {len(out)} "
             f"(twice {twice}, missing {absent}, wrong running total or tier {off}); state: orders missing "
             f"{missing}, counted twice {doubled} (of {dups} duplicates sent), wrong totals {wrong} of "
             f"{len(totals)} customers; dead letters {len(dead)} of {bad} malformed -> {'OK' if ok else 'FAILED'}")
        if ok:
            os.unlink(log_path)
            if endpoint is not None:
                os.unlink(endpoint.log_path)
        return ok
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if endpoint is not None:
            endpoint.kill9()
        shutil.rmtree(state_dir, ignore_errors=True)
        if broker is not None:
            broker.stop()

"""`oncely demo`: exactly-once, shown by killing the processor.

Runs a keyed counter app (`app` below) in a separate `oncely run` process,
sends it a stream of `add` invocations, SIGKILLs the processor twice in the
middle and restarts it, then reads the committed state back from the
changelog and checks every key's sum against what was sent.
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
from collections import defaultdict
from typing import Callable

import oncely

app = oncely.App(os.environ.get("ONCELY_DEMO_APP", "oncely-demo"), partitions=8)
counter = app.keyed("counter")


@counter.handler
async def add(ctx: oncely.Context, amount: int) -> int:
    """Add `amount` to this key's running total."""
    total = ctx.get("total", 0) + amount
    ctx.set("total", total)
    ctx.set("count", ctx.get("count", 0) + 1)
    return total


def run_demo(bootstrap: str | None, records: int, keys: int, kills: int, echo: Callable[[str], None]) -> bool:
    from oncely.admin import read_state
    from oncely.local_kafka import LocalKafka

    broker = None
    if not bootstrap:
        local = LocalKafka()
        if local.status() is None:
            echo("starting a local Apache Kafka broker (as `oncely kafka start` would)...")
            broker = local
        bootstrap = local.start().bootstrap
    name = f"demo-{uuid.uuid4().hex[:8]}"
    state_dir = tempfile.mkdtemp(prefix="oncely-demo-")
    log_path = os.path.join(tempfile.gettempdir(), f"oncely-{name}.log")
    env = {**os.environ, "ONCELY_DEMO_APP": name, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "oncely.cli", "run", "oncely.demo:app", "--bootstrap", bootstrap,
           "--state-dir", state_dir]

    def start() -> subprocess.Popen:
        with open(log_path, "a") as log:
            return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    echo(f"app {name!r}: 8 partitions on {bootstrap}; processor log: {log_path}")
    proc = start()
    try:
        client = oncely.Client(bootstrap, app=name)
        deadline = time.monotonic() + 60
        while True:
            try:
                client._partition_count(name)
                break
            except oncely.ConfigError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the processor did not start; see {log_path}") from None
                time.sleep(0.2)
        rng = random.Random()
        sums: dict[bytes, int] = defaultdict(int)
        counts: dict[bytes, int] = defaultdict(int)
        batches = 20
        kill_after = {round(batches * (i + 1) / (kills + 1)) for i in range(kills)}
        t0 = time.monotonic()
        for b in range(batches):
            for _ in range(records // batches):
                key = f"customer-{rng.randrange(keys)}"
                amount = rng.randint(1, 100)
                client.send("counter", key, "add", amount)
                sums[key.encode()] += amount
                counts[key.encode()] += 1
            client.flush()
            if b in kill_after:
                time.sleep(rng.uniform(0.05, 0.3))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                echo(f"  kill -9 the processor after {sum(counts.values())} sends; restarting it")
                proc = start()
        sent = sum(counts.values())
        echo(f"sent {sent} add invocations over {len(sums)} keys; waiting for the processor...")
        deadline = time.monotonic() + 180
        while True:
            state = read_state(bootstrap, name)
            totals = {k: v for (_, k, n), v in state.items() if n == "total"}
            seen = {k: v for (_, k, n), v in state.items() if n == "count"}
            if totals == sums and seen == counts:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        elapsed = time.monotonic() - t0
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        missing = sum(max(0, counts[k] - seen.get(k, 0)) for k in counts)
        extra = sum(max(0, seen.get(k, 0) - counts[k]) for k in counts)
        wrong = sum(1 for k in sums if totals.get(k) != sums[k])
        echo("")
        echo("key              sent total   committed total   invocations")
        for k in sorted(sums, key=lambda k: -counts[k])[:5]:
            echo(f"{k.decode():<16} {sums[k]:>10}   {totals.get(k, 0):>15}   {seen.get(k, 0):>11}")
        echo("")
        echo(f"processor killed {kills} times; {sent} invocations in {elapsed:.1f} s")
        echo(f"exactly-once check (read_committed changelog): missing {missing}, duplicated {extra}, "
             f"wrong totals {wrong} of {len(sums)} keys -> {'OK' if missing == extra == wrong == 0 else 'FAILED'}")
        ok = missing == extra == wrong == 0
        if ok:
            os.unlink(log_path)
        return ok
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(state_dir, ignore_errors=True)
        if broker is not None:
            broker.stop()

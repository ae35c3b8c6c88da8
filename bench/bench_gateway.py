"""HTTP ingress benchmark: HTTP call -> keyed handler -> result.

In one run, for each setup (`oncely run bench_gateway:app --http`, then
`oncely run` beside a standalone `oncely gateway`; the app below, in child
processes against a local broker or --bootstrap), measured from this
process with aiohttp:
1. latency at a fixed rate (--rate calls/s for --seconds): p50/p99;
2. throughput with --clients concurrent clients (each waits for its result
   before the next call), and their p50/p99;
3. beside it, the Kafka path: `Client.call` one after another (p50/p99).
Then one Markdown table of both.

    python bench/bench_gateway.py [--rate 500] [--clients 64] [--commit-interval S] [--only http|standalone]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import oncely

BENCH = Path(__file__).resolve().parent
app = oncely.App(os.environ.get("BENCH_APP", "bench-gw"), partitions=int(os.environ.get("BENCH_PARTITIONS", "4")))
counter = app.keyed("counter")


@counter.handler
async def add(ctx: oncely.Context, amount: int) -> int:
    n = ctx.get("n", 0) + amount
    ctx.set("n", n)
    return n


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000 if s else float("nan")


async def _one(session: "object", base: str, key: str, lat: list[float], errors: list[int]) -> None:
    import aiohttp

    t = time.perf_counter()
    try:
        async with session.post(f"{base}/counter/{key}/add", data=b"1",  # type: ignore[attr-defined]
                                headers={"Content-Type": "application/json"}) as r:
            await r.read()
            if r.status != 200:
                errors.append(r.status)
                return
    except aiohttp.ClientError:
        errors.append(0)
        return
    lat.append(time.perf_counter() - t)


async def fixed_rate(base: str, rate: float, seconds: float, keys: int) -> tuple[list[float], list[int], float]:
    import aiohttp

    lat: list[float] = []
    errors: list[int] = []
    rng = random.Random(1)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as s:
        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(s, base, f"k{rng.randrange(keys)}", lat, errors)))
        await asyncio.gather(*tasks)
        took = time.perf_counter() - start
    return lat, errors, n / took


async def concurrent(base: str, clients: int, seconds: float, keys: int) -> tuple[list[float], list[int], float]:
    import aiohttp

    lat: list[float] = []
    errors: list[int] = []
    stop = time.perf_counter() + seconds

    async def client(c: int) -> None:
        rng = random.Random(c)
        while time.perf_counter() < stop:
            await _one(s, base, f"k{rng.randrange(keys)}", lat, errors)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        took = time.perf_counter() - start
    return lat, errors, len(lat) / took


def kafka_client_calls(bootstrap: str, n: int, keys: int) -> list[float]:
    lat = []
    with oncely.Client(bootstrap, app=app.name) as c:
        for i in range(n):
            t = time.perf_counter()
            c.call("counter", f"k{i % keys}", "add", 1)
            lat.append(time.perf_counter() - t)
    return lat


def _wait_up(base: str, procs: list[subprocess.Popen], log: str) -> None:
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/restate/health", timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"the processor did not come up; see {log}") from None
            time.sleep(0.3)


def measure(args: argparse.Namespace, bootstrap: str, standalone: bool) -> dict[str, str]:
    """One setup: `oncely run --http`, or `oncely run` beside `oncely gateway`
    (a fresh app each), measured at the fixed rate, with concurrent clients,
    then through `Client.call`."""
    from oncely.kafka_io import unique_name

    name = unique_name("bench-gw")
    env = {**os.environ, "BENCH_APP": name, "ONCELY_STATE_DIR": tempfile.mkdtemp(prefix="oncely-bench-gw-state-"),
           # bench/ for the app module, after what the caller put first (engine_at.py: another engine)
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(BENCH)]))}
    if args.commit_interval:
        env["ONCELY_COMMIT_INTERVAL"] = args.commit_interval
    log = open(Path(tempfile.gettempdir()) / f"{name}.log", "w")
    http = [] if standalone else ["--http", f"127.0.0.1:{args.port}"]
    cli = [sys.executable, "-m", "oncely.cli"]
    procs = [subprocess.Popen([*cli, "run", "bench_gateway:app", "--bootstrap", bootstrap, *http, "--log-level",
                               "WARNING"], cwd=BENCH, env=env, stdout=log, stderr=subprocess.STDOUT)]
    if standalone:
        procs.append(subprocess.Popen([*cli, "gateway", "--app", "bench_gateway:app", "--bootstrap", bootstrap,
                                       "--http", f"127.0.0.1:{args.port}", "--log-level", "WARNING"], cwd=BENCH,
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    base = f"http://127.0.0.1:{args.port}"
    app.name = name
    row: dict[str, str] = {"setup": "`oncely gateway` beside `oncely run`" if standalone else "`oncely run --http`"}
    try:
        _wait_up(base, procs, log.name)
        asyncio.run(fixed_rate(base, 50, 2, args.keys))  # warm-up
        lat, errors, achieved = asyncio.run(fixed_rate(base, args.rate, args.seconds, args.keys))
        row["rate"] = (f"{achieved:.0f}/s achieved: p50 {_pct(lat, .5):.1f} ms, p99 {_pct(lat, .99):.1f} ms"
                       f"{f', {len(errors)} errors' if errors else ''}")
        print(f"{row['setup']}: HTTP at {args.rate:.0f}/s asked, {row['rate']}", flush=True)
        lat, errors, tput = asyncio.run(concurrent(base, args.clients, args.seconds, args.keys))
        row["clients"] = (f"{tput:.0f} calls/s, p50 {_pct(lat, .5):.1f} ms, p99 {_pct(lat, .99):.1f} ms"
                          f"{f', {len(errors)} errors' if errors else ''}")
        print(f"{row['setup']}: HTTP {args.clients} concurrent clients: {row['clients']}", flush=True)
        lat = kafka_client_calls(bootstrap, args.client_calls, args.keys)
        row["client"] = f"p50 {_pct(lat, .5):.1f} ms, p99 {_pct(lat, .99):.1f} ms"
        print(f"{row['setup']}: Client.call one after another ({len(lat)}): {row['client']}", flush=True)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(60)
        from harness import delete_topics_naming

        delete_topics_naming(bootstrap, name)  # a broker that keeps every run's topics slows down
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default=None)
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--client-calls", type=int, default=200)
    ap.add_argument("--commit-interval", default=None, help="seconds (default: the app's, 0.1)")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--only", choices=("http", "standalone"), default=None,
                    help="one setup instead of both: `oncely run --http`, or `oncely gateway` beside `oncely run`")
    args = ap.parse_args()

    from oncely.local_kafka import LocalKafka

    local = None
    bootstrap = args.bootstrap
    if not bootstrap:
        local = LocalKafka(data_dir=tempfile.mkdtemp(prefix="oncely-bench-gw-kafka-"))
        bootstrap = local.start().bootstrap
    print(f"oncely {oncely.__version__}, commit_interval {args.commit_interval or 'default (0.1)'} s, "
          f"{app.partitions} partitions, {args.keys} keys, broker {bootstrap}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    rows = []
    try:
        for standalone in (False, True):
            if args.only is None or args.only == ("standalone" if standalone else "http"):
                rows.append(measure(args, bootstrap, standalone))
    finally:
        if local is not None:
            local.stop()
    print(f"\n| setup | HTTP at {args.rate:.0f}/s | {args.clients} concurrent clients | `Client.call` one by one |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['rate']} | {r['clients']} | {r['client']} |")
    print(f"(load average after: {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()

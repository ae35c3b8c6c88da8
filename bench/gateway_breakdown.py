"""Where an HTTP call's time goes, against a running ingress of the
`bench_gateway` app (or any app with `counter/{key}/add`).

Calls at a fixed rate (or with concurrent clients) while two side readers
watch the app's topics: read_uncommitted (the Invoke's and the Reply's
create times) and read_committed (when the Reply becomes visible). Each
call is split into
  a. HTTP request → Invoke created (the gateway),
  b. Invoke created → Reply created (log hop, the processor's poll, the handler),
  c. Reply created → Reply visible read_committed (waiting for and making the commit),
  d. Reply visible → HTTP answer (the gateway's replies reader, HTTP).
The side readers add fetch load of their own; the clocks are one machine's.

    python bench/gateway_breakdown.py APP --bootstrap HOST:PORT [--port 18080] [--rate 50 | --clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import threading
import time
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, TopicPartition

from oncely import schemas


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000 if s else float("nan")


class Side(threading.Thread):
    """One side reader of the log and replies topics."""

    def __init__(self, args: argparse.Namespace, committed: bool, seen: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.args, self.committed, self.seen = args, committed, seen
        self.stop = threading.Event()
        self.c = Consumer({"bootstrap.servers": args.bootstrap, "group.id": "oncely-breakdown",
                           "isolation.level": "read_committed" if committed else "read_uncommitted",
                           "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        topics = [f"{args.app}.replies"] if committed else [f"{args.app}.log", f"{args.app}.replies"]
        self.c.assign([TopicPartition(t, p, OFFSET_END) for t in topics for p in range(args.partitions)])

    def run(self) -> None:
        while not self.stop.is_set():
            for m in self.c.consume(100, 0.005):
                if m.error() is not None:
                    continue
                now, created = time.time(), m.timestamp()[1] / 1000
                if self.committed:
                    self.seen["visible"][m.key()] = now
                elif m.topic().endswith(".replies"):
                    self.seen["reply"][m.key()] = created
                else:
                    kind, body = schemas.decode("log_record", m.value())["body"]
                    if kind == "oncely.Invoke" and body.get("reply"):
                        self.seen["invoke"][body["idempotency_key"]] = (created, body["reply"]["request_id"])
        self.c.close()


async def drive(args: argparse.Namespace, calls: dict[str, tuple[float, float]]) -> float:
    import aiohttp

    rng = random.Random(1)

    async def one(s: Any) -> None:
        idem = os.urandom(8).hex()
        t0 = time.time()
        async with s.post(f"http://127.0.0.1:{args.port}/counter/k{rng.randrange(1000)}/add", data=b"1",
                          headers={"Content-Type": "application/json", "Idempotency-Key": idem}) as r:
            await r.read()
            if r.status == 200:
                calls[idem] = (t0, time.time())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        start = time.perf_counter()
        if args.clients:
            async def client() -> None:
                while time.perf_counter() < start + args.seconds:
                    await one(s)
            await asyncio.gather(*(client() for _ in range(args.clients)))
        else:
            tasks = []
            for i in range(int(args.rate * args.seconds)):
                delay = start + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(s)))
            await asyncio.gather(*tasks)
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("app")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rate", type=float, default=50)
    ap.add_argument("--clients", type=int, default=0, help="concurrent clients instead of a fixed rate")
    ap.add_argument("--seconds", type=float, default=5)
    args = ap.parse_args()
    seen: dict[str, Any] = {"invoke": {}, "reply": {}, "visible": {}}
    sides = [Side(args, False, seen), Side(args, True, seen)]
    for s in sides:
        s.start()
    time.sleep(2)  # both readers positioned
    calls: dict[str, tuple[float, float]] = {}
    took = asyncio.run(drive(args, calls))
    time.sleep(1)
    for s in sides:
        s.stop.set()
        s.join()
    parts: dict[str, list[float]] = {"a. HTTP → Invoke created": [], "b. Invoke → Reply created": [],
                                     "c. Reply created → visible": [], "d. visible → HTTP answer": []}
    for idem, (t0, t1) in calls.items():
        inv = seen["invoke"].get(idem)
        if inv is None or inv[1] not in seen["reply"] or inv[1] not in seen["visible"]:
            continue
        created, rid = inv
        for name, v in zip(parts, (created - t0, seen["reply"][rid] - created, seen["visible"][rid] -
                                   seen["reply"][rid], t1 - seen["visible"][rid])):
            parts[name].append(v)
    total = [t1 - t0 for t0, t1 in calls.values()]
    print(f"{len(calls)} calls in {took:.1f} s ({len(calls) / took:.0f}/s): p50 {pct(total, .5):.1f} ms, "
          f"p90 {pct(total, .9):.1f} ms, p99 {pct(total, .99):.1f} ms; {len(parts['b. Invoke → Reply created'])} "
          "split (create times have ms resolution)")
    for name, v in parts.items():
        print(f"  {name:30s} p50 {pct(v, .5):7.1f}  p90 {pct(v, .9):7.1f}  p99 {pct(v, .99):7.1f} ms")


if __name__ == "__main__":
    main()

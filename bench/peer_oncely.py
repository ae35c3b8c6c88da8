"""The peer workload as an oncely app, for `oncely run peer_oncely:app`
(run with bench/ as the working directory).

A subscription feeds each JSON order to a keyed `customers` handler that
keeps the customer's running total in state and emits the order with the
total, exactly once. Names come from the environment so every run gets
fresh topics:

    BENCH_APP, BENCH_SOURCE, BENCH_OUT, BENCH_PARTITIONS (default 8)
    BENCH_IDEMPOTENCY=1  deduplicate by the Idempotency-Key header (default:
                         by source topic/partition/offset, as the peers do)
    BENCH_TAG_PID=1      add the process id to each output and to the Kafka
                         client.id (bench-pid-<pid>), so the failover benchmark
                         can tell which process produced an output and which
                         partitions the group gave it
"""

import os

import oncely

PID = os.getpid() if os.environ.get("BENCH_TAG_PID") == "1" else None
OUT = os.environ.get("BENCH_OUT", "bench-out")

app = oncely.App(os.environ.get("BENCH_APP", "bench-peer"), partitions=int(os.environ.get("BENCH_PARTITIONS", "8")),
                 commit_interval=0.1, kafka={"client.id": f"bench-pid-{PID}"} if PID else None)
customers = app.keyed("customers")
app.sink(OUT)


@customers.handler
async def enrich(ctx: oncely.Context, order: dict) -> None:
    total = ctx.get("total", 0) + order["amount"]
    ctx.set("total", total)
    out = {**order, "total": total}
    if PID is not None:
        out["pid"] = PID
    ctx.emit(OUT, out, key=ctx.key)


app.subscribe(os.environ.get("BENCH_SOURCE", "bench-src"), enrich,
              idempotency="header:Idempotency-Key" if os.environ.get("BENCH_IDEMPOTENCY") == "1" else None)

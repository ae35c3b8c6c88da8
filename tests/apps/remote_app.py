"""Test app for the remote endpoint: one keyed handler that uses every ctx
operation, and small handlers for each way an item ends.

    python -m tests.apps.remote_app   # serves it on 127.0.0.1, prints "PORT <n>"

The server is configured by the environment like any endpoint
(ONCELY_VERIFY_KEYS, ONCELY_SIGNING_SECRET).
"""

import asyncio
import sys
import time

import oncely

app = oncely.App("remote-test", partitions=4)
orders = app.keyed("orders")
pricing = app.keyed("pricing")
audit = app.service("audit")
app.sink("order-events", value="bytes")


def slow_lookup(sku: str) -> dict:
    time.sleep(0.05)  # a blocking call: ctx.run runs it in a thread
    return {"sku": sku, "stock": 7}


@orders.handler
async def place(ctx: oncely.KeyedContext, order: dict) -> dict:
    """Every kind of step, in a fixed order the tests check."""
    count = ctx.get("count", 0) + 1                                    # 0 get
    ctx.set("count", count)                                            # 1 set
    stock = await ctx.run("stock", slow_lookup, order["sku"])          # 2 run
    ctx.emit("order-events", f"placed {order['sku']}", key=ctx.key,    # 3 emit
             headers={"n": str(count)})
    ctx.emit("order-log", {"order": order, "n": count}, key=ctx.key)  # 4 emit (undeclared: JSON)
    ctx.send(audit.record, {"order": order}, delay=2.5)                # 5 send
    price = ctx.call(pricing.quote, order["sku"], order["qty"])        # 6 call
    nap = ctx.sleep(1.5)                                               # 7 sleep
    awk_id, approval = ctx.awakeable()                                 # 8 awakeable
    quote, _, approved = await oncely.gather(price, nap, approval)
    ctx.set("last", {"quote": quote, "approved": approved, "awakeable": awk_id})  # 9 set
    return {"count": count, "stock": stock["stock"], "quote": quote, "approved": approved}


@pricing.handler
async def quote(ctx: oncely.KeyedContext, qty: int) -> int:
    return 3 * qty


@pricing.handler
async def self_call(ctx: oncely.KeyedContext) -> int:
    return await ctx.call(pricing.quote, ctx.key, 1)


@pricing.handler
async def fail_terminal(ctx: oncely.KeyedContext) -> None:
    ctx.set("touched", True)
    raise oncely.TerminalError("no such product")


@pricing.handler
async def fail_retry(ctx: oncely.KeyedContext) -> None:
    raise RuntimeError("flaky backend")


@pricing.handler
async def read_two(ctx: oncely.KeyedContext) -> dict:
    try:
        a = ctx.get("a")
        b = ctx.get("b")
    except Exception:  # NeedState is a BaseException: this must not catch it
        return {"swallowed": True}
    return {"a": a, "b": b, "names": ctx.state_keys()}


@pricing.handler
async def dawdle(ctx: oncely.KeyedContext) -> str:
    ctx.set("started", True)
    await asyncio.sleep(30)
    return "late"


@pricing.handler
async def wait_during_run(ctx: oncely.KeyedContext) -> list:
    """A call parked while a ctx.run still runs: not suspended until the
    run's result is journaled."""
    fut = ctx.call(pricing.quote, "other", 2)
    results = await asyncio.gather(fut, ctx.run("slow", slow_lookup, "x"))
    return results


@audit.handler
async def record(ctx: oncely.Context, entry: dict) -> str:
    return ctx.invocation_id


async def _serve() -> None:
    from aiohttp import web

    from oncely.remote import Endpoint

    runner = web.AppRunner(Endpoint(app, max_batch=8).aiohttp_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(_serve())
    except KeyboardInterrupt:
        sys.exit(0)

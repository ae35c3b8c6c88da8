"""Test app of the HTTP gateway: a keyed counter (with bytes, failure and a
slow path), a stateless greeter, and a waiter on an awakeable whose id is
kept as state of service `ids` (readable over HTTP)."""

import asyncio
import os

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "gateway-test"),
                 partitions=int(os.environ.get("ONCELY_TEST_PARTITIONS", "4")),
                 retry=oncely.RetryPolicy(max_attempts=3, initial_interval=0.05, max_interval=0.2))
counter = app.keyed("counter")
greeter = app.service("greeter")
waiter = app.keyed("waiter")
ids = app.keyed("ids")
SLOW = float(os.environ.get("ONCELY_TEST_SLOW", "0"))


@counter.handler
async def add(ctx: oncely.Context, amount: int) -> int:
    n = ctx.get("n", 0) + amount
    if SLOW:
        await asyncio.sleep(SLOW * ctx.random())  # in flight across commits (and kills)
    ctx.set("n", n)
    ctx.set("runs", ctx.get("runs", 0) + 1)
    return n


@counter.handler
async def echo(ctx: oncely.Context, data: object) -> object:
    ctx.set("last", data)
    return data


@counter.handler
async def fail(ctx: oncely.Context) -> None:
    raise oncely.TerminalError("no way")


@greeter.handler
async def hello(ctx: oncely.Context, name: str) -> str:
    return f"hello {name}"


@waiter.handler
async def wait(ctx: oncely.Context) -> object:
    awk_id, fut = ctx.awakeable()
    ctx.send(remember, ctx.key, ["id", awk_id])
    try:
        return {"got": await fut}
    except oncely.TerminalError as e:
        return {"rejected": str(e)}


@waiter.handler
async def twice(ctx: oncely.Context) -> object:
    a_id, a = ctx.awakeable()
    b_id, b = ctx.awakeable()
    ctx.send(remember, ctx.key, ["a", a_id])
    ctx.send(remember, ctx.key, ["b", b_id])
    return [await a, await b]


@ids.handler
async def remember(ctx: oncely.Context, named: list) -> None:
    ctx.set(named[0], named[1])

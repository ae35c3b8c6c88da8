"""Test app: calls between keys across partitions — scatter/gather, chains
with self-inflicted kill -9 between steps, awakeables."""

import asyncio
import os
import signal
from pathlib import Path

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "shuffle-test"), partitions=4)
RESULTS = os.environ.get("ONCELY_TEST_RESULTS", "shuffle-results")
app.sink(RESULTS)
CRASH_DIR = os.environ.get("ONCELY_TEST_CRASH_DIR")

hub = app.keyed("hub")
leaf = app.keyed("leaf")
a, b, c = app.keyed("a"), app.keyed("b"), app.keyed("c")
waiter = app.keyed("waiter")
notify = app.keyed("notify")


# -- scatter/gather ---------------------------------------------------------------


@leaf.handler
async def add(ctx: oncely.Context, amount: int) -> int:
    await asyncio.sleep(ctx.random() * 0.2)  # not journaled: stretches the run for the kills
    ctx.set("calls", ctx.get("calls", 0) + 1)
    ctx.set("total", ctx.get("total", 0) + amount)
    return amount


@hub.handler
async def scatter(ctx: oncely.Context, job: dict) -> int:
    results = await oncely.gather(*(ctx.call(add, f"k{i}", job["amount"]) for i in range(job["fanout"])))
    total = sum(results)
    ctx.set("sum", total)
    ctx.set("gathers", ctx.get("gathers", 0) + 1)
    ctx.emit(RESULTS, {"hub": ctx.key, "sum": total}, key=ctx.key)
    return total


# -- chains: a -> b -> c, killed between steps ---------------------------------------


def crash_once(point: str) -> None:
    """SIGKILL this process the first time any invocation reaches `point`."""
    if CRASH_DIR is None:
        return
    marker = Path(CRASH_DIR) / point
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.fsync(fd)
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


@c.handler
async def c_step(ctx: oncely.Context, x: int) -> int:
    crash_once("c-start")
    ctx.set("runs", ctx.get("runs", 0) + 1)
    return x * 3


@b.handler
async def b_step(ctx: oncely.Context, x: int) -> int:
    crash_once("b-start")
    r = await ctx.call(c_step, f"c{ctx.key[1:]}", x * 2)
    crash_once("b-after-c")
    ctx.set("runs", ctx.get("runs", 0) + 1)
    return r + 1


@a.handler
async def a_start(ctx: oncely.Context, x: int) -> None:
    r = await ctx.call(b_step, f"b{ctx.key[1:]}", x)
    crash_once("a-after-b")
    ctx.set("result", r)
    ctx.set("runs", ctx.get("runs", 0) + 1)
    ctx.emit(RESULTS, {"chain": ctx.key, "result": r}, key=ctx.key)


# -- awakeables --------------------------------------------------------------------


@notify.handler
async def publish(ctx: oncely.Context, awakeable_id: str) -> None:
    ctx.emit(RESULTS, {"waiter": ctx.key, "awakeable": awakeable_id}, key=ctx.key)


@waiter.handler
async def wait(ctx: oncely.Context) -> None:
    awk_id, fut = ctx.awakeable()
    ctx.send(publish, ctx.key, awk_id)  # tell the outside where to resolve
    try:
        value = await fut
        ctx.set("got", value)
    except oncely.TerminalError as e:
        value = None
        ctx.set("rejected", e.message)
    ctx.set("wakes", ctx.get("wakes", 0) + 1)
    ctx.emit(RESULTS, {"woken": ctx.key, "value": value}, key=ctx.key)


@waiter.handler
async def hold(ctx: oncely.Context) -> None:
    """Wait on an awakeable nobody resolves (memory test)."""
    _, fut = ctx.awakeable()
    ctx.set("got", await fut)

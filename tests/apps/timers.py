"""Test app: delayed sends and durable sleeps."""

import os

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "timers-test"), partitions=4)
sched = app.keyed("sched")
target = app.keyed("target")
napper = app.keyed("napper")


def ms(ctx: oncely.Context) -> int:
    return int(ctx.now().timestamp() * 1000)


@sched.handler
async def schedule(ctx: oncely.Context, job: dict) -> None:
    due_ms = ms(ctx) + int(job["delay"] * 1000)
    ctx.send(target.fire, f"t{job['n']}", {"n": job["n"], "due_ms": due_ms}, delay=job["delay"])


@target.handler
async def fire(ctx: oncely.Context, msg: dict) -> None:
    at = ms(ctx)
    ctx.set("fired", ctx.get("fired", 0) + 1)
    ctx.set("early_ms", max(0, msg["due_ms"] - at))  # > 0: fired before its time


@napper.handler
async def nap(ctx: oncely.Context, seconds: float) -> None:
    start = ms(ctx)
    await ctx.sleep(seconds)
    ctx.set("slept_ms", ms(ctx) - start)
    ctx.set("naps", ctx.get("naps", 0) + 1)

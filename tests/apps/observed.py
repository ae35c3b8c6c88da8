"""Test app for metrics, logs and status: every invocation outcome on demand.

`make_app` builds one per test (several processes of one app in one Python
process need an App each: the state dir is in its config); `app` is the one
`oncely run tests.apps.observed:app` runs (name from ONCELY_TEST_APP)."""

from __future__ import annotations

import os

import oncely


def make_app(name: str, partitions: int = 4, **settings: object) -> oncely.App:
    app = oncely.App(name, partitions=partitions,
                     retry=oncely.RetryPolicy(max_attempts=3, initial_interval=0.02, max_interval=0.05),
                     **settings)  # type: ignore[arg-type]
    acct = app.keyed("acct")

    @acct.handler
    async def add(ctx: oncely.Context, amount: int) -> int:
        n = ctx.get("n", 0) + amount
        ctx.set("n", n)
        return n

    @acct.handler
    async def reject(ctx: oncely.Context, _: int) -> None:
        raise oncely.TerminalError("rejected on purpose")

    @acct.handler
    async def boom(ctx: oncely.Context, _: int) -> None:
        raise ValueError("fails every attempt")

    @acct.handler
    async def diverge(ctx: oncely.Context, _: int) -> None:
        # Attempt 0 journals a run step, then fails; its retry replays with
        # another first step: non-determinism, so the invocation is paused.
        if ctx.attempt == 0:
            await ctx.run("step", lambda: 1)
            raise ValueError("first attempt fails after a step")
        ctx.now()

    return app


app = make_app(os.environ.get("ONCELY_TEST_APP", "observed-test"), int(os.environ.get("ONCELY_TEST_PARTITIONS", "4")))

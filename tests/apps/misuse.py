"""Test app: handlers that misuse ctx (a bug: fails at once) and one that
always raises (retried, then dead-lettered)."""

import os

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "misuse-test"), partitions=2,
                 retry=oncely.RetryPolicy(max_attempts=3, initial_interval=0.05, max_interval=0.1))
keyed = app.keyed("keyed")
stateless = app.service("stateless")


@keyed.handler
async def set_object(ctx: oncely.Context, _: int) -> None:
    ctx.set("when", object())  # MISUSE-SET


@stateless.handler
async def use_state(ctx: oncely.Context, _: int) -> None:
    ctx.get("n")  # MISUSE-STATE


@keyed.handler
async def always_fails(ctx: oncely.Context, _: int) -> None:
    raise RuntimeError("downstream is down")  # FAILS

"""Test app: retries, terminal errors and the retry limit."""

import os

import oncely

BACKOFF = float(os.environ.get("ONCELY_TEST_BACKOFF", "0.05"))
app = oncely.App(os.environ.get("ONCELY_TEST_APP", "flaky-test"), partitions=2,
                 retry=oncely.RetryPolicy(max_attempts=3, initial_interval=BACKOFF, max_interval=BACKOFF * 4))
svc = app.keyed("svc")
RUNS_FILE = os.environ.get("ONCELY_TEST_RUNS_FILE", "/tmp/oncely-runs.txt")


def _ran(what: str) -> None:
    with open(RUNS_FILE, "a") as f:
        f.write(what + "\n")


@svc.handler
async def flaky_twice(ctx: oncely.Context, _: int) -> int:
    _ran(f"flaky {ctx.key} {ctx.attempt}")
    if ctx.attempt < 2:
        raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
    ctx.set("done", ctx.get("done", 0) + 1)
    ctx.set("attempts", ctx.attempt + 1)
    return ctx.attempt


@svc.handler
async def terminal(ctx: oncely.Context, _: int) -> None:
    _ran(f"terminal {ctx.key} {ctx.attempt}")
    ctx.set("should-not-stick", 1)
    raise oncely.TerminalError("order rejected: no such customer")


@svc.handler
async def always_fails(ctx: oncely.Context, _: int) -> None:
    _ran(f"always {ctx.key} {ctx.attempt}")
    raise ValueError("downstream is down")

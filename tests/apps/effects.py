"""Test app: a journaled side effect that appends to a file, then a wait.

HANDLER_VERSION=2 changes the first step, to provoke non-determinism."""

import asyncio
import os
import uuid

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "effects-test"),
                 partitions=int(os.environ.get("ONCELY_TEST_PARTITIONS", "4")))
job = app.keyed("job")
EFFECT_FILE = os.environ.get("ONCELY_TEST_EFFECT_FILE", "/tmp/oncely-effects.txt")
VERSION = os.environ.get("HANDLER_VERSION", "1")
WAIT = float(os.environ.get("ONCELY_TEST_WAIT", "3"))


def append_effect(key: str) -> str:
    token = uuid.uuid4().hex
    with open(EFFECT_FILE, "a") as f:
        f.write(f"{key} {token}\n")
        f.flush()
        os.fsync(f.fileno())
    return token


@job.handler
async def work(ctx: oncely.Context, _: int) -> str:
    name = "effect" if VERSION == "1" else "effect-v2"
    token = await ctx.run(name, append_effect, ctx.key)
    await asyncio.sleep(WAIT)  # not durable: replayed after a crash
    ctx.set("token", token)
    return token

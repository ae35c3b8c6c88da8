"""Test app: deposits from a source topic; a negative amount fails the
handler terminally until the "fix" (ONCELY_TEST_FIXED=1) is deployed."""

import os

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "picky-test"), partitions=2)
accounts = app.keyed("accounts")
FIXED = os.environ.get("ONCELY_TEST_FIXED") == "1"


@accounts.handler
async def deposit(ctx: oncely.Context, body: dict) -> int:
    if body["amount"] < 0 and not FIXED:
        raise oncely.TerminalError("negative deposits are not supported")
    balance = ctx.get("balance", 0) + body["amount"]
    ctx.set("balance", balance)
    return balance


app.subscribe(os.environ.get("ONCELY_TEST_SOURCE", "deposits"), deposit)

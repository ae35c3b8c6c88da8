"""Test app: deposits from a JSON topic and an Avro topic, keyed by the record key."""

import os
from pathlib import Path

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "mixed-test"), partitions=4)
accounts = app.keyed("accounts")


@accounts.handler
async def deposit(ctx: oncely.Context, d: dict) -> int:
    balance = ctx.get("balance", 0) + d["amount"]
    ctx.set("balance", balance)
    ctx.set("deposits", ctx.get("deposits", 0) + 1)
    return balance


app.subscribe(os.environ.get("ONCELY_TEST_JSON_TOPIC", "deposits-json"), deposit, value="json",
              max_bytes=2048, name="json-deposits")
app.subscribe(os.environ.get("ONCELY_TEST_AVRO_TOPIC", "deposits-avro"), deposit,
              value=f"avro:{Path(__file__).with_name('deposit.avsc')}", name="avro-deposits")

"""Test app: orders from a source topic, summed per customer."""

import os

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "orders-test"),
                 partitions=int(os.environ.get("ONCELY_TEST_PARTITIONS", "8")))
customers = app.keyed("customers")


@customers.handler
async def add_order(ctx: oncely.Context, order: dict) -> int:
    total = ctx.get("total", 0) + order["amount"]
    ctx.set("total", total)
    ctx.set("orders", ctx.get("orders", 0) + 1)
    rec = ctx.record
    ctx.set("last_source", [rec.topic, rec.partition, rec.offset])
    return total


app.subscribe(
    os.environ.get("ONCELY_TEST_SOURCE", "orders"),
    add_order,
    key=lambda rec: rec.value["customer"],
    value="json",
    idempotency="header:Idempotency-Key",
    idempotency_retention=float(os.environ.get("ONCELY_TEST_RETENTION", str(24 * 3600))),
)

"""Test app: enrich each order with its customer's running total and tier."""

import os

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "enrich-test"), partitions=8)
customers = app.keyed("customers")
OUT = os.environ.get("ONCELY_TEST_OUT", "enriched-orders")
app.sink(OUT)


def tier(total: int) -> str:
    return "gold" if total >= 1000 else "silver" if total >= 300 else "bronze"


@customers.handler
async def enrich(ctx: oncely.Context, order: dict) -> int:
    total = ctx.get("total", 0) + order["amount"]
    ctx.set("total", total)
    ctx.emit(OUT, {**order, "running_total": total, "tier": tier(total)}, key=ctx.key,
             headers={"source": "oncely"})
    return total


app.subscribe(os.environ.get("ONCELY_TEST_SOURCE", "orders"), enrich, key=lambda rec: rec.value["customer"],
              idempotency="header:Idempotency-Key")

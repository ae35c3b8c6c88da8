"""Order enrichment: orders arrive on a topic; a keyed `customers` handler
keeps each customer's running total in state, enriches every order with that
total and a tier, and emits it to `enriched-orders`, exactly once.

    oncely run oncely.examples.enrichment:app --bootstrap HOST:PORT

Topic names and the app name come from the environment (ENRICH_APP,
ORDERS_TOPIC, ENRICHED_TOPIC) so `oncely demo` can run it on fresh topics.
"""

import os

import oncely

app = oncely.App(os.environ.get("ENRICH_APP", "enrichment"), partitions=8)
ORDERS = os.environ.get("ORDERS_TOPIC", "orders")
ENRICHED = os.environ.get("ENRICHED_TOPIC", "enriched-orders")

customers = app.keyed("customers")
app.sink(ENRICHED)  # JSON; app.sink(ENRICHED, value="avro:enriched.avsc") for Avro


def tier(total: int) -> str:
    return "gold" if total >= 5000 else "silver" if total >= 1000 else "bronze"


@customers.handler
async def add_order(ctx: oncely.KeyedContext, order: dict) -> int:
    """Add the order to its customer's total and emit the enriched order."""
    total = ctx.get("total", 0) + order["amount"]
    ctx.set("total", total)
    ctx.set("orders", ctx.get("orders", 0) + 1)
    ctx.emit(ENRICHED, {**order, "running_total": total, "tier": tier(total)}, key=ctx.key,
             headers={"source": "oncely"})
    return total


app.subscribe(
    ORDERS,
    add_order,
    key=lambda rec: rec.value["customer"],   # one customer's orders run one at a time, in order
    value="json",
    idempotency="header:Idempotency-Key",    # a producer's retry is recognised, not counted twice
)

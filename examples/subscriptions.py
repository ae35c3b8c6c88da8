# subscriptions.py: every record of the `orders` topic invokes a keyed handler, exactly once.
from datetime import timedelta

import oncely

app = oncely.App("order-totals", partitions=8)
customers = app.keyed("customers")


@customers.handler
async def add_order(ctx: oncely.KeyedContext, order: dict) -> int:
    total = ctx.get("total", 0) + order["amount"]
    ctx.set("total", total)
    ctx.set("last_offset", ctx.record.offset)  # the source record: topic, partition, offset, key, headers
    return total


app.subscribe(
    "orders",                                   # source topic (or a list of topics)
    add_order,                                  # target handler; it receives the decoded value
    key=lambda rec: rec.value["customer"],      # routing key for keyed targets; default: the record key
    value="json",                               # "json" | "bytes" | "avro:<path to .avsc>" | a callable on the bytes
    idempotency="header:Idempotency-Key",       # or a callable on the record, or None
    idempotency_retention=timedelta(hours=24),  # how long a finished record is remembered
    max_bytes=900 * 1024,                       # larger records are dead-lettered
)

# emit.py: a handler writes records to topics (JSON, Avro, bytes), exactly once.
import oncely

app = oncely.App("order-audit", partitions=8, create_sink_topics=True)  # create missing sink topics
audits = app.keyed("audits")

app.sink("enriched-orders")                                   # JSON (the default)
app.sink("audit", value="avro:audit.avsc")                    # Avro, schema checked at declaration
app.sink("raw", value="bytes", partitions=12)


@audits.handler
async def record(ctx: oncely.KeyedContext, order: dict) -> None:
    total = ctx.get("total", 0) + order["amount"]
    ctx.set("total", total)
    ctx.emit("enriched-orders", {**order, "total": total}, key=ctx.key, headers={"source": "oncely"})
    ctx.emit("audit", {"order": order["id"], "customer": ctx.key, "amount": order["amount"]})
    ctx.emit("raw", f"{order['id']}:{order['amount']}".encode(), key=ctx.key)


app.subscribe("orders", record, key=lambda rec: rec.value["customer"], idempotency="header:Idempotency-Key")

# quickstart.py: a keyed counter, and a side effect that runs once.
import oncely

app = oncely.App("shop", partitions=8)        # bootstrap: argument, else ONCELY_KAFKA_BOOTSTRAP
counter = app.keyed("counter")                # keyed: one invocation per key at a time, with state


def charge_card(card: str, total: int) -> str:
    """Stands in for your payment provider's client."""
    return f"receipt-{card[-4:]}-{total}"


@counter.handler
async def add(ctx: oncely.KeyedContext, amount: int) -> int:
    n = ctx.get("n", 0)
    ctx.set("n", n + amount)
    return n + amount


@counter.handler
async def charge(ctx: oncely.KeyedContext, order: dict) -> str:
    # A side effect runs once: its result is journaled and returned again on
    # replay after a crash, instead of charging twice.
    receipt = await ctx.run("charge", charge_card, order["card"], order["total"])
    ctx.set("last_receipt", receipt)
    return receipt


if __name__ == "__main__":                    # `python3 quickstart.py`: invoke the handlers from outside
    client = oncely.Client(app="shop")        # bootstrap: argument, else ONCELY_KAFKA_BOOTSTRAP
    client.send(add, "alice", 5)                               # by handler reference
    client.send("counter", "alice", "add", 5,                  # or by name
                idempotency_key="order-17")                    # deduplicated for 24 h
    client.send(charge, "alice", {"card": "4242424242424242", "total": 30})
    client.flush()                                             # wait for the broker's acks

# messages.py: messages between keys, calls, timers and awakeables.
from datetime import timedelta

import oncely

app = oncely.App("checkout", partitions=8)
orders = app.keyed("orders")          # keyed by customer
stock = app.keyed("stock")            # keyed by SKU
carts = app.keyed("carts")            # keyed by customer
counter = app.keyed("counter")        # keyed by customer
approvals = app.keyed("approvals")    # keyed by customer
price = app.service("price")          # stateless
mail = app.service("mail")            # stateless


def send_email(to: str, text: str) -> str:
    """Stands in for your mail provider's client."""
    return f"sent to {to}: {text}"


@orders.handler
async def place(ctx: oncely.KeyedContext, order: dict) -> str:
    ctx.send(stock.reserve, order["sku"], order)                        # one-way, exactly once
    ctx.send("mail", None, "confirm", order)                            # by name (stateless: key None)
    ctx.send(carts.expire, order["customer"], order, delay=timedelta(minutes=15))   # later
    placed = await ctx.call(counter.add, order["customer"], 1)          # request/response
    a, b = await oncely.gather(ctx.call(price.of, order["sku"]), ctx.call(price.of, "gift-wrap"))  # fan-out
    await ctx.sleep(timedelta(seconds=1))                               # a durable sleep
    awk_id, approval = ctx.awakeable()                                  # completed from outside
    ctx.send(approvals.ask, order["customer"], awk_id)
    status = "approved" if await approval else "declined"
    ctx.set("status", f"order {order['id']} (#{placed}, {a + b} EUR): {status}")
    return status


@stock.handler
async def reserve(ctx: oncely.KeyedContext, order: dict) -> None:
    ctx.set("reserved", ctx.get("reserved", 0) + 1)


@carts.handler
async def expire(ctx: oncely.KeyedContext, order: dict) -> None:
    ctx.clear_all()


@counter.handler
async def add(ctx: oncely.KeyedContext, n: int) -> int:
    total = ctx.get("n", 0) + n
    ctx.set("n", total)
    return total


@price.handler
async def of(ctx: oncely.Context, sku: str) -> int:
    return {"gift-wrap": 3}.get(sku, 20)


@mail.handler
async def confirm(ctx: oncely.Context, order: dict) -> None:
    await ctx.run("email", send_email, order["customer"], f"order {order['id']} received")


@approvals.handler
async def ask(ctx: oncely.KeyedContext, awakeable_id: str) -> None:
    ctx.set("pending", awakeable_id)    # `oncely awakeable resolve ID true` approves


if __name__ == "__main__":              # `python3 messages.py`: place an order
    client = oncely.Client(app="checkout")
    client.send(place, "alice", {"id": "o-1", "customer": "alice", "sku": "book"})
    client.flush()

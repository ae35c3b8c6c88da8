"""One handler module, run in-process or behind an endpoint (the remote
processor tests compare the two).

`build(name)` is the whole app; `build(name, remote=True, deployments=[url])`
keeps only the in-process `ledger` service and runs `shop` (the service under
test) on the endpoint, which serves `build(...)` whole:

    python -m tests.apps.remote_conf [PORT]   # prints "PORT <n>"

Signing comes from the environment like any endpoint (ONCELY_SIGNING_SECRET).
With REMOTE_CONF_CTL=<dir> the failure tests steer it: each `/invoke` reads
`<dir>/mode` (empty: normal; `503`; `slow S`: answer after S seconds; `hang`)
and appends `<items> <body bytes>` to `<dir>/requests` when it arrives and
`<items>` to `<dir>/answered` once it answered 200.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson

import oncely

SHOP_RETRY = oncely.RetryPolicy(max_attempts=3, initial_interval=0.05, max_interval=0.5)


def build(name: str, remote: bool = False, **settings: Any) -> oncely.App:
    app = oncely.App(name, partitions=2, **settings)
    ledger = app.keyed("ledger")

    @ledger.handler
    async def add(ctx: oncely.KeyedContext, n: int) -> int:
        total = ctx.get("total", 0) + n
        ctx.set("total", total)
        return total

    @ledger.handler
    async def note(ctx: oncely.KeyedContext, text: str) -> None:
        ctx.set("notes", ctx.get("notes", []) + [text])

    if remote:
        return app  # shop runs on the endpoint
    shop = app.keyed("shop", retry=SHOP_RETRY)

    @shop.handler
    async def place(ctx: oncely.KeyedContext, order: dict) -> dict:
        """State, ctx.run, a call to ledger and its answer, a delayed send,
        an awakeable (its id sent to ledger for the test to resolve), a
        sleep, gather and an emit."""
        n = ctx.get("count", 0) + 1
        ctx.set("count", n)
        stock = await ctx.run("stock", lambda: {"sku": order["sku"], "stock": 7})
        total = await ctx.call(ledger.add, order["id"], order["qty"])
        ctx.send(ledger.add, "delayed", 1, delay=0.3)
        awk_id, approval = ctx.awakeable()
        ctx.send(ledger.note, f"awk-{order['id']}", awk_id)
        approved, _ = await oncely.gather(approval, ctx.sleep(0.4))
        out = {"id": order["id"], "n": n, "total": total, "approved": approved, "stock": stock["stock"]}
        ctx.emit(order["topic"], out, key=order["id"], headers={"via": "shop"})
        ctx.set("last", out)
        return out

    @shop.handler
    async def reject(ctx: oncely.KeyedContext, order: dict) -> None:
        ctx.set("touched", True)
        raise oncely.TerminalError(f"no such product {order['sku']}")

    @shop.handler
    async def fill(ctx: oncely.KeyedContext, m: dict) -> int:
        """`m["n"]` values of `m["size"]` bytes each (many MB of state)."""
        for i in range(m["n"]):
            ctx.set(f"blob{i:03d}", chr(65 + i % 26) * m["size"])
        return m["n"]

    @shop.handler
    async def peek(ctx: oncely.KeyedContext, m: dict) -> dict:
        """Reads a few of the big values (they cannot travel eagerly)."""
        got = {n: ctx.get(n) for n in m["names"]}
        out = {"id": m["id"], "lens": {n: len(v or "") for n, v in got.items()},
               "firsts": "".join((v or "?")[0] for v in got.values())}
        ctx.emit(m["topic"], out, key=ctx.key)
        return out

    @shop.handler
    async def tally(ctx: oncely.KeyedContext, m: dict) -> int:
        """Counts per key and emits one record per message."""
        n = ctx.get("n", 0) + 1
        ctx.set("n", n)
        ctx.set("seen", ctx.get("seen", []) + [m["id"]])
        ctx.emit(m["topic"], {"id": m["id"], "n": n}, key=ctx.key)
        return n

    return app


def _steered(ctl: Path) -> Any:
    from aiohttp import web

    @web.middleware
    async def steer(request: web.Request, handler: Any) -> Any:
        if not request.path.endswith("/invoke"):
            return await handler(request)
        body = await request.read()
        items = len(orjson.loads(body)["items"]) if body[:1] == b"{" else -1
        with open(ctl / "requests", "a") as f:
            f.write(f"{items} {len(body)}\n")
        mode = (ctl / "mode").read_text().split() if (ctl / "mode").exists() else []
        if mode == ["503"]:
            return web.Response(status=503, text="down for the test")
        if mode[:1] == ["slow"]:
            await asyncio.sleep(float(mode[1]))
        elif mode == ["hang"]:
            await asyncio.sleep(3600)
        resp = await handler(request)
        if resp.status == 200:
            with open(ctl / "answered", "a") as f:
                f.write(f"{items}\n")
        return resp

    return steer


async def _serve(port: int) -> None:
    from aiohttp import web

    from oncely.remote import Endpoint

    webapp = Endpoint(build("conf-endpoint")).aiohttp_app()
    ctl = os.environ.get("REMOTE_CONF_CTL")
    if ctl:
        webapp.middlewares.append(_steered(Path(ctl)))
    runner = web.AppRunner(webapp)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(_serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
    except KeyboardInterrupt:
        sys.exit(0)

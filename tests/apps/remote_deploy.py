"""Apps for the deployment tests: one endpoint module in versions, and the
processor's app.

    python -m tests.apps.remote_deploy VERSION [PORT]   # prints "PORT <n>"

serves `endpoint_app(VERSION)`: the keyed service `acct` whose handlers tag
what they emit with the version that ran them. `v1` and `v2` have the same
handlers (different code: the tag); `v3` drops `acct.legacy` (a breaking
change); `flip` makes `acct` stateless (another one); `local` also serves
`notes`, a service the processor defines in-process.

The processor's app (`processor_app(name)`, or the module's `app`, named by
$DEPLOY_TEST_APP) defines only `notes`, where `acct.wait` sends the id of
the awakeable it waits on (so the test can resolve it).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import oncely


def processor_app(name: str, **settings: Any) -> oncely.App:
    app = oncely.App(name, partitions=2, **settings)
    notes = app.keyed("notes")

    @notes.handler
    async def note(ctx: oncely.KeyedContext, awakeable_id: str) -> None:
        ctx.set("awakeable", awakeable_id)

    return app


app = processor_app(os.environ.get("DEPLOY_TEST_APP", "deploy-test"))


def endpoint_app(version: str) -> oncely.App:
    app = oncely.App("deploy-endpoint", partitions=2)
    acct = app.service("acct") if version == "flip" else app.keyed("acct")

    @acct.handler
    async def wait(ctx: oncely.Context, m: dict) -> str:
        """Waits on an awakeable (its id sent to notes/<id>), then emits
        which version's code ran after the wait."""
        awk_id, approval = ctx.awakeable()
        ctx.send("notes", m["id"], "note", awk_id)
        got = await approval
        ctx.emit(m["topic"], {"id": m["id"], "after_wait": version, "got": got}, key=m["id"])
        return version

    @acct.handler
    async def quick(ctx: oncely.Context, m: dict) -> str:
        ctx.emit(m["topic"], {"id": m["id"], "ran": version}, key=m["id"])
        return version

    if version != "v3":
        @acct.handler
        async def legacy(ctx: oncely.Context) -> str:
            return version

    if version == "local":
        notes = app.keyed("notes")

        @notes.handler
        async def note(ctx: oncely.KeyedContext, awakeable_id: str) -> None:
            ctx.set("awakeable", awakeable_id)

    return app


async def _serve(version: str, port: int) -> None:
    from aiohttp import web

    from oncely.remote import Endpoint

    runner = web.AppRunner(Endpoint(endpoint_app(version)).aiohttp_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(_serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
    except KeyboardInterrupt:
        sys.exit(0)

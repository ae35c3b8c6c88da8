"""The `oncely demo` enrichment handler behind an HTTP endpoint.

The same app module (`oncely.examples.enrichment`), unchanged, served by
`Endpoint(app).aiohttp_app()`: a processor would send it batches of
invocations and apply what comes back (state, the enriched record it emits)
in its own transaction. Serve it with

    python -m oncely.examples.remote_enrichment [--host 127.0.0.1] [--port 9080]

Signed requests only once keys are set: ONCELY_VERIFY_KEYS=oncelypk1_…
(ed25519 public keys) or ONCELY_SIGNING_SECRET=… (HMAC).

`processor` is the processor's side: the same subscription, its target named
`"customers/add_order"` (the endpoint runs it), the endpoint from
ONCELY_DEPLOYMENTS (and the same ONCELY_SIGNING_SECRET to sign with):

    ONCELY_DEPLOYMENTS=http://127.0.0.1:9080 \
        oncely run oncely.examples.remote_enrichment:processor --bootstrap HOST:PORT

`oncely demo --remote` runs both, killing each -9 mid-stream.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

import oncely
from oncely.examples.enrichment import ENRICHED, ORDERS, app
from oncely.remote import Endpoint

endpoint = Endpoint(app)

processor = oncely.App(app.name, partitions=app.partitions)  # deployments: ONCELY_DEPLOYMENTS
processor.sink(ENRICHED)
processor.subscribe(ORDERS, "customers/add_order", key=lambda rec: rec.value["customer"], value="json",
                    idempotency="header:Idempotency-Key")


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(endpoint.aiohttp_app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_host, bound_port = runner.addresses[0][:2]
    print(f"serving app {app.name!r} on http://{bound_host}:{bound_port} (/discover, /invoke, /health)",
          flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9080, help="0 picks a free port")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

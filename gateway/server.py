"""The ingress's aiohttp server: inside a processor (`oncely run --http`,
on the processor's own event loop, like /metrics) or standalone (`oncely
gateway`). One catch-all aiohttp route hands every request to `dispatch`,
which matches the raw (still percent-encoded) path against the route table,
so keys are decoded to bytes by us and never mangled as text; every error is
JSON `{"message": ...}`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from oncely.errors import ConfigError
from oncely.gateway import openapi, paths, routes
from oncely.gateway.handlers import Gateway, json_response
from oncely.gateway.kafka import GatewayKafka
from oncely.gateway.paths import HttpError

if TYPE_CHECKING:
    from oncely.app import App

log = logging.getLogger("oncely.gateway")

MAX_BODY = 900 * 1024  # as a subscription's default max_bytes: what fits one log record


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (`:8080` listens on every interface)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "0.0.0.0", int(port)


def _error(e: HttpError) -> web.Response:
    body: dict[str, Any] = {"message": e.message}
    if e.invocation_id:
        body["invocation_id"] = e.invocation_id
    return json_response(e.status, body, e.headers)


class GatewayServer:
    """The ingress of one app at http://HOST:PORT (port 0: a free one,
    readable as `.port` once started)."""

    def __init__(self, app: "App", address: str, replies_partition: int | None = None,
                 max_body: int = MAX_BODY) -> None:
        openapi.require_apispec()
        if not app.config.bootstrap:
            raise ConfigError("the gateway needs a Kafka bootstrap address (--bootstrap or $ONCELY_KAFKA_BOOTSTRAP)")
        self.app = app
        self.host, self.port = parse_address(address)
        self.kafka = GatewayKafka(app.config.bootstrap, app.name, app.partitions, app.config.kafka,
                                  replies_partition)
        self.gateway = Gateway(app, self.kafka, max_body)
        self._doc: bytes | None = None
        self._runner: web.AppRunner | None = None

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            segs = paths.segments(request.raw_path) if request.raw_path.split("?")[0] != "/" else []
            found = routes.find(request.method, segs)
            if isinstance(found, list):
                if found:
                    raise HttpError(405, f"{request.method} is not allowed here; allowed: {', '.join(found)}",
                                    {"Allow": ", ".join(found)})
                raise HttpError(404, f"no route {request.method} {request.path} (see /openapi.json)")
            route, params = found
            if route.op == "openapi":
                return self._openapi()
            request["segments"] = segs
            return await getattr(self.gateway, route.op)(request, params)
        except HttpError as e:
            return _error(e)
        except web.HTTPException as e:  # raised by aiohttp itself (e.g. a body above client_max_size)
            return _error(HttpError(e.status, e.reason))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("gateway: %s %s failed", request.method, request.path)
            return _error(HttpError(500, f"internal error: {type(e).__name__}: {e}"))

    def _openapi(self) -> web.Response:
        if self._doc is None:
            self._doc = orjson.dumps(openapi.document(self.app))
        return web.Response(body=self._doc, content_type="application/json")

    async def start(self) -> "GatewayServer":
        await self.kafka.start()
        @web.middleware
        async def every_request(request: web.Request, handler: Any) -> web.StreamResponse:
            del handler  # no aiohttp routes: every request is ours
            return await self.dispatch(request)

        # No aiohttp routes: its router matches decoded paths (a key holding
        # "%2F" or "%0A" would not match); the middleware sees every request.
        app = web.Application(client_max_size=self.gateway.max_body, middlewares=[every_request])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        server = getattr(site, "_server", None)
        if self.port == 0 and server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        log.info("gateway of app %r: http://%s:%d (OpenAPI at /openapi.json)", self.app.name, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.kafka.stop()


def run_gateway(app: "App", address: str | None, replies_partition: int | None = None, admin: str | None = None,
                admin_token: str | None = None) -> None:
    """A standalone gateway (and/or admin API, gateway/admin.py) until
    SIGTERM/SIGINT: no state, no partitions of its own, as many as wanted
    beside the processors."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        servers: list[Any] = []
        try:
            if address is not None:
                servers.append(await GatewayServer(app, address, replies_partition).start())
            if admin is not None:
                from oncely.gateway.admin import AdminServer

                servers.append(await AdminServer(app, admin, admin_token).start())
            await stop.wait()
        finally:
            for server in servers:
                await server.stop()

    asyncio.run(main())

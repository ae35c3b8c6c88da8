"""The ingress's aiohttp server: inside a processor (`oncely run --http`,
on a thread of its own: `GatewayThread`) or standalone (`oncely
gateway`). One catch-all aiohttp route hands every request to `dispatch`,
which matches the raw (still percent-encoded) path against the route table,
so keys are decoded to bytes by us and never mangled as text; every error is
JSON `{"message": ...}`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
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
        self.token = app.config.http_token or None
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
            if self.token is not None and route.op != "health":
                paths.check_bearer(request.headers.get("Authorization", ""), self.token)
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
        app = routes.application(self.dispatch, self.gateway.max_body)  # every request goes to dispatch
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        try:
            await site.start()
        except BaseException:  # e.g. the port is taken: nothing of it stays running
            await self.stop()
            raise
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


class GatewayThread:
    """The ingress inside a processor process (`oncely run --http`), on its
    own thread and event loop. The processor's loop waits for each commit
    (bounded, but seconds during a broker outage): HTTP served on that loop
    would wait with it, and a request could outlive its wait. The gateway
    shares nothing with the processor but the process, so it needs no more."""

    def __init__(self, app: "App", address: str) -> None:
        self.server = GatewayServer(app, address)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="oncely-http", daemon=True)
        self._started: concurrent.futures.Future = concurrent.futures.Future()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:  # raised again by start()
            self._started.set_exception(e)
            self.loop.close()
            return
        self._started.set_result(self.server)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.server.stop())
            self.loop.close()

    def start(self, timeout: float = 120.0) -> GatewayServer:
        """Blocks until the server listens (call it off the processor's loop)."""
        self._thread.start()
        return self._started.result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Blocks until the server and its Kafka clients are closed (bounded)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)


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

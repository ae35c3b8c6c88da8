"""The admin API (Restate's admin paths, port 9070 by convention): the
app's services, invocation status, and the controls cancel / kill / pause /
resume / purge, each a `Control` record on the invocation's partition
(admin_ops.py). A separate aiohttp server from the ingress: loopback by
default; a bearer token (`ONCELY_ADMIN_TOKEN`, `--admin-token`) is required
on every route but /health when set, and binding another address without
one refuses to start.

ADMIN_ROUTES is the one table the dispatcher matches and the OpenAPI
document is generated from: a route is one `Route` line plus its method on
`Admin`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from oncely import __version__
from oncely.errors import ConfigError
from oncely.gateway import openapi, paths
from oncely.gateway.admin_deployments import DEPLOYMENT_ROUTES, DeploymentRoutes
from oncely.gateway.admin_ops import PHASES, InvocationOps, parse_limit
from oncely.gateway.handlers import json_response
from oncely.gateway.kafka import GatewayKafka
from oncely.gateway.paths import HttpError
from oncely.gateway.routes import Route, application

if TYPE_CHECKING:
    from oncely.app import App

log = logging.getLogger("oncely.admin")

_ID = {400: "malformed invocation id", 401: "missing or wrong bearer token", 404: "unknown invocation",
       503: "Kafka unavailable, or no processor answered within x-oncely-wait"}
_CONTROL = {200: "applied: `{invocation_id, action, status}`", 202: "not confirmed within x-oncely-wait (the "
            "control is on the log and is applied when the processor runs)", **_ID,
            409: "wrong phase (e.g. purge of an invocation in flight, resume of one not paused)"}
_W = ("x-oncely-wait",)

ADMIN_ROUTES: tuple[Route, ...] = (
    Route("GET", "/health", "health", "Health: 200 when Kafka answers", {200: "ok", 503: _ID[503]}, tag="meta"),
    Route("GET", "/version", "version", "oncely's version", {200: "`{version}`", 401: _ID[401]}, tag="meta"),
    Route("GET", "/openapi.json", "openapi", "This OpenAPI document", {200: "OpenAPI 3.1", 401: _ID[401]},
          tag="meta"),
    Route("GET", "/services", "services", "The app's services and handlers", {200: "`{services: [...]}`",
          401: _ID[401]}, tag="services"),
    Route("GET", "/services/{service}", "service", "One service", {200: "`{name, keyed, handlers, deployment}`",
          401: _ID[401], 404: "no such service"}, tag="services"),
    Route("GET", "/invocations", "invocations", "Invocations in flight, queued or failed (per partition, "
          "bounded by limit)", {200: "`{invocations: [...], missing_partitions: [...]}`", 400: "bad phase or limit",
                                401: _ID[401], 503: _ID[503]}, headers=_W, query=("phase", "limit"),
          tag="invocations"),
    Route("GET", "/invocations/{invocation_id}", "describe", "An invocation's status",
          {200: "`{target, phase, attempt, error, deployment, journal_length, ...}`", **_ID}, headers=_W,
          tag="invocations"),
    *(Route("PATCH", f"/invocations/{{invocation_id}}/{a}", "control", s, _CONTROL, headers=_W, tag="invocations")
      for a, s in (("cancel", "Cancel: awaited entries fail with TerminalError('cancelled') (cooperative)"),
                   ("kill", "Kill: fail it at once (reason killed), answer its caller, release its key"),
                   ("pause", "Pause: stop it where it is; it keeps its key and stays paused across restarts"),
                   ("resume", "Resume a paused invocation (by journal replay)"),
                   ("purge", "Purge a finished invocation's result, failure and idempotency entry"))),
    *DEPLOYMENT_ROUTES,
)
_PARAMS = {"phase": f"only these phases (repeat, or comma-separated): {', '.join(PHASES)}",
           "limit": "at most this many per partition (1-1000, default 100)",
           "force": "true: remove even while invocations are pinned to it (they pause)",
           "x-oncely-wait": "seconds to wait for the processor's answer (default 30, at most 60)"}


def find(method: str, segs: list[bytes]) -> tuple[Route, dict[str, bytes]] | list[str]:
    """The route and its parameters, or the methods the path allows."""
    allowed: list[str] = []
    for r in ADMIN_ROUTES:
        params = r.match(segs)
        if params is None:
            continue
        if r.method == method or (method == "HEAD" and r.method == "GET"):
            return r, params
        if r.method not in allowed:
            allowed.append(r.method)
    return allowed


def document(app: "App") -> dict[str, Any]:
    """The admin API's OpenAPI 3.1 document, from ADMIN_ROUTES."""
    from apispec import APISpec

    spec = APISpec(title=f"oncely admin API of app {app.name!r}", version=__version__, openapi_version="3.1.0",
                   info={"description": "Services, invocation status and controls. Errors are JSON `{message}`; "
                                        "with a token set, send `Authorization: Bearer <token>`."})
    spec.components.schema("Error", {"type": "object", "required": ["message"],
                                     "properties": {"message": {"type": "string"}}})
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    ops: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(ADMIN_ROUTES):
        op = openapi._operation(r, i)
        for p in op["parameters"]:
            p["description"] = _PARAMS.get(p["name"], p["description"])
        if r.op != "health":
            op["security"] = [{"bearer": []}]
        ops.setdefault(r.path, {})[r.method.lower()] = op
    for path, o in ops.items():
        spec.path(path=path, operations=o)
    return spec.to_dict()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(address: str, token: str | None) -> tuple[str, int]:
    """HOST:PORT, refusing a non-loopback address without a token."""
    host, port = parse_address(address)
    if not token and not is_loopback(host):
        raise ConfigError(f"--admin {address}: the admin API can kill and purge invocations, so on a non-loopback "
                          "address it needs a bearer token (set ONCELY_ADMIN_TOKEN or --admin-token)")
    return host, port


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--admin {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9070")
    return host.strip("[]") or "0.0.0.0", int(port)


class Admin(DeploymentRoutes):
    """What each admin route does (the /deployments ones in admin_deployments.py)."""

    def __init__(self, app: "App", kafka: GatewayKafka) -> None:
        self.app = app
        self.kafka = kafka
        self.ops = InvocationOps(kafka)
        self._doc: bytes | None = None

    async def health(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        why = await self.kafka.healthy()
        if why is not None:
            raise HttpError(503, why, {"Retry-After": "5"})
        return json_response(200, {"status": "ok", "app": self.app.name})

    async def version(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        return json_response(200, {"version": __version__, "app": self.app.name})

    async def openapi(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        if self._doc is None:
            self._doc = orjson.dumps(document(self.app))
        return web.Response(body=self._doc, content_type="application/json")

    def _service(self, name: str) -> dict[str, Any]:
        svc = self.app.services.get(name)
        if svc is None:
            raise HttpError(404, f"app {self.app.name!r} has no service {name!r}")
        return {"name": svc.name, "keyed": svc.keyed, "handlers": sorted(svc.handlers),
                "deployment": getattr(svc, "deployment", None)}

    async def services(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        return json_response(200, {"services": [self._service(n) for n in sorted(self.app.services)]})

    async def service(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        return json_response(200, self._service(paths.text(p["service"], "service")))

    async def invocations(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        phases = [x.strip().upper() for v in request.query.getall("phase", []) for x in v.split(",") if x.strip()]
        found = await self.ops.list(phases, parse_limit(request.query.get("limit")), _wait(request))
        return json_response(200, {"invocations": found.invocations, "missing_partitions": found.missing})

    async def describe(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        raw = paths.text(p["invocation_id"], "invocation id")
        d = await self.ops.describe(raw, _wait(request))
        if d is None:
            raise HttpError(404, f"invocation {raw} is unknown (never accepted, or past its retention)")
        return json_response(200, d)

    async def control(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        raw = paths.text(p["invocation_id"], "invocation id")
        action = request["segments"][-1].decode()
        status, why, inv = await self.ops.control(raw, action, _wait(request))
        if status == "applied":
            return json_response(200, {"invocation_id": inv, "action": action, "status": "applied"})
        if status == "pending":
            return json_response(202, {"invocation_id": inv, "action": action, "status": "pending",
                                       "message": "not confirmed yet: the control is on the log and is applied "
                                                  "when the app's processor reads it"})
        if status == "conflict":
            raise HttpError(409, f"{action} of {inv} refused: {why}")
        raise HttpError(404, f"invocation {inv} is unknown (never accepted, or past its retention)")


def _wait(request: web.Request) -> float:
    return min(paths.wait_seconds(request.headers.get("x-oncely-wait")), 60.0)


def _error(e: HttpError) -> web.Response:
    return json_response(e.status, {"message": e.message}, e.headers)


class AdminServer:
    """The admin API of one app at http://HOST:PORT (port 0: a free one)."""

    def __init__(self, app: "App", address: str, token: str | None = None,
                 kafka: GatewayKafka | None = None) -> None:
        openapi.require_apispec()
        if not app.config.bootstrap:
            raise ConfigError("the admin API needs a Kafka bootstrap address (--bootstrap or $ONCELY_KAFKA_BOOTSTRAP)")
        self.host, self.port = check_exposure(address, token)
        self.app = app
        self.token = token or None
        self._own_kafka = kafka is None
        self.kafka = kafka or GatewayKafka(app.config.bootstrap, app.name, app.partitions, app.config.kafka)
        self.admin = Admin(app, self.kafka)
        self._runner: web.AppRunner | None = None

    def _authorize(self, request: web.Request, route: Route) -> None:
        if self.token is None or route.op == "health":
            return
        paths.check_bearer(request.headers.get("Authorization", ""), self.token)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            segs = paths.segments(request.raw_path) if request.raw_path.split("?")[0] != "/" else []
            found = find(request.method, segs)
            if isinstance(found, list):
                if found:
                    raise HttpError(405, f"{request.method} is not allowed here; allowed: {', '.join(found)}",
                                    {"Allow": ", ".join(found)})
                raise HttpError(404, f"no route {request.method} {request.path} (see /openapi.json)")
            route, params = found
            self._authorize(request, route)
            request["segments"] = segs
            return await getattr(self.admin, route.op)(request, params)
        except HttpError as e:
            return _error(e)
        except web.HTTPException as e:
            return _error(HttpError(e.status, e.reason))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("admin: %s %s failed", request.method, request.path)
            return _error(HttpError(500, f"internal error: {type(e).__name__}: {e}"))

    async def start(self) -> "AdminServer":
        if self._own_kafka:
            await self.kafka.start()
        app = application(self.dispatch, 64 * 1024)  # every request goes to dispatch
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:  # e.g. the port is taken: nothing of it stays running
            await self.stop()
            raise
        server = getattr(site, "_server", None)
        if self.port == 0 and server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        log.info("admin API of app %r: http://%s:%d (%s)", self.app.name, self.host, self.port,
                 "bearer token required" if self.token else "no token: loopback only")
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._own_kafka:
            await self.kafka.stop()

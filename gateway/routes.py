"""The ingress routes (paths follow Restate's): each one is a `Route` in
ROUTES, the single definition the dispatcher matches requests against and
the OpenAPI document is generated from (openapi.py).

A pattern is a tuple of path segments: literals, or `{name}` for a
percent-decoded segment. The first route whose pattern fits the path and
method wins; a path that fits only other methods is a 405.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

JSON_BODY = ("application/json", "application/octet-stream")


@dataclass(frozen=True)
class Route:
    method: str
    path: str            # `/restate/call/{service}/{handler}`
    op: str              # the Gateway method that answers it
    summary: str
    responses: dict[int, str]
    body: tuple[str, ...] = ()     # accepted request content types
    headers: tuple[str, ...] = ()  # documented request headers
    query: tuple[str, ...] = ()    # documented query parameters
    tag: str = "ingress"
    pattern: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", tuple(self.path.strip("/").split("/")))

    def match(self, segs: list[bytes]) -> dict[str, bytes] | None:
        if len(segs) != len(self.pattern):
            return None
        params: dict[str, bytes] = {}
        for p, s in zip(self.pattern, segs):
            if p.startswith("{"):
                params[p[1:-1]] = s
            elif p.encode() != s:
                return None
        return params


CALL = {200: "the handler's output (JSON, or bytes as application/octet-stream)",
        202: "still running after x-oncely-wait: `{invocation_id, status}`, Location names the attach path",
        400: "bad path, key, Idempotency-Key, body or a delay on a call", 404: "no such service or handler",
        413: "body above the limit", 415: "content type not JSON or bytes",
        500: "the invocation failed (terminal error or dead-lettered)", 503: "Kafka unavailable"}
SEND = {202: "accepted once Kafka has it: `{invocation_id, status}`", 400: CALL[400], 404: CALL[404],
        413: CALL[413], 415: CALL[415], 503: CALL[503]}
ATTACH = {200: "the invocation's output", 202: "still running after x-oncely-wait", 400: "malformed id",
          404: "unknown invocation (or past its retention)", 500: "the invocation failed", 503: CALL[503]}
OUTPUT = {200: "the invocation's output", 470: "not finished yet", 400: "malformed id", 404: ATTACH[404],
          500: ATTACH[500], 503: "no answer from the app's processors within x-oncely-wait"}
AWAKE = {200: "`{ok: true}`: completed", 202: "no answer yet (the completion stays on the log)",
         400: "malformed id or body", 404: "its invocation is not in flight (or another app's id)",
         409: "already completed", 413: CALL[413], 503: CALL[503]}
STATE = {200: "the state: `{name: value}` (bytes as `{b64}`), or one raw value", 400: "stateless service",
         404: "no such service, or the value is absent", 503: OUTPUT[503]}
_CALL_H = ("Idempotency-Key", "x-oncely-wait")
_SEND_H = ("Idempotency-Key",)

ROUTES: tuple[Route, ...] = (
    Route("GET", "/restate/health", "health", "Health: 200 when Kafka answers", {200: "ok", 503: CALL[503]},
          tag="meta"),
    Route("GET", "/openapi.json", "openapi", "This OpenAPI document", {200: "OpenAPI 3.1"}, tag="meta"),
    Route("POST", "/restate/call/{service}/{handler}", "call", "Call a stateless handler and wait",
          CALL, JSON_BODY, _CALL_H),
    Route("POST", "/restate/call/{service}/{key}/{handler}", "call", "Call a keyed handler and wait",
          CALL, JSON_BODY, _CALL_H),
    Route("POST", "/restate/send/{service}/{handler}", "send", "Send to a stateless handler (one-way)",
          SEND, JSON_BODY, _SEND_H, ("delay",)),
    Route("POST", "/restate/send/{service}/{key}/{handler}", "send", "Send to a keyed handler (one-way)",
          SEND, JSON_BODY, _SEND_H, ("delay",)),
    Route("GET", "/restate/attach/{invocation_id}", "attach", "Wait for an invocation's output", ATTACH,
          headers=("x-oncely-wait",)),
    Route("GET", "/restate/output/{invocation_id}", "output", "An invocation's output if finished", OUTPUT),
    Route("GET", "/restate/invocation/{invocation_id}/attach", "attach", "Wait for an invocation's output",
          ATTACH, headers=("x-oncely-wait",)),
    Route("GET", "/restate/invocation/{invocation_id}/output", "output", "An invocation's output", OUTPUT),
    Route("GET", "/restate/invocation/{service}/{handler}/{idempotency_key}/attach", "attach",
          "Wait for the output of a stateless call by its idempotency key", ATTACH, headers=("x-oncely-wait",)),
    Route("GET", "/restate/invocation/{service}/{key}/{handler}/{idempotency_key}/attach", "attach",
          "Wait for the output of a keyed call by its idempotency key", ATTACH, headers=("x-oncely-wait",)),
    Route("GET", "/restate/invocation/{service}/{handler}/{idempotency_key}/output", "output",
          "The output of a stateless call by its idempotency key", OUTPUT),
    Route("GET", "/restate/invocation/{service}/{key}/{handler}/{idempotency_key}/output", "output",
          "The output of a keyed call by its idempotency key", OUTPUT),
    Route("POST", "/restate/awakeables/{awakeable_id}/resolve", "resolve", "Resolve an awakeable", AWAKE,
          JSON_BODY, ("x-oncely-wait",)),
    Route("POST", "/restate/awakeables/{awakeable_id}/reject", "reject", "Reject an awakeable (text reason)",
          AWAKE, ("text/plain",), ("x-oncely-wait",)),
    Route("GET", "/restate/state/{service}/{key}", "state", "A key's committed state (log-ordered)", STATE,
          headers=("x-oncely-wait",)),
    Route("GET", "/restate/state/{service}/{key}/{name}", "state", "One committed state value", STATE,
          headers=("x-oncely-wait",)),
    # Restate's short forms; a keyed service takes a key segment, so
    # `/{service}/{key}/{handler}` and `/{service}/{handler}/send` are told
    # apart by the service.
    Route("POST", "/{service}/{handler}", "alias", "Call a stateless handler and wait", CALL, JSON_BODY,
          _CALL_H),
    Route("POST", "/{service}/{key}/{handler}", "alias", "Call a keyed handler (or send to a stateless one "
          "when the last segment is `send`)", CALL, JSON_BODY, _CALL_H, ("delay",)),
    Route("POST", "/{service}/{key}/{handler}/send", "alias", "Send to a keyed handler (one-way)", SEND,
          JSON_BODY, _SEND_H, ("delay",)),
)


def find(method: str, segs: list[bytes]) -> tuple[Route, dict[str, bytes]] | list[str]:
    """The route and its parameters, or the methods the path allows (empty:
    no route has this path)."""
    allowed: list[str] = []
    for r in ROUTES:
        params = r.match(segs)
        if params is None:
            continue
        if r.op == "alias" and segs[0] == b"restate":
            continue  # /restate/... is never a service
        if r.method == method or (method == "HEAD" and r.method == "GET"):
            return r, params
        if r.method not in allowed:
            allowed.append(r.method)
    return allowed


def application(dispatch: Callable[[web.Request], Awaitable[web.StreamResponse]],
                client_max_size: int) -> web.Application:
    """An aiohttp application whose every request goes to `dispatch`.

    Our routes are matched by `dispatch`, not by aiohttp's router (it
    matches decoded paths: a key holding "%2F" or "%0A" would not match), so
    a middleware takes every request. aiohttp's router still resolves each
    one first: left without a route, it makes a 404 for every request, whose
    objects form a reference cycle (measured: 6 cyclic objects per call, and
    30-40k of them freed by one 70-80 ms collection under 500 calls/s). The
    catch-all route below matches every path, so nothing is made; its own
    handler is never called."""

    @web.middleware
    async def every_request(request: web.Request, handler: Any) -> web.StreamResponse:
        del handler
        return await dispatch(request)

    async def unused(request: web.Request) -> web.StreamResponse:
        return await dispatch(request)

    app = web.Application(client_max_size=client_max_size, middlewares=[every_request])
    app.router.add_route("*", r"/{path:[\s\S]*}", unused)
    return app

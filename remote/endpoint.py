"""`Endpoint`: an ordinary `oncely.App` served over HTTP for a processor.

One neutral core, `Endpoint.handle(method, path, headers, body)`, answers
every request; `aiohttp_app()`, `asgi()` and `oncely.remote.aws_lambda`
only adapt it. Routes match path suffixes (a gateway may add a prefix):
`…/discover` (the manifest), `…/invoke` (a batch of invocations) and
`…/health` (no auth). A signed endpoint checks the signature before it
decompresses or parses anything.

This module imports neither confluent_kafka nor rocksdict: an endpoint
deploys where neither is installed (a Lambda zip).
"""

from __future__ import annotations

import asyncio
import logging
import os
import zlib
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

import orjson

from oncely.egress.sinks import Sinks
from oncely.remote.items import run_item
from oncely.remote.signing import H_DEPLOYMENT, Verifier, normalise_path
from oncely.remote.wire import (DEFAULT_DEADLINE_MS, INVOKE_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MAX_DEADLINE_MS,
                                MEDIA_PREFIX, PROTOCOL_MAX, PROTOCOL_MIN, BatchTooLarge, Malformed, parse_invoke)

if TYPE_CHECKING:
    from aiohttp import web

    from oncely.app import App

log = logging.getLogger("oncely.remote")

MiB = 1024 * 1024
DEFAULT_MAX_REQUEST = 8 * MiB
LAMBDA_MAX_REQUEST = 4 * MiB  # the 6 MB event limit, after base64 and the envelope
DEFAULT_MAX_BATCH = 32
Response = tuple[int, dict[str, str], bytes]


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


class Endpoint:
    """Serves `app`'s handlers to a processor.

    verify_keys: ed25519 public keys (`oncelypk1_…`) whose signatures are
    accepted (default: ONCELY_VERIFY_KEYS, comma-separated); hmac_secret: a
    shared secret, or several for rotation (default: ONCELY_SIGNING_SECRET).
    With neither, unsigned requests are accepted (a warning says so).
    max_batch: items per request; max_request_bytes: the largest body (after
    decompression), default 8 MiB, 4 MiB on Lambda.
    """

    def __init__(self, app: App, *, verify_keys: list[Any] | None = None,
                 hmac_secret: str | bytes | list[str | bytes] | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 max_request_bytes: int | None = None, max_response_bytes: int | None = None) -> None:
        if verify_keys is None:
            verify_keys = _split(os.environ.get("ONCELY_VERIFY_KEYS"))
        if hmac_secret is None:
            hmac_secret = _split(os.environ.get("ONCELY_SIGNING_SECRET"))  # type: ignore[assignment]
        secrets = hmac_secret if isinstance(hmac_secret, list) else [hmac_secret]
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError("max_batch must be a positive int")
        self.app = app
        self.verifier = Verifier(verify_keys, secrets)
        self.max_batch = max_batch
        self._max_request = max_request_bytes
        self._max_response = max_response_bytes
        # Undeclared topics are JSON; the processor knows which exist.
        self.sinks = Sinks(app.sinks, topic_exists=lambda _topic: True)
        from oncely import __version__

        self.sdk = f"oncely/{__version__}"
        if not self.verifier.enabled:
            log.warning("endpoint for app %r: no verify keys and no HMAC secret, so it accepts UNSIGNED "
                        "requests; anyone who can reach it can run its handlers", app.name)

    def max_request_bytes(self, platform: str) -> int:
        if self._max_request is not None:
            return self._max_request
        return LAMBDA_MAX_REQUEST if platform == "lambda" else DEFAULT_MAX_REQUEST

    def manifest(self, platform: str) -> dict[str, Any]:
        """What `/discover` answers: protocols, limits and every handler."""
        services = []
        for svc in self.app.services.values():
            r = svc.retry
            services.append({
                "name": svc.name, "keyed": svc.keyed,
                "retry": {"max_attempts": r.max_attempts, "initial_interval": r.initial_interval,
                          "factor": r.factor, "max_interval": r.max_interval},
                "handlers": [{"name": h.name, "takes_input": h.takes_input, "state_hints": None, "timeout_s": None}
                             for h in svc.handlers.values()],
            })
        limit = self.max_request_bytes(platform)
        return {
            "protocol": {"min": PROTOCOL_MIN, "max": PROTOCOL_MAX}, "encodings": ["json"], "compression": ["gzip"],
            "max_request_bytes": limit, "max_response_bytes": self._max_response or limit,
            "max_batch": self.max_batch, "sdk": self.sdk, "platform": platform, "app": self.app.name,
            "sinks": {t: s.serializer.name for t, s in self.app.sinks.items()}, "services": services,
        }

    # -- the core ---------------------------------------------------------------------

    def _json(self, status: int, doc: Any, content_type: str = "application/json",
              extra: dict[str, str] | None = None) -> Response:
        return status, {"content-type": content_type, "x-oncely-sdk": self.sdk, **(extra or {})}, orjson.dumps(doc)

    def _error(self, status: int, message: str, **more: Any) -> Response:
        return self._json(status, {"message": message, **more})

    async def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes, *,
                     platform: str = "aiohttp", deadline_ms: int | None = None) -> Response:
        """Answer one request. `headers` have lower-case names; `body` is
        the body as received; `deadline_ms` is the platform's own limit."""
        route = normalise_path(path)
        if route is None:
            return self._error(404, f"no route {path!r}: the endpoint answers …/discover, …/invoke, …/health")
        method = method.upper()
        if route == "/health":
            return self._json(200, {"ok": True, "sdk": self.sdk})
        want = "GET" if route == "/discover" else "POST"
        if method != want:
            return self._json(405, {"message": f"{route} takes {want}"}, extra={"allow": want})
        if len(body) > self.max_request_bytes(platform):
            return self._error(413, f"the body is larger than {self.max_request_bytes(platform)} bytes")
        if self.verifier.enabled:
            reason = self.verifier.check(method, path, headers, body)
            if reason is not None:
                log.warning("refused %s %s: %s (deployment %s)", method, route, reason, headers.get(H_DEPLOYMENT))
                return self._error(401, reason)
        if route == "/discover":
            accept = headers.get("accept", "")
            if accept and not any(a.split(";")[0].strip() in (MANIFEST_MEDIA_TYPE, "application/json", "*/*")
                                  for a in accept.split(",")):
                return self._unsupported(f"discover answers {MANIFEST_MEDIA_TYPE}, not {accept!r}")
            return self._json(200, self.manifest(platform), MANIFEST_MEDIA_TYPE)
        return await self._invoke(headers, body, platform, deadline_ms)

    def _unsupported(self, message: str) -> Response:
        return self._error(415, message, protocol={"min": PROTOCOL_MIN, "max": PROTOCOL_MAX},
                           media_types=[INVOKE_MEDIA_TYPE], encodings=["json"], compression=["gzip"])

    async def _invoke(self, headers: Mapping[str, str], body: bytes, platform: str,
                      deadline_ms: int | None) -> Response:
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != INVOKE_MEDIA_TYPE:
            what = "version" if ctype.startswith(MEDIA_PREFIX) else "media type"
            return self._unsupported(f"unsupported {what} {ctype or '(none)'!r}; send {INVOKE_MEDIA_TYPE}")
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding == "gzip":
            try:
                body = _gunzip(body, self.max_request_bytes(platform))
            except OverflowError:
                return self._error(413, f"the body inflates beyond {self.max_request_bytes(platform)} bytes")
            except zlib.error as e:
                return self._error(400, f"the body is not valid gzip: {e}")
        elif encoding not in ("identity", ""):
            return self._unsupported(f"unsupported content-encoding {encoding!r}")
        try:
            req = parse_invoke(body, self.max_batch)
        except BatchTooLarge as e:
            return self._error(413, str(e))
        except Malformed as e:
            return self._error(400, str(e))
        limit = _deadline(headers.get("x-oncely-deadline-ms"), req.deadline_ms, deadline_ms)
        if isinstance(limit, str):
            return self._error(400, limit)
        deadline = asyncio.get_running_loop().time() + limit / 1000
        try:
            answers = await asyncio.gather(*(run_item(self.app, self.sinks, req, it, deadline) for it in req.items))
        except Exception as e:
            log.exception("an invoke request failed in the endpoint")
            return self._error(500, f"the endpoint failed: {type(e).__name__}: {e}")
        return self._json(200, {"items": answers}, INVOKE_MEDIA_TYPE)

    # -- adapters ---------------------------------------------------------------------

    def aiohttp_app(self) -> web.Application:
        """An aiohttp `web.Application` answering every path (run it with
        `web.run_app`, or mount it under a prefix)."""
        from aiohttp import web

        limit = self.max_request_bytes("aiohttp")

        async def serve(request: web.Request) -> web.Response:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                status, hdrs, out = self._error(413, f"the body is larger than {limit} bytes")
            else:
                headers = {k.lower(): v for k, v in request.headers.items()}
                status, hdrs, out = await self.handle(request.method, request.path, headers, body)
            ctype = hdrs.pop("content-type")
            return web.Response(status=status, body=out, headers=hdrs, content_type=ctype)

        # The signature covers the body as sent: aiohttp must not inflate it.
        webapp = web.Application(client_max_size=limit, handler_args={"auto_decompress": False})
        webapp.router.add_route("*", "/{tail:.*}", serve)
        return webapp

    def asgi(self) -> Callable[[dict[str, Any], Any, Any], Awaitable[None]]:
        """An ASGI-3 application (uvicorn, hypercorn, …); it also completes
        lifespan events."""
        limit = self.max_request_bytes("asgi")

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                while True:
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    elif message["type"] == "lifespan.shutdown":
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            if scope["type"] != "http":
                raise ValueError(f"an oncely endpoint serves HTTP, not {scope['type']!r}")
            headers: dict[str, str] = {}
            for k, v in scope.get("headers", []):
                name = k.decode("latin-1").lower()
                headers[name] = f"{headers[name]},{v.decode('latin-1')}" if name in headers else v.decode("latin-1")
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    break
                chunks.append(chunk)
                more = message.get("more_body", False)
            if size > limit:
                status, hdrs, out = self._error(413, f"the body is larger than {limit} bytes")
            else:
                status, hdrs, out = await self.handle(scope["method"], scope["path"], headers, b"".join(chunks),
                                                      platform="asgi")
            await send({"type": "http.response.start", "status": status,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in hdrs.items()]})
            await send({"type": "http.response.body", "body": out})

        return app


def _gunzip(body: bytes, limit: int) -> bytes:
    """Inflate a gzip body, refusing (OverflowError) beyond `limit` bytes."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(body, limit + 1)
    if len(out) > limit or d.unconsumed_tail:
        raise OverflowError(limit)
    out += d.flush()
    if not d.eof:
        raise zlib.error("truncated gzip stream")
    if len(out) > limit:
        raise OverflowError(limit)
    return out


def _deadline(header: str | None, body: int | None, platform: int | None) -> int | str:
    """The item time limit in ms: the tightest of the header, the body and
    the platform's; an error text for a malformed header."""
    limits = [v for v in (body, platform) if v is not None]
    if header is not None:
        try:
            limits.append(int(header))
        except ValueError:
            return f"x-oncely-deadline-ms {header!r} is not an integer"
    value = min(limits) if limits else DEFAULT_DEADLINE_MS
    return max(1, min(value, MAX_DEADLINE_MS))

"""AWS Lambda: `handler = lambda_handler(Endpoint(app))` serves API Gateway
REST (payload v1), HTTP API (v2) and Function URL (v2) events.

One event loop per container, kept across invocations (Lambda runs one
event at a time per container), so nothing is set up per request. The
time limit of a request is the function's remaining time less one second,
so a slow item answers `yield` before Lambda kills the container.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any, Callable

import orjson

from oncely.remote.endpoint import Endpoint

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]


class BadEvent(ValueError):
    """Not an API Gateway or Function URL event."""


def parse_event(event: Any) -> tuple[str, str, dict[str, str], bytes]:
    """(method, path, headers with lower-case names, body) of a v1 or v2 event."""
    if not isinstance(event, dict):
        raise BadEvent("the event is not an object")
    if event.get("version") == "2.0":
        http = (event.get("requestContext") or {}).get("http") or {}
        method, path = http.get("method"), event.get("rawPath") or http.get("path")
        headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    else:
        method, path = event.get("httpMethod"), event.get("path")
        multi = event.get("multiValueHeaders")
        if multi:
            headers = {str(k).lower(): ",".join(map(str, v)) for k, v in multi.items()}
        else:
            headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    if not isinstance(method, str) or not isinstance(path, str):
        raise BadEvent("the event names no HTTP method and path (API Gateway v1/v2 or a Function URL)")
    raw = event.get("body") or ""
    if not isinstance(raw, str):
        raise BadEvent("the event body is not a string")
    if event.get("isBase64Encoded"):
        try:
            body = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise BadEvent("the event body is not valid base64") from None
    else:
        body = raw.encode()
    return method, path, headers, body


def lambda_handler(endpoint: Endpoint) -> LambdaHandler:
    """The function Lambda calls with (event, context)."""
    loop: asyncio.AbstractEventLoop | None = None

    def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        nonlocal loop
        if loop is None or loop.is_closed():
            loop = asyncio.new_event_loop()
        try:
            method, path, headers, body = parse_event(event)
        except BadEvent as e:
            return {"statusCode": 400, "headers": {"content-type": "application/json"},
                    "body": orjson.dumps({"message": str(e)}).decode(), "isBase64Encoded": False}
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        deadline = max(1, remaining() - 1000) if callable(remaining) else None
        status, out_headers, out = loop.run_until_complete(
            endpoint.handle(method, path, headers, body, platform="lambda", deadline_ms=deadline))
        # Every answer is JSON text, which REST APIs pass without binary media types.
        return {"statusCode": status, "headers": out_headers, "body": out.decode(), "isBase64Encoded": False}

    return handler

"""The endpoint's other adapters and its imports.

ASGI: no ASGI server (uvicorn, hypercorn) is installed here, so the ASGI
callable is driven in-process with hand-made scopes and messages, as a
server would drive it. Lambda: synthetic API Gateway v1 (REST), v2 (HTTP
API) and Function URL events through `lambda_handler`."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from typing import Any

import orjson
import pytest
from apps.remote_client import REPO, item

from oncely.remote import Endpoint, SigningKey, lambda_handler, sign_request
from oncely.remote.wire import INVOKE_MEDIA_TYPE, invoke_request
from oncely.shuffle.ids import random_id

SECRET = "lambda-secret-0123456789abcdef"


def _app() -> Any:
    from apps.remote_app import app

    return app


def body() -> bytes:
    return invoke_request("remote-test", 1, [item(random_id(), "audit", "record", None, {"n": 1})])


async def asgi_call(app: Any, method: str, path: str, data: bytes, headers: dict[str, str],
                    chunk: int = 7) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request through an ASGI-3 app, the body in small chunks."""
    parts = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
    incoming = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    await app(scope, receive, send)
    start, content = sent
    assert start["type"] == "http.response.start" and content["type"] == "http.response.body"
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, content["body"]


def test_asgi_lifespan_discover_and_invoke() -> None:
    asgi = Endpoint(_app(), hmac_secret=SECRET).asgi()
    key = SigningKey.hmac(SECRET)

    async def go() -> None:
        events = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        acks: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return events.pop(0)

        async def send(message: dict[str, Any]) -> None:
            acks.append(message)

        await asgi({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        assert [a["type"] for a in acks] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

        status, headers, out = await asgi_call(asgi, "GET", "/discover", b"",
                                               sign_request(key, "GET", "/discover", b""))
        assert status == 200 and orjson.loads(out)["platform"] == "asgi"
        data = body()
        status, headers, out = await asgi_call(asgi, "POST", "/api/invoke", data, {
            "content-type": INVOKE_MEDIA_TYPE, **sign_request(key, "POST", "/invoke", data)})
        assert status == 200 and headers["content-type"] == INVOKE_MEDIA_TYPE
        assert orjson.loads(out)["items"][0]["status"] == "completed"
        status, _, out = await asgi_call(asgi, "POST", "/invoke", data, {"content-type": INVOKE_MEDIA_TYPE})
        assert (status, orjson.loads(out)) == (401, {"message": "unsigned"})
        small = Endpoint(_app(), max_request_bytes=100).asgi()
        status, _, out = await asgi_call(small, "POST", "/invoke", data, {"content-type": INVOKE_MEDIA_TYPE})
        assert status == 413

    asyncio.run(go())


class FakeContext:
    """What Lambda passes as `context` (only what the adapter reads)."""

    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def v1_event(method: str, path: str, data: bytes, headers: dict[str, str], b64: bool = False) -> dict[str, Any]:
    return {"resource": "/{proxy+}", "path": path, "httpMethod": method, "headers": headers,
            "multiValueHeaders": {k: [v] for k, v in headers.items()}, "queryStringParameters": None,
            "requestContext": {"stage": "prod", "httpMethod": method},
            "body": base64.b64encode(data).decode() if b64 else data.decode(), "isBase64Encoded": b64}


def v2_event(method: str, path: str, data: bytes, headers: dict[str, str], b64: bool = True) -> dict[str, Any]:
    # HTTP API and Function URL events share this shape (payload format 2.0).
    return {"version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": "",
            "headers": {k.lower(): v for k, v in headers.items()},
            "requestContext": {"http": {"method": method, "path": path, "protocol": "HTTP/1.1"},
                               "domainName": "abc.lambda-url.eu-west-1.on.aws"},
            "body": base64.b64encode(data).decode() if b64 else data.decode(), "isBase64Encoded": b64}


@pytest.mark.parametrize("shape", ["v1", "v1-base64", "v2-http-api", "function-url"])
def test_lambda_events(shape: str) -> None:
    handler = lambda_handler(Endpoint(_app(), hmac_secret=SECRET))
    key = SigningKey.hmac(SECRET)
    data = body()
    headers = {"Content-Type": INVOKE_MEDIA_TYPE, **sign_request(key, "POST", "/invoke", data, "dp_lambda")}
    if shape.startswith("v1"):
        event = v1_event("POST", "/prod/invoke", data, headers, b64=shape == "v1-base64")
    else:
        event = v2_event("POST", "/invoke", data, headers, b64=shape == "function-url")
    answer = handler(event, FakeContext(30_000))
    assert answer["statusCode"] == 200 and answer["isBase64Encoded"] is False
    assert answer["headers"]["content-type"] == INVOKE_MEDIA_TYPE
    assert orjson.loads(answer["body"])["items"][0]["status"] == "completed"
    # The second event runs on the same, kept loop.
    again = handler(v2_event("GET", "/discover", b"", sign_request(key, "GET", "/discover", b"")), None)
    manifest = orjson.loads(again["body"])
    assert manifest["platform"] == "lambda" and manifest["max_request_bytes"] == 4 * 1024 * 1024
    assert handler(v1_event("POST", "/invoke", data, {"content-type": INVOKE_MEDIA_TYPE}), None)["statusCode"] == 401


def test_lambda_time_left_bounds_the_deadline_and_bad_events_are_400() -> None:
    handler = lambda_handler(Endpoint(_app()))
    data = invoke_request("remote-test", 1, [item(random_id(), "pricing", "dawdle", b"k", None, state={})])
    answer = handler(v2_event("POST", "/invoke", data, {"content-type": INVOKE_MEDIA_TYPE}), FakeContext(1300))
    assert orjson.loads(answer["body"])["items"][0]["status"] == "yield"
    for bad in ({"hello": 1}, {"version": "2.0", "rawPath": "/invoke"},
                {"httpMethod": "POST", "path": "/invoke", "body": "%%", "isBase64Encoded": True}):
        out = handler(bad, None)
        assert out["statusCode"] == 400 and "message" in orjson.loads(out["body"])


def test_the_endpoint_imports_no_kafka_no_rocksdb_and_no_cryptography_until_needed() -> None:
    """An endpoint deploys where neither librdkafka nor RocksDB is installed
    (a Lambda zip); ed25519 loads `cryptography` only when keys are given."""
    code = ("import sys, asyncio\n"
            "import oncely.remote, oncely.remote.endpoint, oncely.remote.aws_lambda\n"
            "from tests.apps.remote_app import app\n"
            "ep = oncely.remote.Endpoint(app, hmac_secret='x' * 20)\n"
            "print(asyncio.run(ep.handle('GET', '/discover', {}, b''))[0])\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('confluent_kafka', 'rocksdict', 'cryptography'))\n"
            "assert not heavy, heavy\n"
            "oncely.remote.Endpoint(app, verify_keys=[])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "401"

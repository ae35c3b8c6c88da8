"""What each ingress route does: build a log record, produce it, wait for
its answer on the replies topic (kafka.py), turn the answer into HTTP.

Every call carries an idempotency key (the caller's, or one assigned here
with a 1 h retention), so its id is derived from it and every result can
be attached to, and a repeated call with the same key attaches to the same
invocation (processor/requests.py). Ids handed out are located
(`inv_<id>_<partition>`): an attach by id goes straight to its partition.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from oncely import schemas
from oncely.errors import CANCELLED, KILLED
from oncely.gateway import paths
from oncely.gateway.kafka import GatewayKafka, KafkaUnavailable, NotAckedYet
from oncely.gateway.paths import HttpError
from oncely.sdk.protocol import TAG_BYTES, TAG_JSON
from oncely.shuffle.delivery import awakeable_result
from oncely.shuffle.envelope import invoke_record
from oncely.shuffle.ids import idempotent_id, parse_awakeable
from oncely.shuffle.routing import partition_for

if TYPE_CHECKING:
    from oncely.app import App, Service

ASSIGNED_RETENTION_MS = 3600 * 1000  # an idempotency key the gateway assigned
SEND_ACK_WAIT = 10.0
RETRY_AFTER = {"Retry-After": "5"}


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                        headers=headers)


def value_response(value: bytes | None, headers: dict[str, str]) -> web.Response:
    """A tagged engine value as an HTTP body: JSON, or bytes."""
    if value is None:
        return web.Response(status=200, body=b"null", content_type="application/json", headers=headers)
    if value[:1] == TAG_BYTES:
        return web.Response(status=200, body=value[1:], content_type="application/octet-stream", headers=headers)
    return web.Response(status=200, body=value[1:] if value[:1] == TAG_JSON else value,
                        content_type="application/json", headers=headers)


class Gateway:
    def __init__(self, app: "App", kafka: GatewayKafka, max_body: int) -> None:
        self.app = app
        self.kafka = kafka
        self.partitions = kafka.partitions
        self.max_body = max_body

    # -- helpers -----------------------------------------------------------------

    def _service(self, name: bytes) -> "Service":
        svc = self.app.services.get(paths.text(name, "service"))
        if svc is None:
            raise HttpError(404, f"app {self.app.name!r} has no service {name.decode(errors='replace')!r}")
        return svc

    def _target(self, service: bytes, handler: bytes, key: bytes | None) -> tuple[str, str]:
        svc = self._service(service)
        h = paths.text(handler, "handler")
        if h not in svc.handlers:
            raise HttpError(404, f"service {svc.name!r} has no handler {h!r}")
        if svc.keyed and key is None:
            raise HttpError(400, f"service {svc.name!r} is keyed: call /{svc.name}/{{key}}/{h}")
        if not svc.keyed and key is not None:
            raise HttpError(400, f"service {svc.name!r} is stateless: its paths take no key")
        return svc.name, h

    async def _body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self.max_body:
            raise HttpError(413, f"the body is {request.content_length} bytes; the limit is {self.max_body}")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise HttpError(413, f"the body is above the limit of {self.max_body} bytes") from None

    async def _produce(self, partition: int, key: bytes, record: bytes, timeout: float,
                       inv: str | None = None, pending_ok: bool = False) -> None:
        """Produce and wait for Kafka's acknowledgement; 503 when it refused
        or (unless `pending_ok`: the caller's wait is over, and the record
        may still go through) when it did not answer in time."""
        try:
            await self.kafka.produce(partition, key, record, timeout)
        except NotAckedYet as e:
            if pending_ok:
                raise asyncio.TimeoutError() from None
            raise HttpError(503, f"Kafka unavailable: {e}; retry (with the same Idempotency-Key)", RETRY_AFTER,
                            inv) from None
        except KafkaUnavailable as e:
            raise HttpError(503, f"Kafka unavailable: {e}; retry (with the same Idempotency-Key)", RETRY_AFTER,
                            inv) from None

    async def _ask(self, partition: int, key: bytes, build: Any, wait: float,
                   mined: bool = False) -> dict[str, Any] | None:
        """Produce `build(request_id)` and wait for its answer (None: none
        within `wait`, including a record Kafka has not acknowledged yet:
        it may still go through, the caller decides how to say so)."""
        deadline = time.monotonic() + wait
        rid = self.kafka.request_id(mined)
        fut = self.kafka.expect(rid)
        try:
            await self._produce(partition, key, build(rid), wait, pending_ok=True)
            return await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return None
        finally:
            self.kafka.forget(rid)

    def _answer(self, answer: dict[str, Any], inv: str, wait: bool) -> web.Response:
        status = answer["status"]
        if status == "completed":
            return value_response(answer["value"], {"x-oncely-invocation-id": inv})
        if status == "failed":  # 409: ended by an operator's cancel or kill (Restate's code)
            error = answer["error"] or "failed"
            by_operator = error.endswith(KILLED) or error == CANCELLED or error.endswith(": " + CANCELLED)
            raise HttpError(409 if by_operator else 500, error, invocation_id=inv)
        if status == "running":
            if wait:
                return self._running(inv)
            raise HttpError(470, f"invocation {inv} has not finished ({answer['error']})", invocation_id=inv)
        raise HttpError(404, f"invocation {inv} is unknown (never accepted, or past its retention)",
                        invocation_id=inv)

    @staticmethod
    def _running(inv: str) -> web.Response:
        return json_response(202, {"invocation_id": inv, "status": "running"},
                             {"Location": f"/restate/attach/{inv}"})

    # -- call and send ----------------------------------------------------------------

    async def call(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        return await self._invoke(request, p["service"], p["handler"], p.get("key"), send=False)

    async def send(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        return await self._invoke(request, p["service"], p["handler"], p.get("key"), send=True)

    async def alias(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        """`/{svc}/{handler}`, `/{svc}/{key}/{handler}`, `/{svc}/{handler}/send`,
        `/{svc}/{key}/{handler}/send`, told apart by the service."""
        segs: list[bytes] = request["segments"]
        svc = self._service(segs[0])
        rest = segs[1:]
        send = rest[-1] == b"send" and len(rest) == (3 if svc.keyed else 2)
        if send:
            rest = rest[:-1]
        if len(rest) == 2:
            return await self._invoke(request, segs[0], rest[1], rest[0], send)
        return await self._invoke(request, segs[0], rest[0], None, send)

    async def _invoke(self, request: web.Request, service: bytes, handler: bytes, key: bytes | None,
                      send: bool) -> web.Response:
        svc, h = self._target(service, handler, key)
        delay = request.query.get("delay")
        if delay is not None and not send:
            raise HttpError(400, "delay is only for one-way sends (/send)")
        delay_s = paths.delay_seconds(delay) if delay is not None else 0.0
        given = paths.idempotency_key(request.headers.get("Idempotency-Key"))
        wait = paths.wait_seconds(request.headers.get("x-oncely-wait"))
        ctype = request.headers.get("Content-Type", "") and request.content_type
        payload, fmt = paths.payload(await self._body(request), ctype)
        idem = given or f"gw-{os.urandom(12).hex()}"
        inv_id = idempotent_id(svc, h, key, idem)
        routing = key if key is not None else inv_id
        partition = partition_for(routing, self.partitions)
        inv = paths.located_id(inv_id, partition)
        retention = None if given else ASSIGNED_RETENTION_MS

        def record(reply: dict[str, Any] | None) -> bytes:
            return invoke_record(inv_id, svc, h, key, payload, fmt, idempotency_key=idem,
                                 idempotency_retention_ms=retention, reply=reply)

        if send:
            value = record(None)
            if delay_s > 0:
                value = schemas.encode("log_record", {"body": ("oncely.Delay", {
                    "at_ms": int(time.time() * 1000 + delay_s * 1000), "invocation_id": inv_id,
                    "partition": partition, "routing_key": routing, "record": value})})
            await self._produce(partition, routing, value, SEND_ACK_WAIT, inv)
            return json_response(202, {"invocation_id": inv, "status": "accepted"})
        answer = await self._ask(partition, routing, lambda rid: record(self.kafka.reply_to(rid)), wait)
        return self._running(inv) if answer is None else self._answer(answer, inv, wait=True)

    # -- attach and output ---------------------------------------------------------------

    async def attach(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        return await self._attach(request, p, wait=True)

    async def output(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        return await self._attach(request, p, wait=False)

    async def _attach(self, request: web.Request, p: dict[str, bytes], wait: bool) -> web.Response:
        seconds = paths.wait_seconds(request.headers.get("x-oncely-wait"))
        if "invocation_id" in p:
            inv_id, partition = paths.parse_located(p["invocation_id"], self.partitions)
        else:
            svc, h = self._target(p["service"], p["handler"], p.get("key"))
            idem = paths.idempotency_key(paths.text(p["idempotency_key"], "idempotency key"))
            inv_id = idempotent_id(svc, h, p.get("key"), idem)  # type: ignore[arg-type]
            partition = partition_for(p.get("key") or inv_id, self.partitions)
        parts = range(self.partitions) if partition is None else (partition,)

        def build(rid: bytes) -> bytes:
            return schemas.encode("log_record", {"body": ("oncely.Attach", {
                "invocation_id": inv_id, "reply": self.kafka.reply_to(rid), "wait": wait})})

        answer = await self._first_known([self._ask(q, inv_id, build, seconds) for q in parts])
        found = partition if partition is not None else (answer or {}).get("partition")
        inv = paths.located_id(inv_id, found) if found is not None else paths.text(p.get("invocation_id", b""), "id")
        if answer is None:
            if wait:
                return self._running(inv)
            raise HttpError(503, f"no answer about {inv} within {seconds:g} s: are the app's processors running?",
                            RETRY_AFTER, inv)
        return self._answer(answer, inv, wait)

    @staticmethod
    async def _first_known(asks: list[Any]) -> dict[str, Any] | None:
        """The first answer that knows the invocation (a plain id asks every
        partition); `unknown` when all say so; None when time ran out."""
        tasks = {asyncio.ensure_future(a): q for q, a in enumerate(asks)}
        unknown = None
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    answer = t.result()
                    if answer is None:
                        continue
                    if answer["status"] != "unknown":
                        return {**answer, "partition": tasks[t] if len(tasks) > 1 else None}
                    unknown = answer
            return unknown if unknown is not None and all(t.result() is not None for t in tasks) else None
        finally:
            for t in tasks:
                t.cancel()

    # -- awakeables ------------------------------------------------------------------------

    async def resolve(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        ctype = request.headers.get("Content-Type", "") and request.content_type
        value = paths.tagged_value(await self._body(request), ctype)
        return await self._awakeable(request, p["awakeable_id"], value, None)

    async def reject(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        try:
            reason = (await self._body(request)).decode().strip()
        except UnicodeDecodeError:
            raise HttpError(400, "the reason must be UTF-8 text") from None
        return await self._awakeable(request, p["awakeable_id"], None, reason or "rejected over HTTP")

    async def _awakeable(self, request: web.Request, raw_id: bytes, value: bytes | None,
                         failure: str | None) -> web.Response:
        text = paths.text(raw_id, "awakeable id")
        try:
            app, partition, inv_id, index = parse_awakeable(text)
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        if app != self.app.name:
            raise HttpError(404, f"awakeable {text} belongs to app {app!r}, not {self.app.name!r}")
        if partition >= self.partitions:
            raise HttpError(404, f"awakeable {text}: app {app!r} has no log partition {partition}")
        wait = paths.wait_seconds(request.headers.get("x-oncely-wait"))
        answer = await self._ask(partition, inv_id, lambda rid: awakeable_result(inv_id, index, value, failure, rid),
                                 wait, mined=True)
        if answer is None:
            return json_response(202, {"status": "accepted", "message": "no answer yet: the completion is on the "
                                       "log and is applied when the app's processor runs"})
        if answer.get("ok"):
            return json_response(200, {"ok": True})
        error = answer.get("error") or ""
        raise HttpError(409 if "already completed" in error else 404, f"awakeable {text} was not completed: {error}")

    # -- state and health -----------------------------------------------------------------------

    async def state(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        svc = self._service(p["service"])
        if not svc.keyed:
            raise HttpError(400, f"service {svc.name!r} is stateless: it has no state")
        key, name = p["key"], (paths.text(p["name"], "state name") if "name" in p else None)
        wait = paths.wait_seconds(request.headers.get("x-oncely-wait"))

        def build(rid: bytes) -> bytes:
            return schemas.encode("log_record", {"body": ("oncely.ReadState", {
                "service": svc.name, "key": key, "name": name, "reply": self.kafka.reply_to(rid)})})

        answer = await self._ask(partition_for(key, self.partitions), key, build, wait)
        if answer is None:
            raise HttpError(503, f"no answer within {wait:g} s: are the app's processors running?", RETRY_AFTER)
        entries = answer.get("entries") or {}
        if name is not None:
            if name not in entries:
                raise HttpError(404, f"{svc.name}/{key!r} has no state {name!r}")
            return value_response(entries[name], {})
        return json_response(200, {n: _json_value(v) for n, v in sorted(entries.items())})

    async def health(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        why = self.kafka.down and f"Kafka unreachable: {self.kafka.down}" or await self.kafka.healthy()
        if why is not None:
            raise HttpError(503, why, RETRY_AFTER)
        return json_response(200, {"status": "ok", "app": self.app.name,
                                   "replies_partition": self.kafka.replies_partition})


def _json_value(v: bytes) -> Any:
    if v[:1] == TAG_JSON:
        return orjson.Fragment(v[1:])
    return {"b64": base64.b64encode(v[1:] if v[:1] == TAG_BYTES else v).decode()}

"""HTTP between the processor and one deployment: batches of items per
request, and what a failed request means.

Items for one deployment and log partition (the request names the partition:
awakeable ids embed it) are gathered into one `POST …/invoke` that leaves
when `max_batch` items wait or `linger` after the first one (a few ms). One
key never has two items in a batch (its lock), so items are independent.
A request that cannot be delivered raises `Unreachable` to every item in it
(the item's loop retries it without counting an attempt); one the endpoint
refuses in a way no retry fixes (400, 404, 415, a malformed answer) raises
`Refused` (the invocation pauses). A 413 splits the batch. The deployment's
circuit breaker (`remote.breaker`) sees every request's fate; while it is
open, batches fail at once with `CircuitOpen` and nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from oncely.remote.answers import Answer, BadAnswer, parse_answers
from oncely.remote.breaker import Breaker
from oncely.remote.signing import SigningKey, sign_request
from oncely.remote.wire import INVOKE_MEDIA_TYPE, invoke_request, read_capped
from oncely.shuffle.ids import random_id

if TYPE_CHECKING:
    import aiohttp

    from oncely.remote.registry import Deployment
    from oncely.sdk.protocol import Limits

log = logging.getLogger("oncely.remote")

TRANSIENT = frozenset((401, 403, 408, 425, 429, 500, 502, 503, 504))
MAX_ANSWER_BYTES = 64 * 1024 * 1024
TIMEOUT_SLACK_S = 5.0  # the client gives up this long after the request's deadline


class Unreachable(Exception):
    """The request did not get an answer (connect error, timeout, 5xx, 429,
    408, 401/403): retried without counting an attempt."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitOpen(Unreachable):
    """Not sent: the deployment's circuit is open (retry_after: until it
    lets a probe through)."""


class Refused(Exception):
    """The endpoint refused the request or broke the protocol: a retry
    cannot fix it, the invocation pauses."""


Pending = tuple[dict[str, Any], tuple[bytes, int], "asyncio.Future[Answer]"]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class Batcher:
    """Requests to one deployment for one log partition."""

    def __init__(self, session: aiohttp.ClientSession, dep: Deployment, app: str, partition: int,
                 key: SigningKey | None, deadline_ms: int, limits: Limits, max_batch: int, linger: float,
                 breaker: Breaker | None = None) -> None:
        self.session = session
        self.dep = dep
        self.app = app
        self.partition = partition
        self.key = key
        self.deadline_ms = deadline_ms
        self.limits = limits
        self.max_batch = max(1, min(max_batch, dep.max_batch))
        self.linger = linger
        self.pending: list[Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.requests = 0
        self.breaker = breaker or Breaker(dep.id)

    def submit(self, item: dict[str, Any], sent: tuple[bytes, int]) -> asyncio.Future[Answer]:
        """Queue one item; its answer (or Unreachable/Refused) arrives on the future."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Answer] = loop.create_future()
        self.pending.append((item, sent, fut))
        if len(self.pending) >= self.max_batch:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.linger, self.flush)
        return fut

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = [p for p in self.pending if not p[2].done()]  # cancelled items are not sent
        self.pending = []
        if batch:
            self._spawn(batch)

    def _spawn(self, batch: list[Pending]) -> None:
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, batch: list[Pending]) -> None:
        wait = self.breaker.allow()
        if wait > 0:
            e: Exception = CircuitOpen(f"the circuit of {self.dep.uri} is open", wait)
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        try:
            try:
                answers = await self._post([p[0] for p in batch], [p[1] for p in batch])
            except Unreachable:
                self.breaker.failure()
                raise
            except (Refused, _Split):
                self.breaker.success()  # it answered: it is there
                raise
            self.breaker.success()
        except _Split:
            for p in batch:
                self._spawn([p])
            return
        except (Unreachable, Refused) as e:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        except BaseException as e:  # a bug here must not leave items waiting forever
            self.breaker.abandoned()
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(Refused(f"internal error sending the request: {type(e).__name__}: {e}"))
            if isinstance(e, asyncio.CancelledError):
                raise
            log.exception("sending a request to %s failed", self.dep.uri)
            return
        for (_, _, fut), answer in zip(batch, answers):
            if not fut.done():
                fut.set_result(answer)

    async def _post(self, items: list[dict[str, Any]], sent: list[tuple[bytes, int]]) -> list[Answer]:
        import aiohttp

        body = invoke_request(self.app, self.partition, items, self.deadline_ms, self.limits)
        url = self.dep.url("invoke")
        headers = {**self.dep.headers, "content-type": INVOKE_MEDIA_TYPE, "x-oncely-deployment": self.dep.id,
                   "x-oncely-request-id": random_id().hex(), "x-oncely-deadline-ms": str(self.deadline_ms)}
        if self.key is not None:
            headers.update(sign_request(self.key, "POST", urlsplit(url).path, body, self.dep.id))
        self.requests += 1
        timeout = aiohttp.ClientTimeout(total=self.deadline_ms / 1000 + TIMEOUT_SLACK_S)
        try:
            async with self.session.post(url, data=body, headers=headers, timeout=timeout) as resp:
                out = await read_capped(resp, MAX_ANSWER_BYTES + 1)
                status = resp.status
                retry_after = _retry_after(resp.headers.get("retry-after"))
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise Unreachable(f"{type(e).__name__}: {e}".rstrip(": ")) from None
        if status == 200:
            if len(out) > MAX_ANSWER_BYTES:
                raise Refused(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
            try:
                return parse_answers(out, sent)
            except BadAnswer as e:
                raise Refused(f"invalid answer: {e}") from None
        text = out[:300].decode("utf-8", "replace")
        if status in TRANSIENT:
            if status in (401, 403):
                log.warning("%s refused the request's signature (%d): %s", self.dep.uri, status, text)
            raise Unreachable(f"HTTP {status}: {text}", retry_after)
        if status == 413 and len(items) > 1:
            raise _Split()
        raise Refused(f"HTTP {status}: {text}")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self.tasks):
            task.cancel()


class _Split(Exception):
    """413 on a batch: send its items one by one."""

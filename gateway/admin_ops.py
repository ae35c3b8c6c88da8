"""Invocation controls and status queries from outside, over Kafka: a
`Control` or `Query` record on the invocation's log partition, its answer
read from `<app>.replies` (processor/controls.py applies and answers them in
the partition's transaction). The admin API (admin.py) and `oncely
invocations` both use this; neither needs the other.

A located id (`inv_<id>_<partition>`) goes to its partition; a plain one is
sent to every partition and the first that knows it answers (the others
say unknown). A list asks every partition and merges their answers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from oncely import schemas
from oncely.gateway import paths
from oncely.gateway.kafka import GatewayKafka, KafkaUnavailable, NotAckedYet
from oncely.gateway.paths import HttpError

ACTIONS = ("cancel", "kill", "pause", "resume", "purge")
PHASES = ("INBOXED", "RUNNING", "BACKING_OFF", "SUSPENDED", "PAUSED", "FAILED")
DEFAULT_LIMIT = 100
RETRY_AFTER = {"Retry-After": "5"}


@dataclass
class Listing:
    invocations: list[dict[str, Any]] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # partitions that did not answer within the wait


class InvocationOps:
    def __init__(self, kafka: GatewayKafka) -> None:
        self.kafka = kafka
        self.partitions = kafka.partitions

    async def _ask(self, partition: int, key: bytes, kind: str, body: dict[str, Any],
                   deadline: float) -> dict[str, Any] | None:
        """Produce one record and wait for its answer until `deadline`
        (None: no answer by then). Kafka refusing it is a 503."""
        rid = self.kafka.request_id()
        fut = self.kafka.expect(rid)
        record = schemas.encode("log_record", {"body": (kind, {**body, "reply": self.kafka.reply_to(rid)})})
        try:
            await self.kafka.produce(partition, key, record, max(0.0, deadline - time.monotonic()))
            return await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
        except NotAckedYet:
            return None
        except KafkaUnavailable as e:
            raise HttpError(503, f"Kafka unavailable: {e}; retry", RETRY_AFTER) from None
        except asyncio.TimeoutError:
            return None
        finally:
            self.kafka.forget(rid)

    async def _per_partition(self, raw_id: str, kind: str, body: dict[str, Any],
                             wait: float) -> tuple[dict[str, Any] | None, str]:
        """The answer of the partition that knows the id (or an `unknown`
        when all say so; None when time ran out) and the located id."""
        inv_id, partition = paths.parse_located(raw_id.encode(), self.partitions)
        deadline = time.monotonic() + wait
        parts = range(self.partitions) if partition is None else (partition,)
        tasks = {asyncio.ensure_future(self._ask(p, inv_id, kind, {**body, "invocation_id": inv_id}, deadline)): p
                 for p in parts}
        unknown = None
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    answer = t.result()
                    if answer is not None and answer["status"] != "unknown":
                        return answer, paths.located_id(inv_id, tasks[t])
                    unknown = unknown if answer is None else answer
            complete = all(t.result() is not None for t in tasks)
            return (unknown if complete else None), (raw_id if partition is None else
                                                     paths.located_id(inv_id, partition))
        finally:
            for t in tasks:
                t.cancel()

    async def control(self, raw_id: str, action: str, wait: float) -> tuple[str, str | None, str]:
        """(status, why, located id): applied, unknown, conflict (why), or
        pending when no answer came within `wait` (the record may still
        be applied)."""
        if action not in ACTIONS:
            raise HttpError(400, f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        answer, inv = await self._per_partition(raw_id, "oncely.Control", {"action": action}, wait)
        if answer is None:
            return "pending", None, inv
        return answer["status"], answer.get("error"), inv

    async def describe(self, raw_id: str, wait: float) -> dict[str, Any] | None:
        """The invocation's status (None: unknown); 503 without an answer."""
        answer, inv = await self._per_partition(raw_id, "oncely.Query", {"phases": [], "limit": 1}, wait)
        if answer is None:
            raise HttpError(503, f"no answer about {inv} within {wait:g} s: are the app's processors running?",
                            RETRY_AFTER)
        if answer["status"] != "info":
            return None
        found: list[dict[str, Any]] = orjson.loads(answer["value"])
        return found[0]

    async def list(self, phases: list[str], limit: int, wait: float) -> Listing:
        """Up to `limit` invocations of each partition (filtered by phase)."""
        bad = [p for p in phases if p not in PHASES]
        if bad:
            raise HttpError(400, f"unknown phase {bad[0]!r}; one of {', '.join(PHASES)}")
        deadline = time.monotonic() + wait
        body = {"invocation_id": None, "phases": phases, "limit": limit}
        answers = await asyncio.gather(*(self._ask(p, b"list", "oncely.Query", body, deadline)
                                         for p in range(self.partitions)))
        out = Listing()
        for p, answer in enumerate(answers):
            if answer is None:
                out.missing.append(p)
            else:
                out.invocations.extend(orjson.loads(answer["value"]))
        if out.missing and len(out.missing) == self.partitions:
            raise HttpError(503, f"no partition answered within {wait:g} s: are the app's processors running?",
                            RETRY_AFTER)
        return out


def parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise HttpError(400, f"limit {text!r}: expected a whole number from 1 to 1000")
    return int(text)

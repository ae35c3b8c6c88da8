"""`oncely replay`: re-feed a range of a source topic through its
subscriptions, for recovery.

Without new ids a record the app has read already (below its group's
committed offset) was processed, exactly once, when it was read: it is
skipped, unless the ingest dead-lettered it (a fixed decoder or key
function now invokes it). A record the app has not read yet is left to the
app. A replayed Invoke keeps the id the record had and carries its
coordinates as idempotency key, so repeating a replay runs nothing twice.
With `new_ids` every record becomes a new invocation and is processed again.

Records whose invocation failed (a handler error after its retries, or a
TerminalError) are counted as "failed earlier" and not invoked again: their
path is `oncely invocations retry`. A record that is dead-lettered again
(still undecodable, say) is not written to the DLQ a second time when the
DLQ already holds it for the same subscription; it is counted as "already
dead-lettered".

Invokes are produced with an idempotent (not transactional) producer: the
tool commits no offsets. Re-running an interrupted replay without new ids is
safe; re-running a `new_ids` replay processes the range once more.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from oncely import schemas
from oncely.egress import dead_letters as dl
from oncely.errors import ConfigError
from oncely.ingest.router import H_SUBSCRIPTION, Routed, route
from oncely.kafka_io import read_to_end, watermarks
from oncely.logs import kafka_conf_logging
from oncely.processor import keys
from oncely.processor.clients import source_start

if TYPE_CHECKING:
    from oncely.app import App


@dataclass
class ReplaySummary:
    read: int = 0
    invoked: int = 0
    deduplicated: int = 0
    dead_lettered: int = 0
    already_dead: int = 0
    failed_earlier: int = 0
    not_read: int = 0

    def __str__(self) -> str:
        text = (f"records read {self.read}, invoked {self.invoked}, deduplicated {self.deduplicated}, "
                f"dead-lettered {self.dead_lettered}")
        if self.already_dead:
            text += f", already dead-lettered {self.already_dead} (not written again)"
        if self.failed_earlier:
            text += (f", failed earlier {self.failed_earlier} (not invoked: retry them with "
                     "`oncely invocations retry`)")
        if self.not_read:
            text += f", not read by the app yet {self.not_read} (left to it)"
        return text


def parse_time(text: str) -> int:
    """ISO 8601 -> epoch ms; a time without zone is UTC."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not an ISO 8601 time (e.g. 2026-11-21T08:00:00Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(t.timestamp() * 1000)


def remembered_ids(bootstrap: str, app: "App", config: dict) -> tuple[set[bytes], set[bytes]]:
    """Invocation ids the app's changelog says were accepted (the
    partition's own duplicate rule): (completed or still in flight,
    suspended included; failed). Expired ones are forgotten."""
    from oncely.admin import changelog_latest

    now = time.time() * 1000
    completed, failed = set(), set()
    for k, v in changelog_latest(bootstrap, app.name, config=config).items():
        if k[:1] == keys.DEDUP:
            entry = schemas.decode("dedup_entry", v)
            if entry["expires_at_ms"] > now:
                (failed if entry["failed"] else completed).add(k[1:])
        elif k[:1] == keys.FAILED:
            failed.add(k[1:])
        elif k[:1] == keys.STATUS:  # in flight: a replay must not start it again
            completed.add(k[1:])
    return completed - failed, failed


def read_by_app(bootstrap: str, app: "App", topic: str, parts: list[int], config: dict) -> dict[int, int | None]:
    """Per partition, the app's committed offset of `topic`: what it has read
    (and processed, exactly once). None where it has committed nothing."""
    consumer = Consumer({**config, "group.id": app.name, "enable.auto.commit": False})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=30)
    finally:
        consumer.close()
    return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in found}


def dead_lettered(bootstrap: str, app: "App", topic: str, config: dict) -> set[tuple[str, int, int]]:
    """(subscription, partition, offset) of the records of `topic` the
    app's DLQ holds from its subscriptions."""
    out: set[tuple[str, int, int]] = set()
    try:
        records = read_to_end(bootstrap, app.dlq_topic, config=config)
    except ValueError:  # the app never ran: no dead letters yet
        return out
    for r in records:
        sub, src = r.header(H_SUBSCRIPTION), r.header(dl.H_SOURCE_TOPIC)
        if sub is not None and src is not None and src.decode() == topic:
            out.add((sub.decode(), int(r.header(dl.H_SOURCE_PARTITION) or -1),
                     int(r.header(dl.H_SOURCE_OFFSET) or -1)))
    return out


def _check_order(start: int | str | None, stop: int | str | None) -> None:
    """An inverted range is a mistake, not an empty replay."""
    if start is None or stop is None:
        return
    a, b = (start, stop) if isinstance(start, int) else (parse_time(start), parse_time(str(stop)))
    if a >= b:
        raise ConfigError(f"the range [{start}, {stop}) is empty: its start must come before its end")


def _nonempty(topic: str, span: str, lows: dict[int, int], ends: dict[int, int], starts: dict[int, int],
              stops: dict[int, int]) -> dict[int, tuple[int, int]]:
    """[from, to) per partition, without the empty ones; a ConfigError
    when no partition holds a record of the range (past the end, say)."""
    ranges = {p: (max(lows[p], starts[p]), min(ends[p], stops[p])) for p in starts}
    ranges = {p: r for p, r in ranges.items() if r[0] < r[1]}
    if not ranges:
        held = ", ".join(f"[{p}] {lows[p]}..{ends[p] - 1}" if ends[p] > lows[p] else f"[{p}] none"
                         for p in sorted(starts))
        raise ConfigError(f"nothing to replay: {topic} holds no record in {span} (offsets held: {held})")
    return ranges


def _advance(pending: dict[int, tuple[int, int]], p: int, offset: int,
             progress: Callable[[int], None] | None) -> None:
    if progress:
        progress(1)
    if offset + 1 >= pending[p][1]:
        pending.pop(p, None)


def _offsets_at(consumer: Consumer, topic: str, parts: list[int], ms: int, ends: dict[int, int]) -> dict[int, int]:
    found = consumer.offsets_for_times([TopicPartition(topic, p, ms) for p in parts], timeout=30)
    return {tp.partition: (tp.offset if tp.offset >= 0 else ends[tp.partition]) for tp in found}


def replay(
    app: "App",
    topic: str,
    partitions: list[int] | None = None,
    from_offset: int | None = None,
    from_time: str | None = None,
    to_offset: int | None = None,
    to_time: str | None = None,
    new_ids: bool = False,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> ReplaySummary:
    """Replay [from, to) of `topic` (every partition, or `partitions`)."""
    subs = [s for s in app.subscriptions if topic in s.topics]
    if not subs:
        raise ConfigError(f"app {app.name!r} has no subscription on topic {topic!r}")
    if (from_offset is None) == (from_time is None):
        raise ConfigError("give exactly one of --from-offset and --from-time")
    if to_offset is not None and to_time is not None:
        raise ConfigError("give at most one of --to-offset and --to-time")
    _check_order(from_offset, to_offset)
    _check_order(from_time, to_time)
    bootstrap = app.config.bootstrap
    if not bootstrap:
        raise ConfigError("no Kafka bootstrap address: pass --bootstrap or set ONCELY_KAFKA_BOOTSTRAP")
    conf = {**kafka_conf_logging(), "bootstrap.servers": bootstrap, **app.config.kafka}
    conf.pop("auto.offset.reset", None)
    consumer = Consumer({**conf, "group.id": f"{app.name}-replay", "enable.auto.commit": False,
                         "isolation.level": "read_committed", "enable.partition.eof": True})
    producer = Producer({**conf, "enable.idempotence": True, "linger.ms": 5})
    errors: list[str] = []
    summary = ReplaySummary()
    try:
        md = consumer.list_topics(topic, timeout=30).topics.get(topic)
        if md is None or md.error is not None:
            raise ConfigError(f"topic {topic!r} does not exist")
        parts = sorted(md.partitions) if partitions is None else list(partitions)
        bad = [p for p in parts if p not in md.partitions]
        if bad:
            raise ConfigError(f"topic {topic!r} has no partition(s) {bad}")
        lows, ends = {}, {}
        for p in parts:
            lows[p], ends[p] = watermarks(consumer, TopicPartition(topic, p))
        if from_time is not None:
            starts = _offsets_at(consumer, topic, parts, parse_time(from_time), ends)
        else:
            starts = {p: from_offset for p in parts}
        if to_time is not None:
            stops = _offsets_at(consumer, topic, parts, parse_time(to_time), ends)
        else:
            stops = {p: (to_offset if to_offset is not None else ends[p]) for p in parts}
        span = f"[{from_offset if from_time is None else from_time}, {to_offset or to_time or 'end'})"
        ranges = _nonempty(topic, span, lows, ends, starts, stops)  # type: ignore[arg-type]
        if on_total:
            on_total(sum(b - a for a, b in ranges.values()))
        known, failed = (set(), set()) if new_ids else remembered_ids(bootstrap, app, conf)
        dead = dead_lettered(bootstrap, app, topic, conf)
        read = {} if new_ids else read_by_app(bootstrap, app, topic, list(ranges), conf)
        # Where the app has committed nothing it reads from the start (so
        # everything is left to it), or from the end (so nothing ever is).
        unread_from_start = source_start(app.config) != OFFSET_END
        salt = f"replay-{uuid.uuid4().hex}" if new_ids else None

        def on_delivery(err: KafkaError | None, _msg: object) -> None:
            if err is not None:
                errors.append(str(err))

        consumer.assign([TopicPartition(topic, p, a) for p, (a, _) in ranges.items()])
        pending = dict(ranges)
        while pending:
            for m in consumer.consume(500, timeout=1.0):
                p = m.partition()
                if p not in pending:
                    continue
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.pop(p, None)
                        continue
                    raise KafkaException(err)
                if m.offset() >= pending[p][1]:
                    pending.pop(p, None)
                    continue
                summary.read += 1
                consumed = read.get(p)
                if not new_ids and (m.offset() >= consumed if consumed is not None else unread_from_start):
                    summary.not_read += 1  # the app will read it (and invoke it) itself
                    _advance(pending, p, m.offset(), progress)
                    continue
                processed = consumed is not None and not new_ids
                for sub in subs:
                    out = route(app.name, app.partitions, sub, m, id_salt=salt, replayed=True)
                    if isinstance(out, Routed):
                        if processed and (sub.name, p, m.offset()) not in dead and out.invocation_id not in failed:
                            summary.deduplicated += 1  # invoked when the app read it
                            continue
                        if out.invocation_id in known or out.invocation_id in failed:
                            summary.deduplicated += out.invocation_id in known
                            summary.failed_earlier += out.invocation_id in failed
                            continue
                        target, k, v, h, part = app.log_topic, out.key, out.value, None, out.partition
                        summary.invoked += 1
                    elif (sub.name, p, m.offset()) in dead:
                        summary.already_dead += 1
                        continue
                    else:
                        target, k, v, h, part = app.dlq_topic, out.key, out.value, out.headers, None
                        summary.dead_lettered += 1
                    while True:
                        try:
                            if part is None:
                                producer.produce(target, key=k, value=v, headers=h, on_delivery=on_delivery)
                            else:
                                producer.produce(target, key=k, value=v, partition=part, on_delivery=on_delivery)
                            break
                        except BufferError:
                            producer.poll(0.05)
                producer.poll(0)
                _advance(pending, p, m.offset(), progress)
        left = producer.flush(60)
        if left or errors:
            raise RuntimeError(f"replay: {left} records not acknowledged; errors: {errors[:5]}")
        return summary
    finally:
        consumer.close()

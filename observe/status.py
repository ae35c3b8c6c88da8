"""What `oncely status APP` shows, read from Kafka itself and, when given,
from processes' metrics endpoints. Every Kafka call is bounded by `timeout`.

- the group's processes and what each owns (describe_consumer_groups);
- lag per log and source topic and partition (lag.py: read_committed, a
  gap of only transaction markers counts 0);
- dead letters in `APP.dlq`, counted by reading it (read_committed);
- the newest changelog write (list_offsets max_timestamp): every commit
  that changed state writes there, so it dates the last such commit;
- from metrics endpoints: invocations in flight by phase, the last commit,
  invocation outcomes.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import ConsumerGroupState, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from oncely.errors import ConfigError
from oncely.observe.lag import (LagReader, LagSnapshot, count_records, group_offsets, list_offsets, reader,
                                topic_partitions)

TP = tuple[str, int]


@dataclass
class Process:
    member_id: str
    client_id: str
    host: str
    instance_id: str | None
    partitions: list[TP]


@dataclass
class Scrape:
    url: str
    error: str | None = None
    in_flight: dict[str, float] = field(default_factory=dict)      # phase -> count
    outcomes: dict[str, float] = field(default_factory=dict)       # outcome -> count
    last_commit: float | None = None                               # unix time


@dataclass
class Status:
    app: str
    group_state: str
    processes: list[Process]
    lag: LagSnapshot
    dlq_records: int
    dlq_complete: bool                 # False: counting stopped at the timeout, so at least dlq_records
    last_changelog_write: float | None  # unix time
    scrapes: list[Scrape]


def app_status(conf: dict[str, Any], app: str, sources: list[str] | None = None, metrics_urls: list[str] = (),
               timeout: float = 10.0) -> Status:
    """The status of app `app` (its group has the app's name); ConfigError
    when the app has no topics or its group does not exist."""
    admin = AdminClient(conf)
    log_topic, dlq, changelog = f"{app}.log", f"{app}.dlq", f"{app}.changelog"
    if not topic_partitions(admin, [log_topic], timeout):
        raise ConfigError(f"app {app!r} has no topics at {conf.get('bootstrap.servers')}: {log_topic} does not exist")
    group = admin.describe_consumer_groups([app], request_timeout=timeout)[app].result(timeout)
    committed = group_offsets(admin, app, timeout)
    if group.state in (ConsumerGroupState.DEAD, ConsumerGroupState.UNKNOWN) and not committed:
        raise ConfigError(f"consumer group {app!r} does not exist: no process of app {app!r} has run against "
                          f"{conf.get('bootstrap.servers')} (or the group's offsets expired)")
    processes = [Process(m.member_id, m.client_id, m.host, m.group_instance_id,
                         sorted((tp.topic, tp.partition) for tp in (m.assignment.topic_partitions if m.assignment
                                                                    else [])))
                 for m in group.members]
    topics = [log_topic, *sorted({t for t, _ in committed if t != log_topic} | set(sources or []))]
    lag_reader = LagReader(conf, app, topics, timeout=timeout)
    try:
        lag = lag_reader.read()
    finally:
        lag_reader.close()
    dlq_count, complete = _count_topic(conf, admin, dlq, timeout)
    return Status(app, group.state.name.lower(), sorted(processes, key=lambda p: (p.host, p.client_id)), lag,
                  dlq_count, complete, _last_write(admin, changelog, timeout),
                  [scrape(url, timeout) for url in metrics_urls])


def _count_topic(conf: dict[str, Any], admin: AdminClient, topic: str, timeout: float) -> tuple[int, bool]:
    tps = topic_partitions(admin, [topic], timeout)
    lo = list_offsets(admin, tps, OffsetSpec.earliest(), timeout)
    hi = list_offsets(admin, tps, OffsetSpec.latest(), timeout)
    consumer = reader(conf)
    try:
        counts, complete = count_records(consumer, {tp: (lo[tp], hi[tp]) for tp in tps}, timeout)
    finally:
        consumer.close()
    return sum(counts.values()), complete


def _last_write(admin: AdminClient, topic: str, timeout: float) -> float | None:
    req = {TopicPartition(t, p): OffsetSpec.max_timestamp() for t, p in topic_partitions(admin, [topic], timeout)}
    if not req:
        return None
    deadline = time.monotonic() + timeout
    stamps = [f.result(max(0.0, deadline - time.monotonic())).timestamp
              for f in admin.list_offsets(req, request_timeout=timeout).values()]
    newest = max(stamps, default=-1)
    return newest / 1000 if newest >= 0 else None


def scrape(url: str, timeout: float) -> Scrape:
    """The parts of a processor's /metrics that status shows."""
    from prometheus_client.parser import text_string_to_metric_families

    out = Scrape(url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode()
    except Exception as e:  # a process may be down: say so, show the rest
        out.error = str(getattr(e, "reason", e))
        return out
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "oncely_invocations_in_flight":
                out.in_flight[s.labels["phase"]] = out.in_flight.get(s.labels["phase"], 0) + s.value
            elif s.name == "oncely_invocations_total":
                out.outcomes[s.labels["outcome"]] = out.outcomes.get(s.labels["outcome"], 0) + s.value
            elif s.name == "oncely_last_commit_timestamp_seconds" and s.value > 0:
                out.last_commit = s.value
    return out

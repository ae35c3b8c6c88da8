"""The app's internal topics: created when missing, checked when present."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from oncely.errors import ConfigError

if TYPE_CHECKING:
    from oncely.app import App

log = logging.getLogger("oncely.topics")

WEEK_MS = 7 * 24 * 3600 * 1000
DAY_MS = 24 * 3600 * 1000


def topic_specs(app: "App") -> dict[str, tuple[int, dict[str, str]]]:
    return {
        app.log_topic: (app.partitions, {"cleanup.policy": "delete", "retention.ms": str(WEEK_MS)}),
        app.changelog_topic: (app.partitions, {
            "cleanup.policy": "compact",
            "delete.retention.ms": str(DAY_MS),
            "segment.bytes": str(64 * 1024 * 1024),
            "min.compaction.lag.ms": "0",
        }),
        app.dlq_topic: (1, {"cleanup.policy": "delete", "retention.ms": str(2 * WEEK_MS)}),
        app.replies_topic: (app.partitions, {"cleanup.policy": "delete", "retention.ms": str(DAY_MS)}),
        # Remote deployments by id: every processor reads it whole, so compacted.
        app.deployments_topic: (1, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}),
    }


def ensure_topics(admin: AdminClient, app: "App", timeout: float = 30.0) -> dict[str, Any]:
    """Create missing topics; refuse to start when existing ones disagree.
    Returns facts the processor needs (the changelog's delete.retention.ms)."""
    specs = topic_specs(app)
    md = admin.list_topics(timeout=timeout)
    brokers = max(1, len(md.brokers))
    replication = min(3, brokers)
    # Refuse before creating anything, so a typo leaves nothing behind.
    absent = [t for t in app.source_topics if t not in md.topics]
    if absent:
        raise ConfigError(
            f"source topic(s) {absent} of app {app.name!r} do not exist: create them (`oncely topics create`; "
            "oncely does not create topics it only reads), or fix the name in app.subscribe()"
        )
    missing_sinks = [t for t in app.sinks if t not in md.topics]
    if missing_sinks and not app.config.create_sink_topics:
        raise ConfigError(
            f"sink topic(s) {missing_sinks} of app {app.name!r} do not exist: create them (`oncely topics create`), "
            "or let oncely create them with App(..., create_sink_topics=True) (or ONCELY_CREATE_SINK_TOPICS=1)"
        )
    for name in (app.log_topic, app.changelog_topic, app.replies_topic):
        have = len(md.topics[name].partitions) if name in md.topics else app.partitions
        if have != app.partitions:
            raise ConfigError(
                f"topic {name} has {have} partitions but App({app.name!r}, partitions={app.partitions}) "
                f"expects {app.partitions}. The partition count is fixed when an app is created: use "
                f"partitions={have}, or migrate to a new app name."
            )
    missing = {name: specs[name] for name in specs if name not in md.topics}
    missing.update({t: (app.sinks[t].partitions or app.partitions, {}) for t in missing_sinks})
    if missing:
        create_topics(admin, missing, replication, timeout)
    limited = [app.log_topic, app.changelog_topic, *app.sinks]
    resources = {t: ConfigResource(ConfigResource.Type.TOPIC, t) for t in limited}
    described = admin.describe_configs(list(resources.values()))
    every = {t: described[r].result(timeout) for t, r in resources.items()}
    configs = every[app.changelog_topic]
    policy = configs["cleanup.policy"].value
    if "compact" not in policy:
        raise ConfigError(
            f"topic {app.changelog_topic} has cleanup.policy={policy}; a changelog must be compacted, or old state "
            f"is deleted. Set it with: kafka-configs.sh --alter --entity-type topics --entity-name "
            f"{app.changelog_topic} --add-config cleanup.policy=compact"
        )
    return {"changelog_delete_retention_ms": int(configs["delete.retention.ms"].value),
            # What each topic accepts per record: values are checked where made.
            "max_message_bytes": {t: int(c["max.message.bytes"].value) for t, c in every.items()}}


def create_topics(admin: AdminClient, topics: dict[str, tuple[int, dict[str, str]]], replication: int | None = None,
                  timeout: float = 30.0) -> list[str]:
    """Create topics {name: (partitions, config)} and wait until they are
    visible; one that exists already is left as it is. Returns the names
    created. Replication: min(3, brokers) unless given."""
    if replication is None:
        replication = min(3, max(1, len(admin.list_topics(timeout=timeout).brokers)))
    futures = admin.create_topics([NewTopic(n, parts, replication, config=conf) for n, (parts, conf) in topics.items()],
                                  operation_timeout=timeout)
    created = []
    for name, fut in futures.items():
        try:
            fut.result(timeout)
            created.append(name)
            log.info("created topic %s (%d partitions)", name, topics[name][0])
        except Exception as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise ConfigError(f"could not create topic {name}: {e}") from None
    _wait_for(admin, list(topics), timeout)
    return created


def _wait_for(admin: AdminClient, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=timeout)
        if all(n in md.topics and md.topics[n].error is None for n in names):
            return
        time.sleep(0.1)
    raise ConfigError(f"topics {names} did not become available within {timeout} s")

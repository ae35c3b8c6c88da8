"""`oncely topics`, `oncely produce` and `oncely tail`: the daily Kafka work
without Kafka's shell scripts (the local broker ships only jars)."""

from __future__ import annotations

import signal
import sys
from typing import Any, Iterator

import click
import orjson

from oncely.cli_common import bootstrap_option, connect, kafka_option, show_record
from oncely.errors import ConfigError
from oncely.logs import kafka_conf_logging


def _admin(bootstrap: str, settings: dict[str, str]) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({**kafka_conf_logging(), **settings, "bootstrap.servers": bootstrap})


def _topic(admin: Any, name: str) -> Any:
    """The topic's metadata; a ConfigError when it does not exist."""
    md = admin.list_topics(name, timeout=10).topics.get(name)
    if md is None or md.error is not None:
        raise ConfigError(f"topic {name} does not exist: create it with `oncely topics create {name}`")
    return md


@click.group()
def topics() -> None:
    """Create, list and describe topics."""


@topics.command("create")
@click.argument("name")
@click.option("--partitions", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--config", "config", multiple=True, metavar="KEY=VALUE",
              help="Topic setting, repeatable (e.g. retention.ms=86400000).")
@bootstrap_option
@kafka_option
def topics_create(name: str, partitions: int, config: tuple[str, ...], bootstrap: str, kafka: dict[str, str]) -> None:
    """Create topic NAME (an existing one is left as it is, and said so)."""
    from oncely.topics import create_topics

    settings: dict[str, str] = {}
    for pair in config:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--config")
        settings[key] = value
    admin = _admin(bootstrap, connect(bootstrap, kafka))
    if create_topics(admin, {name: (partitions, settings)}):
        click.echo(f"created topic {name} ({partitions} partitions)")
    else:
        click.echo(f"topic {name} exists already ({len(_topic(admin, name).partitions)} partitions)")


@topics.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also Kafka's own topics (__consumer_offsets, ...).")
@bootstrap_option
@kafka_option
def topics_list(show_all: bool, bootstrap: str, kafka: dict[str, str]) -> None:
    """Print each topic with its partition count."""
    md = _admin(bootstrap, connect(bootstrap, kafka)).list_topics(timeout=10)
    names = sorted(n for n in md.topics if show_all or not n.startswith("__"))
    for name in names:
        click.echo(f"{name} {len(md.topics[name].partitions)}")
    if not names:
        click.echo("no topics")


@topics.command("describe")
@click.argument("name")
@bootstrap_option
@kafka_option
def topics_describe(name: str, bootstrap: str, kafka: dict[str, str]) -> None:
    """Print NAME's partitions (leader, offsets held) and its non-default settings."""
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import ConfigResource

    from oncely.kafka_io import unique_name, watermarks

    settings = connect(bootstrap, kafka)
    admin = _admin(bootstrap, settings)
    md = _topic(admin, name)
    consumer = Consumer({**kafka_conf_logging(), **settings, "bootstrap.servers": bootstrap,
                         "group.id": unique_name("oncely-describe"), "isolation.level": "read_committed"})
    try:
        click.echo(f"{name}: {len(md.partitions)} partitions")
        for p in sorted(md.partitions):
            low, high = watermarks(consumer, TopicPartition(name, p))
            click.echo(f"  [{p}] leader {md.partitions[p].leader}, offsets {low}..{high} ({high - low} records)")
    finally:
        consumer.close()
    res = ConfigResource(ConfigResource.Type.TOPIC, name)
    for key, entry in sorted(admin.describe_configs([res])[res].result(10).items()):
        if not entry.is_default:
            click.echo(f"  {key}={entry.value}")


def _records(key: str | None, value: str | None, headers: tuple[str, ...]) -> Iterator[tuple[Any, Any, Any]]:
    """(key, value, headers) from the options, or from JSON lines on stdin."""
    if value is not None:
        parsed = []
        for h in headers:
            name, sep, hv = h.partition("=")
            if not sep or not name:
                raise click.BadParameter(f"{h!r} is not NAME=VALUE", param_hint="--header")
            parsed.append((name, hv))
        yield key, value, parsed
        return
    if key is not None or headers:
        raise click.UsageError("--key and --header go with --value; on stdin, give them in each JSON line")
    if sys.stdin.isatty():
        raise click.UsageError('give --value, or JSON lines on stdin: {"key": "k", "value": {...}, "headers": {...}}')
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise click.ClickException(f"stdin line {n} is not JSON: {e}") from None
        if not isinstance(rec, dict) or "value" not in rec:
            raise click.ClickException(f'stdin line {n} is not an object with a "value" (and optional "key", '
                                       '"headers")')
        yield rec.get("key"), rec["value"], rec.get("headers")


@click.command("produce")
@click.argument("topic")
@click.option("--key", default=None, help="Record key (text).")
@click.option("--value", default=None, help="Record value (text, e.g. JSON); without it, JSON lines from stdin.")
@click.option("--header", "headers", multiple=True, metavar="NAME=VALUE", help="Record header, repeatable.")
@click.option("--partition", type=click.IntRange(min=0), default=None, help="Partition (default: by key).")
@bootstrap_option
@kafka_option
def produce_cmd(topic: str, key: str | None, value: str | None, headers: tuple[str, ...], partition: int | None,
                bootstrap: str, kafka: dict[str, str]) -> None:
    """Produce records to TOPIC: one from --key/--value/--header, or one per
    JSON line on stdin ({"key": ..., "value": ..., "headers": {...}}; a
    string value is sent as its text, anything else as JSON)."""
    from oncely.kafka_io import produce

    settings = connect(bootstrap, kafka)
    md = _topic(_admin(bootstrap, settings), topic)
    if partition is not None and partition not in md.partitions:
        raise ConfigError(f"topic {topic} has no partition {partition} (it has {len(md.partitions)})")
    n = produce(bootstrap, topic, list(_records(key, value, headers)), partition=partition, config=settings)
    click.echo(f"produced {n} record{'s' if n != 1 else ''} to {topic}")


@click.command("tail")
@click.argument("topic", required=False)
@click.option("--dlq", "dlq_app", metavar="APP", default=None, help="Read APP's dead letters (APP.dlq).")
@click.option("--from-beginning", is_flag=True, help="From each partition's first record (default: the last N).")
@click.option("-n", "--last", default=10, show_default=True, type=click.IntRange(min=0),
              help="Records per partition before the end to start from.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new records until interrupted.")
@bootstrap_option
@kafka_option
def tail_cmd(topic: str | None, dlq_app: str | None, from_beginning: bool, last: int, follow: bool, bootstrap: str,
             kafka: dict[str, str]) -> None:
    """Print the committed records of TOPIC (read_committed) with their
    headers, up to its end; with --follow, keep going."""
    from oncely.kafka_io import iter_records

    if (topic is None) == (dlq_app is None):
        raise click.UsageError("name a TOPIC, or --dlq APP for an app's dead letters")
    name = topic or f"{dlq_app}.dlq"
    settings = connect(bootstrap, kafka)
    try:
        _topic(_admin(bootstrap, settings), name)
    except ConfigError:
        if dlq_app is None:
            raise
        raise ConfigError(f"app {dlq_app!r} has no topic {name} at {bootstrap}: check the name (an app's topics "
                          "are created when it first runs)") from None
    stopping: list[bool] = []
    if follow:
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    shown = 0
    try:
        for rec in iter_records(bootstrap, name, start=None if from_beginning else lambda lo, hi: hi - last,
                                follow=(lambda: not stopping) if follow else None, config=settings):
            show_record(rec)
            shown += 1
    except KeyboardInterrupt:
        pass
    if not shown and not follow:
        click.echo(f"no records in {name}" if from_beginning else f"no records in {name} (the last {last} of "
                   "each partition)")


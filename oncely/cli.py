"""The `oncely` command line: run an app, manage the local broker, demo."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import click

from oncely.local_kafka import KAFKA_VERSION, LocalKafka, LocalKafkaError, check_java


@click.group()
def main() -> None:
    """oncely: exactly-once durable handlers on Kafka."""


@main.group()
def kafka() -> None:
    """A local single-node Apache Kafka broker (KRaft) for development and tests."""


_data_dir = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                         help="Broker data directory (default: <cache>/kafka-data).")
_cache_dir = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                          help="Where the Kafka jars are cached (default: $ONCELY_CACHE_DIR or ~/.cache/oncely).")


@kafka.command("start")
@click.option("--port", type=int, default=None, help="Client port on 127.0.0.1 (default: a free port).")
@_data_dir
@_cache_dir
def kafka_start(port: int | None, data_dir: str | None, cache_dir: str | None) -> None:
    """Start the broker (downloading Apache Kafka once) and print its bootstrap address."""
    broker = LocalKafka(data_dir=data_dir, cache_dir=cache_dir, port=port)
    t0 = time.monotonic()
    try:
        if not broker.jars_cached():
            check_java()
            click.echo(f"Resolving Apache Kafka {KAFKA_VERSION} from Maven Central (first start only)...", err=True)
        already = broker.status()
        info = broker.start()
    except LocalKafkaError as e:
        raise click.ClickException(str(e)) from None
    verb = "already running" if already else f"started in {time.monotonic() - t0:.1f} s"
    click.echo(f"Apache Kafka {info.version} {verb} (pid {info.pid}, data {info.data_dir})", err=True)
    click.echo(info.bootstrap)


@kafka.command("status")
@_data_dir
@_cache_dir
def kafka_status(data_dir: str | None, cache_dir: str | None) -> None:
    """Say whether the broker runs and where; exit 1 when it does not."""
    info = LocalKafka(data_dir=data_dir, cache_dir=cache_dir).status()
    if not info:
        click.echo("not running")
        sys.exit(1)
    click.echo(f"running: {info.bootstrap} (Apache Kafka {info.version}, pid {info.pid}, "
               f"data {info.data_dir}, log {info.log_file})")


@kafka.command("stop")
@_data_dir
@_cache_dir
def kafka_stop(data_dir: str | None, cache_dir: str | None) -> None:
    """Stop the broker cleanly."""
    if LocalKafka(data_dir=data_dir, cache_dir=cache_dir).stop():
        click.echo("stopped")
    else:
        click.echo("not running")


def _load(app_spec: str, bootstrap: str | None = None, state_dir: str | None = None):
    """The App of MODULE:APP with command-line overrides applied."""
    from oncely.runtime import load_app

    app = load_app(app_spec)
    if bootstrap:
        app.config.bootstrap = bootstrap
    if state_dir:
        app.config.state_dir = state_dir
    return app


@main.command("run")
@click.argument("app_spec", metavar="MODULE:APP")
@click.option("--bootstrap", default=None, help="Kafka bootstrap servers (default: $ONCELY_KAFKA_BOOTSTRAP).")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False),
              help="Where RocksDB state lives (default: $ONCELY_STATE_DIR or ./.state).")
@click.option("--log-level", default="INFO", show_default=True)
def run_cmd(app_spec: str, bootstrap: str | None, state_dir: str | None, log_level: str) -> None:
    """Run one processor process of an app; stops cleanly on SIGTERM/SIGINT."""
    import logging

    from oncely.errors import ConfigError
    from oncely.runtime import run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(_load(app_spec, bootstrap, state_dir))
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


@main.command("demo")
@click.option("--bootstrap", default=None, help="Use this Kafka cluster (default: $ONCELY_KAFKA_BOOTSTRAP, "
              "else a local broker started for the demo).")
@click.option("--orders", default=20_000, show_default=True, help="distinct orders to produce")
@click.option("--customers", default=200, show_default=True, help="distinct customers (keys)")
@click.option("--kills", default=2, show_default=True, help="times to kill -9 the processor mid-stream")
def demo_cmd(bootstrap: str | None, orders: int, customers: int, kills: int) -> None:
    """Subscribe a keyed handler to an orders topic (with duplicates and
    malformed records), kill -9 its processor mid-stream, check every total."""
    import os

    from oncely.demo import run_demo

    ok = run_demo(bootstrap or os.environ.get("ONCELY_KAFKA_BOOTSTRAP"), orders, customers, kills, click.echo)
    sys.exit(0 if ok else 1)


@main.group()
def inspect() -> None:
    """Read an app's committed state and invocations from its changelog."""


_bootstrap = click.option("--bootstrap", default=None, envvar="ONCELY_KAFKA_BOOTSTRAP", required=True,
                          help="Kafka bootstrap servers (or $ONCELY_KAFKA_BOOTSTRAP).")


@inspect.command("state")
@click.argument("app")
@_bootstrap
@click.option("--service", default=None)
@click.option("--key", default=None)
def inspect_state(app: str, bootstrap: str, service: str | None, key: str | None) -> None:
    """Print APP's state as `service key name = value` lines."""
    from oncely.admin import read_state

    for (svc, k, name), value in sorted(read_state(bootstrap, app).items()):
        if service and svc != service or key and k != key.encode():
            continue
        click.echo(f"{svc} {k.decode(errors='backslashreplace')} {name} = {value!r}")


@inspect.command("invocations")
@click.argument("app")
@_bootstrap
def inspect_invocations(app: str, bootstrap: str) -> None:
    """Print APP's invocations that outlived a commit: in flight, paused, failed."""
    from oncely.admin import read_invocations

    for inv in read_invocations(bootstrap, app):
        key = inv.key.decode(errors="backslashreplace") if inv.key is not None else "-"
        click.echo(f"{inv.id} {inv.target} {key} {inv.phase} attempt={inv.attempt}"
                   + (f" error={inv.error}" if inv.error else ""))


@main.group()
def awakeable() -> None:
    """Complete an awakeable a handler waits on (`ctx.awakeable()`)."""


@awakeable.command("resolve")
@click.argument("awakeable_id")
@click.argument("value", default="null")
@_bootstrap
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the app's answer.")
def awakeable_resolve(awakeable_id: str, value: str, bootstrap: str, timeout: float) -> None:
    """Resolve AWAKEABLE_ID with VALUE (JSON; default null)."""
    import orjson

    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise click.UsageError(f"VALUE must be JSON (quote strings: '\"yes\"'): {e}") from None
    _complete(lambda c: c.resolve_awakeable(awakeable_id, decoded, timeout=timeout), bootstrap)


@awakeable.command("reject")
@click.argument("awakeable_id")
@click.argument("reason")
@_bootstrap
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the app's answer.")
def awakeable_reject(awakeable_id: str, reason: str, bootstrap: str, timeout: float) -> None:
    """Reject AWAKEABLE_ID: the waiting handler gets TerminalError(REASON)."""
    _complete(lambda c: c.reject_awakeable(awakeable_id, reason, timeout=timeout), bootstrap)


def _complete(action: Callable[[Any], None], bootstrap: str) -> None:
    from oncely.client import Client
    from oncely.errors import AwakeableError

    client = Client(bootstrap)
    try:
        action(client)
    except (AwakeableError, TimeoutError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        client.close()
    click.echo("ok")


@main.command("restore")
@click.argument("app_spec", metavar="MODULE:APP")
@click.option("--partition", "partitions", type=int, multiple=True, help="Partition to rebuild (repeatable).")
@click.option("--all", "all_partitions", is_flag=True, help="Rebuild every partition.")
@click.option("--bootstrap", default=None, envvar="ONCELY_KAFKA_BOOTSTRAP")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False))
@click.option("--keep/--wipe", default=False, help="Catch up from the local checkpoint instead of wiping first.")
def restore_cmd(app_spec: str, partitions: tuple[int, ...], all_partitions: bool, bootstrap: str | None,
                state_dir: str | None, keep: bool) -> None:
    """Rebuild local partition stores from the changelog (the processor must be stopped)."""
    from oncely.admin import restore_partitions
    from oncely.errors import ConfigError

    try:
        app = _load(app_spec, bootstrap, state_dir)
        if not app.config.bootstrap:
            raise ConfigError("no Kafka bootstrap address: pass --bootstrap or set ONCELY_KAFKA_BOOTSTRAP")
        chosen = list(range(app.partitions)) if all_partitions else list(partitions)
        if not chosen:
            raise ConfigError("name the partitions to rebuild with --partition N, or pass --all")
        n = restore_partitions(app, chosen, wipe=not keep)
    except (ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"restored partitions {chosen} of {app.name} from {app.changelog_topic}: {n} records")


@main.command("replay")
@click.argument("app_spec", metavar="MODULE:APP")
@click.option("--topic", required=True, help="Source topic to replay (must have a subscription).")
@click.option("--partition", "partitions", type=int, multiple=True, help="Only this partition (repeatable).")
@click.option("--from-offset", type=int, default=None, help="First offset (inclusive).")
@click.option("--from-time", default=None, help="First record at or after this ISO 8601 time (UTC if no zone).")
@click.option("--to-offset", type=int, default=None, help="Stop before this offset (exclusive; default: the end).")
@click.option("--to-time", default=None, help="Stop before the first record at or after this time.")
@click.option("--new-ids", is_flag=True, help="Process the records again as new invocations (no deduplication).")
@click.option("--bootstrap", default=None, envvar="ONCELY_KAFKA_BOOTSTRAP")
def replay_cmd(app_spec: str, topic: str, partitions: tuple[int, ...], from_offset: int | None,
               from_time: str | None, to_offset: int | None, to_time: str | None, new_ids: bool,
               bootstrap: str | None) -> None:
    """Re-feed a range of a source topic through its subscription(s).

    Without --new-ids, records processed within the dedup retention are
    recognised and change nothing: use it after an outage or a partial
    failure to make sure a range was processed. With --new-ids every record
    is processed again: use it after fixing a handler bug whose effects you
    want recomputed (handlers see the records a second time).
    """
    from tqdm import tqdm

    from oncely.errors import ConfigError
    from oncely.ingest.replay import replay

    try:
        app = _load(app_spec, bootstrap)
        bar = tqdm(unit="rec", desc=f"replay {topic}", disable=None)
        try:
            summary = replay(app, topic, list(partitions) or None, from_offset, from_time, to_offset, to_time,
                             new_ids, progress=bar.update, on_total=lambda n: setattr(bar, "total", n))
        finally:
            bar.close()
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{topic}: {summary}")


if __name__ == "__main__":
    main()

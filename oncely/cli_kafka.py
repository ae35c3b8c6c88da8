"""`oncely kafka start|status|stop`: the local broker for development."""

from __future__ import annotations

import sys
import time

import click

from oncely.local_kafka import KAFKA_VERSION, LocalKafka, LocalKafkaError, check_java


@click.group()
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
            click.echo(f"downloading Apache Kafka {KAFKA_VERSION} from Maven Central (first run only)...", err=True)
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

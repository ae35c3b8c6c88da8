"""The `oncely` command line: run an app, restore and replay it, the demo;
the other commands live in cli_kafka (local broker), cli_inspect (inspect,
invocations, awakeable), cli_topics (topics, produce, tail), cli_status
(status), cli_gateway (gateway) and cli_deployments (deployments)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from oncely import __version__
from oncely.cli_common import Group, add_log_level
from oncely.cli_deployments import deployments
from oncely.cli_gateway import gateway_cmd
from oncely.cli_inspect import awakeable, inspect
from oncely.cli_invocations import admin_options, check_admin, http_token_option, invocations
from oncely.cli_kafka import kafka
from oncely.cli_status import status_cmd
from oncely.cli_topics import produce_cmd, tail_cmd, topics

if TYPE_CHECKING:
    from oncely.app import App


@click.group(cls=Group)
@click.version_option(__version__, prog_name="oncely")
def main() -> None:
    """oncely: exactly-once durable handlers on Kafka."""


def _load(app_spec: str, bootstrap: str | None = None, state_dir: str | None = None) -> "App":
    """The App of MODULE:APP with command-line overrides applied."""
    from oncely.runtime import load_app

    app = load_app(app_spec)
    if bootstrap:
        app.config.bootstrap = bootstrap
    if state_dir:
        app.config.state_dir = state_dir
    return app


_app_bootstrap = click.option("--bootstrap", default=None, metavar="HOST:PORT",
                              help="Kafka bootstrap servers (default: the app's, else $ONCELY_KAFKA_BOOTSTRAP).")
_state_dir = click.option("--state-dir", default=None, type=click.Path(file_okay=False),
                          help="Where RocksDB state lives (default: the app's, else $ONCELY_STATE_DIR or ./.state).")


@main.command("run")
@click.argument("app_spec", metavar="MODULE:APP")
@_app_bootstrap
@_state_dir
@click.option("--metrics", default=None, metavar="HOST:PORT", envvar="ONCELY_METRICS",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (needs oncely[metrics]; $ONCELY_METRICS).")
@click.option("--tracing", is_flag=True, envvar="ONCELY_TRACING",
              help="Export OpenTelemetry spans of invocations as the OTEL_* variables say (default OTLP to "
                   "localhost:4317; needs oncely[tracing]; $ONCELY_TRACING).")
@click.option("--http", default=None, metavar="HOST:PORT", envvar="ONCELY_HTTP",
              help="Serve the HTTP ingress (call, send, attach, awakeables, state) there (needs oncely[http]; "
                   "$ONCELY_HTTP).")
@http_token_option
@admin_options
def run_cmd(app_spec: str, bootstrap: str | None, state_dir: str | None, metrics: str | None,
            tracing: bool, http: str | None, http_token: str | None, admin: str | None,
            admin_token: str | None) -> None:
    """Run one processor process of an app; stops cleanly on SIGTERM/SIGINT."""
    from oncely.runtime import run

    if metrics is not None:
        from oncely.observe.server import parse_address, require_client

        require_client()
        parse_address(metrics)
    if http is not None:
        from oncely.gateway.openapi import require_apispec
        from oncely.gateway.server import parse_address as parse_http

        require_apispec()
        parse_http(http)
    check_admin(admin, admin_token)
    app = _load(app_spec, bootstrap, state_dir)
    if http_token:
        app.config.http_token = http_token
    run(app, metrics, tracing, http, admin, admin_token)


@main.command("demo")
@click.option("--bootstrap", default=None, metavar="HOST:PORT", help="Use this Kafka cluster (default: "
              "$ONCELY_KAFKA_BOOTSTRAP, else a local broker started for the demo).")
@click.option("--orders", default=20_000, show_default=True, type=click.IntRange(min=1),
              help="distinct orders to produce")
@click.option("--customers", default=200, show_default=True, type=click.IntRange(min=1),
              help="distinct customers (keys)")
@click.option("--kills", default=2, show_default=True, type=click.IntRange(min=0),
              help="times to kill -9 the processor mid-stream")
@click.option("--remote", is_flag=True,
              help="run the handler behind an HTTP endpoint in its own process, killed -9 too")
def demo_cmd(bootstrap: str | None, orders: int, customers: int, kills: int, remote: bool) -> None:
    """Subscribe a keyed handler to an orders topic (with duplicates and
    malformed records), kill -9 its processor mid-stream, check every total.
    With --remote the handler runs behind an HTTP endpoint (oncely.remote)."""
    from oncely.demo import run_demo

    ok = run_demo(bootstrap or os.environ.get("ONCELY_KAFKA_BOOTSTRAP"), orders, customers, kills, click.echo,
                  remote=remote)
    sys.exit(0 if ok else 1)


@main.command("restore")
@click.argument("app_spec", metavar="MODULE:APP")
@click.option("--partition", "partitions", type=click.IntRange(min=0), multiple=True,
              help="Partition to rebuild (repeatable).")
@click.option("--all", "all_partitions", is_flag=True, help="Rebuild every partition.")
@_app_bootstrap
@_state_dir
@click.option("--keep/--wipe", default=False, help="Catch up from the local checkpoint instead of wiping first.")
def restore_cmd(app_spec: str, partitions: tuple[int, ...], all_partitions: bool, bootstrap: str | None,
                state_dir: str | None, keep: bool) -> None:
    """Rebuild local partition stores from the changelog (the processor must
    be stopped): after a disk was lost or a store is suspect, instead of
    waiting for the processor's own restore at start."""
    from oncely.admin import restore_partitions
    from oncely.errors import ConfigError
    from oncely.preflight import connect_app

    app = _load(app_spec, bootstrap, state_dir)
    chosen = list(range(app.partitions)) if all_partitions else list(partitions)
    if not chosen:
        raise click.UsageError("name the partitions to rebuild with --partition N, or pass --all")
    connect_app(app)
    try:
        n = restore_partitions(app, chosen, wipe=not keep)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    click.echo(f"restored partitions {chosen} of {app.name} from {app.changelog_topic}: {n} records")


@main.command("replay")
@click.argument("app_spec", metavar="MODULE:APP")
@click.option("--topic", required=True, help="Source topic to replay (must have a subscription).")
@click.option("--partition", "partitions", type=click.IntRange(min=0), multiple=True,
              help="Only this partition (repeatable).")
@click.option("--from-offset", type=click.IntRange(min=0), default=None, help="First offset (inclusive).")
@click.option("--from-time", default=None, help="First record at or after this ISO 8601 time (UTC if no zone).")
@click.option("--to-offset", type=click.IntRange(min=0), default=None,
              help="Stop before this offset (exclusive; default: the end).")
@click.option("--to-time", default=None, help="Stop before the first record at or after this time.")
@click.option("--new-ids", is_flag=True, help="Process the records again as new invocations (no deduplication).")
@_app_bootstrap
def replay_cmd(app_spec: str, topic: str, partitions: tuple[int, ...], from_offset: int | None,
               from_time: str | None, to_offset: int | None, to_time: str | None, new_ids: bool,
               bootstrap: str | None) -> None:
    """Re-feed a range [from, to) of a source topic through its subscription(s).

    Without --new-ids, records processed within the dedup retention are
    recognised and change nothing: use it after an outage, or after fixing
    a decoder or key function that dead-lettered records, to make sure a
    range was processed. With --new-ids every record is processed again:
    use it after fixing a handler bug whose effects you want recomputed.
    Records whose handler failed are not re-run (`oncely invocations retry`
    does that); records dead-lettered again are not written to the DLQ twice.
    """
    from tqdm import tqdm

    from oncely.ingest.replay import replay
    from oncely.preflight import connect_app

    app = _load(app_spec, bootstrap)
    connect_app(app)
    bar = tqdm(unit="rec", desc=f"replay {topic}", disable=None)
    try:
        summary = replay(app, topic, list(partitions) or None, from_offset, from_time, to_offset, to_time,
                         new_ids, progress=bar.update, on_total=lambda n: setattr(bar, "total", n))
    finally:
        bar.close()
    click.echo(f"{topic}: {summary}")


for _command in (kafka, inspect, invocations, awakeable, topics, produce_cmd, tail_cmd, status_cmd, gateway_cmd,
                 deployments):
    main.add_command(_command)
add_log_level(main, {"run": "INFO", "gateway": "INFO", "restore": "INFO", "replay": "INFO", "demo": "ERROR"})


if __name__ == "__main__":
    main()

"""`oncely gateway --app MODULE:APP --http HOST:PORT`: the HTTP ingress on
its own, beside the processors (oncely.gateway). It holds no state: run as
many as wanted; each reads one partition of `<app>.replies`."""

from __future__ import annotations

import click

from oncely.cli_invocations import admin_options, check_admin, http_token_option


@click.command("gateway")
@click.option("--app", "app_spec", required=True, metavar="MODULE:APP", help="The app whose handlers to serve.")
@click.option("--http", "address", default=None, metavar="HOST:PORT", envvar="ONCELY_HTTP",
              help="Listen here (e.g. 127.0.0.1:8080; $ONCELY_HTTP).")
@http_token_option
@admin_options
@click.option("--bootstrap", default=None, metavar="HOST:PORT",
              help="Kafka bootstrap servers (default: the app's, else $ONCELY_KAFKA_BOOTSTRAP).")
@click.option("--replies-partition", type=click.IntRange(min=0), default=None,
              help="The partition of <app>.replies this gateway reads (default: one at random).")
def gateway_cmd(app_spec: str, address: str | None, bootstrap: str | None, replies_partition: int | None,
                http_token: str | None, admin: str | None, admin_token: str | None) -> None:
    """Serve an app's HTTP ingress (call, send, attach, awakeables, state)
    and/or its admin API without running its processor; stops on
    SIGTERM/SIGINT."""
    from oncely.errors import ConfigError
    from oncely.gateway.openapi import require_apispec
    from oncely.gateway.server import parse_address, run_gateway
    from oncely.runtime import load_app

    require_apispec()
    if address is None and admin is None:
        raise ConfigError("nothing to serve: give --http HOST:PORT, --admin HOST:PORT, or both")
    if address is not None:
        parse_address(address)
    check_admin(admin, admin_token)
    app = load_app(app_spec)
    if bootstrap:
        app.config.bootstrap = bootstrap
    if http_token:
        app.config.http_token = http_token
    if replies_partition is not None and replies_partition >= app.partitions:
        raise ConfigError(f"--replies-partition {replies_partition}: app {app.name!r} has {app.partitions} partitions")
    run_gateway(app, address, replies_partition, admin, admin_token)

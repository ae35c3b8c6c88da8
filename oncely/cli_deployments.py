"""`oncely deployments register | list | describe | remove`: an app's remote
deployments (remote/deployments.py), kept in `<app>.deployments`; running
processors follow it, so a registration takes effect without a restart."""

from __future__ import annotations

import asyncio
import os
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import click
import orjson

from oncely.cli_common import Group, kafka_option

F = TypeVar("F", bound=Callable[..., Any])


def _app_options(fn: F) -> F:
    fn = kafka_option(fn)
    fn = click.option("--bootstrap", default=None, metavar="HOST:PORT",
                      help="Kafka bootstrap servers (default: the app's, else $ONCELY_KAFKA_BOOTSTRAP).")(fn)
    return click.option("--app", "app_spec", required=True, envvar="ONCELY_APP", metavar="MODULE:APP|NAME",
                        help="The app: MODULE:APP (its in-process services are checked too) or its name "
                             "($ONCELY_APP).")(fn)


def _admin(app_spec: str, bootstrap: str | None, kafka: dict[str, str]) -> Any:
    """The DeploymentAdmin of the app named by MODULE:APP or by NAME."""
    from oncely.cli_common import connect
    from oncely.errors import ConfigError
    from oncely.remote.deployments import DeploymentAdmin
    from oncely.remote.registry import signing_key_from_env

    if ":" in app_spec:
        from oncely.runtime import load_app

        app = load_app(app_spec)
        if bootstrap:
            app.config.bootstrap = bootstrap
        if not app.config.bootstrap:
            raise ConfigError("give --bootstrap (or $ONCELY_KAFKA_BOOTSTRAP)")
        app.config.kafka.update(connect(app.config.bootstrap, {**app.config.kafka, **kafka}))
        return DeploymentAdmin.for_app(app)
    bootstrap = bootstrap or os.environ.get("ONCELY_KAFKA_BOOTSTRAP")
    if not bootstrap:
        raise ConfigError("give --bootstrap (or $ONCELY_KAFKA_BOOTSTRAP)")
    return DeploymentAdmin(app_spec, bootstrap, connect(bootstrap, kafka), key=signing_key_from_env())


def _headers(_ctx: click.Context, _param: click.Parameter, pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{pair!r} is not NAME:VALUE")
        out[name.strip().lower()] = value.strip()
    return out


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


@click.group("deployments", cls=Group)
def deployments() -> None:
    """Remote deployments: endpoints that run an app's handlers over HTTP."""


@deployments.command("register")
@click.argument("url")
@_app_options
@click.option("--force", is_flag=True, help="Register even a breaking change (a handler removed, a keyed flag "
                                            "changed) or a changed manifest under the same URL.")
@click.option("--dry-run", is_flag=True, help="Discover and check only; write nothing.")
@click.option("--header", "headers", multiple=True, metavar="NAME:VALUE", callback=_headers,
              help="A header sent with every request to the endpoint (repeatable).")
def register_cmd(url: str, app_spec: str, bootstrap: str | None, kafka: dict[str, str], force: bool,
                 dry_run: bool, headers: dict[str, str]) -> None:
    """Discover the endpoint at URL and register its services."""
    admin = _admin(app_spec, bootstrap, kafka)
    r = asyncio.run(admin.register(url, force=force, dry_run=dry_run, headers=headers))
    for w in r.warnings or []:
        click.echo(f"warning (forced): {w}", err=True)
    services = ", ".join(r.services) or "(none)"
    if r.dry_run:
        click.echo(f"dry run: {r.id} ({r.uri}) would be {'registered' if r.created else 'unchanged'}: "
                   f"services {services}")
    elif not r.created:
        click.echo(f"{r.id} ({r.uri}) is registered already with this manifest: services {services}")
    else:
        click.echo(f"{'replaced' if r.replaced else 'registered'} {r.id} ({r.uri}): services {services}")


@deployments.command("list")
@_app_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def list_cmd(app_spec: str, bootstrap: str | None, kafka: dict[str, str], as_json: bool) -> None:
    """The registered deployments, oldest first."""
    rows = asyncio.run(_admin(app_spec, bootstrap, kafka).list())
    if as_json:
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    if not rows:
        click.echo("no deployments registered")
    for d in rows:
        services = ", ".join(f"{s['name']}{'*' if s['name'] in d['newest_for'] else ''}" for s in d["services"])
        click.echo(f"{d['id']}  {d['uri']}  {_when(d['registered_at_ms'])}  {services or '(no services)'}")
    if rows:
        click.echo("(* = new invocations of the service go to this deployment)")


@deployments.command("describe")
@click.argument("dep_id", metavar="ID")
@_app_options
def describe_cmd(dep_id: str, app_spec: str, bootstrap: str | None, kafka: dict[str, str]) -> None:
    """One deployment: its manifest and how many in-flight invocations are
    pinned to it (read from the changelog)."""
    d = asyncio.run(_admin(app_spec, bootstrap, kafka).describe(dep_id))
    click.echo(orjson.dumps(d, option=orjson.OPT_INDENT_2).decode())


@deployments.command("remove")
@click.argument("dep_id", metavar="ID")
@_app_options
@click.option("--force", is_flag=True, help="Remove even while invocations are pinned to it (they pause).")
def remove_cmd(dep_id: str, app_spec: str, bootstrap: str | None, kafka: dict[str, str], force: bool) -> None:
    """Remove a registration."""
    r = asyncio.run(_admin(app_spec, bootstrap, kafka).remove(dep_id, force=force))
    extra = f" ({r.usage.pinned} pinned invocation(s) will pause)" if r.usage.pinned else ""
    click.echo(f"removed {r.id}{extra}")

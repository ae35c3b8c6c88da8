"""`oncely inspect` and `oncely awakeable`: look
at an app's committed state, invocations and timers, and act on them, from
its changelog and log (no processor needed for reading)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable

import click

from oncely.cli_common import bootstrap_option, connect, kafka_option, text


@click.group()
def inspect() -> None:
    """Read an app's committed state, invocations and timers from its changelog."""


@inspect.command("state")
@click.argument("app")
@bootstrap_option
@kafka_option
@click.option("--service", default=None, help="Only this service.")
@click.option("--key", default=None, help="Only this key.")
def inspect_state(app: str, bootstrap: str, kafka: dict[str, str], service: str | None, key: str | None) -> None:
    """Print APP's state as `service key name = value` lines."""
    from oncely.admin import read_state

    shown = 0
    for (svc, k, name), value in sorted(read_state(bootstrap, app, connect(bootstrap, kafka)).items()):
        if service and svc != service or key and k != key.encode():
            continue
        click.echo(f"{svc} {text(k)} {name} = {value!r}")
        shown += 1
    if not shown:
        click.echo("no state")


@inspect.command("invocations")
@click.argument("app")
@bootstrap_option
@kafka_option
@click.option("--failed", "phase", flag_value="FAILED", help="Only failed invocations (retained for a day).")
@click.option("--paused", "phase", flag_value="PAUSED", help="Only paused invocations (non-determinism).")
def inspect_invocations(app: str, bootstrap: str, kafka: dict[str, str], phase: str | None) -> None:
    """Print APP's invocations that outlived a commit: in flight, paused, failed."""
    from oncely.admin import read_invocations

    shown = [i for i in read_invocations(bootstrap, app, connect(bootstrap, kafka)) if not phase or i.phase == phase]
    for inv in shown:
        key = text(inv.key) if inv.key is not None else "-"
        click.echo(f"{inv.id} {inv.target} {key} {inv.phase} attempt={inv.attempt}"
                   + (f" error={inv.error}" if inv.error else "")
                   + (f" retried as {inv.retried}" if inv.retried else ""))
    if not shown:
        click.echo("no invocations")


@inspect.command("timers")
@click.argument("app")
@bootstrap_option
@kafka_option
def inspect_timers(app: str, bootstrap: str, kafka: dict[str, str]) -> None:
    """Print APP's durable timers (sleeps, delayed sends) in the order they fire."""
    from oncely.admin import read_timers

    timers = read_timers(bootstrap, app, connect(bootstrap, kafka))
    for t in timers:
        when = datetime.fromtimestamp(t.fire_ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")
        click.echo(f"{when} {t.invocation} #{t.index} {t.what}")
    if not timers:
        click.echo("no timers")


@click.group()
def awakeable() -> None:
    """Complete an awakeable a handler waits on (`ctx.awakeable()`)."""


_timeout = click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
                        help="Seconds to wait for the app's answer.")


@awakeable.command("resolve")
@click.argument("awakeable_id")
@click.argument("value", default="null")
@bootstrap_option
@kafka_option
@_timeout
def awakeable_resolve(awakeable_id: str, value: str, bootstrap: str, kafka: dict[str, str], timeout: float) -> None:
    """Resolve AWAKEABLE_ID with VALUE (JSON; default null)."""
    import orjson

    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise click.UsageError(f"VALUE must be JSON (quote strings: '\"yes\"'): {e}") from None
    _complete(lambda c: c.resolve_awakeable(awakeable_id, decoded, timeout=timeout), bootstrap, kafka)


@awakeable.command("reject")
@click.argument("awakeable_id")
@click.argument("reason")
@bootstrap_option
@kafka_option
@_timeout
def awakeable_reject(awakeable_id: str, reason: str, bootstrap: str, kafka: dict[str, str], timeout: float) -> None:
    """Reject AWAKEABLE_ID: the waiting handler gets TerminalError(REASON)."""
    _complete(lambda c: c.reject_awakeable(awakeable_id, reason, timeout=timeout), bootstrap, kafka)


def _complete(action: Callable[[Any], None], bootstrap: str, kafka: dict[str, str]) -> None:
    from oncely.client import Client

    client = Client(bootstrap, kafka=connect(bootstrap, kafka))
    try:
        action(client)
    except TimeoutError as e:
        raise click.ClickException(str(e)) from None
    finally:
        client.close()
    click.echo("ok")

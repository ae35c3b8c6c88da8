"""`oncely invocations list | describe | cancel | kill | pause | resume |
purge | retry`: act on an app's invocations straight over Kafka (a `Control`
or `Query` record on the invocation's partition, the answer read from
`<app>.replies`; gateway/admin_ops.py), so no admin server is needed; and
the `--admin` / `--admin-token` options of `oncely run` and `oncely gateway`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, TypeVar

import click

from oncely.cli_common import bootstrap_option, connect, kafka_option

F = TypeVar("F", bound=Callable[..., Any])


def admin_options(fn: F) -> F:
    """--admin HOST:PORT and --admin-token (or $ONCELY_ADMIN_TOKEN)."""
    fn = click.option("--admin-token", default=None, envvar="ONCELY_ADMIN_TOKEN", metavar="TOKEN",
                      help="Bearer token the admin API requires ($ONCELY_ADMIN_TOKEN); needed off loopback.")(fn)
    return click.option("--admin", default=None, metavar="HOST:PORT", envvar="ONCELY_ADMIN",
                        help="Serve the admin API (services, invocation status and controls) there, e.g. "
                             "127.0.0.1:9070 (needs oncely[http]; $ONCELY_ADMIN).")(fn)


def http_token_option(fn: F) -> F:
    """--http-token (or $ONCELY_HTTP_TOKEN): the ingress's bearer token."""
    return click.option("--http-token", default=None, envvar="ONCELY_HTTP_TOKEN", metavar="TOKEN",
                        help="Bearer token the HTTP ingress requires on every route but health "
                             "($ONCELY_HTTP_TOKEN).")(fn)


def check_admin(admin: str | None, token: str | None) -> None:
    """Refuse a bad --admin before anything starts (one sentence)."""
    if admin is not None:
        from oncely.gateway.admin import check_exposure
        from oncely.gateway.openapi import require_apispec

        require_apispec()
        check_exposure(admin, token)


@click.group()
def invocations() -> None:
    """Look at and control an app's invocations (a running processor applies the controls)."""


_timeout = click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0, max=300),
                        help="Seconds to wait for the app's answer.")


def _run(app: str, bootstrap: str, kafka: dict[str, str], timeout: float, work: Callable[[Any], Any]) -> Any:
    """Run `work(ops)` with a Kafka connection of the app; HTTP-style
    errors become one line."""
    from oncely.errors import ConfigError
    from oncely.gateway.admin_ops import InvocationOps
    from oncely.gateway.kafka import GatewayKafka
    from oncely.gateway.paths import HttpError

    from oncely.admin import log_partitions

    settings = connect(bootstrap, kafka)
    partitions = log_partitions(bootstrap, app, settings)

    async def main() -> Any:
        gk = GatewayKafka(bootstrap, app, partitions, settings)
        await gk.start()
        try:
            return await work(InvocationOps(gk))
        finally:
            await gk.stop()

    try:
        return asyncio.run(main())
    except HttpError as e:
        raise click.ClickException(e.message) from None
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


@invocations.command("list")
@click.argument("app")
@click.option("--phase", "phases", multiple=True, metavar="PHASE",
              type=click.Choice(["INBOXED", "RUNNING", "BACKING_OFF", "SUSPENDED", "PAUSED", "FAILED"],
                                case_sensitive=False), help="Only this phase (repeat for several).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000),
              help="At most this many per partition.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@bootstrap_option
@kafka_option
@_timeout
def list_cmd(app: str, phases: tuple[str, ...], limit: int, as_json: bool, bootstrap: str, kafka: dict[str, str],
             timeout: float) -> None:
    """List APP's invocations in flight, queued or failed (not completed ones)."""
    import orjson

    found = _run(app, bootstrap, kafka, timeout,
                 lambda ops: ops.list([p.upper() for p in phases], limit, timeout))
    for d in found.invocations:
        if as_json:
            click.echo(orjson.dumps(d).decode())
        else:
            error = f"  {d['error']}" if d["error"] else ""
            click.echo(f"{d['invocation_id']}  {d['phase']:<11} {d['target']}  key={d['key']!r} "
                       f"attempt={d['attempt']} journal={d['journal_length']}{error}")
    if not found.invocations and not as_json:
        click.echo("no invocations")
    if found.missing:
        click.echo(f"partitions {', '.join(map(str, found.missing))} did not answer within {timeout:g} s", err=True)


@invocations.command("describe")
@click.argument("app")
@click.argument("invocation_id")
@bootstrap_option
@kafka_option
@_timeout
def describe_cmd(app: str, invocation_id: str, bootstrap: str, kafka: dict[str, str], timeout: float) -> None:
    """Print INVOCATION_ID's status as JSON (target, phase, attempt, error, journal length)."""
    import orjson

    d = _run(app, bootstrap, kafka, timeout, lambda ops: ops.describe(invocation_id, timeout))
    if d is None:
        raise click.ClickException(f"invocation {invocation_id} is unknown (never accepted, or past its retention)")
    click.echo(orjson.dumps(d, option=orjson.OPT_INDENT_2).decode())


def _control(action: str, doc: str) -> None:
    @invocations.command(action, help=doc + " Several ids are sent at once; the exit status is 1 if any of "
                                            "them was not applied.")
    @click.argument("app")
    @click.argument("invocation_ids", nargs=-1, required=True, metavar="INVOCATION_ID...")
    @bootstrap_option
    @kafka_option
    @_timeout
    def command(app: str, invocation_ids: tuple[str, ...], bootstrap: str, kafka: dict[str, str],
                timeout: float) -> None:
        async def all_of(ops: Any) -> list[tuple[str, str | None, str]]:
            return list(await asyncio.gather(*(ops.control(i, action, timeout) for i in invocation_ids)))

        failed = []
        for status, why, inv in _run(app, bootstrap, kafka, timeout, all_of):
            if status == "applied":
                click.echo(f"{inv}: {action} applied")
                continue
            if status == "pending":
                failed.append(f"{inv}: no answer within {timeout:g} s; the {action} is on the log and is "
                              "applied when the app's processor reads it")
            elif status == "conflict":
                failed.append(f"{inv}: {action} refused: {why}")
            else:
                failed.append(f"invocation {inv} is unknown (never accepted, or past its retention)")
        if failed:
            for line in failed[:-1]:
                click.echo(f"Error: {line}", err=True)
            raise click.ClickException(failed[-1])


for _action, _doc in (
        ("cancel", "Cancel INVOCATION_ID cooperatively: what it awaits fails with TerminalError('cancelled')."),
        ("kill", "Kill INVOCATION_ID: it fails at once (reason killed), its caller is answered, its key freed."),
        ("pause", "Pause INVOCATION_ID where it is; it keeps its key and stays paused until resumed."),
        ("resume", "Resume a paused INVOCATION_ID (however it was paused), by journal replay."),
        ("purge", "Forget a finished INVOCATION_ID: its result, failure and idempotency key.")):
    _control(_action, _doc)


@invocations.command("retry")
@click.argument("app")
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "all_failed", is_flag=True, help="Retry every failed invocation APP retains.")
@bootstrap_option
@kafka_option
def invocations_retry(app: str, ids: tuple[str, ...], all_failed: bool, bootstrap: str,
                      kafka: dict[str, str]) -> None:
    """Run failed invocations of APP again, after fixing what made them fail.

    A failed invocation (its retries exhausted, or a TerminalError) is kept
    for a day and is not run again by replays. This invokes the same handler
    with the same key, input and source record under a new id derived from
    the failed one, so retrying the same ID twice runs it once.
    """
    from oncely.admin import retry_failed

    if bool(ids) == all_failed:
        raise click.UsageError("name the failed invocations (IDs from `oncely inspect invocations APP --failed`), "
                               "or pass --all")
    pairs = retry_failed(bootstrap, app, None if all_failed else list(ids), connect(bootstrap, kafka))
    for failed, retry in pairs:
        click.echo(f"{failed} retried as {retry}")
    if not pairs:
        click.echo("no failed invocations")

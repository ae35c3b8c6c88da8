"""What the `oncely` commands share: the command group that turns oncely's
errors into one-line messages, the Kafka connection options, --log-level and
--log-format on every command, and the printing of records."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import click

from oncely.errors import AwakeableError, ConfigError
from oncely.local_kafka import LocalKafkaError
from oncely.logs import FORMATS, LEVELS, setup_logging

F = TypeVar("F", bound=Callable[..., Any])


class Group(click.Group):
    """A command group whose commands fail with one sentence: a ConfigError
    (or a refused awakeable, or a local broker that cannot start) raised
    anywhere below becomes `Error: ...` and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, AwakeableError, LocalKafkaError) as e:
            raise click.ClickException(str(e)) from None


def bootstrap_option(fn: F) -> F:
    """--bootstrap, required (from the option or $ONCELY_KAFKA_BOOTSTRAP)."""
    return click.option("--bootstrap", envvar="ONCELY_KAFKA_BOOTSTRAP", required=True, metavar="HOST:PORT",
                        help="Kafka bootstrap servers (or $ONCELY_KAFKA_BOOTSTRAP).")(fn)


def _parse_settings(_ctx: click.Context, _param: click.Parameter, pairs: tuple[str, ...]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE (e.g. security.protocol=SASL_SSL)")
        settings[name] = value
    return settings


def kafka_option(fn: F) -> F:
    """--kafka KEY=VALUE: librdkafka settings (SASL, SSL, ...), as an app's
    kafka={...}; the ONCELY_KAFKA_* variables apply too, as for the app."""
    return click.option("--kafka", "kafka", multiple=True, metavar="KEY=VALUE", callback=_parse_settings,
                        help="librdkafka setting, repeatable (e.g. security.protocol=SASL_SSL); "
                             "ONCELY_KAFKA_<SETTING> variables apply too.")(fn)


def connect(bootstrap: str, kafka: dict[str, str]) -> dict[str, str]:
    """The Kafka settings of a command (environment, then --kafka), once a
    broker at `bootstrap` answered with them; else a one-line ConfigError."""
    from oncely.config import kafka_from_env
    from oncely.preflight import connect as reach

    settings = {**kafka_from_env(dict(os.environ)), **kafka}
    reach(bootstrap, settings, "--kafka")
    return settings


_logging = {"level": "WARNING", "format": "text"}


def _configure(what: str) -> Callable[[click.Context, click.Parameter, str], None]:
    def callback(_ctx: click.Context, _param: click.Parameter, value: str) -> None:
        _logging[what] = value
        setup_logging(_logging["level"], _logging["format"])

    return callback


def add_log_level(group: click.Group, defaults: dict[str, str]) -> None:
    """Give every command below `group` a validated --log-level (default
    WARNING, or `defaults[name]`; $ONCELY_LOG_LEVEL) and --log-format
    text|json ($ONCELY_LOG_FORMAT), applied before the command runs."""
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            add_log_level(cmd, defaults)
            continue
        cmd.params.append(click.Option(
            ["--log-level"], type=click.Choice(LEVELS, case_sensitive=False), default=defaults.get(name, "WARNING"),
            envvar="ONCELY_LOG_LEVEL", show_default=True, expose_value=False, is_eager=True,
            callback=_configure("level"), help="Log level of oncely and librdkafka lines ($ONCELY_LOG_LEVEL)."))
        cmd.params.append(click.Option(
            ["--log-format"], type=click.Choice(FORMATS), default="text", envvar="ONCELY_LOG_FORMAT",
            show_default=True, expose_value=False, is_eager=True, callback=_configure("format"),
            help="Log lines as text, or as one JSON object per line ($ONCELY_LOG_FORMAT)."))


def text(data: bytes | None) -> str:
    """Bytes for a terminal: UTF-8 text when it is, escapes where not."""
    return "null" if data is None else data.decode(errors="backslashreplace")


def show_record(rec: Any) -> None:
    """One record: `partition@offset time key=...`, its value, its headers."""
    when = datetime.fromtimestamp(rec.timestamp / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")
    click.echo(f"{rec.topic}[{rec.partition}]@{rec.offset} {when} key={text(rec.key)}")
    click.echo(f"  {text(rec.value)}")
    for name, value in rec.headers:
        click.echo(f"  {name}: {text(value)}")

"""`oncely status APP`: a summary an operator can glance at (observe/status.py
gathers it; this module prints it)."""

from __future__ import annotations

import dataclasses
import time

import click
import orjson

from oncely.cli_common import bootstrap_option, connect, kafka_option


def _ago(t: float | None) -> str:
    if t is None:
        return "unknown"
    s = max(0.0, time.time() - t)
    return f"{s:.1f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def _parts(ps: list[int]) -> str:
    return ",".join(str(p) for p in ps) or "-"


@click.command("status")
@click.argument("app")
@bootstrap_option
@kafka_option
@click.option("--metrics-url", "metrics_urls", multiple=True, metavar="URL",
              help="A process's /metrics (repeatable): adds invocations in flight by phase and the last commit.")
@click.option("--timeout", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
              help="Bound on each Kafka request and metrics fetch, in seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status_cmd(app: str, bootstrap: str, kafka: dict[str, str], metrics_urls: tuple[str, ...], timeout: float,
               as_json: bool) -> None:
    """Processes of APP (an app name, or MODULE:APP) and their partitions, lag
    per topic, dead letters, the last changelog write; with --metrics-url
    also invocations in flight by phase and the last commit."""
    from oncely.observe.status import app_status

    sources: list[str] = []
    if ":" in app:
        from oncely.runtime import load_app

        loaded = load_app(app)
        app, sources = loaded.name, sorted({t for sub in loaded.subscriptions for t in sub.topics})
    if metrics_urls:
        from oncely.observe.server import require_client

        require_client()
    settings = connect(bootstrap, kafka)
    st = app_status({"bootstrap.servers": bootstrap, **settings}, app, sources, list(metrics_urls), timeout)
    if as_json:
        click.echo(orjson.dumps(dataclasses.asdict(st), option=orjson.OPT_NON_STR_KEYS).decode())
        return
    click.echo(f"app {st.app}: group {st.group_state}, {len(st.processes)} process(es)")
    for p in st.processes:
        by_topic: dict[str, list[int]] = {}
        for t, n in p.partitions:
            by_topic.setdefault(t, []).append(n)
        owns = "; ".join(f"{t} {_parts(ns)}" for t, ns in sorted(by_topic.items())) or "nothing yet"
        click.echo(f"  {p.host} {p.client_id}" + (f" (instance {p.instance_id})" if p.instance_id else "")
                   + f": {owns}")
    click.echo("lag (records not yet processed, read_committed):")
    by_topic_lag: dict[str, list[str]] = {}
    for pl in st.lag.partitions:
        by_topic_lag.setdefault(pl.topic, []).append(f"p{pl.partition} {pl.lag}")
    for topic, total in sorted(st.lag.by_topic().items()):
        click.echo(f"  {topic}: {total}  ({', '.join(by_topic_lag[topic])})")
    dlq = f"{st.dlq_records}" if st.dlq_complete else f"at least {st.dlq_records} (counting stopped at the timeout)"
    click.echo(f"dead letters in {st.app}.dlq: {dlq}")
    click.echo(f"last changelog write: {_ago(st.last_changelog_write)}")
    for s in st.scrapes:
        if s.error is not None:
            click.echo(f"metrics {s.url}: unreachable ({s.error})")
            continue
        flight = ", ".join(f"{k} {v:.0f}" for k, v in s.in_flight.items())
        outcomes = ", ".join(f"{k} {v:.0f}" for k, v in sorted(s.outcomes.items())) or "none yet"
        click.echo(f"metrics {s.url}: last commit {_ago(s.last_commit)}; in flight: {flight}; "
                   f"invocations: {outcomes}")

"""Test app for tracing: a call chain a -> b -> c that kills its own process
once at each crash point, and a subscription whose handler calls c.

With ONCELY_TEST_SPANS set, it installs the OpenTelemetry SDK's
TracerProvider with an exporter that appends every finished span, as the
SDK's own JSON, one line each, to that file (a test helper: the spans of a
subprocess that is killed -9 must already be on disk)."""

import json
import os
import signal
from pathlib import Path

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "traced-test"), partitions=4)
SOURCE = os.environ.get("ONCELY_TEST_SOURCE", "traced-source")
CRASH_DIR = os.environ.get("ONCELY_TEST_CRASH_DIR")
SPANS = os.environ.get("ONCELY_TEST_SPANS")

if SPANS:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class JsonLines(SpanExporter):
        def export(self, spans):  # type: ignore[no-untyped-def]
            with open(SPANS, "a") as f:
                for span in spans:
                    f.write(json.dumps(json.loads(span.to_json(indent=None))) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLines()))
    trace.set_tracer_provider(provider)

a, b, c = app.keyed("a"), app.keyed("b"), app.keyed("c")
hook = app.service("hook")


def crash_once(point: str) -> None:
    """SIGKILL this process the first time any invocation reaches `point`."""
    if CRASH_DIR is None:
        return
    try:
        fd = os.open(Path(CRASH_DIR) / point, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.fsync(fd)
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


@c.handler
async def c_step(ctx: oncely.Context, x: int) -> int:
    ctx.set("runs", ctx.get("runs", 0) + 1)
    return x * 3


@b.handler
async def b_step(ctx: oncely.Context, x: int) -> int:
    y = await ctx.run("double", lambda: x * 2)
    r = await ctx.call(c_step, f"c{ctx.key[1:]}", y)
    crash_once("b-after-c")
    ctx.set("runs", ctx.get("runs", 0) + 1)
    return r + 1


@a.handler
async def a_start(ctx: oncely.Context, x: int) -> None:
    r = await ctx.call(b_step, f"b{ctx.key[1:]}", x)
    crash_once("a-after-b")
    ctx.set("result", r)


@hook.handler
async def on_record(ctx: oncely.Context, rec: dict) -> None:
    await ctx.call(c_step, f"c-{rec['id']}", rec["x"])


app.subscribe(SOURCE, on_record)

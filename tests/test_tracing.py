"""OpenTelemetry tracing (observe/tracing.py): one trace per call chain, on
the engine (TestDriver, in-memory exporter of the SDK) and against a real
broker across kill -9 of a subprocess processor (tests/apps/traced.py writes
its finished spans to a file); subscriptions continue a record's trace;
without OpenTelemetry the processor runs unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely import schemas
from oncely.kafka_io import create_topic, produce, unique_name
from oncely.sdk import runner
from oncely.shuffle.envelope import invoke_record
from oncely.shuffle.ids import parse_id, random_id
from oncely.testing import TestDriver
from support import REPO, ProcessorProcess, changelog_state, wait_for_app_topics, wait_until

from opentelemetry import trace  # the `test` extra installs the SDK
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from oncely.observe.tracing import InvocationTracer, current_traceparent  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from apps import traced  # noqa: E402

SPEC = "tests.apps.traced:app"


def _local_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider of this test only (the global one stays unset, so other
    tests' processors in this pytest process do not trace)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def spans() -> Any:
    provider, exporter = _local_provider()
    runner.tracer = InvocationTracer(provider.get_tracer("test"))
    try:
        yield exporter
    finally:
        runner.tracer = None


def test_invoke_records_decode_with_and_without_a_traceparent() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    old = invoke_record(random_id(), "s", "h", b"k", b"j1", "JSON")
    new = invoke_record(random_id(), "s", "h", b"k", b"j1", "JSON", traceparent=tp)
    assert "traceparent" not in schemas.decode("log_record", old)["body"][1]
    assert schemas.decode("log_record", new)["body"][1]["traceparent"] == tp
    assert len(new) - len(old) == len(tp) + len("traceparent") + 3  # msgpack: two strings, one more map entry


def test_current_traceparent_is_the_current_span_or_none() -> None:
    provider, _ = _local_provider()
    assert current_traceparent() is None
    with provider.get_tracer("t").start_as_current_span("client") as span:
        ctx = span.get_span_context()
        tp = current_traceparent()
        assert tp is not None and tp.startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")
        assert int(tp[-2:], 16) & 1, "sampled"


def _by_kind(finished: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    """Invocation spans by name (asserting each was exported once), and attempt spans."""
    invocations = [s for s in finished if s.kind == trace.SpanKind.CONSUMER]
    names = [s.name for s in invocations]
    assert len(names) == len(set(names)), names
    return {s.name: s for s in invocations}, [s for s in finished if s.kind != trace.SpanKind.CONSUMER]


def test_a_chain_is_one_trace_on_the_engine_across_a_crash(spans: InMemorySpanExporter) -> None:
    with TestDriver(traced.app) as d:
        inv = d.send("a", "a1", "a_start", 5)
        for _ in range(3):  # a crash (kill -9 without Kafka) between each step of the chain
            d._step()
            d.crash()
        d.run()
        assert d.state("a", "a1")["result"] == 31
    inv_spans, attempts = _by_kind(spans.get_finished_spans())
    a, b, c = inv_spans["a/a_start"], inv_spans["b/b_step"], inv_spans["c/c_step"]
    assert a.parent is None and a.context.trace_id == int.from_bytes(parse_id(inv), "big"), "a root: the id"
    assert b.parent.span_id == a.context.span_id and c.parent.span_id == b.context.span_id
    assert {s.context.trace_id for s in (a, b, c, *attempts)} == {a.context.trace_id}
    assert a.attributes["oncely.invocation_id"] == inv and a.attributes["oncely.outcome"] == "completed"
    for s in attempts:
        assert s.parent.span_id == inv_spans[s.name.removesuffix(" attempt")].context.span_id
    b_events = [(e.name, e.attributes["oncely.step.name"], e.attributes["oncely.step.index"],
                 e.attributes["oncely.step.replayed"]) for s in attempts if s.name == "b/b_step attempt"
                for e in s.events]
    assert ("run", "double", 0, False) in b_events
    assert ("call", "c/c_step", 1, True) in b_events, "no attempt of b replayed its call"


def test_an_invocation_span_ends_once_its_retries_are_exhausted(spans: InMemorySpanExporter) -> None:
    app = oncely.App("retries", partitions=1)
    svc = app.service("s", retry=oncely.RetryPolicy(max_attempts=2, initial_interval=0.01))

    @svc.handler
    async def fail(ctx: oncely.Context) -> None:
        ctx.now()
        raise RuntimeError("no")

    with TestDriver(app) as d:
        d.send(fail)
        d.run()
        d.advance(1)
    inv_spans, attempts = _by_kind(spans.get_finished_spans())
    assert [s.attributes["oncely.attempt"] for s in attempts] == [0, 1]
    assert all(s.status.status_code == trace.StatusCode.ERROR for s in attempts)
    assert inv_spans["s/fail"].attributes["oncely.outcome"] == "retries-exhausted"


def _read_spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _hex(n: int, width: int) -> str:
    return f"0x{n:0{width}x}"


def test_a_chain_is_one_trace_across_kill9_and_a_subscription_continues_a_trace(kafka: str, tmp_path: Path) -> None:
    app, source = unique_name("traced"), unique_name("traced-src")
    create_topic(kafka, source, 2)
    crash_dir, spans_file = tmp_path / "crashes", tmp_path / "spans.jsonl"
    crash_dir.mkdir()
    env = {"ONCELY_TEST_APP": app, "ONCELY_TEST_SOURCE": source, "ONCELY_TEST_CRASH_DIR": str(crash_dir),
           "ONCELY_TEST_SPANS": str(spans_file)}
    proc = ProcessorProcess(SPEC, kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    provider, exporter = _local_provider()
    try:
        wait_for_app_topics(kafka, app)
        client = oncely.Client(kafka, app=app)
        with provider.get_tracer("test").start_as_current_span("client") as client_span:
            inv = client.send("a", "a1", "a_start", 5)
        client.flush()

        def result() -> Any:
            if not proc.alive():
                proc.start()  # it killed itself at a crash point: restart, as a supervisor would
            return changelog_state(kafka, app).get(("a", b"a1", "result"))

        assert wait_until(result, 180, 1.0, "the chain to finish") == 31
        # A record carrying the trace context of a producer that traced it.
        trace_id, parent_id = 0x5B8EFFF798038103D269B633813FC60C, 0xEEE19B7EC3C1B174
        produce(kafka, source, [(b"r1", json.dumps({"id": "r1", "x": 1}),
                                 [("traceparent", f"00-{trace_id:032x}-{parent_id:016x}-01".encode())])])
        # The subscribed invocation's span ends when it does, after its call's answer: wait for both.
        wait_until(lambda: {"c/c_step", "hook/on_record"} <= {s["name"] for s in _read_spans(spans_file)
                                                              if s["context"]["trace_id"] == _hex(trace_id, 32)},
                   90, 0.5, "the subscription's invocation and its call to be traced")
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    assert sorted(p.name for p in crash_dir.iterdir()) == ["a-after-b", "b-after-c"]
    assert proc.starts == 3, "each crash point killed the process once"
    client_ctx = client_span.get_span_context()
    assert exporter.get_finished_spans()[0].name == "client"
    chain = [s for s in _read_spans(spans_file) if s["context"]["trace_id"] == _hex(client_ctx.trace_id, 32)]
    # The invocation spans (kind CONSUMER): exported again only with the same ids and parent.
    invocations = {}
    for s in chain:
        if s["kind"] == "SpanKind.CONSUMER":
            prev = invocations.setdefault(s["name"], s)
            assert (prev["context"]["span_id"], prev["parent_id"]) == (s["context"]["span_id"], s["parent_id"])
    assert set(invocations) == {"a/a_start", "b/b_step", "c/c_step"}, [s["name"] for s in chain]
    a, b, c = invocations["a/a_start"], invocations["b/b_step"], invocations["c/c_step"]
    assert a["parent_id"] == _hex(client_ctx.span_id, 16)
    assert b["parent_id"] == a["context"]["span_id"] and c["parent_id"] == b["context"]["span_id"]
    assert a["attributes"]["oncely.invocation_id"] == inv
    attempts = [s for s in chain if s["kind"] != "SpanKind.CONSUMER"]
    for s in attempts:
        assert s["parent_id"] == invocations[s["name"].removesuffix(" attempt")]["context"]["span_id"]
    replayed = {(s["name"], e["attributes"]["oncely.step.name"]) for s in attempts for e in s["events"]
                if e["attributes"]["oncely.step.replayed"]}
    # After each kill, the killed invocation resumed by replaying its call.
    assert {("b/b_step attempt", "c/c_step"), ("a/a_start attempt", "b/b_step")} <= replayed
    sub = [s for s in _read_spans(spans_file) if s["context"]["trace_id"] == _hex(trace_id, 32)]
    hook = next(s for s in sub if s["name"] == "hook/on_record")
    assert hook["parent_id"] == _hex(parent_id, 16)
    assert next(s for s in sub if s["name"] == "c/c_step")["parent_id"] == hook["context"]["span_id"]


INSTALL = """
import os, sys
from opentelemetry import trace
from oncely.errors import ConfigError
from oncely.observe import tracing
from oncely.sdk import runner

assert not tracing.setup("quiet"), "no provider, no --tracing: off"
os.environ["OTEL_TRACES_EXPORTER"] = "nope"
try:
    tracing.setup("shop", install=True)
    raise AssertionError("an unknown exporter must fail")
except ConfigError as e:
    assert "nope" in str(e)
os.environ["OTEL_TRACES_EXPORTER"] = sys.argv[1]
assert tracing.setup("shop", install=True) and runner.tracer is not None
provider = trace.get_tracer_provider()
assert provider.resource.attributes["service.name"] == "shop"
processors = provider._active_span_processor._span_processors
print(",".join(type(p.span_exporter).__module__ for p in processors))
"""


@pytest.mark.parametrize("exporter", ["otlp", "console"])
def test_tracing_flag_sets_up_the_sdk_from_the_otel_variables(exporter: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", INSTALL, exporter], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    want = "opentelemetry.exporter.otlp.proto.grpc" if exporter == "otlp" else "opentelemetry.sdk.trace.export"
    assert done.stdout.strip().startswith(want), done.stdout


NO_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # `import opentelemetry...` raises ImportError, as when not installed
sys.path.insert(0, "tests")
import oncely
from oncely.errors import ConfigError
from oncely.observe import tracing
from oncely.runtime import ProcessorThread
from support import changelog_state, wait_until
from apps import traced

assert tracing.current_traceparent() is None and tracing.child_traceparent() is None
try:
    tracing.setup("x", install=True)
    raise AssertionError("--tracing without OpenTelemetry must fail")
except ConfigError as e:
    assert "oncely[tracing]" in str(e)
bootstrap = sys.argv[1]
proc = ProcessorThread(traced.app).start()
client = oncely.Client(bootstrap, app=traced.app.name)
client.send("a", "a1", "a_start", 5)
client.flush()
wait_until(lambda: changelog_state(bootstrap, traced.app.name).get(("a", b"a1", "result")), 120, 0.5, "the chain")
proc.stop()
assert not [m for m in sys.modules if m.startswith("opentelemetry") and sys.modules[m] is not None]
print("ok")
"""


def test_without_opentelemetry_the_processor_runs_unchanged(kafka: str, tmp_path: Path) -> None:
    app, source = unique_name("untraced"), unique_name("untraced-src")
    create_topic(kafka, source, 1)
    env = {**os.environ, "ONCELY_TEST_APP": app, "ONCELY_TEST_SOURCE": source, "ONCELY_KAFKA_BOOTSTRAP": kafka,
           "ONCELY_STATE_DIR": str(tmp_path / "state")}
    env.pop("ONCELY_TEST_SPANS", None)
    done = subprocess.run([sys.executable, "-c", NO_OTEL, kafka], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_tracing_costs_nothing_when_off() -> None:
    """run_handler with tracing off against the same run with it on (an
    in-memory exporter): off must stay a guard, on is shown for scale."""
    import asyncio

    from oncely.sdk.protocol import HandlerCall
    from oncely.sdk.runner import run_handler

    app = oncely.App("cost", partitions=1)
    svc = app.keyed("k")

    @svc.handler
    async def steps(ctx: oncely.KeyedContext, n: int) -> int:
        for i in range(n):
            ctx.set(f"s{i}", i)
        return n

    def per_call(rounds: int) -> float:
        loop = asyncio.new_event_loop()
        calls = [HandlerCall(random_id(), "k", "steps", b"k", b"5", "JSON", 0, [], None) for _ in range(rounds)]

        async def go() -> float:
            t = time.perf_counter()
            for call in calls:
                await run_handler(app, call)
            return (time.perf_counter() - t) / rounds

        try:
            return loop.run_until_complete(go())
        finally:
            loop.close()

    per_call(2000)
    off = min(per_call(5000) for _ in range(3))
    provider, _ = _local_provider()
    runner.tracer = InvocationTracer(provider.get_tracer("cost"))
    try:
        on = min(per_call(5000) for _ in range(3))
    finally:
        runner.tracer = None
    print(f"run_handler, 5 steps: tracing off {off * 1e6:.1f} us, on {on * 1e6:.1f} us")
    assert off < on

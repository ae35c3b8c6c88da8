"""OpenTelemetry tracing (the optional extra `oncely[tracing]`).

Every invocation has an *invocation span*, parented by the `traceparent` of
its Invoke (the Client's current span, the calling invocation, or a
subscription record's `traceparent` header), and one *attempt span* under it
per run of its handler, with the run's journal steps as events (replayed
ones marked). Invokes made by `ctx.call`/`ctx.send` carry the invocation
span's traceparent, so a chain of calls is one trace.

Why the invocation span's ids come from the invocation id: a process killed
mid-run never exports the spans it had open, yet the Invokes it committed
name their parent. Every attempt and every replay of an invocation starts
its invocation span again with the same span id (and, for a root, the
invocation id as trace id); only the attempt that finishes the invocation
ends it, so it is exported once the invocation completes, fails for good or
runs out of attempts (twice, with the same ids, if the process dies between
that outcome and its commit). The ids are set through the SDK's IdGenerator
extension point on oncely's own Tracer only.

With OpenTelemetry not installed, not imported by the process or no
TracerProvider configured, nothing here runs: `setup` leaves
`oncely.sdk.runner.tracer` None, and the traceparent helpers return None
after one test (OpenTelemetry is not even imported then).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Awaitable

from oncely.errors import ConfigError
from oncely.shuffle.ids import format_id

if TYPE_CHECKING:
    from oncely.sdk.journal import JournalContext
    from oncely.sdk.protocol import HandlerCall, Outcome

log = logging.getLogger("oncely.tracing")

# The OpenTelemetry API, once loaded (`_load`): a process that never imported
# it has no span to continue and no provider, so it is never imported here
# unless tracing is asked for (`setup(install=True)`).
trace: Any = None
otel_context: Any = None
_propagator: Any = None
_CHILDREN: Any = None  # context key: the traceparent of Invokes the running attempt makes


def _load() -> bool:
    """Import the OpenTelemetry API; False when it is not installed."""
    global trace, otel_context, _propagator, _CHILDREN
    if trace is not None:
        return True
    try:
        from opentelemetry import context, trace as api
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return False
    otel_context, _propagator = context, TraceContextTextMapPropagator()
    _CHILDREN = context.create_key("oncely.children-traceparent")
    trace = api
    return True


_EXPORTER_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span (the Client's caller), or None."""
    if "opentelemetry.trace" not in sys.modules or not _load():
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def child_traceparent() -> str | None:
    """The traceparent for an Invoke made by the running attempt (ctx.call,
    ctx.send), or None when it is not traced."""
    if _CHILDREN is None:
        return None
    return otel_context.get_value(_CHILDREN)  # type: ignore[return-value]


def header_traceparent(headers: Any) -> str | None:
    """A source record's `traceparent` header, for its Invoke (at most 128
    bytes: version 00 has 55; a longer one is no trace context to keep)."""
    for name, value in headers:
        if name == "traceparent" and value and len(value) <= 128:
            try:
                return value.decode("ascii") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError:
                return None
    return None


class _InvocationIds:
    """The SDK's IdGenerator, except for the one span being started as an
    invocation span: its ids are derived from the invocation id."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.span_id: int | None = None
        self.trace_id: int | None = None

    def generate_span_id(self) -> int:
        n = self.span_id
        return self.inner.generate_span_id() if n is None else n

    def generate_trace_id(self) -> int:
        n = self.trace_id
        return self.inner.generate_trace_id() if n is None else n

    def is_trace_id_random(self) -> bool:
        return bool(self.trace_id is None and self.inner.is_trace_id_random())


def _span_id(inv_id: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(inv_id, digest_size=8, person=b"oncely-span").digest(), "big") or 1


class InvocationTracer:
    """The spans of invocations, for `oncely.sdk.runner` (its `tracer` hook)."""

    def __init__(self, tracer: Any) -> None:
        if not _load():
            raise ConfigError("tracing needs OpenTelemetry: pip install 'oncely[tracing]'")
        self._tracer = tracer
        self._ids = _InvocationIds(tracer.id_generator)
        tracer.id_generator = self._ids

    def _invocation_span(self, call: HandlerCall, name: str) -> Any:
        parent = _propagator.extract({"traceparent": call.traceparent}) if call.traceparent else otel_context.Context()
        start_ms = call.created_at_ms
        ids = self._ids
        ids.span_id = _span_id(call.invocation_id)
        ids.trace_id = int.from_bytes(call.invocation_id[:16], "big") or 1  # a root: the invocation id
        try:
            return self._tracer.start_span(
                name, context=parent, kind=trace.SpanKind.CONSUMER,
                start_time=start_ms * 1_000_000 if start_ms else None,
                attributes={"oncely.service": call.service, "oncely.handler": call.handler,
                            "oncely.invocation_id": format_id(call.invocation_id)})
        finally:
            ids.span_id = ids.trace_id = None

    async def run(self, call: HandlerCall, ctx: JournalContext, body: Awaitable[Outcome],
                  max_attempts: int) -> Outcome:
        """Await the handler's run `body` inside its attempt span."""
        name = f"{call.service}/{call.handler}"
        invocation = self._invocation_span(call, name)
        in_invocation = trace.set_span_in_context(invocation, otel_context.Context())
        attempt = self._tracer.start_span(f"{name} attempt", context=in_invocation, attributes={
            "oncely.service": call.service, "oncely.handler": call.handler,
            "oncely.invocation_id": format_id(call.invocation_id), "oncely.attempt": call.attempt,
            "oncely.replayed_steps": len(call.journal)})
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, in_invocation)
        ctx.span = attempt
        token = otel_context.attach(otel_context.set_value(
            _CHILDREN, carrier.get("traceparent"), trace.set_span_in_context(attempt, in_invocation)))
        try:
            outcome = await body
        except BaseException:
            # Suspended, rewound or revoked: the invocation goes on elsewhere or later.
            attempt.set_attribute("oncely.outcome", "cancelled")
            attempt.end()
            raise
        finally:
            otel_context.detach(token)
        status = outcome.status
        _end(attempt, status, outcome.error)
        if status in ("completed", "terminal") or (status == "retry" and call.attempt + 1 >= max_attempts):
            _end(invocation, status if status != "retry" else "retries-exhausted", outcome.error)
        return outcome


def _end(span: Any, outcome: str, error: str | None) -> None:
    span.set_attribute("oncely.outcome", outcome)
    if outcome != "completed":
        span.set_status(trace.Status(trace.StatusCode.ERROR, (error or outcome)[:1000]))
    span.end()


def setup(app_name: str, install: bool = False) -> bool:
    """Trace this process's invocations when OpenTelemetry is configured:
    a TracerProvider set before the processor starts (by the app module, or
    `opentelemetry-instrument`) is used as it is; `install` (`oncely run
    --tracing`) sets one up from the standard OTEL_* environment variables.
    Returns whether tracing is on."""
    from oncely.sdk import runner

    runner.tracer = None
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if not install and "opentelemetry.trace" not in sys.modules:
        return False  # nothing in this process uses OpenTelemetry
    if not _load():
        if install:
            raise ConfigError("--tracing needs OpenTelemetry: pip install 'oncely[tracing]'")
        return False
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        if not install:
            return False
        provider = _install_provider(app_name)
    tracer = provider.get_tracer("oncely")
    if not hasattr(tracer, "id_generator"):
        log.warning("tracing is off: the TracerProvider (%s) is not the OpenTelemetry SDK's",
                    type(provider).__name__)
        return False
    runner.tracer = InvocationTracer(tracer)
    log.info("tracing invocations with %s", type(provider).__name__)
    return True


def _install_provider(app_name: str) -> Any:
    """The SDK's TracerProvider with the exporters OTEL_TRACES_EXPORTER names
    (default otlp; OTEL_EXPORTER_OTLP_PROTOCOL picks grpc or http/protobuf);
    the sampler, limits, batching and exporter settings are the SDK's own
    OTEL_* variables; service.name defaults to the app's name."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError("--tracing needs the OpenTelemetry SDK: pip install 'oncely[tracing]'") from None
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": app_name}))
    provider = TracerProvider(resource=resource)
    for name in _exporter_names():
        found = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed "
                              "(pip install 'oncely[tracing]' brings otlp)")
        provider.add_span_processor(BatchSpanProcessor(next(iter(found)).load()()))
    trace.set_tracer_provider(provider)
    return trace.get_tracer_provider()


def _exporter_names() -> list[str]:
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    if "none" in names:
        return []
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc").strip()
    if "otlp" in names and protocol not in _EXPORTER_BY_PROTOCOL:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: oncely exports grpc or http/protobuf")
    return [_EXPORTER_BY_PROTOCOL[protocol] if n == "otlp" else n for n in names]

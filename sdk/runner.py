"""Runs one handler invocation: decode its input, run the handler on a
journal context, and map how it ended to an `Outcome` (completed, terminal,
retry, or paused when the handler diverged from its journal). The executor
that schedules it (an asyncio task in the processor, a request handler in a
remote endpoint) only calls `run_handler`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Coroutine

import orjson

from oncely.errors import NonDeterminismError, TerminalError, UsageError, user_location
from oncely.sdk.journal import context_for
from oncely.sdk.protocol import NOT_DECODED, HandlerCall, Outcome, encode_value
from oncely.shuffle.ids import format_id

_NONE = encode_value(None)

if TYPE_CHECKING:
    from oncely.app import App, Handler
    from oncely.observe.tracing import InvocationTracer
    from oncely.sdk.journal import JournalContext

log = logging.getLogger("oncely.executor")

# Set by oncely.observe.tracing.setup when OpenTelemetry is configured.
tracer: InvocationTracer | None = None


def decode_input(payload: bytes, fmt: str) -> object:
    if fmt == "BYTES":
        return payload
    return orjson.loads(payload)


def describe_error(exc: BaseException) -> str:
    """The error with the user's line (not the oncely line that noticed it)."""
    where = user_location(exc.__traceback__)
    return f"{type(exc).__name__}: {exc}" + (f" (at {where})" if where else "")


def _log_failure(call: HandlerCall, exc: BaseException) -> None:
    """The full traceback once, at WARNING, on the first failure; retries
    only at DEBUG, so a handler failing ten times does not flood the log."""
    level = logging.WARNING if call.attempt == 0 else logging.DEBUG
    log.log(level, "%s %s/%s attempt %d raised", format_id(call.invocation_id), call.service, call.handler,
            call.attempt, exc_info=exc)


def input_of(app: App, call: HandlerCall) -> object:
    """The handler's input decoded from the call's payload (its
    subscription's decoder, or the payload format)."""
    if call.subscription is not None:
        sub = app.subscription(call.subscription)
        if sub is None:
            raise LookupError(f"the invocation came from subscription {call.subscription!r}, "
                              f"which app {app.name!r} no longer has")
        return sub.decoder.decode(call.payload)
    return decode_input(call.payload, call.payload_format)


def run_handler(app: App, call: HandlerCall) -> Coroutine[Any, Any, Outcome]:
    """The coroutine that runs (or resumes by replay) the invocation `call`
    of one of `app`'s handlers. The handler's own failures come back as
    Outcomes; only cancellation propagates. (A plain function: one
    coroutine less per invocation.)"""
    handler = app.lookup(call.service, call.handler)
    if handler is None:
        return _ended(Outcome("terminal", error=f"no handler {call.service}.{call.handler} in app {app.name!r}"))
    ctx = context_for(call, handler.service.keyed)
    if tracer is not None:
        return tracer.run(call, ctx, _run(app, call, handler, ctx), handler.service.retry.max_attempts)
    return _run(app, call, handler, ctx)


async def _ended(outcome: Outcome) -> Outcome:
    return outcome


async def _run(app: App, call: HandlerCall, handler: Handler, ctx: JournalContext) -> Outcome:
    try:
        if handler.takes_input:
            arg = call.input
            if arg is NOT_DECODED:
                try:
                    arg = input_of(app, call)
                except LookupError as e:
                    return Outcome("terminal", error=str(e))
                except Exception as e:
                    return Outcome("terminal", error=f"cannot decode the input: {type(e).__name__}: {e}")
            value = await handler.fn(ctx, arg)
        else:
            value = await handler.fn(ctx)
    except (Exception, NonDeterminismError) as e:  # (cancellation propagates)
        return raised(call, ctx, e)
    return returned(call, ctx, value)


def raised(call: HandlerCall, ctx: JournalContext, e: Exception | NonDeterminismError) -> Outcome:
    """The outcome of a handler that raised `e` (the processor's first-step
    lane maps its handlers' ends with this and `returned` too)."""
    if isinstance(e, NonDeterminismError):
        return Outcome("paused", error=str(e))
    if ctx.diverged is not None:
        return Outcome("paused", error=str(ctx.diverged))
    if isinstance(e, TerminalError):
        if isinstance(e, UsageError):
            _log_failure(call, e)
            return Outcome("terminal", error=describe_error(e))
        return Outcome("terminal", error=e.message)
    _log_failure(call, e)
    return Outcome("retry", error=describe_error(e))


def returned(call: HandlerCall, ctx: JournalContext, value: Any) -> Outcome:
    """The outcome of a handler that returned `value`."""
    if ctx.diverged is not None:
        # The handler caught the error itself; still never continue.
        return Outcome("paused", error=str(ctx.diverged))
    if value is None:
        encoded = _NONE  # most handlers return nothing
    else:
        try:
            encoded = encode_value(value)
        except TypeError as e:
            return Outcome("terminal", error=f"the handler's return value is neither JSON nor bytes: {e}")
        try:
            call.limits.check_message("the handler's return value", len(encoded))
        except TerminalError as e:
            return Outcome("terminal", error=e.message)
    writes, cleared = ctx.state_changes()
    # Positional, in Outcome's field order (status, value, error, state, cleared_all, emits): once per record.
    return Outcome("completed", encoded, None, writes, cleared, ctx.emits)

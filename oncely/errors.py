"""Errors users see."""

from __future__ import annotations

from types import TracebackType


# The errors an operator's cancel and kill leave (processor/controls.py); the
# ingress answers an invocation that ended with one of them 409, as Restate does.
CANCELLED = "cancelled"
KILLED = "killed by an operator"


class OncelyError(Exception):
    """Base of oncely's own errors."""


class ConfigError(OncelyError):
    """The app or its environment is configured wrongly; the message says what to fix."""


class AwakeableError(OncelyError):
    """Resolving or rejecting an awakeable failed: a malformed id, an
    awakeable already completed, or no invocation in flight waiting on it."""


class TerminalError(OncelyError):
    """Raise from a handler (or a `ctx.run` step) to fail the invocation at
    once, without retries. A caller awaiting it gets the same error."""

    def __init__(self, message: str = "terminal error", code: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class RecordTooLarge(TerminalError):
    """A value is larger than the Kafka topic it must be written to accepts
    (its max.message.bytes, or the client's message.max.bytes). Raised where
    the value is made (ctx.set, ctx.run, ctx.emit, ctx.send/call, a handler's
    result), so the handler can catch it; uncaught, the invocation fails at
    once and is dead-lettered: a retry would make the same value."""

    def __init__(self, what: str, size: int, limit: int, topic: str) -> None:
        super().__init__(f"{what} is {size} bytes; topic {topic} accepts at most {limit} bytes per record "
                         "(its max.message.bytes, less the record's key and overhead)")
        self.size = size
        self.limit = limit


class UsageError(TerminalError, TypeError, ValueError):
    """A handler used `ctx` wrongly: a state value that is neither JSON nor
    bytes, state in a stateless service, a malformed target or duration.
    That is a bug in the handler, so retrying cannot help: the invocation
    fails at once, and the report names the handler's line. Also a TypeError
    and a ValueError, so code that caught those before still does."""


def user_location(tb: TracebackType | None) -> str | None:
    """`file:line` of the deepest frame of `tb` outside oncely's own modules
    (the example apps count as user code): where the user's code went wrong,
    rather than where oncely noticed it."""
    found = None
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        internal = (module == "oncely" or module.startswith("oncely.")) and not module.startswith("oncely.examples")
        if not internal:
            found = tb
        tb = tb.tb_next
    return f"{found.tb_frame.f_code.co_filename}:{found.tb_lineno}" if found is not None else None


class NonDeterminismError(BaseException):
    """A replayed handler issued a different operation than its journal holds.

    A BaseException so that a handler's `except Exception` cannot swallow it:
    the invocation is paused, never silently continued.
    """

    def __init__(self, index: int, expected: str, actual: str) -> None:
        super().__init__(
            f"non-determinism at journal index {index}: the journal holds {expected} "
            f"but the handler now issued {actual}"
        )
        self.index = index
        self.expected = expected
        self.actual = actual

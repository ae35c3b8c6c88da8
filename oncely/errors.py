"""Errors users see."""

from __future__ import annotations


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

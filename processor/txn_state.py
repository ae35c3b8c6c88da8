"""What the transactional producer keeps and reports (producer.py): the
open transaction's bookkeeping, a commit on its way, outcomes, counters."""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from confluent_kafka import KafkaError

from oncely.processor.worker import Pending


class Outcome(enum.Enum):
    COMMITTED = "committed"
    REWIND = "rewind"
    REPLACE = "replace"


class GiveUp(Exception):
    """The process cannot get a working producer; exit and be restarted."""


@dataclass
class TxnStats:
    commits: int = 0
    aborts: int = 0
    replacements: int = 0
    abandoned: int = 0
    reports_left: int = 0  # records whose delivery reports commit_transaction served itself (reports.py)
    replaced_for: Counter = field(default_factory=Counter)


@dataclass
class OpenTxn:
    """What the open transaction holds."""

    produced: int = 0
    error: KafkaError | None = None        # a produce() that failed at once
    faults: list[tuple[bytes, str]] = field(default_factory=list)  # (owner, why)
    # Owned records not delivered (yet): seq -> (owner, topic).
    unacked: dict[int, tuple[bytes, str]] = field(default_factory=dict)
    seq: int = 0
    # Records librdkafka's queue had no room for, in order (overflow.py: overflow.Waiting).
    overflow: list[tuple] = field(default_factory=list)


@dataclass
class CommitResult:
    outcome: Outcome
    why: str = ""
    faults: list[tuple[bytes, str]] = field(default_factory=list)  # owners whose records failed
    # Owned records still undelivered when the commit failed (owner, topic):
    # a topic deleted since start shows only as records that never leave.
    undelivered: list[tuple[bytes, str]] = field(default_factory=list)
    # Committed, but the next transaction's records made meanwhile were lost
    # with a producer that could not begin it: the caller rewinds.
    next_lost: bool = False


@dataclass
class Committing:
    """A commit on its way (`TxnProducer.start_commit`)."""

    pending: Pending[None]
    stage: list[str]  # the call it is in, for the error message
    # When opening the next transaction began and ended, if the job did (txn_opener.py).
    opening: list[float] = field(default_factory=list)

    def ready(self) -> bool:
        return self.pending.ready()

    @property
    def opening_seconds(self) -> float:
        """How long the job spent opening the next transaction (not part of this commit)."""
        return self.opening[1] - self.opening[0] if len(self.opening) == 2 else 0.0

"""What the engine's hook calls count, counted once per committed transaction.

The engine calls these methods from one-line hooks (`if self.metrics is not
None: self.metrics.x(...)`), so a process without `--metrics` pays one
attribute test per hook. They run on the event-loop thread (the restore
ones on the restore worker thread, each with its own fields), and cost a few
dict operations: prometheus-client's own metric objects take a lock per
observation and cannot add a batch to a histogram, so the counts live here
and `collector.py` exposes them through prometheus-client at scrape time.

End-to-end latency runs from the source record's timestamp (a subscribed
record) or the Invoke's creation to the commit of the invocation's end.

Outcomes are exactly-once, like the effects they describe: a completed or
failed invocation, a dropped duplicate, a dead letter only count when the
transaction holding them commits. They are staged until `committed`, and a
rewind (an aborted or unknown transaction: its records are replayed)
drops what was staged. Durations (handler attempts, commits, restores) are
observed as they happen.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from typing import Any

# Outcomes of `oncely_invocations_total`: each invocation ends once in
# completed, terminal (TerminalError) or dead-lettered (any other failure);
# retried and paused count attempts.
COMPLETED, TERMINAL, DEAD, RETRIED, PAUSED = "completed", "terminal", "dead-lettered", "retried", "paused"
_FINAL = {COMPLETED, TERMINAL, DEAD}  # outcomes that end an invocation: their end-to-end latency counts

HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RECORD_BUCKETS = (1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000)
RESTORE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)


class Histogram:
    """Bucket counts (`counts[i]`: observations in (bounds[i-1], bounds[i]],
    the last one above every bound) and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus's `le` buckets, `+Inf` last."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


class Metrics:
    """The processor's counters and histograms; see the module docstring."""

    def __init__(self) -> None:
        # Committed counts.
        self.invocations: Counter[tuple[str, str, str]] = Counter()  # (service, handler, outcome)
        self.duplicates = 0
        self.dead_letters: Counter[str] = Counter()  # reason
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.commit_seconds = Histogram(COMMIT_BUCKETS)
        self.txn_records = Histogram(RECORD_BUCKETS)
        self.last_commit = 0.0  # unix time of the last commit
        # Observed as they happen.
        self.handler_seconds: dict[tuple[str, str], Histogram] = {}
        self.restored_records = 0
        self.restore_seconds = Histogram(RESTORE_BUCKETS)
        # Staged until the open transaction commits: (the Invoke, outcome).
        self._staged: list[tuple[dict[str, Any], str]] = []
        self._dead: Counter[str] = Counter()
        self._duplicates = 0
        # The same of the transaction whose commit is on its way (`freeze`).
        self._frozen: tuple[list[tuple[dict[str, Any], str]], Counter[str], int] | None = None

    # -- invocations (partition.py) -----------------------------------------------

    def started(self, inv: Any) -> None:
        """An attempt starts (or resumes by replay)."""
        inv.started = time.monotonic()

    def attempt_ended(self, inv: Any) -> None:
        """An attempt returned an outcome: its handler duration."""
        started = inv.started
        if not started:
            return
        seconds = time.monotonic() - started
        invoke = inv.invoke
        target = (invoke["service"], invoke["handler"])
        h = self.handler_seconds.get(target)
        if h is None:
            h = self.handler_seconds[target] = Histogram(HANDLER_BUCKETS)
        h.counts[bisect_left(h.bounds, seconds)] += 1
        h.sum += seconds

    def outcome(self, inv: Any, outcome: str) -> None:
        """completed, retried or paused (failures go through `failed`)."""
        self._staged.append((inv.invoke, outcome))

    def failed(self, inv: Any, reason: str) -> None:
        """An invocation failed and was dead-lettered with `reason`."""
        self._staged.append((inv.invoke, TERMINAL if reason == "terminal" else DEAD))
        self._dead[reason] += 1

    def duplicate(self) -> None:
        self._duplicates += 1

    # -- commit loop (commit_loop.py) -------------------------------------------------

    def dead_letter(self, reason: str) -> None:
        """A record dead-lettered without an invocation (ingest, an
        undecodable log record)."""
        self._dead[reason] += 1

    def freeze(self) -> None:
        """A commit is on its way: what is staged is its, what follows the next one's."""
        self._frozen = (self._staged, self._dead, self._duplicates)
        self._staged, self._dead, self._duplicates = [], Counter(), 0

    def committed(self, seconds: float, records: int) -> None:
        """A transaction committed: what it held counts now."""
        now = time.time()
        self.last_commit = now
        self.commit_seconds.observe(seconds)
        self.txn_records.observe(records)
        if self._frozen is None:
            self.freeze()
        staged, dead, duplicates = self._frozen  # type: ignore[misc]
        self._frozen = None
        self.dead_letters.update(dead)
        self.duplicates += duplicates
        now_ms = now * 1000
        counts, latency = self.invocations, self.latency
        for invoke, outcome in staged:
            target = (invoke["service"], invoke["handler"])
            counts[(*target, outcome)] += 1
            if outcome in _FINAL:
                h = latency.get(target)
                if h is None:
                    h = latency[target] = Histogram(LATENCY_BUCKETS)
                source = invoke["source"]
                seconds = (now_ms - (source["timestamp_ms"] if source else invoke.get("created_at_ms", now_ms))) / 1000
                h.counts[bisect_left(h.bounds, seconds)] += 1
                h.sum += seconds

    def rewound(self) -> None:
        """A transaction was aborted (or its outcome is unknown): what it
        and the open one held is replayed, so nothing staged counts."""
        self._frozen = None
        self._staged.clear()
        self._dead.clear()
        self._duplicates = 0

    # -- restore (restore.py, on the restore worker thread) ------------------------------

    def restored(self, records: int) -> None:
        self.restored_records += records

    def restore_done(self, seconds: float) -> None:
        self.restore_seconds.observe(seconds)

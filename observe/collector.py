"""The Prometheus collector of a running processor.

It reads, at scrape time and on the processor's event-loop thread (see
server.py), the counters the engine already keeps (`CommitLoop`,
`TxnStats`, subscription stats, `Progress`), the live partitions (phases in
flight, timers, stores), the hook counts of `Metrics`, and the last answer of
the `LagWatcher`. Nothing here calls Kafka. Names of the lag families are
kafka_exporter's, so dashboards made for it work unchanged.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from oncely import __version__
from oncely.observe.lag import LagWatcher
from oncely.observe.metrics import Histogram, Metrics
from oncely.processor import keys

if TYPE_CHECKING:
    from oncely.processor.commit_loop import CommitLoop

PHASES = ("running", "waiting", "inboxed", "backing_off", "paused", "suspended")
# Exported at 0 before they first happen, so queries and alerts see them.
REPLACE_CAUSES = ("stuck", "fatal", "unknown-outcome", "abort-failed", "begin-failed", "offsets-blocked")
DEAD_REASONS = ("terminal", "retries-exhausted", "unknown-handler", "missing-key", "unproducible", "internal-error",
                "undecodable-log-record", "unsupported-log-record", "undecodable", "key-error", "idempotency-error",
                "too-large")
TIMER_COUNT_CAP = 10_000    # durable timers counted per partition at most (the scan runs on the loop)
TIMER_COUNT_EVERY = 10.0    # seconds a partition's durable timer count is reused


def _histograms(name: str, doc: str, labels: list[str],
                series: dict[tuple[str, ...], Histogram]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=labels)
    for values, h in sorted(series.items()):
        fam.add_metric(list(values), h.cumulative(), h.sum)
    return fam


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class ProcessorCollector:
    """`collect()` yields every metric of one processor process."""

    def __init__(self, loop: "CommitLoop", metrics: Metrics, lag: LagWatcher | None = None) -> None:
        self.loop = loop
        self.metrics = metrics
        self.lag = lag
        self._timer_counts: dict[int, tuple[float, int]] = {}  # partition -> (when counted, count)

    def collect(self) -> Iterator[Metric]:
        cl, m = self.loop, self.metrics
        app = cl.app.name
        info = GaugeMetricFamily("oncely_info", "The app this process runs and the oncely version.",
                                 labels=["app", "version"])
        info.add_metric([app, __version__], 1)
        yield info
        yield from self._lag()
        yield from self._invocations()
        yield from self._transactions()
        yield from self._partitions()
        subs = CounterMetricFamily("oncely_subscription_records", "Source records read by each subscription, "
                                   "by what they became: invoked or dead (a rewind reads them again); local: "
                                   "invoked and started on this process without the log.",
                                   labels=["subscription", "outcome"])
        for sub in cl.app.subscriptions:
            for outcome in ("read", "invoked", "local", "dead"):
                subs.add_metric([sub.name, outcome], sub.stats.get(outcome, 0))
        yield subs
        yield _gauge("oncely_last_commit_timestamp_seconds", "Unix time of this process's last commit "
                     "(0 before the first).", m.last_commit)

    def _lag(self) -> Iterator[Metric]:
        snap = self.lag.snapshot if self.lag is not None else None
        lag = GaugeMetricFamily("kafka_consumergroup_lag", "Records the group has not processed: the last "
                                "stable offset minus the committed offset (transaction markers not counted).",
                                labels=["consumergroup", "topic", "partition"])
        lag_sum = GaugeMetricFamily("kafka_consumergroup_lag_sum", "kafka_consumergroup_lag summed per topic.",
                                    labels=["consumergroup", "topic"])
        current = GaugeMetricFamily("kafka_consumergroup_current_offset", "The group's committed offset.",
                                    labels=["consumergroup", "topic", "partition"])
        end = GaugeMetricFamily("kafka_topic_partition_current_offset", "The last stable offset (read_committed).",
                                labels=["topic", "partition"])
        if snap is not None:
            for p in snap.partitions:
                part = str(p.partition)
                lag.add_metric([snap.group, p.topic, part], p.lag)
                end.add_metric([p.topic, part], p.end)
                if p.committed is not None:
                    current.add_metric([snap.group, p.topic, part], p.committed)
            for topic, total in sorted(snap.by_topic().items()):
                lag_sum.add_metric([snap.group, topic], total)
        yield from (lag, lag_sum, current, end)
        yield _gauge("oncely_consumer_lag_updated_timestamp_seconds", "Unix time the lag was last read from "
                     "Kafka (0 before the first time).", snap.at if snap is not None else 0.0)

    def _invocations(self) -> Iterator[Metric]:
        m = self.metrics
        inv = CounterMetricFamily("oncely_invocations", "Invocation outcomes, counted when committed: completed, "
                                  "terminal, dead-lettered (each invocation once), retried and paused (attempts).",
                                  labels=["service", "handler", "outcome"])
        for (svc, handler, outcome), n in sorted(m.invocations.items()):
            inv.add_metric([svc, handler, outcome], n)
        yield inv
        counts = dict.fromkeys(PHASES, 0)
        for part in self.loop.partitions.values():
            counts["suspended"] += part.suspended
            counts["inboxed"] += part.queued
            for i in part.invocations.values():
                phase = i.phase
                if phase == "RUNNING":
                    counts["waiting" if i.awaiting else "running"] += 1
                else:
                    counts[phase.lower()] = counts.get(phase.lower(), 0) + 1
        flight = GaugeMetricFamily("oncely_invocations_in_flight", "Invocations in flight on this process's "
                                   "partitions, by phase.", labels=["phase"])
        for phase, n in counts.items():
            flight.add_metric([phase], n)
        yield flight
        yield _counter("oncely_duplicates", "Duplicate Invokes dropped (committed).", m.duplicates)
        dead = CounterMetricFamily("oncely_dead_letters", "Dead letters written (committed), by reason.",
                                   labels=["reason"])
        for reason, n in sorted({**dict.fromkeys(DEAD_REASONS, 0), **m.dead_letters}.items()):
            dead.add_metric([reason], n)
        yield dead
        yield _histograms("oncely_handler_duration_seconds", "Duration of a handler attempt, start to outcome "
                          "(waits included).", ["service", "handler"], m.handler_seconds)
        yield _histograms("oncely_end_to_end_latency_seconds", "Source record timestamp (or the Invoke's creation) "
                          "to the commit of the invocation's outcome.", ["service", "handler"], m.latency)

    def _transactions(self) -> Iterator[Metric]:
        cl, m = self.loop, self.metrics
        yield _counter("oncely_commits", "Transactions committed.", cl.commits)
        yield _histograms("oncely_commit_duration_seconds", "Time to commit a transaction (changelog records, "
                          "offsets, commit, RocksDB write; not opening the next one).", [], {(): m.commit_seconds})
        yield _histograms("oncely_transaction_records", "Records produced per committed transaction.", [],
                          {(): m.txn_records})
        yield _counter("oncely_aborts", "Transactions aborted.", cl.aborts)
        replaced = CounterMetricFamily("oncely_producer_replacements", "Transactional producers replaced, by cause.",
                                       labels=["cause"])
        causes = cl.txn.stats.replaced_for if cl.txn is not None else {}
        for cause, n in sorted({**dict.fromkeys(REPLACE_CAUSES, 0), **causes}.items()):
            replaced.add_metric([cause], n)
        yield replaced
        yield _counter("oncely_rewinds", "Rewinds of every partition to the last commit.", cl.rewinds)
        yield _counter("oncely_consumer_restarts", "Consumers replaced after a fatal error.", cl.consumer_restarts)
        yield _counter("oncely_records_committed", "Log and source records read whose commit succeeded.",
                       cl.progress.records)

    def _partitions(self) -> Iterator[Metric]:
        cl, m = self.loop, self.metrics
        assignment = cl.assignment
        log_topic = cl.app.log_topic
        restoring = sum(1 for t, _ in assignment.recovering if t == log_topic) if assignment is not None else 0
        yield _gauge("oncely_partitions_running", "Log partitions this process runs.", len(cl.partitions))
        yield _gauge("oncely_partitions_restoring", "Log partitions being recovered (offset fetch and restore).",
                     restoring)
        yield _counter("oncely_restored_records", "Changelog records applied by restores.", m.restored_records)
        yield _histograms("oncely_restore_duration_seconds", "Duration of a restore (one recovery job).", [],
                          {(): m.restore_seconds})
        size = GaugeMetricFamily("oncely_rocksdb_size_bytes", "RocksDB size of a partition store (SST files and "
                                 "memtables).", labels=["partition"])
        for p, store in sorted((assignment.stores if assignment is not None else {}).items()):
            n = _store_size(store)
            if n is not None:
                size.add_metric([str(p)], n)
        yield size
        timers = GaugeMetricFamily("oncely_timers_pending", "Timers waiting: retry (backing-off invocations, in "
                                   f"memory) and durable (sleeps and delayed sends, committed; at most "
                                   f"{TIMER_COUNT_CAP} counted).", labels=["partition", "kind"])
        now = time.monotonic()
        for p, part in sorted(cl.partitions.items()):
            timers.add_metric([str(p), "retry"], len(part.timers.retries))
            timers.add_metric([str(p), "durable"], self._durable_timers(p, part, now))
        yield timers

    def _durable_timers(self, p: int, part: Any, now: float) -> int:
        seen = self._timer_counts.get(p)
        if seen is not None and now - seen[0] < TIMER_COUNT_EVERY:
            return seen[1]
        n = 0
        try:
            it = part.store.db.iter()
            it.seek(keys.TIMER)
            end = keys.prefix_end(keys.TIMER)
            while it.valid() and n < TIMER_COUNT_CAP and (end is None or it.key() < end):
                n += 1
                it.next()
        except Exception:  # a store closed under a rewind
            return seen[1] if seen is not None else 0
        self._timer_counts[p] = (now, n)
        return n


def _store_size(store: Any) -> int | None:
    try:
        db = store.db
        return sum(db.property_int_value(name) or 0
                   for name in ("rocksdb.total-sst-files-size", "rocksdb.size-all-mem-tables"))
    except Exception:  # closed
        return None

"""The consumer's group membership: the rebalance callbacks, and leaving.

The callbacks run inside whichever consumer call serves them (consume on
the loop thread; poll or close on a worker), so they never block on Kafka
themselves: they commit (on a revocation, while the generation is still
ours), then tell the `Assignment` what changed.

librdkafka's assignment holds only the partitions being read (a recovering
one is not assigned in the consumer: assignment.py), so every callback
unassigns or assigns exactly those itself; confluent-kafka's fallback would
assign everything the group gave.

A stop must not end a consumer that still has a rebalance to serve: with
an assignment waiting, librdkafka's close can hang for good with the GIL
held, and its destroy hangs too (docs/design.md, "Failover"). So:

- a static member that has been assigned first serves what the group sent
  (`settle`, its partitions paused), then is dropped without a close
  (`drop`: no callback, no LeaveGroup, as KIP-345 wants);
- any other member (and a static one still joining) unsubscribes and serves
  its callbacks until the group has taken everything back (`leave`); the
  close that follows has nothing left to revoke.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, TopicPartition

from oncely.processor.worker import Worker

if TYPE_CHECKING:
    from oncely.processor.commit_loop import CommitLoop

log = logging.getLogger("oncely.commit")

TP = tuple[str, int]
# The longest a stop waits for the group to take its partitions back (a
# broker outage must not hold the exit); then the close goes on anyway.
LEAVE_BOUND = 3.0
_LEAVE_POLL = 0.05
# The longest a static member's stop serves what the group sent before the drop.
SETTLE_BOUND = 1.0


class GroupMember:
    """One subscribed consumer's membership: what the group gave it, and
    the callbacks that hand those changes to the commit loop."""

    def __init__(self, loop: "CommitLoop", consumer: Consumer) -> None:
        # (The consumer is not kept here: it holds these callbacks, and a
        # reference back would keep it alive after the loop let go of it.)
        self.loop = loop
        self.owned: set[TP] = set()  # what the group gave and has not taken back
        self.assigned = False  # the group has answered our join at least once
        consumer.subscribe([loop.app.log_topic, *loop.sources], on_assign=self._on_assign,
                           on_revoke=self._on_revoke, on_lost=self._on_lost)

    def _on_assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        loop = self.loop
        given = [(t.topic, t.partition) for t in tps]
        self.owned.update(given)
        self.assigned = True
        if loop.stopping or loop.assignment is None:
            consumer.incremental_assign([])  # leaving: nothing is read any more
            return
        log.info("assigned %s", sorted(given))
        loop.assignment.assign(given)

    def _on_revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        loop = self.loop
        log.info("revoking %s", sorted((t.topic, t.partition) for t in tps))
        if loop.txn is not None and loop.txn.ready and not loop.stopping:
            # Commit everything (the revoked partitions' progress included)
            # while our generation is still valid.
            loop.commit(force=True)
        self._forget(tps)

    def _on_lost(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        loop = self.loop
        log.warning("assignment lost: %s", sorted((t.topic, t.partition) for t in tps))
        if loop.committing is not None:
            loop.end_commit()  # started while the generation was ours: its outcome stands
        self._forget(tps)
        # Nothing of the open transaction may be committed now: our group
        # generation is gone. Abort and rewind what we still own.
        if loop.txn is not None and loop.txn.ready:
            loop.settle(loop.txn.abort("assignment lost"))

    def _forget(self, tps: list[TopicPartition]) -> None:
        loop = self.loop
        gone = [(t.topic, t.partition) for t in tps]
        self.owned.difference_update(gone)
        assert loop.assignment is not None and loop.open is not None
        loop.open.forget(gone)
        loop.pacing.paused_sources.difference_update(gone)
        loop.assignment.revoke(gone)

    def leave(self, consumer: Consumer, worker: Worker, bound: float) -> None:
        """Unsubscribe and serve the callbacks until the group has taken
        back every partition (at most LEAVE_BOUND s, or until a stop
        request): the close that follows then revokes nothing."""
        worker.call(consumer.unsubscribe, bound, "leaving the group")
        deadline = time.monotonic() + LEAVE_BOUND
        while not self.loop.interrupt.is_set():
            # Served until a poll finds nothing: an assignment already on
            # its way is taken (and given back) here, not inside close.
            taken = worker.call(lambda: consumer.consume(500, _LEAVE_POLL), bound, "leaving the group")
            if not taken and not self.owned:
                return
            if time.monotonic() > deadline:
                log.warning("leaving the group: %d partition(s) not taken back within %.0f s; closing anyway",
                            len(self.owned), LEAVE_BOUND)
                return

    def settle(self, consumer: Consumer, worker: Worker, bound: float) -> None:
        """Serve every callback the group has queued (an assignment on its
        way is taken, as nothing, here: not inside the drop), with every
        partition paused so that no record stands in between; at most
        SETTLE_BOUND s."""
        worker.call(lambda: consumer.pause(consumer.assignment()), bound, "pausing before the drop")
        deadline = time.monotonic() + SETTLE_BOUND
        while not self.loop.interrupt.is_set() and time.monotonic() < deadline:
            if not worker.call(lambda: consumer.consume(500, _LEAVE_POLL), bound, "settling before the drop"):
                return


def referenced_elsewhere(held: list[Consumer], known: int = 0) -> bool:
    """Whether anything but `held` (and `known` other references we know
    of) refers to the consumer in it: then it cannot be dropped."""
    return sys.getrefcount(held[0]) > 2 + known  # (the list's and the argument's)


def drop(held: list[Consumer], worker: Worker, bound: float) -> bool:
    """Destroy the consumer in `held` (its only reference) on `worker`
    without a close: confluent-kafka then destroys it with librdkafka's
    NO_CONSUMER_CLOSE, which serves no callback and sends no LeaveGroup.
    False (nothing done) when something else still refers to it."""
    if referenced_elsewhere(held):
        return False
    worker.call(held.clear, bound, "dropping the consumer")
    return True

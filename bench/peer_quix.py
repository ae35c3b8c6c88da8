"""The peer workload in Quix Streams 3.x, run as its own process by
bench_peers.py (with the interpreter that has quixstreams; see
`--quix-python` there). Imports nothing of oncely.

Per-key running total in a stateful `apply` (RocksDB + changelog topic, as
Quix always keeps it), one output per input with `to_topic`, exactly-once,
100 ms commits. Runs until SIGTERM, which Quix handles as a clean stop.

    python bench/peer_quix.py --bootstrap HOST:PORT --source T --out T --group G --state-dir D
"""

from __future__ import annotations

import logging

from quixstreams import Application
from quixstreams.state import State

from peer_args import peer_args


def running_total(order: dict, state: State) -> dict:
    total = state.get("total", 0) + order["amount"]
    state.set("total", total)
    return {**order, "total": total}


def main() -> None:
    args = peer_args(__doc__, state_dir=True)
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        commit_interval=args.commit_interval,
        state_dir=args.state_dir,
        loglevel=logging.WARNING,
    )
    source = app.topic(args.source, value_deserializer="json", key_deserializer="bytes")
    out = app.topic(args.out, value_serializer="json", key_serializer="bytes")
    sdf = app.dataframe(source)
    sdf = sdf.apply(running_total, stateful=True)
    sdf.to_topic(out)
    app.run()


if __name__ == "__main__":
    main()

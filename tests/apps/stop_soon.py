"""Start an app's processor in this process and stop it again soon after,
ROUNDS times (tests/test_group_leave.py): the stop lands while the consumer
joins its group, is assigned, or restores. Every other round the app is not
a static member (its stop leaves the group instead of dropping the
consumer). Prints each stop's duration.

Run as a process of its own: a close that hangs inside librdkafka with the
GIL held stops every thread here, so only the parent can see it.

    python tests/apps/stop_soon.py BOOTSTRAP STATE_DIR ROUNDS MAX_DELAY
"""

import random
import sys
import time
import uuid

import oncely
from oncely.runtime import ProcessorThread


def main() -> None:
    bootstrap, state_dir, rounds, max_delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    rng = random.Random(3)
    for i in range(rounds):
        name = f"stop-soon-{uuid.uuid4().hex[:8]}"
        app = oncely.App(name, partitions=4, bootstrap=bootstrap, state_dir=state_dir)
        app.config.static_membership = i % 2 == 0
        counter = app.keyed("counter")

        @counter.handler
        async def add(ctx: oncely.Context, n: int) -> None:
            ctx.set("n", ctx.get("n", 0) + n)

        proc = ProcessorThread(app).start()
        time.sleep(rng.uniform(0.0, max_delay))
        t0 = time.monotonic()
        proc.stop()
        print(f"round {i} (static member: {app.config.static_membership}): stopped in "
              f"{time.monotonic() - t0:.2f} s", flush=True)


if __name__ == "__main__":
    main()

"""A tiny oncely app for the compose deployment.

Run it with:  cd compose && ONCELY_APP=example_app:app docker compose up -d

The compose file mounts this directory (or $ONCELY_APP_DIR) read-only at /app
and runs `oncely run $ONCELY_APP`, so any module here can be the app.
"""

import oncely

app = oncely.App("compose-counter", partitions=8)

counter = app.keyed("counter")


@counter.handler
async def add(ctx: oncely.Context, amount: int) -> int:
    """Add `amount` to this key's counter and return the new total."""
    n = ctx.get("n", 0) + amount
    ctx.set("n", n)
    return n

"""The HTTP servers leave no cyclic garbage per request.

Garbage that only the cyclic collector frees piles up between collections,
and `oncely run` collects its youngest generation only every 50,000 net
allocations (runtime.tune_gc): under 500 calls/s one such collection freed
30-40k objects and held the ingress (and the processor beside it) for 70-80
ms, which was the p99 of every call in flight. aiohttp makes such a cycle for
every request its router cannot match, so the ingress and the admin API give
it a route that matches everything (gateway/routes.py).

The servers run here in this process (a real aiohttp server on its own
thread, a real broker) because only this process's collector can be asked
what it freed.
"""

from __future__ import annotations

import asyncio
import gc
import urllib.error
import urllib.request
from collections import Counter

from confluent_kafka.admin import AdminClient

import oncely
from oncely.testing import unique_name
from oncely.topics import ensure_topics

REQUESTS = 200


def _cyclic_garbage_of(urls: list[str]) -> Counter[str]:
    """Types of the objects the cyclic collector frees after `urls` are each
    requested REQUESTS times (the client side, urllib, makes no cycles)."""
    gc.collect()
    gc.garbage.clear()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(REQUESTS):
            for url in urls:
                try:
                    urllib.request.urlopen(url, timeout=10).read()
                except urllib.error.HTTPError as e:  # a 4xx is an answer too
                    e.read()
        gc.collect()
        return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                       if type(o).__module__.startswith(("aiohttp", "oncely", "multidict", "yarl")))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_ingress_and_admin_requests_leave_no_cyclic_garbage(kafka: str) -> None:
    from oncely.gateway.admin import AdminServer
    from oncely.gateway.server import GatewayThread

    app = oncely.App(unique_name("garbage"), partitions=2, bootstrap=kafka)
    counter = app.keyed("counter")

    @counter.handler
    async def add(ctx: oncely.Context, n: int) -> int:
        return n

    ensure_topics(AdminClient({"bootstrap.servers": kafka}), app)
    ingress = GatewayThread(app, "127.0.0.1:0")
    server = ingress.start()
    admin = AdminServer(app, "127.0.0.1:0")  # here on the ingress thread's loop (`oncely run` uses its own)
    asyncio.run_coroutine_threadsafe(admin.start(), ingress.loop).result(60)
    try:
        base, admin_base = f"http://127.0.0.1:{server.port}", f"http://127.0.0.1:{admin.port}"
        garbage = _cyclic_garbage_of([
            f"{base}/restate/health",          # a route of ours
            f"{base}/nosuch/handler",          # our 404
            f"{base}/counter/k%2F1/add/x/y",   # a path no route has
            f"{admin_base}/health",
            f"{admin_base}/services",
        ])
    finally:
        asyncio.run_coroutine_threadsafe(admin.stop(), ingress.loop).result(60)
        ingress.stop()
    # A cycle per request would show as REQUESTS of each of its objects.
    assert sum(garbage.values()) < REQUESTS // 2, f"cyclic garbage after {REQUESTS} rounds: {garbage.most_common(8)}"

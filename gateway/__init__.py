"""oncely.gateway: the HTTP ingress (paths follow Restate's).

Call a handler and wait for its result, send one-way (optionally delayed),
attach to an invocation by id or idempotency key, resolve and reject
awakeables, read a key's committed state, all over HTTP; served inside
`oncely run APP --http HOST:PORT` or standalone (`oncely gateway`, no state,
scales out). Answers travel back on `<app>.replies`.

- `routes.py`: the route table (the dispatcher and the OpenAPI document
  both read it);
- `paths.py`: checks of paths, keys, ids, headers and bodies (4xx);
- `handlers.py`: what each route does;
- `kafka.py`: the producer and the replies reader;
- `openapi.py`: the OpenAPI document (apispec, extra `http`);
- `server.py`: the aiohttp server, in a processor or standalone.
"""

from oncely.gateway.server import GatewayServer, run_gateway

__all__ = ["GatewayServer", "run_gateway"]

"""Test helpers for the remote endpoint: run `tests.apps.remote_app` as an
HTTP server in its own process, and talk to it with aiohttp's client."""

from __future__ import annotations

import asyncio
import base64
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from oncely.remote.wire import INVOKE_MEDIA_TYPE, StateSnapshot, invoke_request, item_request
from oncely.sdk.protocol import Entry, decode_value, encode_value

REPO = Path(__file__).resolve().parent.parent.parent


class EndpointProcess:
    """`python -m tests.apps.remote_app` on a free loopback port."""

    def __init__(self, log: Path, env: dict[str, str] | None = None) -> None:
        clean = {k: v for k, v in os.environ.items() if k not in ("ONCELY_VERIFY_KEYS", "ONCELY_SIGNING_SECRET")}
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.apps.remote_app"], cwd=REPO,
                                     env={**clean, **(env or {})}, stdout=subprocess.PIPE, stderr=self._log)
        self.port = self._read_port(30.0)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log

    def _read_port(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline().decode()
                if line.startswith("PORT "):
                    return int(line.split()[1])
                if not line and self.proc.poll() is not None:
                    break
        self.stop()
        raise RuntimeError(f"the endpoint did not start: {self._log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def http(method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    """One request with aiohttp's client: (status, headers, body)."""

    async def go() -> tuple[int, dict[str, str], bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.request(method, url, data=body, headers=headers or {}) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()

    return asyncio.run(go())


def invoke(base: str, items: list[dict[str, Any]], headers: dict[str, str] | None = None,
           partition: int = 3, deadline_ms: int | None = None) -> tuple[int, Any]:
    """POST …/invoke; (status, the decoded JSON answer)."""
    body = invoke_request("remote-test", partition, items, deadline_ms)
    status, _, out = http("POST", f"{base}/invoke", body, {"content-type": INVOKE_MEDIA_TYPE, **(headers or {})})
    return status, orjson.loads(out)


def item(inv_id: bytes, service: str, handler: str, key: bytes | None, payload: Any, journal: list[Entry] | None = None,
         state: dict[str, Any] | None = None, complete: bool = True, names: list[str] | None = None,
         attempt: int = 0) -> dict[str, Any]:
    snapshot = None if state is None else StateSnapshot(complete, {n: encode_value(v) for n, v in state.items()},
                                                        names)
    return item_request(inv_id, service, handler, key, orjson.dumps(payload), "JSON", attempt, journal or [],
                        state=snapshot)


def entries_of(answer: dict[str, Any]) -> list[Entry]:
    """An item's new entries as journal entries (what the processor appends)."""
    return [Entry(e["kind"], e["name"], unb64(e["value"]), e["error"], e["completed"]) for e in answer["entries"]]


def unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def value_of(text: str | None) -> Any:
    raw = unb64(text)
    return None if raw is None else decode_value(raw)

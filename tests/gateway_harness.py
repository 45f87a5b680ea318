"""Running a gateway in-process on a loopback port for tests, with any engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from engine.api import Hypothesis, Word
from streaming.ops.config import Config, LoggingConfig
from streaming.ops.logs import setup_logging
from streaming.server import Gateway


class EchoEngine:
    """Instant fake engine: one word per 300 ms of audio; can fail or sleep."""

    family, device = "echo", "cpu"

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.calls = 0

    def _answer(self, segments):
        import time

        self.calls += 1
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("engine exploded")
        out = []
        for s in segments:
            n = len(s.audio) * 1000 // s.sample_rate // 300
            # Like a text decoder, a partial continues from its prefix: "wK" is the K-th 300 ms
            # of the segment however much of it the window holds.
            first = int(s.prefix[-1].word[1:]) + 1 if s.prefix else 0
            start = s.prefix[-1].end_ms if s.prefix else 0
            fresh = [
                Word(f"w{first + i}", start + i * 300, start + i * 300 + 300, 0.9)
                for i in range(max(0, n - (start + 299) // 300))
            ]
            words = [*s.prefix, *fresh]
            out.append(Hypothesis(" ".join(w.word for w in words), words=words, confidence=0.9))
        return out

    def draft(self, segments):
        return self._answer(segments)

    def transcribe(self, segments):
        return self._answer(segments)


def gateway_config(**server) -> Config:
    base = Config()
    server = {"http_port": 0, **server}  # free ports only: test runs may overlap on one machine
    return dataclasses.replace(
        base, server=dataclasses.replace(base.server, host="127.0.0.1", port=0, **server)
    )


@contextlib.asynccontextmanager
async def running(config: Config, engine, timeout_s: float = 60.0, refine_engine=None):
    """A started gateway with `engine` (and `refine_engine` as its refine model, if given),
    once ready."""
    load_refine = None if refine_engine is None else lambda: refine_engine
    gateway = Gateway(config, lambda: engine, load_refine)
    await gateway.start()
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not gateway.ready:
        if gateway.engine_error or asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"engine did not load: {gateway.engine_error}")
        await asyncio.sleep(0.02)
    try:
        yield gateway
    finally:
        if not gateway.draining:
            await gateway.drain()


async def http_get(port: int, path: str) -> tuple[int, dict, str]:
    def fetch():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read().decode()

    return await asyncio.to_thread(fetch)


async def collect(ws, until: str = "session.closed", timeout_s: float = 60.0) -> list[dict]:
    """Read JSON messages until one of type `until` (inclusive) or the connection closes."""
    messages = []
    async with asyncio.timeout(timeout_s):
        async for raw in ws:
            message = json.loads(raw)
            messages.append(message)
            if message["type"] == until:
                break
    return messages


async def read_all(ws) -> list[dict]:
    """Every JSON message until the server closes the connection."""
    messages = []
    async with asyncio.timeout(30):
        with contextlib.suppress(ConnectionClosed):
            while True:
                messages.append(json.loads(await ws.recv()))
    return messages


async def subscribe(gw, call_id: str, **connect_options):
    """A subscriber to a call's events, returned once the gateway has registered it."""
    ws = await connect(f"ws://127.0.0.1:{gw.port}/v1/calls/{call_id}/events", **connect_options)
    async with asyncio.timeout(10):
        while len(getattr(gw.calls.calls.get(call_id), "subscribers", ())) < 1:
            await asyncio.sleep(0.01)
    return ws


@contextlib.contextmanager
def debug_logs(monkeypatch) -> Iterator[io.StringIO]:
    """The server's text logs at debug level, written to the yielded buffer; the root logger's
    handlers and level are restored afterwards."""
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    setup_logging(LoggingConfig(level="debug", format="text"))
    try:
        yield stderr
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)

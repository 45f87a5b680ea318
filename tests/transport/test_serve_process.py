"""`streamscribe serve` as its own process: start-up, SIGTERM drain, fail-fast model errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

from websockets.asyncio.client import connect

from tests.gateway_harness import collect, http_get
from tests.serverproc import REPO, SERVE
from tests.streams import RATE, chunks, librivox_clips, to_s16le


def start_server(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    """The server process and its "listening" log record (port, event loop, ...)."""
    proc = subprocess.Popen(
        [
            *SERVE,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "0",
            *args,
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        record = json.loads(line)
        if record.get("msg") == "listening":
            return proc, record
    proc.kill()
    raise AssertionError("server did not report its port")


def test_sigterm_drains_open_streams_then_exits():
    speech = librivox_clips()[0][1]
    proc, listening = start_server("--model", "noop")
    port = listening["port"]
    try:

        async def main():
            for _ in range(100):
                if (await http_get(port, "/readyz"))[0] == 200:
                    break
                await asyncio.sleep(0.05)
            async with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
                await ws.recv()
                for chunk in chunks(to_s16le(speech[: RATE * 3]), 3200):  # mid-utterance
                    await ws.send(chunk)
                await asyncio.sleep(0.2)
                proc.send_signal(signal.SIGTERM)
                messages = await collect(ws, timeout_s=30)
                await ws.wait_closed()
                return messages, ws.close_code

        messages, code = asyncio.run(main())
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.stderr.close()
    kinds = [m["type"] for m in messages]
    assert "transcript.final" in kinds and kinds[-1] == "session.closed"
    assert messages[-1]["reason"] == "shutdown" and code == 1001


def test_serves_on_uvloop_unless_asyncio_is_configured():
    asked_for_asyncio = {"STREAMSCRIBE_SERVER__EVENT_LOOP": "asyncio"}
    for env, expected in (({}, "uvloop"), (asked_for_asyncio, "asyncio")):
        proc, listening = start_server("--model", "noop", env=env)
        try:
            assert listening["event_loop"] == expected
            assert asyncio.run(http_get(listening["port"], "/healthz"))[0] == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            proc.kill()
            proc.stderr.close()


def serve_until_exit(*args: str) -> subprocess.CompletedProcess:
    """`streamscribe serve` expected to stop on its own (a start-up error)."""
    return subprocess.run(
        [sys.executable, "-m", "streaming", "serve", "--http-port", "0", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_model_that_cannot_load_stops_the_server(tmp_path):
    proc = serve_until_exit("--port", "0", "--model", str(tmp_path))
    assert proc.returncode == 2
    assert "cannot tell the model family" in proc.stderr and "Traceback" not in proc.stderr


def test_port_in_use_is_one_clear_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve_until_exit("--host", "127.0.0.1", "--port", str(port), "--model", "noop")
    assert proc.returncode == 2
    assert "cannot listen" in proc.stderr and "Traceback" not in proc.stderr

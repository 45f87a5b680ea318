"""`server.workers`: the real `streamscribe serve --workers 2` on loopback: one server on
shared ports, one session cap, one /metrics, workers and engine process started again when
they die, and SIGTERM draining every worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.gateway_harness import http_get, read_all

REPO = Path(__file__).resolve().parents[2]
COMMAND = str(Path(sys.executable).with_name("streamscribe"))


class Server:
    """`streamscribe serve --model noop --workers 2` with its port and its children's pids."""

    def __init__(self, config: Path) -> None:
        argv = ["--log-level", "info", "--config", str(config), "serve", "--model", "noop"]
        argv += ["--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--workers", "2"]
        self.proc = subprocess.Popen(
            [COMMAND, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.entries: list[dict] = []  # the JSON log lines, read by a thread as they come
        threading.Thread(target=self._read_logs, daemon=True).start()
        lines: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line or line.startswith("Ctrl-C stops"):
                break
            lines.append(line)
        self.lines = lines
        readyz = next(line for line in lines if "/readyz" in line)
        self.port = int(readyz.split("127.0.0.1:")[1].split("/")[0])

    def _read_logs(self) -> None:
        for line in self.proc.stderr:
            if line.startswith("{"):
                self.entries.append(json.loads(line))

    def logs(self, message: str) -> list[dict]:
        return [entry for entry in list(self.entries) if entry.get("msg") == message]

    def alive(self, message: str) -> list[int]:
        """Pids of the children that logged `message` when they started and are still there."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        running = {int(pid) for pid in children.split()}
        return [entry["pid"] for entry in self.logs(message) if entry["pid"] in running]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # its children follow it (they die with their parent)
                self.proc.wait()


@pytest.fixture
def server(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  max_sessions: 4\n  drain_grace_s: 10\n")
    running = Server(config)
    yield running
    running.close()


async def open_stream(port: int):
    ws = await connect(f"ws://127.0.0.1:{port}/v1/stream")
    assert json.loads(await ws.recv())["type"] == "session.started"
    return ws


async def open_when_ready(port: int):
    """A stream once the worker the kernel picks has its engine back (each worker reconnects
    on its own after an engine restart)."""
    for _ in range(50):
        try:
            return await open_stream(port)
        except InvalidStatus:
            await asyncio.sleep(0.2)
    return await open_stream(port)


async def until(check, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


def test_two_workers_one_cap_one_metrics_restarts_and_drain(server):
    port = server.port
    assert "  workers   2 gateway processes" in "".join(server.lines)
    assert len(server.alive("worker started")) == 2
    assert len(server.alive("engine process started")) == 1

    async def main():
        streams = [await open_stream(port) for _ in range(4)]  # the cap is the server's
        with pytest.raises(InvalidStatus) as full:
            await open_stream(port)
        metrics = (await http_get(port, "/metrics"))[2]
        for ws in streams[2:]:
            await ws.close()

        # A worker killed: only its streams go; it is started again.
        victim = server.alive("worker started")[0]
        os.kill(victim, signal.SIGKILL)

        async def two_workers_again():
            return len(server.alive("worker started")) == 2 and victim not in server.alive(
                "worker started"
            )

        await until(two_workers_again)

        # The engine process killed: not ready while it is down, then ready again.
        engine = server.alive("engine process started")[0]
        os.kill(engine, signal.SIGKILL)
        await until(lambda: _ready(port, 503), 10)
        await until(lambda: _ready(port, 200))

        # SIGTERM: every open stream gets its session.closed and 1001; the process exits 0.
        open_now = [await open_when_ready(port) for _ in range(2)]
        server.proc.send_signal(signal.SIGTERM)
        ended = [await read_all(ws) for ws in open_now]
        codes = [ws.close_code for ws in open_now]
        return full.value.response.status_code, metrics, ended, codes

    status, metrics, ended, codes = asyncio.run(main())
    assert status == 503
    assert "streamscribe_sessions_active 4.0" in metrics  # both workers' streams, summed
    assert 'streamscribe_sessions_total{dialect="native"} 4.0' in metrics
    assert all(messages[-1]["type"] == "session.closed" for messages in ended)
    assert codes == [1001, 1001]
    assert server.proc.wait(timeout=30) == 0


def test_children_do_not_outlive_a_killed_supervisor(server):
    children = server.alive("worker started") + server.alive("engine process started")
    server.proc.kill()  # no chance to stop them
    server.proc.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


async def _ready(port: int, status: int) -> bool:
    return (await http_get(port, "/readyz"))[0] == status


def test_a_resume_reaches_the_worker_that_holds_the_stream(server):
    """The kernel hands a reconnecting client to either worker; the one that does not hold the
    stream forwards the connection to the one that does, so every resume succeeds."""

    async def main():
        port = server.port
        ws = await connect(f"ws://127.0.0.1:{port}/v1/stream")
        started = json.loads(await ws.recv())
        token, last_seq, outcomes = started["resume_token"], started["seq"], []
        for _ in range(8):  # 8 reconnects: with 2 workers, about half land on the other one
            ws.transport.abort()
            await asyncio.sleep(0.1)
            ws = await connect(
                f"ws://127.0.0.1:{port}/v1/stream?resume={token}&last_seq={last_seq}"
            )
            resumed = json.loads(await ws.recv())
            outcomes.append(resumed["type"])
            last_seq = resumed["seq"]
        await ws.send(json.dumps({"type": "close"}))
        closed = (await read_all(ws))[-1]
        return token, outcomes, closed, ws.close_code

    token, outcomes, closed, code = asyncio.run(main())
    assert token.startswith(("w0.", "w1."))
    assert outcomes == ["session.resumed"] * 8
    assert closed["type"] == "session.closed" and code == 1000


def test_key_limits_and_tokens_hold_across_workers(tmp_path):
    """A key's stream limit counts the streams of every worker, and a token minted by one
    worker is good on the other (one token secret for the whole server)."""
    import urllib.request

    config = tmp_path / "config.yaml"
    config.write_text('server:\n  api_keys: "k1"\n  key_limits: "k1:3:0"\n')
    running = Server(config)
    try:
        rest = int(
            next(x for x in running.lines if "REST" in x).split("127.0.0.1:")[1].split("/")[0]
        )

        def mint() -> str:
            request = urllib.request.Request(
                f"http://127.0.0.1:{rest}/v1/auth/token",
                data=b"{}",
                headers={"Authorization": "Bearer k1", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())["token"]

        async def main():
            url = f"ws://127.0.0.1:{running.port}/v1/stream"
            tokens = [await asyncio.to_thread(mint) for _ in range(6)]  # minted on either worker
            accepted = 0
            for token in tokens:  # each used on either worker
                async with connect(f"{url}?token={token}") as ws:
                    accepted += json.loads(await ws.recv())["type"] == "session.started"
            headers = {"Authorization": "Bearer k1"}
            held = [await connect(url, additional_headers=headers) for _ in range(3)]
            refused = []
            for _ in range(4):  # whichever worker the kernel picks refuses a fourth
                with pytest.raises(InvalidStatus) as info:
                    await connect(url, additional_headers=headers)
                refused.append(info.value.response.status_code)
            for ws in held:
                await ws.close()
            return accepted, refused

        accepted, refused = asyncio.run(main())
    finally:
        running.close()
    assert accepted == 6
    assert refused == [429] * 4

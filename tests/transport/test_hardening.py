"""The gateway over loopback against hostile or careless clients: API keys on every endpoint,
keys kept out of the logs, the AudioSocket address, the session cap for call subscribers,
clients that never read, and a drain bounded by its grace period."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import socket
import time

import aiohttp
import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode

from tests.gateway_harness import (
    EchoEngine,
    debug_logs,
    gateway_config,
    http_get,
    running,
    subscribe,
)
from tests.streams import RATE, joined, librivox_clips, to_s16le


@pytest.fixture(scope="module")
def speech() -> bytes:
    return to_s16le(joined([audio for _, audio, _ in librivox_clips()[:2]], silence_s=0.6))


# Many partials (long segments, one every 100 ms of audio), so that the server sends a lot.
CHATTY = "/v1/stream?partial_interval_ms=100&hangover_ms=5000&max_segment_ms=60000"


class RawClient:
    """A WebSocket client that sends and never reads, not even a close frame (a small receive
    buffer, so that the server's sends soon block)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, port: int, path: str = "/v1/stream") -> RawClient:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        await loop.sock_sendall(
            sock,
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode(),
        )
        head = b""
        while b"\r\n\r\n" not in head:  # the handshake's answer, then nothing more is read
            head += await loop.sock_recv(sock, 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(sock)

    async def stream(self, audio: bytes, frame: int = 3200) -> None:
        """Send audio frames as fast as the server takes them, round and round."""
        try:
            while True:
                for at in range(0, len(audio), frame):
                    data = Frame(Opcode.BINARY, audio[at : at + frame]).serialize(
                        mask=True, extensions=[]
                    )
                    await self.loop.sock_sendall(self.sock, data)
        except OSError:
            return

    def shrink_server_buffers(self, server) -> None:
        """Small send buffers on the server's side of this connection, so that a client that
        never reads blocks the server's sends in seconds, not after megabytes."""
        port = self.sock.getsockname()[1]
        peers = {c.transport.get_extra_info("peername")[1]: c for c in server.connections}
        ws = peers[port]
        ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ws.transport.set_write_buffer_limits(high=1024)

    def close(self) -> None:
        self.sock.close()


def test_metrics_need_the_key_when_keys_are_set_health_and_ready_do_not():
    async def main():
        async with running(gateway_config(api_keys="k1"), EchoEngine()) as gw:
            bare = await http_get(gw.port, "/metrics")
            keyed = await http_get(gw.port, "/metrics?api_key=k1")
            health = await http_get(gw.port, "/healthz")
            ready = await http_get(gw.port, "/readyz")
        return bare[0], keyed[0], health[0], ready[0]

    assert asyncio.run(main()) == (401, 200, 200, 200)


def test_bad_keys_are_throttled_with_429_and_retry_after():
    async def main():
        async with running(gateway_config(api_keys="k1"), EchoEngine()) as gw:
            codes = [(await http_get(gw.port, "/metrics?api_key=guess"))[0] for _ in range(10)]
            blocked = await http_get(gw.port, "/metrics?api_key=k1")
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"ws://127.0.0.1:{gw.port}/v1/stream?api_key=k1"):
                    pass
        return codes, blocked, refused.value.response

    codes, blocked, refused = asyncio.run(main())
    assert codes == [401] * 10
    assert blocked[0] == 429 and int(blocked[1]["Retry-After"]) > 0
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0


def test_rest_port_takes_the_key_as_the_main_port_does():
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(RATE, dtype=np.float32), RATE, format="WAV")

    async def post(port: int, query: str) -> int:
        form = aiohttp.FormData()
        form.add_field("file", buffer.getvalue(), filename="a.wav")
        form.add_field("model", "x")
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/v1/audio/transcriptions{query}"
            async with session.post(url, data=form) as response:
                return response.status

    async def main():
        async with running(gateway_config(api_keys="k1"), EchoEngine()) as gw:
            return await post(gw.rest.port, "?api_key=k1"), await post(gw.rest.port, "?api_key=no")

    assert asyncio.run(main()) == (200, 401)


def test_keys_never_reach_the_debug_logs(monkeypatch):
    async def main():
        async with running(gateway_config(api_keys="s3cret-key"), EchoEngine()) as gw:
            base = f"ws://127.0.0.1:{gw.port}/v1/stream"
            async with connect(f"{base}?api_key=s3cret-key") as ws:
                await ws.recv()
            headers = {"Authorization": "Bearer s3cret-key"}
            async with connect(base, additional_headers=headers) as ws:
                await ws.recv()
            async with connect(base, subprotocols=["token", "s3cret-key"]) as ws:
                await ws.recv()
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{gw.rest.port}/v1/audio/transcriptions?api_key=s3cret-key"
                async with session.post(url, data=b"x", headers=headers) as response:
                    await response.read()

    with debug_logs(monkeypatch) as stderr:
        asyncio.run(main())
    logged = stderr.getvalue()
    assert "GET /v1/stream" in logged  # the request lines were logged ...
    assert "s3cret-key" not in logged  # ... without the key


def test_audiosocket_listens_on_loopback_whatever_server_host_is():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = gateway_config(audiosocket_port=port)
    config = dataclasses.replace(base, server=dataclasses.replace(base.server, host="0.0.0.0"))

    async def main():
        async with running(config, EchoEngine()) as gw:
            return [s.getsockname()[0] for s in gw.audiosocket.sockets]

    assert asyncio.run(main()) == ["127.0.0.1"]


def test_call_subscribers_count_against_the_session_cap():
    async def main():
        async with running(gateway_config(max_sessions=2), EchoEngine()) as gw:
            first = await subscribe(gw, "call-a")
            second = await subscribe(gw, "call-b")
            base = f"ws://127.0.0.1:{gw.port}"
            refused = []
            for path in ("/v1/calls/call-c/events", "/v1/stream"):
                with pytest.raises(InvalidStatus) as err:
                    async with connect(base + path):
                        pass
                refused.append(err.value.response)
            ready = await http_get(gw.port, "/readyz")
            await first.close()
            await second.close()
            return [(r.status_code, r.headers.get("Retry-After")) for r in refused], ready[0]

    refused, ready = asyncio.run(main())
    assert [status for status, _ in refused] == [503, 503] and all(r for _, r in refused)
    assert ready == 503


def test_clients_that_never_read_free_their_slots(speech):
    """Clients cut for not reading must give their session back: with max_sessions 3, three
    of them must not lock everyone else out (a cut stream is kept for a resume, so each slot
    comes back once its resume window has passed)."""

    async def main():
        config = gateway_config(max_sessions=3, idle_timeout_s=0.5, resume_window_s=1)
        async with running(config, EchoEngine(delay_s=0.3)) as gw:
            clients = [await RawClient.open(gw.port, CHATTY) for _ in range(3)]
            for client in clients:
                client.shrink_server_buffers(gw.server)
            senders = [asyncio.create_task(c.stream(speech)) for c in clients]
            async with asyncio.timeout(30):
                while gw.metrics.errors.labels("slow_client")._value.get() < 3:
                    await asyncio.sleep(0.05)
            started = time.monotonic()
            async with asyncio.timeout(5):
                while gw.connections:
                    await asyncio.sleep(0.05)
            ready = await http_get(gw.port, "/readyz")
            async with connect(f"ws://127.0.0.1:{gw.port}/v1/stream") as ws:
                first = json.loads(await ws.recv())["type"]
            for client, sender in zip(clients, senders, strict=True):
                sender.cancel()
                client.close()
            return time.monotonic() - started, ready[0], first

    freed_s, ready, first = asyncio.run(main())
    assert freed_s < 4 and ready == 200 and first == "session.started"


def test_drain_ends_within_the_grace_period_with_clients_still_streaming(speech):
    async def main():
        config = gateway_config(drain_grace_s=1.0)
        async with running(config, EchoEngine(delay_s=0.5)) as gw:
            client = await RawClient.open(gw.port)
            sender = asyncio.create_task(client.stream(speech))
            await asyncio.sleep(1.0)
            started = time.monotonic()
            await gw.drain()
            took = time.monotonic() - started
            sender.cancel()
            client.close()
            return took

    assert asyncio.run(main()) <= 1.5


class LostLink:
    """A link that yields audio frames and then is lost (`abort`): sends succeed until then."""

    def __init__(self, audio: bytes) -> None:
        self.transport = self
        self.frames = [audio[at : at + 3200] for at in range(0, len(audio), 3200)]
        self.cut = asyncio.Event()

    async def recv(self):
        if self.cut.is_set():
            raise ConnectionClosed(None, None)
        if self.frames:
            return self.frames.pop(0)
        await self.cut.wait()
        raise ConnectionClosed(None, None)

    def wake(self) -> None:
        pass

    async def send(self, frame) -> None:
        if self.cut.is_set():
            raise ConnectionClosed(None, None)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.cut.set()

    async def wait_closed(self) -> None:
        await self.cut.wait()

    def abort(self) -> None:
        self.cut.set()


@pytest.mark.parametrize("window_s", [0, 30])
def test_a_stream_held_back_ends_when_its_link_is_lost(speech, window_s):
    """Held back for finals that the engine has not answered, a stream whose link goes must
    let go of it at once, not wait for results nobody will deliver: it ends (its slot freed),
    or, with a resume window, detaches to wait for a client to resume it."""
    from engine.scheduler import Scheduler
    from streaming.dialects.native import NativeDialect
    from streaming.ops.metrics import Metrics
    from streaming.transport.websocket import Connection

    async def main():
        link = LostLink(speech)
        config = gateway_config(max_pending_finals=1, resume_window_s=window_s)
        scheduler = Scheduler(EchoEngine())  # never started: finals stay pending
        conn = Connection(link, NativeDialect(), {}, config, scheduler, Metrics())
        running_ = asyncio.create_task(conn.run())
        async with asyncio.timeout(10):
            while not conn.protocol.paused:
                await asyncio.sleep(0.01)
        link.abort()
        await asyncio.wait_for(running_, 2)
        state = conn.finished.is_set(), conn.detached
        if conn.lingering is not None:
            conn.lingering.cancel()
        return state

    assert asyncio.run(main()) == ((True, False) if window_s == 0 else (False, True))


# --- found by the fuzzer (tests/transport/test_fuzz.py) ----------------------------------------


async def raw_exchange(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Send `data` on a fresh TCP connection and read everything until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(timeout_s):
            return await reader.read(-1)
    finally:
        writer.close()


def test_invalid_utf8_text_closes_1007_and_pipelined_requests_get_one_answer():
    from tests.wsraw import TEXT, frame, upgrade_request

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            bad_text = upgrade_request("/v1/stream") + frame(TEXT, b'{"type": "\xff"}')
            ws_reply = await raw_exchange(gw.port, bad_text)
            get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            http_reply = await raw_exchange(gw.port, get * 3)
            channel = await http_get(gw.port, "/v1/sessions/abc/captions.vtt?channel=%C2%B2")
            return ws_reply, http_reply, channel

    ws_reply, http_reply, channel = asyncio.run(main())
    assert ws_reply.startswith(b"HTTP/1.1 101")
    close = ws_reply[ws_reply.rindex(b"\x88") :]  # the server's close frame, unmasked
    assert int.from_bytes(close[2:4], "big") == 1007
    assert http_reply.count(b"HTTP/1.1 200") == 1 and http_reply.endswith(b"ok\n")
    assert channel[0] == 400


def test_a_client_that_never_finishes_its_request_is_cut(monkeypatch):
    from streaming.transport import wsserver

    monkeypatch.setattr(wsserver, "OPEN_TIMEOUT_S", 0.3)

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            loop = asyncio.get_running_loop()
            started = loop.time()
            reply = await raw_exchange(gw.port, b"GET /heal", timeout_s=5)
            return reply, loop.time() - started

    reply, took = asyncio.run(main())
    assert reply == b"" and took < 2

"""deploy/nginx/streamscribe.conf with Debian's real nginx, on loopback, in front of two real
`streamscribe serve --model noop` processes: TLS termination, streams on every WebSocket route,
REST uploads and tokens behind the same host and port, least_conn over both instances, and a
SIGTERM to one instance while streams are open through nginx (its streams get their finals,
`session.closed` and 1001; new streams go to the other instance).

Both instances run as a deployment behind nginx must: the same API key and the same
`server.token_secret`, so a token minted by one instance opens streams on the other."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets

from streaming.server import ROUTES
from tests.deploy import nginxrun

pytestmark = [
    pytest.mark.skipif(nginxrun.NGINX is None, reason="nginx is not installed (Debian: nginx)"),
    pytest.mark.skipif(not nginxrun.shutil.which("openssl"), reason="no openssl command"),
]

COMMAND = str(Path(sys.executable).with_name("streamscribe"))
KEY = "deploy-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
RATE = 16000
FRAME = 3200  # 100 ms of 16 kHz 16-bit mono
DRAIN_GRACE_S = 4  # server.drain_grace_s of the instances: how long a stuck drain lasts


# --- audio ----------------------------------------------------------------------------------------


def voiced(seconds: float, f0: float = 130.0) -> np.ndarray:
    """A vowel-like sound (harmonics of f0, vibrato, syllable-rate envelope) that the voice
    detector takes for speech; the noop model gives placeholder words for it."""
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * f0 * t * (1 + 0.02 * np.sin(2 * np.pi * 3 * t))
    harmonics = [(1, 1.0), (2, 0.6), (3, 0.5), (4, 0.3), (5, 0.25), (6, 0.2), (8, 0.1)]
    sound = sum(amp * np.sin(k * phase) for k, amp in harmonics)
    sound *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.2 * sound / np.abs(sound).max()).astype(np.float32)


def pcm(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


SILENCE = bytes(FRAME * 3)
SPEECH = pcm(voiced(1.5))
TRAILING = bytes(FRAME * 10)  # 1 s of silence: past the hangover, the segment ends


def wav_bytes() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.concatenate([np.zeros(4800, np.float32), voiced(1.5)]), RATE, format="WAV")
    return buffer.getvalue()


# --- the servers and nginx ------------------------------------------------------------------------


@dataclass
class Instance:
    proc: subprocess.Popen
    port: int
    rest_port: int
    stderr: Path

    def metric(self, series: str) -> float:
        """One series of the instance's own /metrics (0 when it has none yet)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/metrics", headers=AUTH)
        with urllib.request.urlopen(request, timeout=5) as response:
            text = response.read().decode()
        found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def sessions_active(self) -> int:
        return int(self.metric("streamscribe_sessions_active"))

    def ready(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def launch(
    folder: Path, name: str, settings: dict[str, str] | None = None
) -> tuple[subprocess.Popen, Path]:
    """`streamscribe serve --model noop` on free loopback ports; `settings` adds environment
    overrides (STREAMSCRIBE_SERVER__REDIS_URL, ...) to the ones every instance here has."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSCRIBE_")}
    env = {
        **clean,
        "STREAMSCRIBE_SERVER__API_KEYS": KEY,
        "STREAMSCRIBE_SERVER__TOKEN_SECRET": "shared-by-every-instance-behind-nginx",
        "STREAMSCRIBE_SERVER__DRAIN_GRACE_S": str(DRAIN_GRACE_S),
        **(settings or {}),
    }
    stderr = folder / f"{name}.stderr"
    with stderr.open("wb") as sink:
        proc = subprocess.Popen(
            [COMMAND, "serve", "--model", "noop", "--host", "127.0.0.1", "--port", "0",
             "--http-port", "0"],
            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=sink,
        )  # fmt: skip
    return proc, stderr


def ready_summary(proc: subprocess.Popen, stderr: Path, timeout_s: float = 60.0) -> Instance:
    """Reads the ready summary `serve` prints (bounded: select on the pipe, no blocking read)
    and the two ports it names."""
    fd, seen = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout_s
    while b"Ctrl-C stops" not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"no ready summary: {seen!r} {stderr.read_text()[-2000:]}")
        if select.select([fd], [], [], min(left, 0.5))[0]:
            seen += os.read(fd, 65536)
    text = seen.decode()
    port = int(re.search(r"streams\s+ws://127\.0\.0\.1:(\d+)/", text).group(1))
    rest = int(re.search(r"REST\s+http://127\.0\.0\.1:(\d+)/", text).group(1))
    return Instance(proc, port, rest, stderr)


@dataclass
class Stack:
    instances: list[Instance]
    nginx: nginxrun.Nginx
    https_port: int
    http_port: int
    context: ssl.SSLContext

    def wss(self, path: str = "/v1/stream") -> str:
        return f"wss://127.0.0.1:{self.https_port}{path}"

    def https(self, path: str) -> str:
        return f"https://127.0.0.1:{self.https_port}{path}"


@contextlib.contextmanager
def stack(folder: Path, settings: dict[str, str] | None = None):
    """Two instances (with `settings`, see `launch`) and nginx in front of them; everything
    stopped on the way out."""
    launched = [launch(folder, name, settings) for name in ("a", "b")]  # both load at once
    instances: list[Instance] = []
    nginx = None
    try:
        for proc, stderr in launched:
            instances.append(ready_summary(proc, stderr))
        cert, key = nginxrun.self_signed_pair(folder)
        https_port, http_port = nginxrun.free_port(), nginxrun.free_port()
        site = nginxrun.derive(
            cert,
            key,
            https_port,
            http_port,
            {
                "streamscribe_streams": [f"127.0.0.1:{i.port}" for i in instances],
                "streamscribe_rest": [f"127.0.0.1:{i.rest_port}" for i in instances],
            },
        )
        nginx = nginxrun.start(nginxrun.main_conf(folder, site), https_port)
        context = ssl.create_default_context(cafile=str(cert))
        yield Stack(instances, nginx, https_port, http_port, context)
    finally:
        if nginx is not None:
            nginx.stop()
        for proc, _ in launched:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with stack(tmp_path_factory.mktemp("nginx")) as running:
        yield running


# --- stream helpers -------------------------------------------------------------------------------


def connect(live: Stack, path: str = "/v1/stream", **kw):
    kw.setdefault("additional_headers", AUTH)
    return websockets.connect(
        live.wss(path), ssl=live.context, open_timeout=10, close_timeout=5, **kw
    )


async def send(ws, data: bytes) -> None:
    for i in range(0, len(data), FRAME):
        await ws.send(data[i : i + FRAME])


async def first_event(ws, timeout_s: float = 10.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout_s))


async def rest_of_stream(ws, timeout_s: float = 20.0) -> tuple[list[dict], int | None]:
    """Every event until the server closes the connection, and the close code."""
    events: list[dict] = []

    async def read():
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in ws:
                events.append(json.loads(message))

    await asyncio.wait_for(read(), timeout_s)
    return events, ws.close_code


async def deaf_stream(port: int) -> asyncio.StreamWriter:
    """A native stream straight to an instance whose client never reads again after the
    handshake: on SIGTERM the instance waits for its close reply until drain_grace_s, and keeps
    refusing new streams with 503 meanwhile."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return writer


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


async def whole_stream(live: Stack) -> tuple[list[dict], int | None]:
    """A stream that speaks, asks to close, and reads to the end."""
    async with connect(live) as ws:
        started = await first_event(ws)
        await send(ws, SILENCE + SPEECH + TRAILING)
        await ws.send(json.dumps({"type": "close"}))
        events, code = await rest_of_stream(ws)
    return [started, *events], code


def assert_whole(events: list[dict], code: int | None) -> None:
    kinds = types(events)
    assert kinds[0] == "session.started" and kinds[-1] == "session.closed", kinds
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert finals and all(f["text"] for f in finals), kinds
    assert code == 1000


# --- the shipped file as nginx reads it -----------------------------------------------------------


def test_nginx_accepts_the_shipped_configuration(tmp_path):
    """`nginx -t` on deploy/nginx/streamscribe.conf, with the host-specific lines replaced."""
    cert, key = nginxrun.self_signed_pair(tmp_path)
    site = nginxrun.derive(
        cert,
        key,
        nginxrun.free_port(),
        nginxrun.free_port(),
        {
            "streamscribe_streams": ["127.0.0.1:18765", "127.0.0.1:28765"],
            "streamscribe_rest": ["127.0.0.1:18766", "127.0.0.1:28766"],
        },
    )
    checked = nginxrun.check(nginxrun.main_conf(tmp_path, site))
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


# --- through nginx --------------------------------------------------------------------------------


def test_streams_through_nginx_get_their_finals_on_both_instances(live):
    """Four native streams at once over wss:// through nginx: least_conn puts two on each
    instance; each gets session.started, its finals, session.closed and close 1000."""

    async def main():
        opened = [await connect(live) for _ in range(4)]
        try:
            for ws in opened:
                assert (await first_event(ws))["type"] == "session.started"
            spread = [instance.sessions_active() for instance in live.instances]
            assert spread == [2, 2], spread
            for ws in opened:
                await send(ws, SILENCE + SPEECH + TRAILING)
                await ws.send(json.dumps({"type": "close"}))
            return await asyncio.gather(*(rest_of_stream(ws) for ws in opened))
        finally:
            for ws in opened:
                await ws.close()

    for events, code in asyncio.run(main()):
        assert types(events)[-1] == "session.closed" and code == 1000
        assert any(e["type"] == "transcript.final" and e["text"] for e in events)


def test_least_conn_sends_each_new_stream_to_the_less_busy_instance(live):
    """One long stream holds one instance; six short streams one after the other all go to
    the other, idle instance (round robin would alternate)."""
    native = 'streamscribe_sessions_total{dialect="native"}'

    async def main():
        before = [instance.metric(native) for instance in live.instances]
        async with connect(live) as long:
            assert (await first_event(long))["type"] == "session.started"
            busy = [instance.sessions_active() for instance in live.instances]
            assert sorted(busy) == [0, 1], busy
            for _ in range(6):
                events, code = await whole_stream(live)
                assert_whole(events, code)
        after = [instance.metric(native) for instance in live.instances]
        return busy, [a - b for a, b in zip(after, before, strict=True)]

    busy, accepted = asyncio.run(main())
    assert accepted == [1 if n else 6 for n in busy], (busy, accepted)


def test_every_websocket_route_upgrades_through_nginx(live):
    """Each route of the server's route table, and a call-events subscriber, completes its
    WebSocket handshake through nginx (101 from the instance, relayed)."""
    paths = [*ROUTES, "/v1/calls/CA0123456789/events"]

    async def main():
        for path in paths:
            async with connect(live, path) as ws:
                assert ws.response.status_code == 101, path

    asyncio.run(main())


def test_health_page_and_metrics_through_nginx_and_plain_http_redirects(live):
    with httpx.Client(verify=live.context, timeout=10) as client:
        assert client.get(live.https("/healthz")).status_code == 200
        assert client.get(live.https("/readyz")).status_code == 200
        page = client.get(live.https("/"))
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert client.get(live.https("/metrics")).status_code == 401  # the key is needed
        metrics = client.get(live.https("/metrics"), headers=AUTH)
        assert metrics.status_code == 200 and "streamscribe_sessions_active" in metrics.text
        plain = httpx.get(f"http://127.0.0.1:{live.http_port}/v1/stream", timeout=10)
        assert plain.status_code == 301
        assert plain.headers["location"].startswith("https://")


def test_rest_upload_through_nginx(live):
    """POST /v1/audio/transcriptions on the streams' host and port reaches an instance's REST
    port; a body over the limit is refused by nginx with the server's 413 in OpenAI's shape."""
    with httpx.Client(verify=live.context, timeout=30) as client:
        answer = client.post(
            live.https("/v1/audio/transcriptions"),
            headers=AUTH,
            files={"file": ("speech.wav", wav_bytes(), "audio/wav")},
            data={"model": "whisper-1"},
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"]

    async def too_large() -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", live.https_port, ssl=live.context, server_hostname="localhost"
        )
        writer.write(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: multipart/form-data; boundary=XX\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (26214400 + 65536 + 1)
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        writer.close()
        return head + body

    head, _, body = asyncio.run(too_large()).partition(b"\r\n\r\n")
    assert head.split()[1] == b"413"
    assert json.loads(body)["error"]["code"] == "file_too_large"


def test_the_page_mints_a_token_through_nginx_that_both_instances_accept(live):
    """What the browser page does behind nginx: GET /v1/client-config names nginx's own port as
    the REST port, POST /v1/auth/token there mints a token, and streams opened with it (the
    subprotocol `token.<TOKEN>`) are accepted on either instance (shared token_secret)."""
    with httpx.Client(verify=live.context, timeout=10) as client:
        config = client.get(live.https("/v1/client-config")).json()
        assert config["rest_port"] == live.https_port and config["auth"] is True
        minted = client.post(
            f"https://127.0.0.1:{config['rest_port']}/v1/auth/token",
            headers=AUTH,
            json={"scopes": ["stream"]},
        )
    assert minted.status_code == 200, minted.text
    token = minted.json()["token"]

    async def main():
        opened = [
            await connect(live, additional_headers={}, subprotocols=[f"token.{token}"])
            for _ in range(2)
        ]
        try:
            for ws in opened:
                assert (await first_event(ws))["type"] == "session.started"
            return [instance.sessions_active() for instance in live.instances]
        finally:
            for ws in opened:
                await ws.close()

    assert asyncio.run(main()) == [1, 1]


# --- one instance stops ---------------------------------------------------------------------------


def test_sigterm_to_one_instance_drains_its_streams_and_new_streams_go_to_the_other(tmp_path):
    """Four streams through nginx, mid-speech, two on each instance. SIGTERM to instance A: its
    two streams get their final (the open segment is flushed), session.closed and close 1001;
    B's streams go on and end normally. New streams through nginx succeed while A still drains
    (A answers 503: nginx tries B) and once A has exited (refused connections: nginx tries B).
    A client of A's that never reads its close frame holds A's drain open until drain_grace_s,
    as a slow final would."""

    async def main(live: Stack):
        a, b = live.instances
        opened = [await connect(live) for _ in range(4)]
        deaf = None
        try:
            for ws in opened:
                assert (await first_event(ws))["type"] == "session.started"
            assert [a.sessions_active(), b.sessions_active()] == [2, 2]
            deaf = await deaf_stream(a.port)
            for ws in opened:
                await send(ws, SILENCE + SPEECH)  # speech still open: no final yet
            await asyncio.sleep(0.3)
            a.proc.send_signal(signal.SIGTERM)
            reading = {asyncio.ensure_future(rest_of_stream(ws, 30)) for ws in opened}
            done: set[asyncio.Future] = set()
            deadline = asyncio.get_running_loop().time() + 15
            while len(done) < 2 and (left := deadline - asyncio.get_running_loop().time()) > 0:
                finished, reading = await asyncio.wait(
                    reading, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                done |= finished
            assert len(done) == 2, f"{len(done)} streams ended after the SIGTERM"
            await asyncio.sleep(0.2)
            assert not any(task.done() for task in reading), "a stream of B ended too"
            for events, code in (task.result() for task in done):
                assert "transcript.final" in types(events), types(events)
                assert types(events)[-1] == "session.closed" and code == 1001
            # A drains: it refuses new streams with 503, and nginx sends them to B.
            assert a.proc.poll() is None and a.ready() == 503
            for events, code in await asyncio.gather(whole_stream(live), whole_stream(live)):
                assert_whole(events, code)
            assert a.metric('streamscribe_rejections_total{reason="draining"}') >= 1
            assert a.proc.poll() is None, "A's drain ended before the new streams were tried"
            # A has gone: nginx's connection to it is refused, and it tries B.
            assert await asyncio.to_thread(a.proc.wait, DRAIN_GRACE_S + 10) == 0
            for events, code in await asyncio.gather(*(whole_stream(live) for _ in range(3))):
                assert_whole(events, code)
            # B's streams went on all along: they end normally, with their finals.
            for ws in opened:
                if ws.close_code is None:
                    await send(ws, TRAILING)
                    await ws.send(json.dumps({"type": "close"}))
            for events, code in await asyncio.gather(*reading):
                assert "transcript.final" in types(events), types(events)
                assert types(events)[-1] == "session.closed" and code == 1000
        finally:
            if deaf is not None:
                deaf.close()
            for ws in opened:
                await ws.close()

    with stack(tmp_path) as live:
        asyncio.run(main(live))
        assert live.instances[1].proc.poll() is None
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", live.instances[0].port), timeout=1).close()
            pytest.fail("instance A still accepts connections after its drain")

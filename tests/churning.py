"""Connection churn against a server process: thousands of short connections of every kind,
most of them cut off rudely, while the process's memory, file descriptors and threads are
sampled; what a server leaks per connection shows as growth after the warm-up.

Each cycle opens one connection and ends it one of the ways clients do: WebSocket streams of
every dialect aborted (TCP reset) after a little audio, or closed normally, or cut mid-handshake;
REST uploads cut mid-body (and some completed, so the decode threads exist from the warm-up);
AudioSocket calls cut or hung up; call-event subscribers that vanish or close.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

from tests.fuzz_cases import handshake
from tests.fuzz_plain import multipart, packet, wav_bytes
from tests.fuzzing import Ports
from tests.serverproc import ServerProcess, Usage
from tests.wsraw import BINARY, TEXT, Reader, abort, close_frame, frame, read_head

CYCLE_BOUND_S = 10.0  # one cycle never takes longer (a hung one is counted, not waited for)
AUDIO = {
    "native": lambda rng: [frame(BINARY, rng.randbytes(3200))],
    "deepgram": lambda rng: [frame(BINARY, rng.randbytes(3200))],
    "twilio": lambda rng: [
        frame(TEXT, json.dumps({"event": "connected"}).encode()),
        frame(TEXT, json.dumps(_twilio_start(rng)).encode()),
        frame(TEXT, json.dumps(_twilio_media(rng)).encode()),
    ],
    "audiofork": lambda rng: [
        frame(TEXT, json.dumps({"callSid": f"churn-{rng.randint(0, 10**9)}"}).encode()),
        frame(BINARY, rng.randbytes(1600)),
    ],
    "realtime": lambda rng: [
        frame(TEXT, json.dumps(_realtime_append(rng)).encode()),
    ],
}
PATHS = {
    "native": "/v1/stream",
    "deepgram": "/v1/listen",
    "twilio": "/v1/telephony/twilio",
    "audiofork": "/v1/telephony/audiofork",
    "realtime": "/v1/realtime",
}
ENDERS = {
    "native": b'{"type": "close"}',
    "deepgram": b'{"type": "CloseStream"}',
    "twilio": b'{"event": "stop"}',
}


def _twilio_start(rng: random.Random) -> dict:
    call = f"CAchurn{rng.randint(0, 10**9)}"
    return {"event": "start", "start": {"callSid": call, "streamSid": "MZ1"}, "streamSid": "MZ1"}


def _twilio_media(rng: random.Random) -> dict:
    payload = base64.b64encode(rng.randbytes(160)).decode()
    return {"event": "media", "streamSid": "MZ1", "media": {"payload": payload}}


def _realtime_append(rng: random.Random) -> dict:
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(4800)).decode()}


# --- one cycle of each kind -------------------------------------------------------------------


async def _open_ws(port: int, path: str, rng: random.Random):
    """A WebSocket after its 101, or None when the server refused it (the status is raised)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshake(rng, path))
    await writer.drain()
    status, _, _ = await read_head(reader)
    if status != 101:
        abort(writer)
        raise Refused(status)
    return reader, writer


class Refused(Exception):
    """The server answered the handshake or request with this status instead of serving."""

    def __init__(self, status: int | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


async def ws_abort(ports: Ports, rng: random.Random, dialect: str) -> None:
    """Open, send a little, reset the connection."""
    _, writer = await _open_ws(ports.main, PATHS[dialect], rng)
    for data in AUDIO[dialect](rng):
        writer.write(data)
    await writer.drain()
    await asyncio.sleep(rng.random() * 0.05)
    abort(writer)


async def ws_close(ports: Ports, rng: random.Random, dialect: str) -> None:
    """Open, send a little, end politely (the dialect's end message or a close frame), and read
    until the server's close frame."""
    reader, writer = await _open_ws(ports.main, PATHS[dialect], rng)
    try:
        for data in AUDIO[dialect](rng):
            writer.write(data)
        ender = ENDERS.get(dialect)
        writer.write(frame(TEXT, ender) if ender else close_frame(1000))
        await writer.drain()
        frames = Reader(reader)
        while (await frames.next())[0] != 0x8:
            pass
        writer.write(close_frame(1000))
        await writer.drain()
    finally:
        abort(writer)


async def ws_midhandshake(ports: Ports, rng: random.Random, dialect: str) -> None:
    """Send part of the upgrade request and vanish."""
    _, writer = await asyncio.open_connection("127.0.0.1", ports.main)
    request = handshake(rng, PATHS[dialect])
    writer.write(request[: rng.randint(1, len(request) - 1)])
    await writer.drain()
    await asyncio.sleep(rng.random() * 0.02)
    abort(writer)


async def subscriber(ports: Ports, rng: random.Random, polite: bool) -> None:
    """Follow a call's events, then vanish (reset) or close."""
    reader, writer = await _open_ws(ports.main, f"/v1/calls/churn-{rng.randint(0, 99)}/events", rng)
    await asyncio.sleep(rng.random() * 0.05)
    if polite:
        writer.write(close_frame(1000))
        await writer.drain()
        frames = Reader(reader)
        while (await frames.next())[0] != 0x8:
            pass
    abort(writer)


def _upload(rng: random.Random) -> bytes:
    boundary = "churn" + rng.randbytes(6).hex()
    body = multipart([("file", wav_bytes(rng, 0.3), "a.wav"), ("model", b"x", None)], boundary)
    head = (
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def rest_abort(ports: Ports, rng: random.Random) -> None:
    """An upload cut mid-body."""
    _, writer = await asyncio.open_connection("127.0.0.1", ports.rest)
    request = _upload(rng)
    writer.write(request[: rng.randint(len(request) // 4, len(request) - 1)])
    await writer.drain()
    await asyncio.sleep(rng.random() * 0.05)
    abort(writer)


async def rest_complete(ports: Ports, rng: random.Random) -> None:
    """A whole upload, answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.rest)
    try:
        writer.write(_upload(rng))
        await writer.drain()
        status, _, _ = await read_head(reader)
        if status != 200:
            raise Refused(status)
    finally:
        abort(writer)


async def audiosocket_call(ports: Ports, rng: random.Random, hang_up: bool) -> None:
    """A call that sends its UUID and some audio, then is cut, or hangs up and is answered by
    the server closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.audiosocket)
    try:
        writer.write(packet(0x01, uuid.UUID(int=rng.getrandbits(128)).bytes))
        for _ in range(rng.randint(1, 10)):
            writer.write(packet(0x10, rng.randbytes(320)))
        if hang_up:
            writer.write(packet(0x00))
        await writer.drain()
        if hang_up:
            writer.write_eof()
            await reader.read()
        else:
            await asyncio.sleep(rng.random() * 0.05)
    finally:
        abort(writer)


Cycle = Callable[[Ports, random.Random], Awaitable[None]]


def kinds() -> dict[str, Cycle]:
    """Every kind of cycle by name."""
    table: dict[str, Cycle] = {}
    for dialect in PATHS:
        table[f"{dialect}_abort"] = lambda p, r, d=dialect: ws_abort(p, r, d)
        table[f"{dialect}_close"] = lambda p, r, d=dialect: ws_close(p, r, d)
    table["handshake_cut"] = lambda p, r: ws_midhandshake(p, r, r.choice(sorted(PATHS)))
    table["subscriber_vanish"] = lambda p, r: subscriber(p, r, polite=False)
    table["subscriber_close"] = lambda p, r: subscriber(p, r, polite=True)
    table["rest_cut"] = rest_abort
    table["rest_complete"] = rest_complete
    table["audiosocket_cut"] = lambda p, r: audiosocket_call(p, r, hang_up=False)
    table["audiosocket_hangup"] = lambda p, r: audiosocket_call(p, r, hang_up=True)
    return table


# --- the soak -------------------------------------------------------------------------------------


@dataclass
class Sample:
    cycles: int
    seconds: float
    rss_kb: int
    fds: int
    threads: int
    sessions_active: float | None


@dataclass
class Soak:
    """What a churn run saw: samples (the first after the warm-up), outcomes per kind."""

    samples: list[Sample] = field(default_factory=list)
    outcomes: dict[str, Counter] = field(default_factory=dict)
    cycles: int = 0
    seconds: float = 0.0

    def growth(self) -> dict[str, float]:
        """Last sample minus the warm-up sample."""
        first, last = self.samples[0], self.samples[-1]
        return {
            "rss_kb": last.rss_kb - first.rss_kb,
            "fds": last.fds - first.fds,
            "threads": last.threads - first.threads,
        }

    def table(self) -> str:
        head = f"{'cycles':>7s} {'seconds':>8s} {'RSS MB':>8s} {'fds':>5s} {'threads':>7s}"
        lines = [f"{head} {'sessions':>8s}"]
        for s in self.samples:
            sessions = "-" if s.sessions_active is None else f"{s.sessions_active:.0f}"
            lines.append(
                f"{s.cycles:7d} {s.seconds:8.1f} {s.rss_kb / 1024:8.1f} {s.fds:5d} "
                f"{s.threads:7d} {sessions:>8s}"
            )
        return "\n".join(lines)

    def record(self) -> dict:
        return {
            "cycles": self.cycles,
            "seconds": round(self.seconds, 1),
            "samples": [asdict(s) for s in self.samples],
            "growth_after_warmup": self.growth(),
            "outcomes": {kind: dict(c) for kind, c in self.outcomes.items()},
        }


def sessions_active(port: int) -> float | None:
    """The server's `streamscribe_sessions_active` gauge (None when /metrics does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    match = re.search(r"^streamscribe_sessions_active (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


async def settle(server: ServerProcess, baseline: Usage | None, timeout_s: float) -> Usage:
    """Wait until the server's file descriptors are back at `baseline` (its connections have
    closed), or without a baseline stop changing, at most `timeout_s`; the usage then."""
    deadline = time.monotonic() + timeout_s
    last = server.usage()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        now = server.usage()
        if now.fds <= (baseline.fds if baseline is not None else last.fds):
            return now
        last = now
    return last


async def churn(
    server: ServerProcess,
    cycles: int,
    warmup: int,
    every: int,
    concurrency: int = 16,
    seed: int = 1,
    settle_s: float = 5.0,
    progress: Callable[[Sample], None] | None = None,
) -> Soak:
    """Run `cycles` cycles (kinds in turn), `concurrency` at a time; sample after `warmup`
    cycles and every `every` cycles after, each time once the connections have settled."""
    ports = Ports(server.port, server.http_port, server.audiosocket_port)
    table = kinds()
    names = sorted(table)
    soak = Soak(outcomes={name: Counter() for name in names})
    started = time.monotonic()
    baseline: Usage | None = None
    semaphore = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        name = names[index % len(names)]
        rng = random.Random(f"{seed}:{index}")
        async with semaphore:
            try:
                async with asyncio.timeout(CYCLE_BOUND_S):
                    await table[name](ports, rng)
                outcome = "ok"
            except Refused as err:
                outcome = f"http_{err.status}"
            except TimeoutError:
                outcome = "timeout"
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as err:
                outcome = type(err).__name__
        soak.outcomes[name][outcome] += 1

    marks = [warmup, *range(warmup + every, cycles, every), cycles]
    done = 0
    for mark in sorted(set(m for m in marks if 0 < m <= cycles)):
        await asyncio.gather(*(one(i) for i in range(done, mark)))
        done = mark
        usage = await settle(server, baseline, settle_s)
        sample = Sample(
            cycles=done,
            seconds=round(time.monotonic() - started, 1),
            rss_kb=usage.rss_kb,
            fds=usage.fds,
            threads=usage.threads,
            sessions_active=await asyncio.to_thread(sessions_active, server.port),
        )
        if baseline is None:
            baseline = usage
        soak.samples.append(sample)
        if progress is not None:
            progress(sample)
    soak.cycles = done
    soak.seconds = time.monotonic() - started
    return soak

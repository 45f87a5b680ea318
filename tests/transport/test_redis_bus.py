"""Call events and caption exports across server instances through Redis (`server.redis_url`):
two (or three) gateways in this process share one Debian `redis-server` on a loopback port, as
instances behind nginx would. Calls stream into gateway A; subscribers and exports go to B."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect

from clients.telephony import audiosocket_sim, twilio_sim
from streaming.core.events import FinalTranscript, Latency, SessionStarted
from streaming.transport import calls, redis_bus
from streaming.transport.bus import LocalBus
from tests.gateway_harness import (
    EchoEngine,
    collect,
    gateway_config,
    http_get,
    read_all,
    running,
    subscribe,
)
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (Debian: apt-get install redis-server); "
    "these tests start one on a loopback port",
)
LABELS = ("inbound", "outbound")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on 127.0.0.1: no persistence, files in a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe,
            ):
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return
            assert self.process.poll() is None, "redis-server exited"
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer within 10 s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def two_party_call() -> dict[str, bytes]:
    """Inbound speaks, then outbound answers (short clips, so a call takes a few seconds)."""
    clips = librivox_clips()
    first, second = clips[1][1], clips[4][1]
    quiet = np.zeros(RATE, np.float32)
    inbound = np.concatenate([quiet, first, quiet, np.zeros_like(second), quiet])
    outbound = np.concatenate([quiet, np.zeros_like(first), quiet, second, quiet])
    return {
        "inbound": twilio_sim.to_mulaw(inbound, RATE),
        "outbound": twilio_sim.to_mulaw(outbound, RATE),
    }


def twilio_url(gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}/v1/telephony/twilio"


def final(channel: int, text: str) -> FinalTranscript:
    return FinalTranscript(channel, 1, 0, 900, text, [], 0.9, Latency(10, 1, 5), "endpoint")


async def until(condition, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def check_call(events: list[dict], call_sid: str) -> None:
    """A whole call as a subscriber sees it: numbered from 1 without a gap, both tracks' finals."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["call_id"] for e in events} == {call_sid}
    assert events[0]["type"] == "session.started" and events[-1]["type"] == "session.closed"
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert {f["channel"] for f in finals} == set(LABELS)


def test_without_redis_url_the_gateway_keeps_everything_in_process():
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            return gw.bus, gw.calls.bus, gw.captions.sink

    bus, hub_bus, sink = asyncio.run(main())
    assert isinstance(bus, LocalBus) and hub_bus is bus and not bus.shared and sink is None


def test_a_call_on_one_instance_reaches_subscribers_on_every_instance(redis_server, two_party_call):
    call_sid = twilio_sim.new_call_sid()

    async def main():
        config = gateway_config(redis_url=redis_server.url)
        async with running(config, EchoEngine()) as a, running(config, EchoEngine()) as b:
            on_a = await subscribe(a, call_sid)
            on_b = await subscribe(b, call_sid)  # before the call starts: held
            await asyncio.sleep(0.3)
            stream = list(twilio_sim.messages(two_party_call, call_sid, {"hangover_ms": "400"}))
            await twilio_sim.replay(twilio_url(a), stream)
            events = await asyncio.gather(read_all(on_a), read_all(on_b))
            await until(lambda: not a.calls.calls and not b.calls.calls)  # all freed
            return events, (on_a.close_code, on_b.close_code)

    (on_a, on_b), close_codes = asyncio.run(main())
    assert close_codes == (1000, 1000)
    check_call(on_a, call_sid)
    assert on_b == on_a  # the same messages, `seq` and all, in the same order


def test_an_audiosocket_call_reaches_a_subscriber_on_another_instance(redis_server):
    (_, speech, _) = librivox_clips()[1]
    slin = audiosocket_sim.to_slin(np.concatenate([np.zeros(RATE, np.float32), speech]), RATE)
    call = uuid.uuid4()
    port = free_port()

    async def main():
        a_config = gateway_config(redis_url=redis_server.url, audiosocket_port=port)
        b_config = gateway_config(redis_url=redis_server.url)
        async with running(a_config, EchoEngine()), running(b_config, EchoEngine()) as b:
            on_b = await subscribe(b, str(call))
            packets = audiosocket_sim.call_packets(call, slin)
            await audiosocket_sim.replay("127.0.0.1", port, packets)
            return await read_all(on_b), on_b.close_code

    events, close_code = asyncio.run(main())
    assert close_code == 1000
    assert events[0]["type"] == "session.started" and events[-1]["type"] == "session.closed"
    assert [e["channel"] for e in events if e["type"] == "transcript.final"] == ["inbound"]


def test_a_subscriber_joining_a_running_call_elsewhere_is_not_refused_after_the_hold(
    redis_server,
):
    """The live set says the call runs on A, though it says nothing while B's hold passes."""

    async def main():
        config = gateway_config(redis_url=redis_server.url, call_subscriber_hold_s=0.3)
        async with running(config, EchoEngine()) as a, running(config, EchoEngine()) as b:
            a.calls.publish("quiet-call", "conn", LABELS, SessionStarted("s", {"channels": 2}))
            on_b = await subscribe(b, "quiet-call")
            await asyncio.sleep(0.8)  # well past the hold
            still_open = on_b.state.name
            a.calls.publish("quiet-call", "conn", LABELS, final(1, "at last"))
            a.calls.end("quiet-call", "conn")
            return still_open, await read_all(on_b), on_b.close_code

    still_open, events, close_code = asyncio.run(main())
    assert still_open == "OPEN" and close_code == 1000
    assert [(e["type"], e["seq"], e["channel"], e["text"]) for e in events] == [
        ("transcript.final", 2, "outbound", "at last")
    ]


def test_a_call_that_never_starts_anywhere_is_not_found_after_the_hold(redis_server):
    async def main():
        config = gateway_config(redis_url=redis_server.url, call_subscriber_hold_s=0.3)
        async with running(config, EchoEngine()), running(config, EchoEngine()) as b:
            began = time.monotonic()
            on_b = await subscribe(b, "CAnobody")
            events = await read_all(on_b)
            waited = time.monotonic() - began
            await until(lambda: not b.calls.calls)
            return events, on_b.close_code, waited

    events, close_code, waited = asyncio.run(main())
    assert [e["code"] for e in events] == ["call_not_found"] and close_code == 4004
    assert 0.3 <= waited < 3.0


def test_caption_exports_are_served_by_any_instance_even_one_started_later(redis_server):
    speech = [audio for _, audio, _ in librivox_clips()[:2]]

    async def files(gateway, session: str) -> list[tuple[int, str]]:
        paths = [f"/v1/sessions/{session}/captions.{kind}" for kind in ("vtt", "srt")]
        paths.append(f"/v1/sessions/{session}/captions.srt?channel=0")
        answers = [await http_get(gateway.port, path) for path in paths]
        return [(status, body) for status, _, body in answers]

    async def main():
        config = gateway_config(redis_url=redis_server.url)
        async with running(config, EchoEngine()) as a, running(config, EchoEngine()) as b:
            async with connect(f"ws://127.0.0.1:{a.port}/v1/stream") as ws:
                await ws.recv()
                start = {
                    "type": "session.start",
                    "captions": {"mode": "popon", "preset": 32},
                    "timecode_origin_ms": 3_600_000,
                }
                await ws.send(json.dumps(start))
                session = json.loads(await ws.recv())["session_id"]
                for chunk in chunks(to_s16le(joined(speech)), RATE * 2 // 10):
                    await ws.send(chunk)
                await ws.send(json.dumps({"type": "close"}))
                messages = await collect(ws)
            on_a = await files(a, session)
            deadline = time.monotonic() + 5  # B hears A's cues a moment after A's client does
            while (on_b := await files(b, session)) != on_a and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            async with running(config, EchoEngine()) as c:  # reads them back from Redis
                await until(lambda: c.bus.up)
                deadline = time.monotonic() + 5
                while (on_c := await files(c, session)) != on_a and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            missing = await http_get(b.port, "/v1/sessions/nosuchsession/captions.vtt")
            return messages, on_a, on_b, on_c, missing[0]

    messages, on_a, on_b, on_c, missing = asyncio.run(main())
    cues = [m for m in messages if m["type"] == "caption.cue"]
    assert len(cues) >= 2
    assert [status for status, _ in on_a] == [200, 200, 200]
    assert on_a[0][1].count(" --> ") == len(cues) and "01:00:0" in on_a[0][1]
    assert on_b == on_a and on_c == on_a
    assert missing == 404


def test_redis_going_away_mid_call_spares_local_subscribers_and_comes_back(
    redis_server, two_party_call, caplog, monkeypatch
):
    monkeypatch.setattr(redis_bus, "BACKOFF_MAX_S", 0.5)  # reconnect soon after the restart
    caplog.set_level(logging.INFO, logger="streaming.transport.redis_bus")
    first, second = twilio_sim.new_call_sid(), twilio_sim.new_call_sid()

    async def main():
        config = gateway_config(redis_url=redis_server.url)
        async with running(config, EchoEngine()) as a, running(config, EchoEngine()) as b:
            on_a, on_b = await subscribe(a, first), await subscribe(b, first)
            stream = list(twilio_sim.messages(two_party_call, first, {"hangover_ms": "400"}))
            async with connect(twilio_url(a)) as call:
                for n, text in enumerate(stream):
                    await call.send(text)
                    if n == len(stream) // 2:
                        redis_server.kill()  # mid-call
                    if n % 10 == 0:
                        await asyncio.sleep(0.005)  # let events flow while the call goes on
            local = await read_all(on_a)
            killed_at = time.monotonic()
            # Back again: both instances reconnect, and a new call reaches B.
            redis_server.start()
            await until(lambda: a.bus.up and b.bus.up)
            reconnected = time.monotonic() - killed_at
            await on_b.close()
            on_a2, on_b2 = await subscribe(a, second), await subscribe(b, second)
            stream = list(twilio_sim.messages(two_party_call, second, {"hangover_ms": "400"}))
            await twilio_sim.replay(twilio_url(a), stream)
            after = await asyncio.gather(read_all(on_a2), read_all(on_b2))
            return local, on_a.close_code, reconnected, after

    local, close_code, reconnected, (on_a2, on_b2) = asyncio.run(main())
    assert close_code == 1000
    check_call(local, first)  # everything, in order, though Redis died mid-call
    warnings = [r for r in caplog.records if r.getMessage().startswith("redis unavailable")]
    assert len(warnings) == 2  # one per instance, however many retries failed
    assert reconnected < 10
    check_call(on_a2, second)
    assert on_b2 == on_a2


def test_publishing_never_waits_for_redis(redis_server, monkeypatch):
    """With Redis gone, publishing stays as fast as ever and the backlog stays bounded."""
    monkeypatch.setattr(redis_bus, "QUEUE_MAX", 500)

    async def main():
        config = gateway_config(redis_url=redis_server.url)
        async with running(config, EchoEngine()) as a:
            await until(lambda: a.bus.up)
            on_a = await subscribe(a, "busy-call")
            redis_server.kill()
            began = time.perf_counter()
            for n in range(900):  # fewer than a subscriber may fall behind
                a.calls.publish("busy-call", "conn", LABELS, final(0, f"final {n}"))
            publishing = time.perf_counter() - began
            a.calls.end("busy-call", "conn")
            events = await read_all(on_a)
            return publishing, len(a.bus.queue), events

    publishing, queued, events = asyncio.run(main())
    assert publishing < 1.0
    assert queued <= 500
    assert [e["text"] for e in events] == [f"final {n}" for n in range(900)]


def test_a_call_whose_instance_vanished_ends_for_subscribers_elsewhere(redis_server, monkeypatch):
    """A crashed instance says no "end": its call leaves the live set when that expires, and
    the sweeps on the subscriber's instance end it there (close 1000)."""
    monkeypatch.setattr(calls, "SWEEP_S", 0.2)

    async def main():
        config = gateway_config(redis_url=redis_server.url)
        async with running(config, EchoEngine()) as a, running(config, EchoEngine()) as b:
            a.calls.publish("lost-call", "conn", LABELS, final(0, "before the crash"))
            on_b = await subscribe(b, "lost-call")
            a.calls.publish("lost-call", "conn", LABELS, final(0, "still here"))
            await until(lambda: b.calls.calls["lost-call"].live)
            # A crashes: its live set entry goes (as its expiry would), and no "end" is said.
            a.calls.closed = True
            a.bus.send(("DEL", calls.CALL_LIVE.format("lost-call")))
            began = time.monotonic()
            events = await read_all(on_b)
            return events, on_b.close_code, time.monotonic() - began

    events, close_code, took = asyncio.run(main())
    assert [e["text"] for e in events] == ["still here"] and close_code == 1000
    assert took < 5

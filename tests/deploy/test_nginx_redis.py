"""Call events across instances behind real nginx, through a real Redis: the two
`streamscribe serve --model noop` instances of tests/deploy/test_nginx.py, each with
`server.redis_url` naming one Debian `redis-server` on a free loopback port, and nginx (the
shipped deploy/nginx/streamscribe.conf) in front of them.

A Twilio call streams straight into instance A (its own port, so where it runs is known).
Subscribers of `/v1/calls/{callSid}/events` are connected straight to B, straight to A, and
through nginx (least_conn puts one on each instance): every one of them gets the same messages (the
call's `seq`, its finals on both tracks, `session.closed`) and close 1000. Without
`server.redis_url` the same call reaches A's subscriber only; B's is told `call_not_found`
(close 4004) once `server.call_subscriber_hold_s` has passed, so the check above can fail."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import websockets

from clients.telephony import twilio_sim
from tests.deploy import nginxrun
from tests.deploy import test_nginx as base

REDIS_SERVER = shutil.which("redis-server")
pytestmark = [
    *base.pytestmark,
    pytest.mark.skipif(
        REDIS_SERVER is None,
        reason="redis-server is not installed (Debian: apt-get install redis-server); this test "
        "starts one on a loopback port",
    ),
]

HOLD_S = 3.0  # server.call_subscriber_hold_s with Redis: longer than subscribing takes here
NO_BUS_HOLD_S = 1.0  # ... and without: how long B's subscriber waits for a call it never hears
WAIT_S = 15.0  # most any one step here waits


def _track(lead_s: float, speech_s: float, tail_s: float, f0: float) -> bytes:
    rate = base.RATE
    audio = np.concatenate(
        [np.zeros(int(lead_s * rate), np.float32), base.voiced(speech_s, f0)]
        + [np.zeros(int(tail_s * rate), np.float32)]
    )
    return twilio_sim.to_mulaw(audio, rate)


# The caller speaks, then the agent answers: one final (at least) on each track.
TRACKS = {"inbound": _track(0.5, 1.5, 2.0, 130.0), "outbound": _track(2.0, 1.5, 0.5, 210.0)}
LABELS = set(TRACKS)


# --- redis-server ---------------------------------------------------------------------------------


class RedisServer:
    """Debian's redis-server on 127.0.0.1 and a free port: no persistence, files in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.port = nginxrun.free_port()
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=5
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client.ping():
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"redis-server did not answer on {self.port} within 10 s")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def listeners(self, channel: str) -> int:
        """Redis connections subscribed to `channel`: one per instance that follows it."""
        return dict(self.client.pubsub_numsub(channel)).get(channel.encode(), 0)

    def instances(self) -> int:
        """Server instances connected: each subscribes to its own `streamscribe:bus:*`."""
        return len(self.client.pubsub_channels("streamscribe:bus:*"))

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def until(condition, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """nginx before two instances that share one Redis, with both connected to it."""
    folder = tmp_path_factory.mktemp("nginx-redis")
    server = RedisServer(folder)
    try:
        settings = {
            "STREAMSCRIBE_SERVER__REDIS_URL": server.url,
            "STREAMSCRIBE_SERVER__CALL_SUBSCRIBER_HOLD_S": str(HOLD_S),
        }
        with base.stack(folder, settings) as live:
            until(lambda: server.instances() == 2, "both instances connected to Redis")
            yield live, server
    finally:
        server.stop()


# --- a call and its subscribers ---------------------------------------------------------------


def events_path(call_sid: str) -> str:
    return f"/v1/calls/{call_sid}/events"


def direct(port: int, path: str):
    """A WebSocket straight to one instance's own port, with the API key."""
    return websockets.connect(
        f"ws://127.0.0.1:{port}{path}",
        additional_headers=base.AUTH,
        open_timeout=10,
        close_timeout=5,
    )


async def twilio_call(port: int, call_sid: str) -> int | None:
    """The whole call, as Twilio sends it, straight to one instance; returns once the instance
    has closed the stream after `stop` (its close code)."""
    stream = twilio_sim.messages(TRACKS, call_sid, {"hangover_ms": "400"})
    async with direct(port, "/v1/telephony/twilio") as ws:
        for text in stream:
            await ws.send(text)
        _, code = await base.rest_of_stream(ws, WAIT_S)  # Twilio gets nothing back but the close
    return code


def check_call(events: list[dict], call_sid: str) -> None:
    """A whole call as a subscriber sees it: numbered from 1 without a gap, from
    session.started to session.closed, with finals (with words) on both tracks."""
    kinds = base.types(events)
    assert kinds[0] == "session.started" and kinds[-1] == "session.closed", kinds
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["call_id"] for e in events} == {call_sid}
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert {f["channel"] for f in finals} == LABELS, finals
    assert all(f["text"] for f in finals), finals


# --- with Redis ---------------------------------------------------------------------------------


def test_a_call_on_one_instance_reaches_its_subscribers_on_both_and_through_nginx(shared):
    """Subscribers first (held until the call starts): one straight to B, one straight to A,
    two through nginx. Then the call streams into A. All four get the same messages."""
    live, server = shared
    a, b = live.instances
    call_sid = twilio_sim.new_call_sid()
    channel = f"streamscribe:call:{call_sid}"

    async def main():
        async with contextlib.AsyncExitStack() as opened:
            on_b = await opened.enter_async_context(direct(b.port, events_path(call_sid)))
            on_a = await opened.enter_async_context(direct(a.port, events_path(call_sid)))
            via_nginx = [
                await opened.enter_async_context(base.connect(live, events_path(call_sid)))
                for _ in range(2)
            ]
            # Each instance hears the call's channel before it registers its subscribers, and
            # asks Redis once more which instances carry the call (a round trip) after that.
            await asyncio.to_thread(
                until, lambda: server.listeners(channel) == 2, "A and B following the call"
            )
            await asyncio.sleep(0.3)
            subscribers = [on_b, on_a, *via_nginx]
            reading = [base.rest_of_stream(ws, WAIT_S) for ws in subscribers]
            began = time.monotonic()
            *heard, call_code = await asyncio.gather(*reading, twilio_call(a.port, call_sid))
            return heard, call_code, time.monotonic() - began

    heard, call_code, took = asyncio.run(main())
    assert call_code == 1000
    (b_events, b_code), (a_events, a_code), *through = heard
    assert (b_code, a_code, *(code for _, code in through)) == (1000,) * 4
    check_call(a_events, call_sid)
    assert b_events == a_events  # the same messages, `seq` and all, in the same order
    for events, _ in through:
        assert events == a_events
    assert took < WAIT_S
    # least_conn put one nginx subscriber on each instance (the first on either, the second on
    # the one without a connection from nginx): B's and A's own subscriber each came through.
    landed: list[str] = []

    def logged() -> bool:
        landed[:] = live.nginx.upstreams(events_path(call_sid))
        return len(landed) == 2

    until(logged, "nginx logging both subscribers", 5)
    assert sorted(landed) == sorted(f"127.0.0.1:{i.port}" for i in live.instances), landed
    # Nothing of the call is left behind: no instance follows it, none carries it.
    until(lambda: server.listeners(channel) == 0, "the call's channel released", 5)
    assert not server.client.exists(f"{channel}:live")


def test_a_subscriber_through_nginx_may_join_a_call_already_running(shared):
    """A subscriber that joins mid-call (wherever nginx puts it) gets the rest of the call,
    numbered on from where it joined, as the call's own subscriber on A does."""
    live, server = shared
    a, _ = live.instances
    call_sid = twilio_sim.new_call_sid()
    channel = f"streamscribe:call:{call_sid}"
    stream = list(twilio_sim.messages(TRACKS, call_sid, {"hangover_ms": "400"}))
    half = len(stream) // 2

    async def main():
        async with direct(a.port, events_path(call_sid)) as on_a:
            await asyncio.to_thread(until, lambda: server.listeners(channel) == 1, "A follows")
            await asyncio.sleep(0.3)  # and has asked Redis who carries the call
            async with direct(a.port, "/v1/telephony/twilio") as call:
                for text in stream[:half]:
                    await call.send(text)
                first = json.loads(await asyncio.wait_for(on_a.recv(), WAIT_S))
                assert first["type"] == "session.started"
                await asyncio.to_thread(
                    until, lambda: server.client.exists(f"{channel}:live"),
                    "A says it carries the call",
                )  # fmt: skip
                async with base.connect(live, events_path(call_sid)) as late:
                    await asyncio.sleep(0.5)  # it follows the channel and learns A carries it
                    for text in stream[half:]:
                        await call.send(text)
                    _, call_code = await base.rest_of_stream(call, WAIT_S)
                    late_events = await base.rest_of_stream(late, WAIT_S)
                a_events = await base.rest_of_stream(on_a, WAIT_S)
        return [first, *a_events[0]], a_events[1], late_events, call_code

    a_events, a_code, (late_events, late_code), call_code = asyncio.run(main())
    assert (call_code, a_code, late_code) == (1000, 1000, 1000)
    check_call(a_events, call_sid)
    assert late_events and late_events == a_events[-len(late_events) :]
    assert late_events[-1]["type"] == "session.closed"
    assert "outbound" in {e["channel"] for e in late_events if e["type"] == "transcript.final"}


# --- without Redis ------------------------------------------------------------------------------


def test_without_redis_url_a_subscriber_on_the_other_instance_is_not_found(tmp_path):
    """The same call and subscribers, two instances without `server.redis_url`: A's subscriber
    gets the call; B's hears nothing of it and is told call_not_found (close 4004) once its
    hold has passed."""
    settings = {"STREAMSCRIBE_SERVER__CALL_SUBSCRIBER_HOLD_S": str(NO_BUS_HOLD_S)}
    launched = [base.launch(tmp_path, name, settings) for name in ("a", "b")]
    try:
        a, b = (base.ready_summary(proc, stderr) for proc, stderr in launched)
        call_sid = twilio_sim.new_call_sid()

        async def main():
            began = time.monotonic()  # B's hold starts a little later: once it is open

            async def waited_on_b(ws) -> tuple[list[dict], int | None, float]:
                events, code = await base.rest_of_stream(ws, WAIT_S)
                return events, code, time.monotonic() - began

            async with (
                direct(b.port, events_path(call_sid)) as on_b,
                direct(a.port, events_path(call_sid)) as on_a,
            ):
                (b_events, b_code, took), (a_events, a_code), call_code = await asyncio.gather(
                    waited_on_b(on_b),
                    base.rest_of_stream(on_a, WAIT_S),
                    twilio_call(a.port, call_sid),
                )
                return b_events, b_code, a_events, a_code, call_code, took

        b_events, b_code, a_events, a_code, call_code, took = asyncio.run(main())
    finally:
        for proc, _ in launched:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert call_code == 1000 and a_code == 1000
    check_call(a_events, call_sid)
    assert [(e["type"], e["code"]) for e in b_events] == [("error", "call_not_found")]
    assert b_code == 4004
    assert NO_BUS_HOLD_S <= took < WAIT_S

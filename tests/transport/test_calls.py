"""The call hub: subscriptions at /v1/calls/{call_id}/events and webhook delivery, driven by
publishing events directly (the dialect tests cover calls that arrive over the wire)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time

import pytest
from aiohttp import web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streaming.core.events import FinalTranscript, Latency, PartialTranscript, SessionStarted
from streaming.transport import calls
from streaming.transport.calls import CallHub, call_events_id
from tests.gateway_harness import EchoEngine, gateway_config, read_all, running, subscribe

LABELS = ("inbound", "outbound")


def final(channel: int, text: str = "hello there") -> FinalTranscript:
    return FinalTranscript(channel, 1, 0, 900, text, [], 0.9, Latency(10, 1, 5), "endpoint")


def partial(channel: int) -> PartialTranscript:
    return PartialTranscript(channel, 1, 1, 0, 400, "hel", "lo")


def test_call_paths():
    assert call_events_id("/v1/calls/CA0123abc/events") == "CA0123abc"
    uuid = "4f1f1f6e-9f6a-4c1e-8d5e-2d1b9d6c7a10"
    assert call_events_id(f"/v1/calls/{uuid}/events") == uuid
    for path in (
        "/v1/calls//events",
        "/v1/calls/a/b/events",
        "/v1/calls/x",
        "/v1/calls/%20/events",
    ):
        assert call_events_id(path) is None


def test_events_are_native_json_with_the_calls_seq_labels_and_id():
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            ws = await subscribe(gw, "call-1")
            gw.calls.publish("call-1", "conn-a", LABELS, SessionStarted("s", {"channels": 2}))
            gw.calls.publish("call-1", "conn-a", LABELS, final(1))
            gw.calls.publish("call-1", "conn-a", LABELS, final(5))  # no label: index kept
            gw.calls.end("call-1", "conn-a")
            return await read_all(ws), ws.close_code

    events, close_code = asyncio.run(main())
    assert close_code == 1000
    assert [(e["type"], e["seq"], e["call_id"]) for e in events] == [
        ("session.started", 1, "call-1"),
        ("transcript.final", 2, "call-1"),
        ("transcript.final", 3, "call-1"),
    ]
    assert events[1]["channel"] == "outbound" and events[2]["channel"] == 5
    assert events[1]["text"] == "hello there" and events[1]["latency"]["endpoint_ms"] == 10


def test_the_call_ends_when_its_last_publisher_does():
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            ws = await subscribe(gw, "call-2")
            gw.calls.publish("call-2", "a", ("inbound",), final(0, "from a"))
            gw.calls.publish("call-2", "b", ("outbound",), final(0, "from b"))
            gw.calls.end("call-2", "a")
            gw.calls.end("call-2", "nobody")
            await asyncio.sleep(0.2)
            still_open = ws.state.name
            gw.calls.publish("call-2", "b", ("outbound",), final(0, "b again"))
            gw.calls.end("call-2", "b")
            return still_open, await read_all(ws)

    still_open, events = asyncio.run(main())
    assert still_open == "OPEN"
    assert [(e["channel"], e["text"]) for e in events] == [
        ("inbound", "from a"),
        ("outbound", "from b"),
        ("outbound", "b again"),
    ]


def test_a_slow_subscriber_is_cut_off_and_never_holds_up_the_call(monkeypatch):
    monkeypatch.setattr(calls, "SUBSCRIBER_QUEUE", 100)
    texts = iter(os.urandom(5000).hex() for _ in range(1000))  # 10 kB finals that don't compress

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            # A subscriber that reads nothing, with a small receive buffer so it fills quickly.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", gw.port))
            url = f"ws://127.0.0.1:{gw.port}/v1/calls/call-3/events"
            stalled = await connect(url, sock=sock, max_queue=1)
            reader = await connect(url)
            while len(getattr(gw.calls.calls.get("call-3"), "subscribers", ())) < 2:
                await asyncio.sleep(0.01)
            received = asyncio.create_task(read_all(reader))
            longest = 0.0
            for _ in range(20):
                began = time.perf_counter()
                for _ in range(50):
                    gw.calls.publish("call-3", "conn", LABELS, final(0, next(texts)))
                longest = max(longest, time.perf_counter() - began)
                await asyncio.sleep(0.05)
            subscribers = len(gw.calls.calls["call-3"].subscribers)
            gw.calls.end("call-3", "conn")
            events = await received
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(10):
                    while True:
                        await stalled.recv()
            return longest, subscribers, len(events), stalled.close_code

    longest, subscribers, delivered, stalled_code = asyncio.run(main())
    assert longest < 1.0  # publishing never waits for a subscriber
    assert subscribers == 1 and delivered == 1000  # the reader got everything
    assert stalled_code == 1006  # cut without a closing handshake


def test_too_many_subscribers_are_refused():
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            held = [await subscribe(gw, "busy") for _ in range(calls.MAX_SUBSCRIBERS)]
            extra = await connect(f"ws://127.0.0.1:{gw.port}/v1/calls/busy/events")
            events = await read_all(extra)
            for ws in held:
                await ws.close()
            return events, extra.close_code

    events, close_code = asyncio.run(main())
    assert [e["code"] for e in events] == ["too_many_subscribers"] and close_code == 1013


def test_subscriptions_need_the_api_key_and_unknown_paths_are_404():
    async def main():
        async with running(gateway_config(api_keys="k1"), EchoEngine()) as gw:
            base = f"ws://127.0.0.1:{gw.port}"
            statuses = []
            for url in (f"{base}/v1/calls/c/events", f"{base}/v1/calls/c/other"):
                with pytest.raises(InvalidStatus) as refused:
                    await connect(url)
                statuses.append(refused.value.response.status_code)
            ws = await connect(f"{base}/v1/calls/c/events?api_key=k1")
            await ws.close()
            return statuses

    assert asyncio.run(main()) == [401, 404]


class Receiver:
    """A loopback webhook receiver answering each POST with the next status of `statuses`
    (then 200), after `delay_s`."""

    def __init__(self, statuses=(), delay_s: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.delay_s = delay_s
        self.attempts: list[float] = []
        self.received: list[dict] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts.append(time.monotonic())
        await asyncio.sleep(self.delay_s)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.received.append(await request.json())
        return web.Response(status=status)

    @contextlib.asynccontextmanager
    async def serving(self):
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"
        finally:
            await runner.cleanup()


@pytest.mark.parametrize(
    "statuses, retries, attempts, delivered",
    [
        ((503, 429, 408), 3, 4, True),  # retried with backoff until it succeeds
        ((500, 500, 500), 2, 3, False),  # retries exhausted: dropped and logged
        ((400,), 3, 1, False),  # refused: no retry
    ],
)
def test_webhook_retries_transient_failures_with_backoff(statuses, retries, attempts, delivered):
    receiver = Receiver(statuses)

    async def main():
        async with receiver.serving() as url:
            hub = CallHub(1.0, url, retries)
            ok = await hub._post("c", json.dumps({"type": "transcript.final"}))
            await hub.aclose(1.0)
            return ok

    assert asyncio.run(main()) is delivered
    assert len(receiver.attempts) == attempts
    gaps = [b - a for a, b in zip(receiver.attempts, receiver.attempts[1:], strict=False)]
    for n, gap in enumerate(gaps):
        assert gap >= calls.BACKOFF_S * 2**n * 0.9  # exponential backoff


def test_webhook_unreachable_is_retried_then_given_up(caplog):
    async def main():
        hub = CallHub(1.0, "http://127.0.0.1:9/hook", 1)  # discard port: refused
        began = time.monotonic()
        ok = await hub._post("c", "{}")
        await hub.aclose(1.0)
        return ok, time.monotonic() - began

    ok, elapsed = asyncio.run(main())
    assert not ok and elapsed >= calls.BACKOFF_S
    assert "webhook delivery failed" in caplog.text


def test_a_slow_webhook_never_blocks_publishing_and_gets_only_call_level_events():
    receiver = Receiver(delay_s=0.2)

    async def main():
        async with receiver.serving() as url:
            hub = CallHub(1.0, url, 0)
            began = time.perf_counter()
            hub.publish("c", "conn", LABELS, SessionStarted("s", {}))
            for channel in (0, 1):
                hub.publish("c", "conn", LABELS, partial(channel))
                hub.publish("c", "conn", LABELS, final(channel))
            hub.end("c", "conn")
            publishing = time.perf_counter() - began
            await hub.aclose(10.0)
            return publishing

    assert asyncio.run(main()) < 0.1
    assert [(m["type"], m.get("channel")) for m in receiver.received] == [
        ("session.started", None),
        ("transcript.final", "inbound"),
        ("transcript.final", "outbound"),
    ]

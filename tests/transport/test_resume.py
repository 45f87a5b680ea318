"""Session resume over loopback (server.resume_window_s): a client that loses its connection
reconnects with `?resume=TOKEN&last_seq=N`, gets what it missed, resends the audio the server
did not get, and the stream goes on as if never cut."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from tests.gateway_harness import EchoEngine, collect, gateway_config, http_get, read_all, running
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le

FRAME = RATE * 2 // 10  # 100 ms of 16-bit mono


@pytest.fixture(scope="module")
def pcm() -> bytes:
    return to_s16le(joined([audio for _, audio, _ in librivox_clips()[:3]]))


def url(gw, query: str = "") -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/stream{query}"


async def stream(ws, data: bytes, pace: float = 8.0) -> None:
    for chunk in chunks(data, FRAME):
        await ws.send(chunk)
        await asyncio.sleep(0.1 / pace)


async def straight_run(gw, data: bytes) -> list[dict]:
    async with connect(url(gw)) as ws:
        messages = [json.loads(await ws.recv())]
        await stream(ws, data)
        await ws.send(json.dumps({"type": "close"}))
        messages += await collect(ws)
    return messages


def finals(messages: list[dict]) -> list[tuple[int, int, int, str]]:
    return [
        (m["segment_id"], m["start_ms"], m["end_ms"], m["text"])
        for m in messages
        if m["type"] == "transcript.final"
    ]


async def remaining(gw, within_s: float = 5.0) -> int:
    """Live streams left once they had `within_s` to end."""
    for _ in range(int(within_s / 0.05)):
        if not gw.connections:
            break
        await asyncio.sleep(0.05)
    return len(gw.connections)


async def read_for(ws, seconds: float) -> list[dict]:
    messages = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                messages.append(json.loads(await ws.recv()))
    except TimeoutError:
        pass
    return messages


def test_a_cut_stream_resumes_with_nothing_lost_or_doubled(pcm):
    cut_at = len(pcm) // 2 // FRAME * FRAME

    async def main():
        async with running(gateway_config(resume_window_s=10), EchoEngine(delay_s=0.02)) as gw:
            reference = await straight_run(gw, pcm)
            ws = await connect(url(gw))
            started = json.loads(await ws.recv())
            token = started["resume_token"]
            await stream(ws, pcm[:cut_at])
            before = await read_for(ws, 0.3)
            ws.transport.abort()  # the network goes: no close frame
            await asyncio.sleep(0.8)  # meanwhile the server finishes what it has
            seen = [started, *before][: max(1, len(before) // 2)]  # some never arrived
            last_seq = seen[-1]["seq"]
            async with connect(url(gw, f"?resume={token}&last_seq={last_seq}")) as again:
                replayed = []
                while True:
                    message = json.loads(await again.recv())
                    if message["type"] == "session.resumed":
                        resumed = message
                        break
                    replayed.append(message)
                await stream(again, pcm[resumed["audio_bytes"] :])
                await again.send(json.dumps({"type": "close"}))
                rest = await collect(again)
                await again.wait_closed()
                code = again.close_code
            return reference, seen, replayed, resumed, rest, code, await remaining(gw)

    reference, seen, replayed, resumed, rest, code, left = asyncio.run(main())
    assert [m["seq"] for m in replayed] == list(
        range(seen[-1]["seq"] + 1, seen[-1]["seq"] + 1 + len(replayed))
    )
    assert resumed["replayed"] == len(replayed) and resumed["dropped"] == 0
    assert resumed["seq"] == seen[-1]["seq"] + len(replayed) + 1
    assert resumed["gap_ms"] >= 700 and 0 < resumed["audio_bytes"] <= cut_at
    assert resumed["audio_ms"] == resumed["audio_bytes"] // 32
    whole = [*seen, *replayed, resumed, *rest]
    seqs = [m["seq"] for m in whole]
    assert seqs == list(range(1, len(whole) + 1))  # every message once, in order
    assert finals(whole) == finals(reference)  # same segments, same text: none lost or doubled
    assert whole[-1]["type"] == "session.closed" and code == 1000 and left == 0
    assert whole[-1]["audio_ms"] == reference[-1]["audio_ms"]


def test_unknown_token_or_bad_last_seq_is_error_then_4005():
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with connect(url(gw, "?resume=nope&last_seq=3")) as ws:
                unknown = await read_all(ws)
                unknown_code = ws.close_code
            ws = await connect(url(gw))
            token = json.loads(await ws.recv())["resume_token"]
            ws.transport.abort()
            await asyncio.sleep(0.2)
            async with connect(url(gw, f"?resume={token}&last_seq=99")) as again:
                beyond = await read_all(again)
                beyond_code = again.close_code
            async with connect(url(gw, f"?resume={token}&last_seq=1")) as again:
                ok = json.loads(await again.recv())
            return unknown, unknown_code, beyond, beyond_code, ok

    unknown, unknown_code, beyond, beyond_code, ok = asyncio.run(main())
    assert unknown_code == 4005 and unknown[-1]["code"] == "resume_failed"
    assert "unknown, or ended" in unknown[-1]["message"]
    assert beyond_code == 4005 and "last_seq must be 0 to 1" in beyond[-1]["message"]
    assert ok["type"] == "session.resumed" and ok["seq"] == 2  # the refusal kept the session


def test_a_session_is_dropped_after_the_window_and_cannot_be_resumed(pcm):
    async def main():
        async with running(gateway_config(resume_window_s=0.5), EchoEngine()) as gw:
            ws = await connect(url(gw))
            token = json.loads(await ws.recv())["resume_token"]
            await stream(ws, pcm[: FRAME * 30])
            ws.transport.abort()
            await asyncio.sleep(0.2)
            held = len(gw.connections)
            left = await remaining(gw)
            async with connect(url(gw, f"?resume={token}&last_seq=1")) as again:
                refused = await read_all(again)
                code = again.close_code
            return held, left, refused, code

    held, left, refused, code = asyncio.run(main())
    assert held == 1 and left == 0
    assert code == 4005 and refused[-1]["code"] == "resume_failed"


def test_resume_takes_over_a_half_open_connection(pcm):
    """The old link never told the server it went (no FIN reached it): a resume cuts it."""

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            old = await connect(url(gw))
            token = json.loads(await old.recv())["resume_token"]
            await stream(old, pcm[: FRAME * 20])
            seen = await read_for(old, 0.3)
            last = seen[-1]["seq"] if seen else 1
            async with connect(url(gw, f"?resume={token}&last_seq={last}")) as again:
                resumed = json.loads(await again.recv())
                await again.send(json.dumps({"type": "close"}))
                rest = await collect(again)
            await old.wait_closed()
            return resumed, rest, old.close_code

    resumed, rest, old_code = asyncio.run(main())
    assert resumed["type"] == "session.resumed" and resumed["replayed"] == 0
    assert rest[-1]["type"] == "session.closed" and old_code != 1000


def test_a_small_buffer_reports_the_events_it_dropped(pcm):
    async def main():
        config = gateway_config(resume_buffer_events=10)
        async with running(config, EchoEngine()) as gw:
            ws = await connect(url(gw))
            token = json.loads(await ws.recv())["resume_token"]
            await stream(ws, pcm[: len(pcm) // 2])
            sent = await read_for(ws, 0.5)
            ws.transport.abort()
            await asyncio.sleep(0.2)
            async with connect(url(gw, f"?resume={token}&last_seq=0")) as again:
                messages = []
                while not messages or messages[-1]["type"] != "session.resumed":
                    messages.append(json.loads(await again.recv()))
            return sent, messages

    sent, messages = asyncio.run(main())
    resumed = messages[-1]
    assert resumed["replayed"] == len(messages) - 1 <= 10
    assert resumed["dropped"] == messages[0]["seq"] - 1 > 0
    assert resumed["replayed"] + resumed["dropped"] == resumed["seq"] - 1


def test_without_a_window_there_is_no_token_and_a_cut_stream_ends():
    async def main():
        async with running(gateway_config(resume_window_s=0), EchoEngine()) as gw:
            ws = await connect(url(gw))
            started = json.loads(await ws.recv())
            ws.transport.abort()
            return started, await remaining(gw)

    started, left = asyncio.run(main())
    assert started["resume_token"] is None and left == 0


def test_drain_ends_a_detached_session_at_once(pcm):
    async def main():
        async with running(gateway_config(resume_window_s=60), EchoEngine()) as gw:
            ws = await connect(url(gw))
            await ws.recv()
            await stream(ws, pcm[: FRAME * 30])
            ws.transport.abort()
            await asyncio.sleep(0.2)
            loop = asyncio.get_running_loop()
            start = loop.time()
            await gw.drain()
            return loop.time() - start, len(gw.connections)

    took, left = asyncio.run(main())
    assert took < 5 and left == 0


def test_a_resume_needs_the_key_that_opened_the_session():
    async def main():
        config = gateway_config(api_keys="alpha,beta")
        async with running(config, EchoEngine()) as gw:

            def auth(key):
                return {"additional_headers": {"Authorization": f"Bearer {key}"}}

            ws = await connect(url(gw), **auth("alpha"))
            token = json.loads(await ws.recv())["resume_token"]
            ws.transport.abort()
            await asyncio.sleep(0.2)
            resume = url(gw, f"?resume={token}&last_seq=1")
            async with connect(resume, **auth("beta")) as other:
                refused = await read_all(other)
                refused_code = other.close_code
            async with connect(resume, **auth("alpha")) as same:
                resumed = json.loads(await same.recv())
            return refused, refused_code, resumed

    refused, refused_code, resumed = asyncio.run(main())
    assert refused_code == 4005 and "another API key" in refused[-1]["message"]
    assert resumed["type"] == "session.resumed"


def test_at_the_cap_a_kept_session_makes_way_for_a_new_stream():
    async def main():
        async with running(gateway_config(max_sessions=2), EchoEngine()) as gw:
            cut = []
            for _ in range(2):
                ws = await connect(url(gw))
                cut.append(json.loads(await ws.recv())["resume_token"])
                ws.transport.abort()
                await asyncio.sleep(0.1)
            ready = await http_get(gw.port, "/readyz")  # full, but of streams with no client
            async with connect(url(gw)) as fresh:
                started = json.loads(await fresh.recv())
                async with connect(url(gw, f"?resume={cut[0]}&last_seq=1")) as oldest:
                    refused = await read_all(oldest)
                async with connect(url(gw, f"?resume={cut[1]}&last_seq=1")) as newer:
                    resumed = json.loads(await newer.recv())
            evicted = gw.metrics.resumes.labels("evicted")._value.get()
            return ready[0], started, refused, resumed, evicted

    ready, started, refused, resumed, evicted = asyncio.run(main())
    assert ready == 200 and started["type"] == "session.started" and evicted == 1
    assert refused[-1]["code"] == "resume_failed"  # the longest gone was ended
    assert resumed["type"] == "session.resumed"

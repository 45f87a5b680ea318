"""The gateway over loopback: native protocol, GET endpoints, limits, bad input, draining."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.gateway_harness import EchoEngine, collect, gateway_config, http_get, running
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le


@pytest.fixture(scope="module")
def speech():
    return [audio for _, audio, _ in librivox_clips()[:2]]


def url(gateway, query: str = "") -> str:
    return f"ws://127.0.0.1:{gateway.port}/v1/stream{query}"


async def send_audio(ws, audio, frame_ms: int = 100, pace: float = 0.0) -> None:
    """Send in frames, as fast as possible, or `pace` times faster than real time."""
    for chunk in chunks(to_s16le(audio), RATE * 2 * frame_ms // 1000):
        await ws.send(chunk)
        if pace:
            await asyncio.sleep(frame_ms / 1000 / pace)


def test_native_stream_end_to_end(speech):
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with connect(url(gw, "?sample_rate=16000")) as ws:
                started = json.loads(await ws.recv())
                assert started["type"] == "session.started" and started["seq"] == 1
                assert started["config"]["sample_rate"] == 16000
                # Paced: a stream sent all at once may see every partial superseded by the
                # next one before the engine takes it (partials are dropped, never queued).
                await send_audio(ws, joined(speech), pace=5)
                await ws.send(json.dumps({"type": "close"}))
                messages = await collect(ws)
                await ws.wait_closed()
                assert ws.close_code == 1000
        return [started, *messages]

    messages = asyncio.run(main())
    seqs = [m["seq"] for m in messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    kinds = [m["type"] for m in messages]
    assert kinds.count("transcript.final") == 2
    assert kinds.count("speech.started") == 2 and "transcript.partial" in kinds
    assert kinds[-1] == "session.closed"
    final = next(m for m in messages if m["type"] == "transcript.final")
    assert set(final["latency"]) == {"endpoint_ms", "queue_ms", "compute_ms"}
    assert final["words"] and {"word", "start_ms", "end_ms", "confidence"} <= set(final["words"][0])


def test_health_ready_and_metrics():
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            health = await http_get(gw.port, "/healthz")
            ready = await http_get(gw.port, "/readyz")
            async with connect(url(gw)) as ws:
                await ws.recv()
                await ws.send(b"\x00\x00" * 1600)
                await ws.send(json.dumps({"type": "close"}))
                await collect(ws)
            metrics = await http_get(gw.port, "/metrics")
            missing = await http_get(gw.port, "/nope")
        return health, ready, metrics, missing

    health, ready, metrics, missing = asyncio.run(main())
    assert health[0] == 200 and ready[0] == 200 and missing[0] == 404
    status, headers, body = metrics
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'streamscribe_sessions_total{dialect="native"} 1.0' in body
    assert "streamscribe_audio_seconds_total 0.1" in body
    assert "streamscribe_batches_total" in body and "streamscribe_lag_seconds" in body


def test_bad_messages_get_errors_and_the_session_continues():
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                await ws.send("{not json")
                bad_json = json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "dance"}))
                unknown = json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "session.update", "sample_rate": 8000}))
                update = json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "close"}))
                closed = await collect(ws)
        return bad_json, unknown, update, closed

    bad_json, unknown, update, closed = asyncio.run(main())
    assert (bad_json["type"], bad_json["code"]) == ("error", "bad_json")
    assert unknown["code"] == "unknown_type" and "dance" in unknown["message"]
    assert update["code"] == "invalid_update" and "sample_rate" in update["message"]
    assert closed[-1]["type"] == "session.closed"


@pytest.mark.parametrize(
    "query, first, expected",
    [
        ("?sample_rate=11025", None, "sample_rate"),
        ("?encoding=mp3", None, "encoding"),
        ("", {"type": "session.start", "channels": 5}, "channels"),
        ("", {"type": "session.start", "hangover": 100}, "hangover_ms"),
        ("?hangover_ms=5000", None, "max_segment_ms"),  # valid alone, clashes with the segmenter
    ],
)
def test_invalid_config_is_an_error_then_close_4001(query, first, expected):
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with connect(url(gw, query)) as ws:
                if first is not None:
                    assert json.loads(await ws.recv())["type"] == "session.started"
                    await ws.send(json.dumps(first))
                error = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                return error, ws.close_code

    error, code = asyncio.run(main())
    assert error["type"] == "error" and error["code"] == "invalid_config"
    assert expected in error["message"] and code == 4001


def test_session_start_before_audio_reconfigures():
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                await ws.send(
                    json.dumps(
                        {
                            "type": "session.start",
                            "config": {"encoding": "mulaw", "sample_rate": 8000},
                        }
                    )
                )
                again = json.loads(await ws.recv())
                await ws.send(b"\xff" * 800)
                await ws.send(json.dumps({"type": "session.start"}))
                error = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                return again, error, ws.close_code

    again, error, code = asyncio.run(main())
    assert again["type"] == "session.started"
    assert again["config"]["encoding"] == "mulaw" and again["config"]["sample_rate"] == 8000
    assert error["code"] == "invalid_sequence" and code == 4002


def test_frame_over_the_limit_closes_1009():
    async def main():
        async with running(gateway_config(max_frame_bytes=4096), EchoEngine()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                await ws.send(b"\x00" * 8192)
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                return closed.value.rcvd.code

    assert asyncio.run(main()) == 1009


def test_session_cap_refuses_with_503_and_retry_after():
    async def main():
        async with running(gateway_config(max_sessions=1), EchoEngine()) as gw:
            async with connect(url(gw)) as first:
                await first.recv()
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(url(gw)):
                        pass
                ready = await http_get(gw.port, "/readyz")
            response = refused.value.response
            return response.status_code, response.headers.get("Retry-After"), ready[0]

    status, retry_after, ready = asyncio.run(main())
    assert status == 503 and int(retry_after) > 0 and ready == 503


def test_api_key_required_when_configured():
    async def main():
        async with running(gateway_config(api_keys="k1,k2"), EchoEngine()) as gw:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url(gw)):
                    pass
            async with connect(url(gw), additional_headers={"Authorization": "Bearer k2"}) as ws:
                ok = json.loads(await ws.recv())["type"]
            return refused.value.response.status_code, ok

    assert asyncio.run(main()) == (401, "session.started")


def test_idle_timeout_flushes_and_closes(speech):
    async def main():
        async with running(gateway_config(idle_timeout_s=1.0), EchoEngine()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                await send_audio(ws, speech[0][: RATE * 2])  # speech still open
                messages = await collect(ws, timeout_s=20)
                await ws.wait_closed()
                return messages, ws.close_code

    messages, code = asyncio.run(main())
    kinds = [m["type"] for m in messages]
    assert "transcript.final" in kinds and kinds[-1] == "session.closed"
    error = next(m for m in messages if m["type"] == "error")
    assert error["code"] == "idle_timeout" and code == 1000


def test_engine_failure_reaches_only_its_session(speech):
    async def main():
        engine = EchoEngine(fail=True)
        async with running(gateway_config(), engine) as gw:
            async with connect(url(gw, "?interim_results=false")) as ws:
                await ws.recv()
                await send_audio(ws, joined(speech[:1]))
                await ws.send(json.dumps({"type": "close"}))
                messages = await collect(ws)
            engine.fail = False
            async with connect(url(gw, "?interim_results=false")) as ws:
                await ws.recv()
                await send_audio(ws, joined(speech[:1]))
                await ws.send(json.dumps({"type": "close"}))
                healthy = await collect(ws)
        return messages, healthy

    messages, healthy = asyncio.run(main())
    errors = [m for m in messages if m["type"] == "error"]
    assert errors and errors[0]["code"] == "engine_error" and "exploded" in errors[0]["message"]
    assert messages[-1]["type"] == "session.closed"
    assert [m["type"] for m in healthy].count("transcript.final") == 1


def test_drain_delivers_finals_then_closes_1001(speech):
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                await send_audio(ws, speech[0][: RATE * 3])  # mid-utterance
                drain = asyncio.create_task(gw.drain())
                messages = await collect(ws)
                await ws.wait_closed()
                await drain
                return messages, ws.close_code

    messages, code = asyncio.run(main())
    kinds = [m["type"] for m in messages]
    assert "transcript.final" in kinds and kinds[-1] == "session.closed"
    assert messages[-1]["reason"] == "shutdown" and code == 1001


def test_abrupt_disconnect_frees_the_session(speech):
    """Without session resume (server.resume_window_s 0; see test_resume.py for it)."""

    async def main():
        async with running(gateway_config(resume_window_s=0), EchoEngine(delay_s=0.05)) as gw:
            ws = await connect(url(gw))
            await ws.recv()
            await send_audio(ws, speech[0][: RATE * 2])
            ws.transport.abort()
            for _ in range(100):
                if not gw.connections:
                    break
                await asyncio.sleep(0.05)
            return len(gw.connections), gw.scheduler.queue_lengths()

    connections, queues = asyncio.run(main())
    assert connections == 0 and queues["partial"] == 0


class StuckSocket:
    """A peer that never reads: every send waits until the connection is cut."""

    def __init__(self) -> None:
        self.transport = self
        self.aborted = False
        self.cut = asyncio.Event()

    async def recv(self):
        await asyncio.Event().wait()

    async def send(self, frame) -> None:
        await self.cut.wait()
        raise ConnectionClosed(None, None)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await asyncio.Event().wait()

    async def wait_closed(self) -> None:
        await asyncio.Event().wait()

    def abort(self) -> None:
        self.aborted = True
        self.cut.set()


def test_client_that_stops_reading_is_dropped():
    """A send that waits longer than the idle timeout means the client stopped reading: the
    connection is cut (not buffered without bound) and its session freed (at once without a
    resume window; after it with one, see test_resume.py)."""
    from engine.scheduler import Scheduler
    from streaming.dialects.native import NativeDialect
    from streaming.ops.metrics import Metrics
    from streaming.transport.websocket import Connection

    async def main():
        ws, metrics = StuckSocket(), Metrics()
        config = gateway_config(idle_timeout_s=0.2, resume_window_s=0)
        conn = Connection(ws, NativeDialect(), {}, config, Scheduler(EchoEngine()), metrics)

        async def watchdog():  # the server's part: look at the connection now and then
            while True:
                await asyncio.sleep(0.05)
                conn.watch()

        watching = asyncio.create_task(watchdog())
        await asyncio.wait_for(conn.run(), 5)
        watching.cancel()
        return ws.aborted, conn.finished.is_set(), metrics.render().decode()

    aborted, finished, metrics = asyncio.run(main())
    assert aborted and finished
    assert 'streamscribe_errors_total{code="slow_client"} 1.0' in metrics


def test_audio_faster_than_real_time_is_held_back_not_buffered(speech):
    """With a slow engine, a client blasting audio is read only as fast as finals come back."""

    async def main():
        config = gateway_config(max_pending_finals=1)
        async with running(config, EchoEngine(delay_s=0.3)) as gw:
            peak = 0

            async def watch():
                nonlocal peak
                while True:
                    for conn in list(gw.connections):
                        if conn.session is not None:
                            peak = max(peak, conn.session.pending_finals)
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch())
            async with connect(url(gw, "?interim_results=false")) as ws:
                await ws.recv()
                await send_audio(ws, joined(speech * 2, silence_s=1.0))
                await ws.send(json.dumps({"type": "close"}))
                messages = await collect(ws)
            watcher.cancel()
            return peak, messages

    peak, messages = asyncio.run(main())
    assert peak == 1
    assert [m["type"] for m in messages].count("transcript.final") == 4


def test_status_reports_lag_when_the_engine_falls_behind(speech):
    async def main():
        config = gateway_config(status_lag_ms=100.0)
        async with running(config, EchoEngine(delay_s=2.0)) as gw:
            async with connect(url(gw, "?interim_results=false")) as ws:
                await ws.recv()
                for clip in speech * 2:  # each final arrives while the previous one computes
                    await send_audio(ws, joined([clip], silence_s=0.6))
                    await asyncio.sleep(0.3)
                for _ in range(50):  # keep audio flowing: the backlog is checked once a second
                    await ws.send(b"\x00\x00" * 1600)
                    await asyncio.sleep(0.05)
                await ws.send(json.dumps({"type": "close"}))
                return await collect(ws)

    messages = asyncio.run(main())
    statuses = [m for m in messages if m["type"] == "status"]
    assert statuses and statuses[0]["lag_ms"] >= 100 and statuses[0]["queued_audio_ms"] > 0
    assert [m["type"] for m in messages].count("transcript.final") == 4


def test_repeated_query_parameters_are_joined():
    from streaming.server import _query

    assert _query("keyterm=a+b&keyterm=c&x=1") == {"keyterm": "a b,c", "x": "1"}


def test_paced_audio_takes_the_fast_path_in_order_with_control_messages(speech, monkeypatch):
    # Frames that arrive one at a time are fed to the session as they are parsed (no recv()),
    # yet a control message between them still applies exactly where it was sent.
    from streaming.transport.websocket import Connection

    taken = []
    take = Connection._take_frame

    def counting(self, data):
        result = take(self, data)
        taken.append(result)
        return result

    monkeypatch.setattr(Connection, "_take_frame", counting)
    first, second = speech

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                await send_audio(ws, first[: RATE * 2], pace=10)  # mid-utterance
                await ws.send(json.dumps({"type": "finalize"}))
                await send_audio(ws, second, pace=10)
                await ws.send(json.dumps({"type": "close"}))
                return await collect(ws)

    messages = asyncio.run(main())
    assert taken.count(True) >= 10  # of 20 + ~25 frames (frames that bunch up take recv())
    seqs = [m["seq"] for m in messages]
    assert seqs == sorted(seqs)
    finals = [m for m in messages if m["type"] == "transcript.final"]
    assert len(finals) == 2 and finals[0]["from_finalize"]
    assert finals[0]["end_ms"] == 2000 <= finals[1]["start_ms"]  # cut exactly at the finalize
    kinds = [m["type"] for m in messages]
    assert kinds.index("transcript.partial") < kinds.index("transcript.final")
    assert kinds[-1] == "session.closed"


def test_deeply_nested_json_is_an_error_not_1011():
    """50,000 nested brackets in one text frame: an error, the stream goes on, and so does the
    next one (json.loads alone raises RecursionError, which closed the stream with 1011)."""

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                await ws.send("[" * 50_000 + "]" * 50_000)
                error = json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "close"}))
                closed = await collect(ws)
                first_code = ws.close_code
            async with connect(url(gw)) as ws:
                started = json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "close"}))
                again = await collect(ws)
        return error, closed, first_code, started, again

    error, closed, first_code, started, again = asyncio.run(main())
    assert (error["type"], error["code"]) == ("error", "bad_json")
    assert closed[-1]["type"] == "session.closed" and first_code != 1011
    assert started["type"] == "session.started" and again[-1]["type"] == "session.closed"


@pytest.mark.parametrize("name", ["a" * 5000 + ".js", "a" * 300 + ".css"])
def test_web_names_that_are_not_plain_short_file_names_are_404(name):
    """A 5,000-character name made is_file() raise (ENAMETOOLONG): a 500 before."""

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            return await http_get(gw.port, "/web/" + name), await http_get(gw.port, "/web/app.js")

    (status, _, _), (good, _, _) = asyncio.run(main())
    assert status == 404 and good == 200

"""The OpenAI Realtime transcription WebSocket (/v1/realtime) with real speech: every server event
is checked against the official `openai` package's models (GA, and beta for the beta session)."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from openai.types.beta.realtime.transcription_session_update import (
    Session as BetaTranscriptionSession,
)
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter
from websockets.asyncio.client import connect

from engine.audio import resample
from streaming.core.audio import encode_alaw, encode_mulaw
from tests.gateway_harness import EchoEngine, gateway_config, running
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le

SERVER_EVENTS = TypeAdapter(RealtimeServerEvent)
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
FAILED = "conversation.item.input_audio_transcription.failed"


class HotwordEcho(EchoEngine):
    """EchoEngine that remembers the hotwords of each final."""

    def __init__(self) -> None:
        super().__init__()
        self.hotwords: list[tuple[str, ...]] = []

    def transcribe(self, segments):
        self.hotwords += [s.hotwords for s in segments]
        return super().transcribe(segments)


@pytest.fixture(scope="module")
def speech():
    return [audio for _, audio, _ in librivox_clips()[:2]]


def pcm24k(audio: np.ndarray) -> bytes:
    return to_s16le(resample(audio, RATE, 24000))


def validated(message: dict) -> dict:
    """The event, after checking it against the openai package's model of its type."""
    if message["type"] == "transcription_session.updated":  # beta: the session's own model
        assert set(message) == {"event_id", "type", "session"}
        BetaTranscriptionSession.model_validate(message["session"], strict=False)
    else:
        model = SERVER_EVENTS.validate_python(message)
        assert model.type == message["type"]
    assert message["event_id"].startswith("event_")
    return message


def update(session: dict, kind: str = "session.update", **extra) -> str:
    return json.dumps({"type": kind, "session": session, **extra})


def ga_session(fmt: dict, turn_detection: dict | None, **transcription) -> dict:
    return {
        "type": "transcription",
        "audio": {
            "input": {
                "format": fmt,
                "transcription": {"model": "gpt-4o-transcribe", **transcription},
                "turn_detection": turn_detection,
            }
        },
    }


async def send_audio(ws, data: bytes, chunk_bytes: int, pause_s: float = 0.0) -> None:
    for chunk in chunks(data, chunk_bytes):
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": _b64(chunk)}))
        if pause_s:
            await asyncio.sleep(pause_s)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def receive(ws, until, timeout_s: float = 30.0) -> list[dict]:
    """Validated events until `until(events)` is true."""
    events: list[dict] = []
    async with asyncio.timeout(timeout_s):
        while not until(events):
            events.append(validated(json.loads(await ws.recv())))
    return events


def completed(count: int):
    return lambda events: sum(e["type"] == COMPLETED for e in events) >= count


def last_is(kind: str):
    return lambda events: bool(events) and events[-1]["type"] == kind


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


def check_items(events: list[dict]) -> list[dict]:
    """Each completed item: its deltas concatenate to its transcript; returns completions."""
    done = of_type(events, COMPLETED)
    for item in done:
        deltas = [e["delta"] for e in of_type(events, DELTA) if e["item_id"] == item["item_id"]]
        assert "".join(deltas) == item["transcript"]
        assert item["content_index"] == 0 and item["usage"]["type"] == "duration"
    return done


def url(gw) -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/realtime?intent=transcription"


def test_server_vad_turns_pcm16_24k(speech):
    engine = HotwordEcho()

    async def main():
        async with running(gateway_config(http_port=-1), engine) as gw:
            async with connect(url(gw)) as ws:
                created = validated(json.loads(await ws.recv()))
                session = ga_session(
                    {"type": "audio/pcm", "rate": 24000},
                    {"type": "server_vad", "silence_duration_ms": 600, "prefix_padding_ms": 200},
                    language="en",
                    prompt="LibriVox",
                )
                await ws.send(update(session))
                updated = validated(json.loads(await ws.recv()))
                await send_audio(ws, pcm24k(joined(speech)), 4800)  # 100 ms frames
                return created, updated, await receive(ws, completed(2))

    created, updated, events = asyncio.run(main())
    assert created["type"] == "session.created"
    assert created["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    turn = updated["session"]["audio"]["input"]["turn_detection"]
    assert turn == {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 200,
        "silence_duration_ms": 600,
    }
    assert updated["session"]["audio"]["input"]["transcription"]["prompt"] == "LibriVox"
    started = of_type(events, "input_audio_buffer.speech_started")
    stopped = of_type(events, "input_audio_buffer.speech_stopped")
    committed = of_type(events, "input_audio_buffer.committed")
    done = check_items(events)
    items = [e["item_id"] for e in started]
    assert len(items) == 2 and len(set(items)) == 2
    assert [e["item_id"] for e in stopped] == items == [e["item_id"] for e in committed]
    assert sorted(e["item_id"] for e in done) == sorted(items)
    assert [e["previous_item_id"] for e in committed] == [None, items[0]]
    # joined(): 2 s of silence, a clip, 2 s, a clip, 2 s.
    first_clip_ms = len(speech[0]) * 1000 // RATE
    assert 1700 <= started[0]["audio_start_ms"] <= 2500
    assert started[0]["audio_start_ms"] < stopped[0]["audio_end_ms"] <= 2000 + first_clip_ms + 200
    for item in done:
        assert item["transcript"].startswith("w0 w1 w2")
    assert all(words == ("LibriVox",) for words in engine.hotwords)
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)


def test_commit_without_vad_mulaw_beta_session(speech):
    async def main():
        async with running(gateway_config(http_port=-1), EchoEngine()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                beta = {"input_audio_format": "g711_ulaw", "turn_detection": None}
                await ws.send(update(beta, "transcription_session.update"))
                updated = validated(json.loads(await ws.recv()))
                audio = resample(joined(speech, silence_s=0.8), RATE, 8000)
                await send_audio(ws, encode_mulaw(audio), 1600)  # 200 ms frames
                await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                events = await receive(ws, completed(1))
                await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c2"}))
                error = validated(json.loads(await ws.recv()))
                return updated, events, error

    updated, events, error = asyncio.run(main())
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["input_audio_format"] == "g711_ulaw"
    assert updated["session"]["turn_detection"] is None
    assert not of_type(events, "input_audio_buffer.speech_started")
    assert not of_type(events, "input_audio_buffer.speech_stopped")
    (committed,) = of_type(events, "input_audio_buffer.committed")
    (done,) = check_items(events)
    assert done["item_id"] == committed["item_id"]
    # Both clips are in the one committed turn (the VAD's pause between them does not split it).
    words = done["transcript"].split()
    assert words.count("w0") == 2
    total_ms = sum(len(clip) for clip in speech) * 1000 / RATE
    assert done["usage"]["seconds"] >= total_ms / 1000
    assert error["error"]["code"] == "input_audio_buffer_commit_empty"
    assert error["error"]["event_id"] == "c2"


def test_clear_drops_the_open_turn_alaw(speech):
    clip = speech[0]
    quiet = np.zeros(RATE // 2, np.float32)

    def alaw(audio):
        return encode_alaw(resample(audio, RATE, 8000))

    async def main():
        async with running(gateway_config(http_port=-1), EchoEngine()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                await ws.send(update(ga_session({"type": "audio/pcma"}, {"type": "server_vad"})))
                await ws.recv()
                # 5x real time: partials computed, not all superseded, so words get committed
                await send_audio(ws, alaw(np.concatenate([quiet, clip[: RATE * 2]])), 800, 0.02)
                first = await receive(ws, lambda es: bool(of_type(es, DELTA)))
                await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
                cleared = await receive(ws, last_is("input_audio_buffer.cleared"))
                await send_audio(ws, alaw(np.concatenate([quiet, clip, quiet, quiet])), 800)
                later = await receive(ws, completed(1))
                return first, cleared, later

    first, cleared, later = asyncio.run(main())
    dropped = of_type(first, "input_audio_buffer.speech_started")[0]["item_id"]
    assert cleared[-1]["type"] == "input_audio_buffer.cleared"
    # The dropped turn is never stopped, committed or completed.
    about_dropped = {e["type"] for e in first + cleared + later if e.get("item_id") == dropped}
    assert about_dropped <= {"input_audio_buffer.speech_started", DELTA}
    (done,) = check_items(later)
    assert done["item_id"] != dropped
    assert len(done["transcript"].split()) >= len(clip) * 1000 // RATE // 300


def test_bad_input_gets_error_events_and_the_session_goes_on(speech):
    bad = [
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"type": "response.create", "event_id": "e1"}),
        json.dumps({"type": "input_audio_buffer.append", "audio": "%%% not base64"}),
        json.dumps({"type": "input_audio_buffer.append"}),
        update({"input_audio_format": "mp3"}, "transcription_session.update"),
        update(ga_session({"type": "audio/pcm", "rate": 16000}, None)),
        update(ga_session({"type": "audio/pcm"}, {"type": "semantic_vad"})),
        update(ga_session({"type": "audio/pcm"}, {"type": "server_vad", "threshold": 2})),
        update(ga_session({"type": "audio/pcm"}, {"silence_duration_ms": 50})),
        update({"type": "realtime"}),
        json.dumps({"type": "input_audio_buffer.commit", "event_id": "e2"}),
    ]

    async def main():
        async with running(gateway_config(http_port=-1), EchoEngine()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                errors = []
                for message in bad:
                    await ws.send(message)
                    errors.append(validated(json.loads(await ws.recv())))
                await ws.send(b"\x00\x01")
                errors.append(validated(json.loads(await ws.recv())))
                await send_audio(ws, pcm24k(speech[0][:RATE]), 4800)
                await ws.send(update(ga_session({"type": "audio/pcmu"}, {"type": "server_vad"})))
                errors += of_type(await receive(ws, last_is("error")), "error")
                await ws.send(update(ga_session({"type": "audio/pcm"}, None, language="de")))
                updated = (await receive(ws, last_is("session.updated")))[-1]
                return errors, updated

    errors, updated = asyncio.run(main())
    assert [e["type"] for e in errors] == ["error"] * len(errors), errors
    codes = [e["error"]["code"] for e in errors]
    assert codes[:3] == ["invalid_json", "invalid_event", "invalid_event"]
    assert codes[3:11] == ["invalid_value"] * 8
    assert codes[11:] == ["input_audio_buffer_commit_empty", "invalid_event", "invalid_value"]
    assert (
        errors[2]["error"]["event_id"] == "e1"
        and "response.create" in errors[2]["error"]["message"]
    )
    assert errors[11]["error"]["event_id"] == "e2"
    assert "silence_duration_ms" in errors[9]["error"]["message"]
    assert "once audio has been appended" in errors[13]["error"]["message"]
    # A change that may happen mid-stream is answered with the effective session.
    assert updated["type"] == "session.updated"
    assert updated["session"]["audio"]["input"]["transcription"]["language"] == "de"
    assert updated["session"]["audio"]["input"]["turn_detection"] is None


def test_drain_delivers_the_open_turn_without_vad(speech):
    async def main():
        async with running(gateway_config(http_port=-1), EchoEngine()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                await ws.send(update(ga_session({"type": "audio/pcm"}, None)))
                await ws.recv()
                await send_audio(ws, pcm24k(speech[0]), 4800)
                await asyncio.sleep(0.5)  # the audio is read before the drain begins
                drain = asyncio.create_task(gw.drain())
                events = [validated(json.loads(raw)) async for raw in ws]
                await drain
                return events, ws.close_code

    events, close_code = asyncio.run(main())
    assert close_code == 1001
    (done,) = check_items(events)
    assert done["transcript"].startswith("w0")
    assert of_type(events, "input_audio_buffer.committed")[0]["item_id"] == done["item_id"]


def test_engine_failure_fails_the_item(speech):
    async def main():
        async with running(gateway_config(http_port=-1), EchoEngine(fail=True)) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                await send_audio(ws, pcm24k(joined(speech[:1])), 4800)
                return await receive(ws, last_is(FAILED))

    events = asyncio.run(main())
    (failed,) = of_type(events, FAILED)
    (committed,) = of_type(events, "input_audio_buffer.committed")
    assert failed["item_id"] == committed["item_id"] and failed["content_index"] == 0
    assert (
        failed["error"]["type"] == "server_error"
        and "engine exploded" in failed["error"]["message"]
    )
    assert not of_type(events, COMPLETED)


def test_deltas_go_on_after_the_last_sent_word_the_final_still_has():
    """Sans-I/O: stable words go out as deltas; a final that disagrees with them neither
    repeats a sent word nor loses a word after the last one it still has (counting words
    would have sent "Dashwood had then" again)."""
    from engine.api import Word
    from streaming.core.events import FinalTranscript, Latency, PartialTranscript, SpeechStarted
    from streaming.dialects.openai_realtime import OpenAIRealtimeDialect

    def timed(text: str, start_ms: int = 0) -> list[Word]:
        return [
            Word(w, start_ms + 300 * i, start_ms + 300 * i + 250, 0.9)
            for i, w in enumerate(text.split())
        ]

    dialect = OpenAIRealtimeDialect()
    dialect.vad = True
    sent: list[str] = []
    for event in [
        SpeechStarted(0, 0, 0),
        PartialTranscript(0, 0, 1, 0, 1200, "John Dashwood", "had", timed("John Dashwood had")),
        PartialTranscript(
            0, 0, 2, 0, 1500, "John Dashwood had", "then", timed("John Dashwood had then")
        ),
        # the final found two words before the sent ones, and one after them
        FinalTranscript(
            0,
            0,
            0,
            2000,
            "And Mr. John Dashwood had then",
            timed("And Mr. John Dashwood had then"),
            0.9,
            Latency(0, 0, 0),
            "endpoint",
        ),
    ]:
        sent += [json.loads(m)["delta"] for m in dialect.encode(event) if DELTA in m]
    assert "".join(sent).split() == ["John", "Dashwood", "had", "then"]


def test_a_language_the_model_lacks_gets_an_error_event(speech):
    """Before the first append the session is made anew, so a refusal ends it (4001); later
    it is an error the session survives, keeping its language (no session.updated for it)."""
    from websockets.exceptions import ConnectionClosed

    class English(EchoEngine):
        languages = frozenset({"en"})

    french = update(ga_session({"type": "audio/pcm"}, None, language="fr"))

    async def main():
        async with running(gateway_config(http_port=-1), English()) as gw:
            async with connect(url(gw)) as ws:
                await ws.recv()
                await ws.send(french)
                before = await receive(ws, last_is("error"))
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                code = ws.close_code
            async with connect(url(gw)) as ws:
                await ws.recv()
                await send_audio(ws, pcm24k(speech[0][:RATE]), 4800)
                await ws.send(french)
                await ws.send(update(ga_session({"type": "audio/pcm"}, None, language="en-GB")))
                after = await receive(ws, last_is("session.updated"))
        return before, code, after

    before, code, after = asyncio.run(main())
    for events in (before, after):
        (error,) = of_type(events, "error")
        assert error["error"]["code"] == "invalid_config"
        assert "'fr'" in error["error"]["message"]
        assert error["error"]["message"].endswith("languages: en")
    assert code == 4001
    assert len(of_type(after, "session.updated")) == 1
    assert after[-1]["session"]["audio"]["input"]["transcription"]["language"] == "en-GB"

"""The Deepgram-compatible endpoint /v1/listen, driven by the official `deepgram-sdk` client (and
by plain WebSockets where the SDK cannot send what a test needs) against a loopback gateway."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json

import numpy as np
import pytest
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.types import (
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streaming.core.audio import StreamResampler, encode_alaw, encode_mulaw
from streaming.dialects.deepgram import ParamError, UtteranceEnds, parse_params
from tests.gateway_harness import EchoEngine, gateway_config, running
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le

# The SDK's async client still uses websockets' legacy API.
pytestmark = [
    pytest.mark.filterwarnings("ignore:websockets.legacy is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:websockets.exceptions.InvalidStatusCode:DeprecationWarning"),
]
KEY = "dg-test-key"
PAD_S = 0.3  # the session's default speech padding


@pytest.fixture(scope="module")
def speech():
    return [audio for _, audio, _ in librivox_clips()[:2]]


@contextlib.asynccontextmanager
async def listen(gw, key: str = KEY, **params):
    """The SDK's live client, pointed at the in-process gateway."""
    host = f"127.0.0.1:{gw.port}"
    environment = DeepgramClientEnvironment(
        base=f"http://{host}", production=f"ws://{host}", agent=f"ws://{host}", agent_rest=""
    )
    client = AsyncDeepgramClient(api_key=key, environment=environment)
    async with client.listen.v1.connect(model="nova-3", **params) as socket:
        yield socket


async def send_pcm(socket, data: bytes, frame_bytes: int = RATE * 2 // 10, pace_s=0.0) -> None:
    for chunk in chunks(data, frame_bytes):
        await socket.send_media(chunk)
        if pace_s:
            await asyncio.sleep(pace_s)


async def drain(socket, timeout_s: float = 60.0) -> list:
    """Every message until the server closes the stream; the SDK's iteration ends without an
    error only on a normal close."""
    async with asyncio.timeout(timeout_s):
        return [message async for message in socket]


async def read_until(socket, done, timeout_s: float = 30.0) -> list:
    messages = []
    async with asyncio.timeout(timeout_s):
        while not messages or not done(messages[-1]):
            messages.append(await socket.recv())
    return messages


def spans(seconds: float, clip_s: float) -> bool:
    """A segment's length fits the clip's: its speech, give or take the clip's quiet ends, plus
    the padding on both sides."""
    return clip_s - 1.0 <= seconds <= clip_s + 2 * PAD_S


def finals(messages) -> list:
    return [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]


def url(gw, query: str = "") -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/listen{query}"


def native_url(gw) -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/stream"


async def raw_until(ws, kind: str, timeout_s: float = 30.0) -> list[dict]:
    messages = []
    async with asyncio.timeout(timeout_s):
        async for raw in ws:
            messages.append(json.loads(raw))
            if messages[-1]["type"] == kind:
                break
    return messages


# --- the official client ------------------------------------------------------------------------


def test_live_stream_with_the_sdk(speech):
    audio = to_s16le(joined(speech))

    async def main():
        async with running(gateway_config(api_keys=KEY), EchoEngine()) as gw:
            async with listen(
                gw,
                encoding="linear16",
                sample_rate=16000,
                interim_results="true",
                vad_events="true",
                utterance_end_ms="1000",
                endpointing=300,
                punctuate="true",
                smart_format="true",
                language="en-US",
            ) as socket:
                await send_pcm(socket, audio, pace_s=0.01)  # 10x real time: room for partials
                await socket.send_close_stream()
                return await drain(socket)

    messages = asyncio.run(main())
    kinds = (ListenV1Results, ListenV1SpeechStarted, ListenV1UtteranceEnd, ListenV1Metadata)
    assert all(isinstance(m, kinds) for m in messages), messages
    starts = [RATE * 2, RATE * 2 + len(speech[0]) + RATE * 2]  # clip onsets, in samples
    done = finals(messages)
    assert len(done) == 2
    for final, onset in zip(done, starts, strict=True):
        assert final.speech_final and not final.from_finalize and final.channel_index == [0, 1]
        assert isinstance(final.start, float) and isinstance(final.duration, float)
        assert onset / RATE - PAD_S - 0.1 <= final.start <= onset / RATE
        alternative = final.channel.alternatives[0]
        assert alternative.transcript and 0 < alternative.confidence <= 1
        words = alternative.words
        assert [w.word for w in words] == alternative.transcript.split()
        assert all(w.punctuated_word and 0 < w.confidence <= 1 for w in words)
        assert final.start <= words[0].start < words[-1].end <= final.start + final.duration
    first = messages.index(done[0])
    interim = [m for m in messages[:first] if isinstance(m, ListenV1Results)]
    assert interim and not any(m.is_final or m.speech_final for m in interim)
    assert all(m.channel.alternatives[0].transcript for m in interim)

    started = [m for m in messages if isinstance(m, ListenV1SpeechStarted)]
    assert [s.channel for s in started] == [[0, 1], [0, 1]]
    for event, onset in zip(started, starts, strict=True):
        assert 0 <= event.timestamp - onset / RATE < 0.5  # the clips open with a breath
    ends = [m for m in messages if isinstance(m, ListenV1UtteranceEnd)]
    assert [e.last_word_end for e in ends] == [
        f.channel.alternatives[0].words[-1].end for f in done
    ]
    assert all(e.channel == [0, 1] for e in ends)
    bounds = [messages.index(m) for m in (*done, messages[-1])]
    for i, end in enumerate(ends):  # after its final, before the next one
        assert bounds[i] < messages.index(end) < bounds[i + 1]

    metadata = messages[-1]
    assert isinstance(metadata, ListenV1Metadata)
    assert metadata.request_id == done[0].metadata.request_id
    assert metadata.channels == 1 and metadata.sha256 == hashlib.sha256(audio).hexdigest()
    assert metadata.duration == pytest.approx(len(audio) / 2 / RATE, abs=0.01)


def test_utterance_end_comes_in_the_silence_without_waiting_for_an_event(speech):
    # A voice bot ends its turn on UtteranceEnd: it must come once the silence has lasted
    # utterance_end_ms of audio, while the stream goes on, not with the next speech.
    audio = to_s16le(np.concatenate([speech[0], np.zeros(RATE * 3, np.float32)]))

    async def main():
        async with running(gateway_config(api_keys=KEY), EchoEngine()) as gw:
            async with listen(
                gw, encoding="linear16", sample_rate=16000, utterance_end_ms="1000"
            ) as socket:
                await send_pcm(socket, audio, pace_s=0.01)
                messages = await read_until(socket, lambda m: isinstance(m, ListenV1UtteranceEnd))
                await socket.send_close_stream()
                return messages + await drain(socket)

    messages = asyncio.run(main())
    (final,) = finals(messages)
    end = next(m for m in messages if isinstance(m, ListenV1UtteranceEnd))
    assert messages.index(end) > messages.index(final)
    assert end.last_word_end == final.channel.alternatives[0].words[-1].end
    assert isinstance(messages[-1], ListenV1Metadata)  # the stream was still open for it


def test_interim_results_off_by_default_and_endpointing_false(speech):
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with listen(gw, encoding="linear16", sample_rate=16000) as socket:
                await send_pcm(socket, to_s16le(joined(speech)))
                await socket.send_close_stream()
                default = await drain(socket)
            async with connect(url(gw, "?interim_results=FALSE&endpointing=false")) as ws:
                for chunk in chunks(to_s16le(joined(speech)), 3200):
                    await ws.send(chunk)
                await ws.send(json.dumps({"type": "CloseStream"}))
                off = await raw_until(ws, "Metadata")
        return default, off

    default, off = asyncio.run(main())
    results = [m for m in default if isinstance(m, ListenV1Results)]
    assert len(results) == 2 and all(m.is_final and m.speech_final for m in results)
    assert not any(isinstance(m, (ListenV1SpeechStarted, ListenV1UtteranceEnd)) for m in default)
    results = [m for m in off if m["type"] == "Results"]
    assert len(results) == 2 and all(m["is_final"] and not m["speech_final"] for m in results)


def test_finalize_then_close_stream(speech):
    clip = to_s16le(speech[0])
    half = len(clip) // 2 // 2 * 2

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with listen(gw, encoding="linear16", sample_rate=16000) as socket:
                await send_pcm(socket, to_s16le(np.zeros(RATE, np.float32)) + clip[:half])
                await socket.send_finalize()
                forced = await read_until(socket, lambda m: isinstance(m, ListenV1Results))
                await send_pcm(socket, clip[half:] + to_s16le(np.zeros(RATE, np.float32)))
                await send_pcm(socket, clip[:half])  # speech still open at CloseStream
                await socket.send_close_stream()
                rest = await drain(socket)
        return forced, rest

    forced, rest = asyncio.run(main())
    (result,) = forced
    assert result.is_final and result.from_finalize and not result.speech_final
    assert result.start + result.duration == pytest.approx(1 + len(clip) / 4 / RATE, abs=0.02)
    done = finals(rest)
    assert len(done) == 2
    assert done[0].speech_final and not done[0].from_finalize  # the rest of the clip
    assert done[0].start == pytest.approx(result.start + result.duration, abs=0.02)
    assert not done[1].speech_final  # flushed by CloseStream
    assert isinstance(rest[-1], ListenV1Metadata) and len(rest) == 3


def test_close_stream_and_empty_frame_close_with_1000(speech):
    async def main():
        codes = []
        async with running(gateway_config(), EchoEngine()) as gw:
            for close in (json.dumps({"type": "CloseStream"}), b""):
                async with connect(url(gw, "?encoding=linear16&sample_rate=16000")) as ws:
                    for chunk in chunks(to_s16le(speech[0][: RATE * 2]), 3200):
                        await ws.send(chunk)
                    await ws.send(close)
                    messages = await raw_until(ws, "Metadata")
                    await ws.wait_closed()
                    codes.append((messages[-2]["type"], messages[-1]["type"], ws.close_code))
        return codes

    assert asyncio.run(main()) == [("Results", "Metadata", 1000)] * 2


def test_multichannel(speech):
    """Two clips, one per channel, overlapping in time: multichannel=true transcribes each
    channel on its own; multichannel=false transcribes their mix."""
    a, b = speech
    assert len(a) > RATE * 6 and len(b) > RATE * 2  # b starts before a ends, ends after it
    stereo = np.zeros((RATE * 6 + len(b) + RATE * 2, 2), np.float32)
    stereo[RATE : RATE + len(a), 0] = a
    stereo[RATE * 6 : RATE * 6 + len(b), 1] = b
    data = to_s16le(stereo.reshape(-1))

    async def main():
        out = []
        async with running(gateway_config(), EchoEngine()) as gw:
            for multichannel in ("true", "false"):
                params = dict(encoding="linear16", sample_rate=16000, channels=2)
                async with listen(gw, multichannel=multichannel, **params) as socket:
                    await send_pcm(socket, data, RATE * 4 // 10)
                    await socket.send_close_stream()
                    out.append(await drain(socket))
        return out

    separate, mixed = asyncio.run(main())
    by_channel = {tuple(f.channel_index): f for f in finals(separate)}
    assert set(by_channel) == {(0, 2), (1, 2)} and len(finals(separate)) == 2
    for final, (onset, clip) in zip(
        (by_channel[0, 2], by_channel[1, 2]), ((1, a), (6, b)), strict=True
    ):
        assert onset - PAD_S - 0.1 <= final.start <= onset
        assert spans(final.duration, len(clip) / RATE)
    assert separate[-1].channels == 2
    (whole,) = finals(mixed)  # the clips overlap: one stretch of speech in the mix
    assert whole.channel_index == [0, 1]
    assert 1 - PAD_S - 0.1 <= whole.start <= 1
    assert spans(whole.start + whole.duration - 1, 5 + len(b) / RATE)


def test_encodings_and_rates_give_the_same_segments(speech):
    """mu-law, A-law and other rates: the same speech gives the same segment times as 16 kHz
    linear16 (times are seconds of audio whatever the wire rate)."""
    audio = joined(speech[:1])
    cases = [("linear16", 16000, to_s16le), ("mulaw", 8000, encode_mulaw)]
    cases += [("alaw", 8000, encode_alaw), ("linear16", 48000, to_s16le)]

    async def main():
        out = []
        async with running(gateway_config(), EchoEngine()) as gw:
            for encoding, rate, encode in cases:
                wire = StreamResampler(RATE, rate)
                data = encode(np.concatenate((wire.feed(audio), wire.flush())))
                async with listen(gw, encoding=encoding, sample_rate=rate) as socket:
                    await send_pcm(socket, data, len(data) // 50)
                    await socket.send_close_stream()
                    out.append(await drain(socket))
        return out

    reference, *others = [(finals(m), m[-1]) for m in asyncio.run(main())]
    assert len(reference[0]) == 1 and reference[1].duration == pytest.approx(len(audio) / RATE)
    for done, metadata in others:
        assert len(done) == 1 and metadata.duration == pytest.approx(len(audio) / RATE, abs=0.01)
        assert done[0].start == pytest.approx(reference[0][0].start, abs=0.06)
        assert done[0].duration == pytest.approx(reference[0][0].duration, abs=0.06)


def test_keepalive_holds_an_idle_stream_open(speech):
    async def main():
        async with running(gateway_config(idle_timeout_s=1.0), EchoEngine()) as gw:
            async with listen(gw, encoding="linear16", sample_rate=16000) as socket:
                for _ in range(6):  # 1.8 s without audio
                    await socket.send_keep_alive()
                    await asyncio.sleep(0.3)
                await send_pcm(socket, to_s16le(joined(speech[:1])))
                await socket.send_close_stream()
                return await drain(socket)

    messages = asyncio.run(main())
    assert [type(m) for m in messages] == [ListenV1Results, ListenV1Metadata]


def test_keyterm_reaches_the_engine_as_hotwords(speech):
    class Recording(EchoEngine):
        hotwords: set = set()

        def transcribe(self, segments):
            self.hotwords.update(s.hotwords for s in segments)
            return super().transcribe(segments)

    async def main():
        engine = Recording()
        async with running(gateway_config(), engine) as gw:
            async with listen(gw, encoding="linear16", sample_rate=16000, keyterm="Dashwood") as s:
                await send_pcm(s, to_s16le(joined(speech[:1])))
                await s.send_close_stream()
                await drain(s)
        return engine.hotwords

    assert asyncio.run(main()) == {("Dashwood",)}


# --- authentication -----------------------------------------------------------------------------


def test_token_header_and_browser_subprotocol(speech):
    async def main():
        async with running(gateway_config(api_keys=f"other,{KEY}"), EchoEngine()) as gw:
            with pytest.raises(ApiError) as refused:
                async with listen(gw, key="wrong"):
                    pass
            with pytest.raises(InvalidStatus) as bad_subprotocol:
                async with connect(url(gw), subprotocols=["token", "wrong"]):
                    pass
            async with connect(url(gw), subprotocols=["token", KEY]) as ws:
                chosen = ws.subprotocol
                await ws.send(to_s16le(speech[0][:RATE]))
                await ws.send(json.dumps({"type": "CloseStream"}))
                browser = await raw_until(ws, "Metadata")
            headers = {"Authorization": f"Bearer {KEY}"}
            async with connect(native_url(gw), additional_headers=headers) as ws:
                native = (json.loads(await ws.recv())["type"], ws.subprotocol)
        return refused.value, bad_subprotocol.value, chosen, browser, native

    refused, bad_subprotocol, chosen, browser, native = asyncio.run(main())
    assert refused.status_code == 401
    assert bad_subprotocol.response.status_code == 401
    assert chosen == "token" and browser[-1]["type"] == "Metadata"
    assert native == ("session.started", None)


# --- bad input ----------------------------------------------------------------------------------


def test_bad_messages_get_errors_and_touch_no_other_stream(speech):
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with connect(url(gw)) as bad, connect(url(gw)) as good:
                for text in ("{not json", json.dumps({"type": "Dance"}), "[1, 2]"):
                    await bad.send(text)
                errors = [json.loads(await bad.recv()) for _ in range(3)]
                for ws in (bad, good):
                    for chunk in chunks(to_s16le(joined(speech[:1])), 3200):
                        await ws.send(chunk)
                    await ws.send(json.dumps({"type": "CloseStream"}))
                return errors, await raw_until(bad, "Metadata"), await raw_until(good, "Metadata")

    errors, bad, good = asyncio.run(main())
    assert [(e["type"], e["variant"]) for e in errors] == [("Error", "SchemaError")] * 3
    assert "JSON" in errors[0]["description"] and "Dance" in errors[1]["description"]
    assert [m["type"] for m in bad] == [m["type"] for m in good] == ["Results", "Metadata"]


@pytest.mark.parametrize(
    "query, named",
    [
        ("encoding=opus", "encoding"),
        ("sample_rate=11025", "sample_rate"),
        ("channels=4", "channels"),
        ("endpointing=soon", "endpointing"),
        ("interim_results=maybe", "interim_results"),
        ("utterance_end_ms=0", "utterance_end_ms"),
        ("vad_events=2", "vad_events"),
    ],
)
def test_bad_parameters_are_an_error_then_a_close(query, named):
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with connect(url(gw, f"?{query}")) as ws:
                error = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                return error, ws.close_code

    error, code = asyncio.run(main())
    assert error["type"] == "Error" and error["variant"] == "invalid_config"
    assert error["description"].startswith(f"invalid query parameter: {named}=")
    assert code == 4001


# --- parameters and utterance ends, without a server --------------------------------------------


def test_parameters_map_to_session_options():
    params = parse_params(
        {
            "encoding": "MULAW",
            "sample_rate": "8000",
            "interim_results": "True",
            "vad_events": "1",
            "multichannel": "0",
            "endpointing": "300",
            "utterance_end_ms": "1500",
            "language": "en-GB",
            "keywords": "Dashwood:2",
            "model": "nova-3",
            "smart_format": "TRUE",
            "diarize": "true",
        }
    )
    assert params.options == {
        "interim_results": True,
        "encoding": "mulaw",
        "sample_rate": 8000,
        "channels": 1,
        "hangover_ms": 300,
        "language": "en",
    }
    assert params.hotwords == ("Dashwood",) and params.vad_events and params.endpointing
    assert params.utterance_end_s == 1.5
    assert parse_params({}).options == {
        "interim_results": False,
        "encoding": "pcm_s16le",
        "sample_rate": 16000,
        "channels": 1,
    }
    assert parse_params({"endpointing": "10"}).options["hangover_ms"] == 100
    assert parse_params({"endpointing": "60000"}).options["hangover_ms"] == 4000
    off = parse_params({"endpointing": "False"})
    assert not off.endpointing and "hangover_ms" not in off.options
    mixed = parse_params({"channels": "2", "encoding": "alaw", "sample_rate": "8000"})
    assert mixed.mixed and mixed.frame_bytes == 2
    assert mixed.options | {"interim_results": False} == {
        "interim_results": False,
        "encoding": "pcm_f32le",
        "sample_rate": 16000,
        "channels": 1,
    }
    with pytest.raises(ParamError, match="multichannel"):
        parse_params({"multichannel": "yes"})


def test_utterance_end_needs_the_gap_without_new_speech():
    ends = UtteranceEnds(1.0)
    assert ends.final(0, 2.0, clock_s=2.5) == []  # not yet a second of audio after the word
    assert ends.due(2.9) == [] and ends.due(3.0) == [(0, 2.0)] and ends.due(9.0) == []
    ends.final(1, 5.0, clock_s=5.2)
    assert ends.speech(1, 5.6) == []  # speech again within the gap: the utterance goes on
    assert ends.due(99.0) == []
    ends.final(0, 7.0, clock_s=7.1)
    assert ends.speech(0, 8.5) == [(0, 7.0)]
    ends.speech(1, 11.0)  # a final whose channel already spoke again, late or soon
    assert ends.final(1, 10.5, clock_s=20.0) == []
    assert ends.final(1, 9.5, clock_s=20.0) == [(1, 9.5)]


# --- real speech --------------------------------------------------------------------------------


def test_real_speech_through_the_sdk_with_the_cpu_model():
    pytest.importorskip("faster_whisper", reason="pip install -e '.[cpu]'")
    from benchmarks.scoring import corpus_wer
    from engine.whisper import load_engine

    clips = librivox_clips()
    audio = to_s16le(joined([a for _, a, _ in clips], silence_s=1.5))

    async def main():
        async with running(gateway_config(), load_engine("tiny.en"), timeout_s=120) as gw:
            params = dict(encoding="linear16", sample_rate=16000, interim_results="true")
            async with listen(gw, **params) as socket:
                await send_pcm(socket, audio, pace_s=0.05)  # 2x real time
                await socket.send_close_stream()
                return await drain(socket, timeout_s=300)

    messages = asyncio.run(main())
    text = " ".join(f.channel.alternatives[0].transcript for f in finals(messages))
    wer = corpus_wer([" ".join(ref for _, _, ref in clips)], [text])
    assert wer <= 0.2, (wer, text)
    assert any(isinstance(m, ListenV1Results) and not m.is_final for m in messages)
    assert isinstance(messages[-1], ListenV1Metadata)


def test_a_language_the_model_lacks_is_an_error_then_a_close():
    """As for other bad parameters: the model's languages come with the refusal."""

    class English(EchoEngine):
        languages = frozenset({"en"})

    async def main():
        async with running(gateway_config(), English()) as gw:
            async with connect(url(gw, "?language=fr-CA")) as ws:
                error = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                return error, ws.close_code

    error, code = asyncio.run(main())
    assert error["type"] == "Error" and error["variant"] == "invalid_config"
    assert "'fr'" in error["description"] and error["description"].endswith("languages: en")
    assert code == 4001

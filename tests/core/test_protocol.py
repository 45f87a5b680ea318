"""The sans-I/O stream protocol driven with no socket: frames in, actions out."""

from __future__ import annotations

import dataclasses
import json
import uuid

import pytest

from engine.scheduler import Outcome
from streaming.core.close_codes import CLOSE_BAD_CONFIG, CLOSE_BAD_SEQUENCE
from streaming.core.events import FinalTranscript, SessionClosed, SessionStarted
from streaming.core.protocol import NOTHING, Actions, StreamProtocol
from streaming.dialects.audiofork import AudioForkDialect
from streaming.dialects.deepgram import DeepgramDialect
from streaming.dialects.native import NativeDialect
from streaming.ops.config import Config
from tests.core.test_session import fake_words
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le

FRAME = 3200  # 100 ms of 16-bit 16 kHz mono


@pytest.fixture(scope="module")
def speech() -> bytes:
    """One LibriVox clip between silences, as 16-bit PCM."""
    return to_s16le(joined([librivox_clips()[0][1]], silence_s=1.0))


def config(**server) -> Config:
    base = Config()
    return dataclasses.replace(base, server=dataclasses.replace(base.server, **server))


def protocol(dialect=None, query=None, now: float = 0.0, **server) -> StreamProtocol:
    dialect = dialect if dialect is not None else NativeDialect()
    return StreamProtocol(uuid.uuid4().hex, dialect, query or {}, config(**server), None, now)


def messages(actions: Actions) -> list[dict]:
    return [json.loads(frame) for frame in actions.send]


def answer(stream: StreamProtocol, actions: Actions) -> list[Actions]:
    """Each engine request of `actions` answered at once (one word per 300 ms), recursively."""
    out = [actions]
    for request in actions.submit:
        outcome = Outcome(None, "done", fake_words(request.audio), queue_ms=1, compute_ms=2)
        out += answer(stream, stream.on_result(request, outcome))
    return out


def stream_audio(stream: StreamProtocol, audio: bytes, now: float = 0.0) -> list[Actions]:
    out = []
    for frame in chunks(audio, FRAME):
        out += answer(stream, stream.receive_binary(frame, now))
    return out


def sent(actions: list[Actions]) -> list[dict]:
    return [message for step in actions for message in messages(step)]


def test_native_stream_from_start_to_close(speech):
    stream = protocol()
    opened = stream.open()
    assert [m["type"] for m in messages(opened)] == ["session.started"]
    assert stream.reading and opened.close is None and not opened.submit

    steps = stream_audio(stream, speech)
    assert any(step.submit for step in steps)  # the audio became engine requests
    steps += answer(stream, stream.receive_text(json.dumps({"type": "close"}), 1.0))
    out = sent(steps)
    kinds = [m["type"] for m in out]
    assert "transcript.partial" in kinds and kinds.count("transcript.final") == 1
    assert kinds[-1] == "session.closed"
    assert [m["seq"] for m in out] == list(range(2, len(out) + 2))  # wire order, after start
    assert [step.close for step in steps if step.close] == [(1000, "")]
    assert not stream.reading


def test_session_start_after_audio_is_a_sequence_error(speech):
    stream = protocol()
    stream.open()
    stream_audio(stream, speech[:FRAME])
    actions = stream.receive_text(json.dumps({"type": "session.start"}), 0.1)
    (error,) = messages(actions)
    assert error["type"] == "error" and error["code"] == "invalid_sequence"
    assert actions.close == (CLOSE_BAD_SEQUENCE, "invalid_sequence")
    assert not stream.reading
    assert stream.receive_binary(speech[:FRAME], 0.2) is NOTHING  # nothing more is read


def test_bad_options_close_with_4001():
    refused = protocol(query={"sample_rate": "banana"})
    actions = refused.open()
    assert messages(actions)[0]["code"] == "invalid_config"
    assert actions.close == (CLOSE_BAD_CONFIG, "invalid_config") and not refused.reading

    stream = protocol()
    stream.open()
    start = {"type": "session.start", "config": {"encoding": "ogg_vorbis"}}
    actions = stream.receive_text(json.dumps(start), 0.0)
    assert actions.close == (CLOSE_BAD_CONFIG, "invalid_config")


def test_session_start_before_audio_restarts_the_session():
    stream = protocol(query={"hotwords": "Elinor"})
    stream.open()
    start = {"type": "session.start", "config": {"sample_rate": 8000}}
    (started,) = messages(stream.receive_text(json.dumps(start), 0.0))
    assert started["type"] == "session.started" and stream.session.options.sample_rate == 8000
    assert stream.session.hotwords == ("Elinor",)  # kept from the query


def test_backpressure_pauses_then_resumes(speech):
    stream = protocol(max_pending_finals=1)
    stream.open()
    finals = []
    for frame in chunks(speech + speech, FRAME):  # held finals: pause at the first one
        actions = stream.receive_binary(frame, 0.0)
        finals += [r for r in actions.submit if r.kind == "final"]
        if finals:
            break
    assert actions.pause and stream.paused
    outcome = Outcome(None, "done", fake_words(finals[0].audio))
    resumed = stream.on_result(finals[0], outcome)
    assert not resumed.pause and not stream.paused
    assert [m["type"] for m in messages(resumed)] == ["transcript.final"]


def test_idle_timeout_and_max_duration_on_tick(speech):
    stream = protocol(now=100.0, idle_timeout_s=5.0)
    stream.open()
    stream_audio(stream, speech[: RATE * 2], now=101.0)
    assert stream.tick(105.9) is NOTHING
    actions = stream.tick(106.0)
    out = messages(actions)
    assert out[0]["type"] == "error" and out[0]["code"] == "idle_timeout"
    assert not stream.reading

    long = protocol(now=0.0, max_session_s=60.0, idle_timeout_s=100.0)
    long.open()
    long.receive_text(json.dumps({"type": "keepalive"}), 59.0)
    out = messages(long.tick(60.0))
    assert [m["type"] for m in out] == ["error", "session.closed"]
    assert out[0]["code"] == "max_duration"


def test_drain_closes_with_1001_at_the_deadline():
    stream = protocol()
    stream.open()
    stream.drain(2.0)
    assert stream.tick(1.9) is NOTHING
    actions = stream.tick(2.0)
    assert [m["type"] for m in messages(actions)] == ["session.closed"]
    assert actions.close == (1001, "")


def test_deepgram_closestream_and_empty_frame_close_the_stream(speech):
    for close in (json.dumps({"type": "CloseStream"}), b""):
        stream = protocol(DeepgramDialect(), {"encoding": "linear16", "sample_rate": "16000"})
        assert not stream.open().send  # Deepgram says nothing on start
        steps = stream_audio(stream, speech)
        receive = stream.receive_text if isinstance(close, str) else stream.receive_binary
        steps += answer(stream, receive(close, 1.0))
        out = sent(steps)
        assert any(m["type"] == "Results" and m["is_final"] for m in out)
        assert out[-1]["type"] == "Metadata"
        assert [step.close for step in steps if step.close] == [(1000, "")]


def test_telephony_dialect_publishes_to_its_call(speech):
    stream = protocol(AudioForkDialect(), {"call_id": "CA1"})
    opened = stream.open()
    assert stream.call_id == "CA1" and stream.channel_labels == ("caller",)
    assert [type(e) for e in opened.publish] == [SessionStarted]
    assert not opened.send  # the platform gets nothing back but finals
    steps = stream_audio(stream, speech[: len(speech) // 2])
    steps += answer(stream, stream.hangup())  # the platform hung up: flush for subscribers
    published = [event for step in steps for event in step.publish]
    assert any(isinstance(e, FinalTranscript) for e in published)
    assert isinstance(published[-1], SessionClosed)


def test_plain_streams_publish_nothing(speech):
    stream = protocol()
    steps = [stream.open(), *stream_audio(stream, speech)]
    assert not any(step.publish for step in steps)
    assert stream.hangup() is NOTHING  # a native stream has no hang-up: it is abandoned
    assert stream.abandon() == []  # every request was answered: nothing left to cancel


def test_status_comes_from_the_clock_when_the_client_stops_sending():
    """A client that stops sending still learns that the engine falls further behind: the
    watchdog's tick sends `status` once a second while the lag is over status_lag_ms."""
    lag = [0.0]
    stream = StreamProtocol(
        uuid.uuid4().hex,
        NativeDialect(),
        {},
        config(status_lag_ms=500.0, idle_timeout_s=60.0),
        None,
        0.0,
        backlog=lambda: (lag[0], 2000.0),
    )
    stream.open()
    stream.receive_binary(b"\x00\x00" * 1600, 0.0)  # then nothing more arrives
    sent = []
    for step in range(1, 17):  # the watchdog ticks every 0.25 s for 4 s; the lag grows
        lag[0] = step * 250.0
        sent += [(step * 0.25, m) for m in messages(stream.tick(step * 0.25))]
    statuses = [(t, m) for t, m in sent if m["type"] == "status"]
    assert [t for t, _ in statuses] == [1.0, 2.0, 3.0, 4.0]  # once a second, no more
    assert [m["lag_ms"] for _, m in statuses] == [1000, 2000, 3000, 4000]

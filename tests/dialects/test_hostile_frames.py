"""Hostile text frames, one per dialect: each is a Reject in the dialect and an error through the
stream protocol, never an exception (the gateway's close 1011)."""

from __future__ import annotations

import json
import uuid

import pytest

from streaming.core.close_codes import CLOSE_BAD_CONFIG
from streaming.core.protocol import StreamProtocol
from streaming.dialects.audiofork import AudioForkDialect
from streaming.dialects.base import MAX_JSON_DEPTH, MAX_TEXT_CHARS, BadJSON, Reject, load_json
from streaming.dialects.deepgram import DeepgramDialect
from streaming.dialects.native import NativeDialect
from streaming.dialects.openai_realtime import OpenAIRealtimeDialect
from streaming.dialects.twilio import TwilioDialect
from streaming.ops.config import Config

DEEP = "[" * 50_000 + "]" * 50_000  # json.loads: RecursionError
LONG_NUMBER = '{"type": "keepalive", "event": "start", "n": ' + "1" * 5_000 + "}"  # ValueError
JSON_ANYWHERE = [DEEP, LONG_NUMBER]  # hostile in every dialect
TWILIO_START = {"callSid": "CA1", "streamSid": "MZ1"}


def ga_update(input_config: dict) -> str:
    session = {"type": "transcription", "audio": {"input": input_config}}
    return json.dumps({"type": "session.update", "session": session})


def through_protocol(dialect, frame: str):
    """The frame through a fresh StreamProtocol: the actions, and the error frames it sent."""
    stream = StreamProtocol(uuid.uuid4().hex, dialect, {}, Config(), None, 0.0)
    stream.open()
    return stream.receive_text(frame, 1.0)


def rejects(dialect, frame: str) -> list[Reject]:
    return [c for c in dialect.on_text(frame) if isinstance(c, Reject)]


@pytest.mark.parametrize(
    "frame",
    [
        *JSON_ANYWHERE,
        '{"type": "session.start", "config": 5}',
        '{"type": "session.start", "config": [[1, 2]]}',
        '{"type": "session.update", "config": "abc"}',
    ],
)
def test_native(frame):
    assert rejects(NativeDialect(), frame)
    actions = through_protocol(NativeDialect(), frame)
    (error,) = [json.loads(m) for m in actions.send]
    assert error["type"] == "error" and error["code"] in ("bad_json", "invalid_config")
    assert actions.close is None


@pytest.mark.parametrize("frame", JSON_ANYWHERE)
def test_deepgram(frame):
    dialect = DeepgramDialect()
    dialect.opening({})
    assert rejects(dialect, frame)
    dialect = DeepgramDialect()
    actions = through_protocol(dialect, frame)
    errors = [json.loads(m) for m in actions.send if '"Error"' in m]
    assert errors and errors[0]["variant"] == "SchemaError"


@pytest.mark.parametrize(
    "frame",
    [
        *JSON_ANYWHERE,
        ga_update({"format": {"type": []}}),
        ga_update({"format": {"type": {}}}),
        ga_update({"format": []}),
        '{"type": "transcription_session.update", "session": {"input_audio_format": []}}',
        '{"type": "transcription_session.update", "session": {"input_audio_format": {}}}',
    ],
)
def test_openai_realtime(frame):
    assert rejects(OpenAIRealtimeDialect(), frame)
    actions = through_protocol(OpenAIRealtimeDialect(), frame)
    errors = [json.loads(m) for m in actions.send if '"error"' in m]
    assert errors and errors[-1]["error"]["type"] == "invalid_request_error"
    assert actions.close is None


@pytest.mark.parametrize(
    "frame, fatal",
    [
        (DEEP, False),
        (LONG_NUMBER, False),
        (json.dumps({"event": "start", "start": {**TWILIO_START, "tracks": [[1]]}}), True),
        (json.dumps({"event": "start", "start": {**TWILIO_START, "tracks": [{}]}}), True),
    ],
)
def test_twilio(frame, fatal):
    """Twilio gets nothing back (errors are logged); a bad `start` ends the stream with 4001."""
    (reject,) = rejects(TwilioDialect(), frame)
    assert (reject.close_code is not None) == fatal
    actions = through_protocol(TwilioDialect(), frame)
    assert actions.close == ((CLOSE_BAD_CONFIG, "bad_start") if fatal else None)


@pytest.mark.parametrize(
    "frame, code",
    [
        (DEEP, "bad_metadata"),
        (LONG_NUMBER, "bad_metadata"),
        ('{"mixType": []}', "invalid_config"),
        ('{"mixType": {"a": 1}}', "invalid_config"),
    ],
)
def test_audiofork_first_frame(frame, code):
    (reject,) = rejects(AudioForkDialect(), frame)
    assert reject.code == code
    actions = through_protocol(AudioForkDialect(), frame)
    (error,) = [json.loads(m) for m in actions.send]
    assert error["type"] == "error" and error["data"]["code"] == code
    assert actions.close in (None, (CLOSE_BAD_CONFIG, code))


def test_load_json_bounds():
    """Nesting up to the bound parses; deeper, or brackets inside strings, are told apart."""
    assert load_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    with pytest.raises(BadJSON, match="nested deeper"):
        load_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    brackets = json.dumps({"type": "x", "text": "[{" * 1000 + '\\"'})
    assert load_json(brackets)["text"].startswith("[{")
    with pytest.raises(BadJSON, match="characters"):
        load_json(" " * (MAX_TEXT_CHARS + 1))

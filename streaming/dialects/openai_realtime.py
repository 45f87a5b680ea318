"""OpenAI Realtime transcription at /v1/realtime (`?intent=transcription`).

JSON text frames both ways. The client configures the session with `session.update` (GA shape:
`session.type` "transcription", `session.audio.input.{format, transcription, turn_detection}`)
or `transcription_session.update` (beta shape: `input_audio_format`,
`input_audio_transcription`, `turn_detection`), and streams base64 audio in
`input_audio_buffer.append`; `input_audio_buffer.commit` ends a turn, `.clear` drops it.

An item is one turn: with server VAD, speech start to speech stop (a split at the session's
maximum segment length stays inside the item); with `turn_detection: null`, all speech between
two commits. Deltas only carry text that is never retracted: the stable prefix of the partials
while the person speaks, then the rest of the final. When the final disagrees with words already
sent (rare), deltas go on after the last sent word the final still has (never repeating one),
and `...completed` carries the final's transcript, which is authoritative.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.api import Word
from streaming.core.events import (
    ErrorEvent,
    Event,
    FinalTranscript,
    PartialTranscript,
    SessionClosed,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
)
from streaming.core.stability import resume_point
from streaming.dialects.base import (
    Audio,
    BadJSON,
    Command,
    Configure,
    Dialect,
    Finalize,
    Opening,
    Reject,
    Reply,
    Update,
    load_json,
)
from streaming.ops.config import ConfigError, SessionConfig, override_section

# Wire format -> (session encoding, sample rate, bytes per millisecond).
FORMATS = {
    "pcm16": ("pcm_s16le", 24000, 48),
    "g711_ulaw": ("mulaw", 8000, 8),
    "g711_alaw": ("alaw", 8000, 8),
}
GA_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
MIN_COMMIT_MS = 100  # OpenAI refuses to commit less audio than this
SERVER_ERRORS = ("engine_error", "internal_error")
CLIENT_EVENTS = (
    "session.update",
    "transcription_session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
)


@dataclass
class _Item:
    """One user turn: segments `first`..`last` of the session (`last` is None while open)."""

    id: str
    first: int
    last: int | None = None
    committed: bool = False
    discarded: bool = False
    stable: dict[int, list[Word]] = field(default_factory=dict)  # segment -> stable words
    finals: dict[int, list[Word]] = field(default_factory=dict)  # segment -> final words
    failed: str = ""
    sent: list[Word] = field(default_factory=list)  # words already sent in deltas
    audio_ms: int = 0


# Replies the dialect sends itself (through the gateway, in order with the session's events).
@dataclass(frozen=True)
class _Updated:
    options: Mapping[str, object]  # what the session took: the dialect shows it from now on


@dataclass(frozen=True)
class _Committed:
    item: _Item | None  # the item open when the client committed


@dataclass(frozen=True)
class _Cleared:
    item: _Item | None  # the item open when the client cleared


class _BadEvent(ValueError):
    """A client event that cannot be applied; the message says why."""


class OpenAIRealtimeDialect(Dialect):
    name = "openai_realtime"
    binary_audio = False

    def __init__(self) -> None:
        self.format = "pcm16"
        self.vad = True
        self.threshold: float | None = None  # as the client set it (mapped to aggressiveness)
        self.model: str | None = None
        self.prompt = ""
        self.keywords: list[str] = []
        self.options: dict = {}  # the session's effective options, from SessionStarted
        self.session_id = ""
        self.beta = False  # answer session updates in the beta shape
        self.created = False
        self.audio_seen = False
        self.audio_ms = 0.0  # audio appended, by the wire format's byte rate
        self.buffer_start_ms = 0.0  # audio time of the last commit or clear
        self.items: list[_Item] = []  # not yet completed, oldest first
        self.open: _Item | None = None
        self.last_committed: str | None = None
        self.max_segment = -1
        self.error_event_id: str | None = None  # client event_id of the error about to be sent

    # --- client -> commands -------------------------------------------------------------------

    def opening(self, query: Mapping[str, str]) -> Opening:
        encoding, rate, _ = FORMATS[self.format]
        return Opening(
            {"encoding": encoding, "sample_rate": rate, "channels": 1, "interim_results": True}
        )

    def on_binary(self, data: bytes) -> list[Command]:
        return [
            Reject(
                "invalid_event",
                "binary frames are not part of the protocol; send audio as base64 in "
                "input_audio_buffer.append events",
            )
        ]

    def on_text(self, text: str) -> list[Command]:
        try:
            message = load_json(text)
        except BadJSON as err:
            return [Reject("invalid_json", f"events must be JSON: {err}")]
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return [Reject("invalid_event", "an event is a JSON object with a string 'type'")]
        commands = self._commands(message)
        # An error answering this event names it (the Reject's error is sent right away).
        event_id = message.get("event_id")
        rejected = any(isinstance(c, Reject) for c in commands) and isinstance(event_id, str)
        self.error_event_id = event_id if rejected else None
        return commands

    def _commands(self, message: dict) -> list[Command]:
        kind = message["type"]
        try:
            if kind in ("session.update", "transcription_session.update"):
                return self._update(message, beta=kind == "transcription_session.update")
            if kind == "input_audio_buffer.append":
                return self._append(message)
            if kind == "input_audio_buffer.commit":
                return self._commit()
            if kind == "input_audio_buffer.clear":
                return self._clear()
        except _BadEvent as err:
            return [Reject("invalid_value", str(err))]
        return [
            Reject(
                "invalid_event",
                f"unsupported event type {kind!r}; this server accepts {', '.join(CLIENT_EVENTS)}",
            )
        ]

    def _append(self, message: dict) -> list[Command]:
        audio = message.get("audio")
        if not isinstance(audio, str):
            raise _BadEvent("input_audio_buffer.append needs 'audio': base64 audio bytes")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise _BadEvent("'audio' is not valid base64") from None
        self.audio_seen = True
        self.audio_ms += len(data) / FORMATS[self.format][2]
        return [Audio(data)]

    def _commit(self) -> list[Command]:
        buffered = self.audio_ms - self.buffer_start_ms
        if self.open is None and buffered < MIN_COMMIT_MS:
            return [
                Reject(
                    "input_audio_buffer_commit_empty",
                    f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, "
                    f"got {buffered:.2f} ms",
                )
            ]
        return [Finalize(), Reply(_Committed(self.open))]

    def _clear(self) -> list[Command]:
        if self.open is not None:
            self.open.discarded = True
        return [Finalize(), Reply(_Cleared(self.open))]

    def _update(self, message: dict, beta: bool) -> list[Command]:
        """Validate the whole update first; only then change anything."""
        session = message.get("session")
        if not isinstance(session, dict):
            raise _BadEvent("the update needs a 'session' object")
        if session.get("type", "transcription") != "transcription":
            raise _BadEvent(
                "only transcription sessions are served here: set session.type to 'transcription'"
            )
        config = session["audio"].get("input", {}) if isinstance(session.get("audio"), dict) else {}
        if not isinstance(config, dict):
            raise _BadEvent("session.audio.input must be an object")
        wire_format = _format(config["format"]) if "format" in config else None
        if "input_audio_format" in session:
            wire_format = _beta_format(session["input_audio_format"])
        turns = config if "turn_detection" in config else session
        options: dict[str, object] = {}
        vad, threshold = self.vad, self.threshold
        if "turn_detection" in turns:
            vad, vad_options = _turn_detection(turns["turn_detection"])
            threshold = _threshold(turns["turn_detection"])
            options.update(vad_options)
        if wire_format is not None:
            encoding, rate, _ = FORMATS[wire_format]
            options.update(encoding=encoding, sample_rate=rate)
        transcription = config.get("transcription", session.get("input_audio_transcription"))
        model, prompt, keywords = self.model, self.prompt, self.keywords
        hotwords: tuple[str, ...] | None = None
        if isinstance(transcription, dict):
            if transcription.get("language") is not None:
                options["language"] = _text(transcription["language"], "transcription.language")
            model, prompt, keywords = _transcription(transcription)
            hotwords = (*keywords, prompt.strip()) if prompt.strip() else tuple(keywords)
        _check_options(options)
        if self.audio_seen:
            fixed = sorted(
                k for k, v in options.items() if k != "language" and self.options[k] != v
            )
            if fixed:
                raise _BadEvent(
                    "the audio format and the VAD timings cannot change once audio has been "
                    f"appended ({', '.join(fixed)} would change); open a new session"
                )
        self.beta, self.vad, self.threshold = beta, vad, threshold
        self.model, self.prompt, self.keywords = model, prompt, keywords
        if wire_format is not None:
            self.format = wire_format
        if not self.audio_seen:  # a new session core with these options; answered on start
            return [Configure(options, hotwords or ())]
        update = {"language": options["language"]} if "language" in options else {}
        return [Update(update, hotwords, reply=_Updated(update))]

    # --- events -> server events ----------------------------------------------------------------

    def encode(self, event: Event | _Updated | _Committed | _Cleared) -> list[str | bytes]:
        return [json.dumps({"event_id": _id("event"), **m}) for m in self._messages(event)]

    def _messages(self, event: object) -> list[dict]:
        if isinstance(event, SessionStarted):
            self.options, self.session_id = dict(event.options), event.session_id
            if not self.created:
                self.created = True
                return [{"type": "session.created", "session": self._session_ga()}]
            return [self._updated()]
        if isinstance(event, _Updated):
            self.options.update(event.options)
            return [self._updated()]
        if isinstance(event, SpeechStarted):
            return self._speech_started(event)
        if isinstance(event, SpeechStopped):
            return self._speech_stopped(event)
        if isinstance(event, _Committed):
            self.buffer_start_ms = self.audio_ms
            item = event.item or self._new_item(self.max_segment + 1)
            return [] if item.committed else self._commit_item(item, self.max_segment)
        if isinstance(event, _Cleared):
            self.buffer_start_ms = self.audio_ms
            if event.item is not None:
                event.item.last = self.max_segment
                self.open = None if self.open is event.item else self.open
                self._progress(event.item)
            return [{"type": "input_audio_buffer.cleared"}]
        if isinstance(event, PartialTranscript):
            item = self._item_for(event.segment_id)
            if item is None:
                return []
            item.stable[event.segment_id] = event.words[: len(event.stable_text.split())]
            return self._progress(item)
        if isinstance(event, FinalTranscript):
            item = self._item_for(event.segment_id)
            if item is None:
                return []
            item.finals[event.segment_id] = event.words
            item.audio_ms += event.end_ms - event.start_ms
            return self._progress(item)
        if isinstance(event, ErrorEvent):
            return self._error(event)
        if isinstance(event, SessionClosed):  # the stream ends: an open turn is committed
            if self.open is None or self.open.discarded:
                return []
            return self._commit_item(self.open, self.max_segment)
        return []  # status has no counterpart

    def _speech_started(self, event: SpeechStarted) -> list[dict]:
        self.max_segment = max(self.max_segment, event.segment_id)
        if self.open is None:
            self.open = self._new_item(event.segment_id)
        if not self.vad:
            return []
        return [
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": event.ms,
                "item_id": self.open.id,
            }
        ]

    def _speech_stopped(self, event: SpeechStopped) -> list[dict]:
        self.max_segment = max(self.max_segment, event.segment_id)
        item = self.open
        if not self.vad or item is None or item.discarded:
            return []
        self.buffer_start_ms = max(self.buffer_start_ms, float(event.ms))
        stopped = {
            "type": "input_audio_buffer.speech_stopped",
            "audio_end_ms": event.ms,
            "item_id": item.id,
        }
        return [stopped, *self._commit_item(item, event.segment_id)]

    def _commit_item(self, item: _Item, last: int) -> list[dict]:
        item.last, item.committed = last, True
        if self.open is item:
            self.open = None
        committed = {
            "type": "input_audio_buffer.committed",
            "previous_item_id": self.last_committed,
            "item_id": item.id,
        }
        self.last_committed = item.id
        return [committed, *self._progress(item)]

    def _progress(self, item: _Item) -> list[dict]:
        """New words as a delta, and the transcript once every segment of a committed item has
        its final. Words of the first segment still open are its stable prefix."""
        last = self.max_segment if item.last is None else item.last
        words: list[Word] = []
        complete = item.committed or (item.discarded and item.last is not None)
        for segment in range(item.first, last + 1):
            if segment in item.finals:
                words += item.finals[segment]
                continue
            words += item.stable.get(segment, [])
            complete = False
            break
        if item.discarded:
            if complete:
                self.items.remove(item)
            return []
        out = []
        # A final that disagrees with words already sent goes on after the last of them it has.
        resume = len(item.sent) if words[: len(item.sent)] == item.sent else None
        if resume is None:
            resume = resume_point(item.sent, words)
        if len(words) > resume:
            delta = " ".join(w.word for w in words[resume:])
            out.append(self._item_event("delta", item, delta=" " + delta if item.sent else delta))
            item.sent += words[resume:]
        if complete:
            self.items.remove(item)
            if item.failed:
                error = {"type": "server_error", "code": "engine_error", "message": item.failed}
                out.append(self._item_event("failed", item, error=error))
            else:
                usage = {"type": "duration", "seconds": item.audio_ms / 1000}
                transcript = " ".join(w.word for w in words)
                out.append(self._item_event("completed", item, transcript=transcript, usage=usage))
        return out

    def _error(self, event: ErrorEvent) -> list[dict]:
        if event.segment_id is not None:  # the engine failed on one segment: its item fails
            item = self._item_for(event.segment_id)
            if item is None:
                return []
            item.finals[event.segment_id] = []
            item.failed = event.message
            return self._progress(item)
        kind = "server_error" if event.code in SERVER_ERRORS else "invalid_request_error"
        error = {
            "type": kind,
            "code": event.code,
            "message": event.message,
            "param": None,
            "event_id": self.error_event_id,
        }
        self.error_event_id = None
        return [{"type": "error", "error": error}]

    def _new_item(self, first: int) -> _Item:
        item = _Item(_id("item"), first)
        self.items.append(item)
        return item

    def _item_for(self, segment: int) -> _Item | None:
        self.max_segment = max(self.max_segment, segment)
        for item in self.items:
            if item.first <= segment and (item.last is None or segment <= item.last):
                return item
        return None

    @staticmethod
    def _item_event(name: str, item: _Item, **fields: object) -> dict:
        return {
            "type": f"conversation.item.input_audio_transcription.{name}",
            "item_id": item.id,
            "content_index": 0,
            **fields,
        }

    # --- session objects ------------------------------------------------------------------------

    def _turn_detection(self) -> dict | None:
        if not self.vad:
            return None
        options = self.options
        threshold = self.threshold
        if threshold is None:
            threshold = options["vad_aggressiveness"] / 4
        return {
            "type": "server_vad",
            "threshold": threshold,
            "prefix_padding_ms": options["speech_pad_ms"],
            "silence_duration_ms": options["hangover_ms"],
        }

    def _transcription_config(self) -> dict:
        config: dict = {
            "model": self.model,
            "language": self.options["language"],
            "prompt": self.prompt,
        }
        if self.keywords:
            config["keywords"] = self.keywords
        return config

    def _session_ga(self) -> dict:
        wire_format = {"type": next(k for k, v in GA_FORMATS.items() if v == self.format)}
        if self.format == "pcm16":
            wire_format["rate"] = FORMATS["pcm16"][1]
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": f"sess_{self.session_id}",
            "audio": {
                "input": {
                    "format": wire_format,
                    "transcription": self._transcription_config(),
                    "turn_detection": self._turn_detection(),
                    "noise_reduction": None,
                }
            },
        }

    def _updated(self) -> dict:
        if not self.beta:
            return {"type": "session.updated", "session": self._session_ga()}
        session = {
            "object": "realtime.transcription_session",
            "id": f"sess_{self.session_id}",
            "input_audio_format": self.format,
            "input_audio_transcription": self._transcription_config(),
            "turn_detection": self._turn_detection(),
            "input_audio_noise_reduction": None,
            "modalities": ["text"],
        }
        return {"type": "transcription_session.updated", "session": session}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise _BadEvent(f"{name} must be a string")
    return value


def _transcription(value: dict) -> tuple[str | None, str, list[str]]:
    """(model, prompt, keywords) of a transcription config; prompt and keywords become the
    engine's hotwords."""
    model = value.get("model")
    prompt = value.get("prompt")
    keywords = value.get("keywords") or []
    if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
        raise _BadEvent("transcription.keywords must be a list of strings")
    return (
        None if model is None else _text(model, "transcription.model"),
        "" if prompt is None else _text(prompt, "transcription.prompt"),
        [k.strip() for k in keywords if k.strip()],
    )


def _format(value: object) -> str:
    """GA `audio.input.format`: {"type": "audio/pcm", "rate": 24000} or audio/pcmu, audio/pcma."""
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str) or kind not in GA_FORMATS:
        raise _BadEvent(
            f"audio.input.format must be an object with type {', '.join(GA_FORMATS)}; got {value!r}"
        )
    if kind == "audio/pcm" and value.get("rate", 24000) != 24000:
        raise _BadEvent(f"audio/pcm must be 24000 Hz, got rate {value.get('rate')!r}")
    return GA_FORMATS[kind]


def _beta_format(value: object) -> str:
    if not isinstance(value, str) or value not in FORMATS:
        raise _BadEvent(f"input_audio_format must be one of {', '.join(FORMATS)}; got {value!r}")
    return value


def _turn_detection(value: object) -> tuple[bool, dict[str, object]]:
    """(server VAD on?, session options): null turns VAD off (commit ends the turn)."""
    if value is None:
        return False, {}
    if not isinstance(value, dict):
        raise _BadEvent("turn_detection must be an object or null")
    if value.get("type", "server_vad") != "server_vad":
        raise _BadEvent(f"turn_detection.type {value['type']!r} is not supported; use server_vad")
    options: dict[str, object] = {}
    if value.get("silence_duration_ms") is not None:
        options["hangover_ms"] = value["silence_duration_ms"]
    if value.get("prefix_padding_ms") is not None:
        options["speech_pad_ms"] = value["prefix_padding_ms"]
    threshold = _threshold(value)
    if threshold is not None:
        options["vad_aggressiveness"] = min(3, int(threshold * 4))
    return True, options


def _threshold(value: object) -> float | None:
    """turn_detection.threshold (0..1), or None when not given."""
    if not isinstance(value, dict) or value.get("threshold") is None:
        return None
    threshold = value["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise _BadEvent("turn_detection.threshold must be a number from 0 to 1")
    if not 0 <= threshold <= 1:
        raise _BadEvent(f"turn_detection.threshold must be from 0 to 1, got {threshold}")
    return float(threshold)


OPENAI_NAMES = {
    "hangover_ms": "turn_detection.silence_duration_ms",
    "speech_pad_ms": "turn_detection.prefix_padding_ms",
}


def _check_options(options: dict[str, object]) -> None:
    """Validate like the config file, naming the OpenAI field in the message."""
    for key, value in options.items():
        try:
            override_section("session", SessionConfig(), {key: value}, OPENAI_NAMES.get(key, key))
        except ConfigError as err:
            raise _BadEvent(str(err)) from None

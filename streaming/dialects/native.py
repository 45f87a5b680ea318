"""The native protocol at /v1/stream (product.md, "Native protocol").

Binary frames are audio; text frames are JSON control messages. Every server message has `type`
and a per-session increasing `seq`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from streaming.core.events import (
    CaptionAppend,
    CaptionCue,
    ErrorEvent,
    Event,
    FinalTranscript,
    PartialTranscript,
    RefinedTranscript,
    SessionClosed,
    SessionResumed,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    Status,
    TranslatedTranscript,
)
from streaming.dialects.base import (
    Audio,
    Close,
    Command,
    Configure,
    Dialect,
    Finalize,
    KeepAlive,
    Opening,
    Reject,
    Update,
    parse_message,
)

# Options a client may change once audio flows; the rest fix the audio format or the segmenter.
UPDATABLE = {
    "interim_results",
    "partial_interval_ms",
    "partial_window_ms",
    "stable_agreement",
    "stable_settle_ms",
    "language",
}

# Query keys that are credentials, not session options.
NOT_OPTIONS = ("hotwords", "api_key", "token")


def words_json(words) -> list[dict]:
    return [
        {
            "word": w.word,
            "start_ms": w.start_ms,
            "end_ms": w.end_ms,
            "confidence": round(w.confidence, 4),
        }
        for w in words
    ]


def split_hotwords(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list):
        items = [str(v) for v in value]
    else:
        raise ValueError("hotwords must be a list of strings or a comma-separated string")
    return tuple(item.strip() for item in items if item.strip())


class NativeDialect(Dialect):
    name = "native"
    binary_audio = True
    refined_messages = True
    resumable = True

    def __init__(self) -> None:
        self.seq = 0

    def opening(self, query: Mapping[str, str]) -> Opening:
        options = {k: v for k, v in query.items() if k not in NOT_OPTIONS}
        hotwords = split_hotwords(query["hotwords"]) if "hotwords" in query else ()
        return Opening(options, hotwords)

    def on_binary(self, data: bytes) -> list[Command]:
        return [Audio(data)]

    def on_text(self, text: str) -> list[Command]:
        message = parse_message(text)
        if isinstance(message, Reject):
            return [message]
        kind = message["type"]
        body = {k: v for k, v in message.items() if k != "type"}
        if kind in ("session.start", "session.update"):
            return [self._configure(kind, body)]
        simple = {"finalize": Finalize, "keepalive": KeepAlive, "close": Close}
        if kind in simple:
            return [simple[kind]()]
        return [
            Reject(
                "unknown_type",
                f"unknown message type {kind!r}; expected one of "
                "session.start, session.update, finalize, keepalive, close",
            )
        ]

    def _configure(self, kind: str, body: dict) -> Command:
        config = body.pop("config", None) or {}
        if not isinstance(config, dict):
            return Reject("invalid_config", f"config must be an object of options, not {config!r}")
        options = dict(config)
        options.update(body)
        captions = options.pop("captions", None)  # {mode, preset, rows, hold_back_words}
        if captions is not None:
            if not isinstance(captions, dict):
                return Reject("invalid_config", "captions must be an object, e.g. {mode: popon}")
            options.update({f"captions_{key}": value for key, value in captions.items()})
        try:
            hotwords = split_hotwords(options.pop("hotwords")) if "hotwords" in options else None
        except ValueError as err:
            return Reject("invalid_config", str(err))
        if kind == "session.start":
            return Configure(options, hotwords or ())
        fixed = sorted(set(options) - UPDATABLE)
        if fixed:
            return Reject(
                "invalid_update",
                f"cannot change {', '.join(fixed)} mid-stream; "
                f"session.update accepts {', '.join(sorted(UPDATABLE))} and hotwords",
            )
        return Update(options, hotwords)

    def encode(self, event: Event) -> list[str | bytes]:
        message = self._message(event)
        if message is None:
            return []
        self.seq += 1
        return [json.dumps({"type": message.pop("type"), "seq": self.seq, **message})]

    def _message(self, event: Event) -> dict | None:
        if isinstance(event, SessionStarted):
            return {
                "type": "session.started",
                "session_id": event.session_id,
                "config": event.options,
                "resume_token": self.resume_token,
            }
        if isinstance(event, SpeechStarted):
            return {
                "type": "speech.started",
                "channel": event.channel,
                "segment_id": event.segment_id,
                "audio_ms": event.ms,
            }
        if isinstance(event, SpeechStopped):
            return {
                "type": "speech.stopped",
                "channel": event.channel,
                "segment_id": event.segment_id,
                "audio_ms": event.ms,
            }
        if isinstance(event, PartialTranscript):
            return {
                "type": "transcript.partial",
                "channel": event.channel,
                "segment_id": event.segment_id,
                "rev": event.rev,
                "start_ms": event.start_ms,
                "end_ms": event.end_ms,
                "stable_text": event.stable_text,
                "volatile_text": event.volatile_text,
            }
        if isinstance(event, FinalTranscript):
            return {
                "type": "transcript.final",
                "channel": event.channel,
                "segment_id": event.segment_id,
                "start_ms": event.start_ms,
                "end_ms": event.end_ms,
                "text": event.text,
                "words": words_json(event.words),
                "confidence": round(event.confidence, 4),
                "latency": dataclasses.asdict(event.latency),
                "reason": event.reason,
                "from_finalize": event.from_finalize,
            }
        if isinstance(event, RefinedTranscript):
            message = {
                "type": "transcript.refined",
                "channel": event.channel,
                "segment_id": event.segment_id,
                "start_ms": event.start_ms,
                "end_ms": event.end_ms,
                "text": event.text,
                "words": words_json(event.words),
                "confidence": round(event.confidence, 4),
                "latency": {"queue_ms": event.queue_ms, "compute_ms": event.compute_ms},
                "changed": event.changed,
            }
            if event.skipped:
                message |= {"skipped": True, "reason": event.reason}
            return message
        if isinstance(event, TranslatedTranscript):
            message = {
                "type": "transcript.translated",
                "channel": event.channel,
                "segment_id": event.segment_id,
                "start_ms": event.start_ms,
                "end_ms": event.end_ms,
                "language": event.language,
                "text": event.text,
            }
            if event.skipped:
                message |= {"skipped": True, "reason": event.reason}
            return message
        if isinstance(event, Status):
            return {
                "type": "status",
                "lag_ms": event.lag_ms,
                "queued_audio_ms": event.queued_audio_ms,
            }
        if isinstance(event, ErrorEvent):
            message = {"type": "error", "code": event.code, "message": event.message}
            if event.channel is not None:
                message.update(channel=event.channel, segment_id=event.segment_id)
            return message
        if isinstance(event, CaptionAppend):
            return {
                "type": "caption.append",
                "channel": event.channel,
                "text": event.text,
                "row_break": event.row_break,
                "speaker_change": event.speaker_change,
                "rows": event.rows,
                "start_ms": event.start_ms,
                "end_ms": event.end_ms,
            }
        if isinstance(event, CaptionCue):
            return {
                "type": "caption.cue",
                "channel": event.channel,
                "id": event.id,
                "start_ms": event.start_ms,
                "end_ms": event.end_ms,
                "start_tc": event.start_tc,
                "end_tc": event.end_tc,
                "lines": event.lines,
            }
        if isinstance(event, SessionResumed):
            return {
                "type": "session.resumed",
                "gap_ms": event.gap_ms,
                "audio_bytes": event.audio_bytes,
                "audio_ms": event.audio_ms,
                "replayed": event.replayed,
                "dropped": event.dropped,
            }
        if isinstance(event, SessionClosed):
            return {
                "type": "session.closed",
                "audio_ms": event.audio_ms,
                "segments": event.segments,
                "reason": event.reason,
            }
        return None

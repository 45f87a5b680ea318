"""What a session says: dialect-neutral events, and the engine requests it asks for.

Dialects turn events into their own wire messages; the gateway hands requests to the scheduler.
All times are audio time in milliseconds from the start of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.api import Word
from streaming.core.stability import WHOLE_SEGMENT, Window


@dataclass(frozen=True)
class SessionStarted:
    session_id: str
    options: dict


@dataclass(frozen=True)
class SpeechStarted:
    channel: int
    segment_id: int
    ms: int


@dataclass(frozen=True)
class SpeechStopped:
    channel: int
    segment_id: int
    ms: int


@dataclass(frozen=True)
class PartialTranscript:
    channel: int
    segment_id: int
    rev: int
    start_ms: int
    end_ms: int
    stable_text: str
    volatile_text: str
    words: list[Word] = field(default_factory=list)  # stream time


@dataclass(frozen=True)
class Latency:
    endpoint_ms: int
    queue_ms: int
    compute_ms: int


@dataclass(frozen=True)
class FinalTranscript:
    channel: int
    segment_id: int
    start_ms: int
    end_ms: int
    text: str
    words: list[Word]  # stream time
    confidence: float
    latency: Latency
    reason: str  # endpoint | max_length | flush
    from_finalize: bool = False


@dataclass(frozen=True)
class RefinedTranscript:
    """The refine model's text of a segment whose final already went out (refine_mode async).
    `skipped`: the refine pass did not run (`reason`: queue_full, deadline, or the error), and
    the final stands; `changed`: the refined text differs from the final's."""

    channel: int
    segment_id: int
    start_ms: int
    end_ms: int
    text: str
    words: list[Word]  # stream time
    confidence: float
    queue_ms: int
    compute_ms: int
    changed: bool
    skipped: bool = False
    reason: str = ""


@dataclass(frozen=True)
class TranslatedTranscript:
    """The refine model's translation of a segment whose final went out (`translate_to`):
    `language` is the target. `skipped`: the translation did not run (`reason`: queue_full,
    deadline, or the error) and `text` is empty."""

    channel: int
    segment_id: int
    start_ms: int
    end_ms: int
    language: str
    text: str
    skipped: bool = False
    reason: str = ""


@dataclass(frozen=True)
class Status:
    lag_ms: int
    queued_audio_ms: int


@dataclass(frozen=True)
class ErrorEvent:
    code: str
    message: str
    fatal: bool = False
    channel: int | None = None
    segment_id: int | None = None


@dataclass(frozen=True)
class SessionResumed:
    """A client took a stream over after a disconnect: the events it missed were sent again
    just before this one; it resends its audio from byte `audio_bytes` of the stream."""

    gap_ms: int  # wall time the stream had no client
    audio_bytes: int  # audio bytes received so far: the client resends what follows
    audio_ms: int
    replayed: int  # events sent again (those after the client's last_seq that were kept)
    dropped: int  # events after last_seq no longer kept (server.resume_buffer_events)


@dataclass(frozen=True)
class SessionClosed:
    audio_ms: int
    segments: int
    reason: str


@dataclass(frozen=True)
class CaptionAppend:
    """Roll-up captions (streaming/core/captions.py): `text` is appended to the current row as is,
    or starts a new row when `row_break`; never retracted."""

    channel: int
    text: str
    row_break: bool
    speaker_change: bool  # the row starts with ">> "
    rows: int  # rows the roll-up display keeps
    start_ms: int  # audio time of its first and last word
    end_ms: int


@dataclass(frozen=True)
class CaptionCue:
    """A pop-on caption (streaming/core/captions.py): at most two lines, shown start_ms..end_ms."""

    id: int
    channel: int
    start_ms: int
    end_ms: int
    lines: list[str]
    speech_end_ms: int  # end of the audio of its last word
    start_tc: str  # programme time (audio time + timecode origin), HH:MM:SS.mmm
    end_tc: str


Event = (
    SessionStarted
    | SpeechStarted
    | SpeechStopped
    | PartialTranscript
    | FinalTranscript
    | RefinedTranscript
    | TranslatedTranscript
    | Status
    | ErrorEvent
    | SessionResumed
    | SessionClosed
    | CaptionAppend
    | CaptionCue
)


@dataclass(frozen=True, eq=False)
class EngineRequest:
    """Ask the scheduler for a `draft` (partial) or `transcribe` (final) of one segment, or for
    the refine model's `transcribe` of a final's audio (refine; a translation of it when
    `translate_to` is set)."""

    kind: str  # "partial" | "final" | "refine"
    channel: int
    segment_id: int
    rev: int
    audio: np.ndarray  # float32 mono 16 kHz: the whole segment, or a partial's window of it
    hotwords: tuple[str, ...] = ()
    window: Window = WHOLE_SEGMENT  # which part of the segment `audio` is (partials)
    first_text: bool = False  # a partial of a segment that has shown no words yet
    language: str | None = None  # Segment.language: a primary subtag, or None for the model's
    deadline_ms: int | None = None  # refine: no use this long after it is asked for
    translate_to: str | None = None  # refine: Segment.translate_to, the target language

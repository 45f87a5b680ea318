"""What a session says: dialect-neutral events, and the engine requests it asks for.

Dialects turn events into their own wire messages; the gateway hands requests to the scheduler.
All times are audio time in milliseconds from the start of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.api import Word


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
class SessionClosed:
    audio_ms: int
    segments: int
    reason: str


Event = (
    SessionStarted
    | SpeechStarted
    | SpeechStopped
    | PartialTranscript
    | FinalTranscript
    | Status
    | ErrorEvent
    | SessionClosed
)


@dataclass(frozen=True, eq=False)
class EngineRequest:
    """Ask the scheduler for a `draft` (partial) or `transcribe` (final) of one segment."""

    kind: str  # "partial" | "final"
    channel: int
    segment_id: int
    rev: int
    audio: np.ndarray  # float32 mono 16 kHz
    hotwords: tuple[str, ...] = ()

"""Deepgram-compatible live transcription at /v1/listen (README, "Deepgram-compatible").

Deepgram clients (the official SDKs, voice-agent frameworks given a host override) talk to this
server unchanged: query parameters become session options, `KeepAlive` / `Finalize` /
`CloseStream` become session calls, and session events go back as `Results`, `SpeechStarted`,
`UtteranceEnd` and `Metadata` messages. Times on the wire are seconds of audio.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from engine.api import Word
from streaming.core.audio import ENCODINGS as BYTES_PER_SAMPLE
from streaming.core.audio import SAMPLE_RATES, AudioDecoder, AudioFormat
from streaming.core.events import (
    ErrorEvent,
    Event,
    FinalTranscript,
    PartialTranscript,
    SessionClosed,
    SessionStarted,
    SpeechStarted,
)
from streaming.dialects.base import (
    Audio,
    Close,
    Command,
    Dialect,
    Finalize,
    KeepAlive,
    Opening,
    Reject,
    Reply,
    parse_message,
)
from streaming.ops.config import parse_bool

log = logging.getLogger("streaming.dialects.deepgram")

ENCODINGS = {"linear16": "pcm_s16le", "mulaw": "mulaw", "alaw": "alaw"}
MIN_HANGOVER_MS, MAX_HANGOVER_MS = 100, 4000  # what the segmenter takes with default lengths
MODEL_UUID = str(uuid.uuid5(uuid.NAMESPACE_URL, "streamscribe"))
MODEL_INFO = {"name": "streamscribe", "version": "latest", "arch": "streamscribe"}
SCHEMA_ERRORS = {"bad_json", "bad_message", "unknown_type"}
_PUNCTUATION = string.punctuation + "“”‘’…–—"
# Parameters with a meaning here; any other Deepgram parameter is accepted and ignored.
KNOWN_PARAMS = {
    "encoding",
    "sample_rate",
    "channels",
    "multichannel",
    "interim_results",
    "endpointing",
    "utterance_end_ms",
    "vad_events",
    "punctuate",
    "smart_format",
    "keyterm",
    "keywords",
    "language",
    "model",
    "api_key",
}


class ParamError(ValueError):
    """A query parameter has a value this server cannot honour; the message says which."""


@dataclass(frozen=True)
class ListenParams:
    """What the query string asks for, in this server's terms."""

    options: dict[str, object]  # session options
    hotwords: tuple[str, ...]
    encoding: str  # wire encoding (session name)
    sample_rate: int
    channels: int  # channels on the wire
    multichannel: bool  # False with 2 channels: the mix is transcribed
    endpointing: bool  # finals at an endpoint are `speech_final`
    utterance_end_s: float | None
    vad_events: bool

    @property
    def frame_bytes(self) -> int:
        return BYTES_PER_SAMPLE[self.encoding] * self.channels

    @property
    def mixed(self) -> bool:
        return self.channels > 1 and not self.multichannel


def parse_params(query: Mapping[str, str]) -> ListenParams:
    """Deepgram's query parameters; unknown ones are ignored, as formatting options are."""
    name = query.get("encoding", "linear16").strip().lower()
    if name not in ENCODINGS:
        raise ParamError(
            f"encoding={query['encoding']!r}: this server takes raw audio in {', '.join(ENCODINGS)}"
        )
    encoding = ENCODINGS[name]
    sample_rate = _int(query, "sample_rate", 16000)
    if sample_rate not in SAMPLE_RATES:
        raise ParamError(
            f"sample_rate={sample_rate}: expected one of {', '.join(map(str, SAMPLE_RATES))}"
        )
    channels = _int(query, "channels", 1)
    if channels not in (1, 2):
        raise ParamError(f"channels={channels}: this server transcribes 1 or 2 channels")
    multichannel = _bool(query, "multichannel", False)
    for accepted in ("punctuate", "smart_format"):
        _bool(query, accepted, False)
    options: dict[str, object] = {"interim_results": _bool(query, "interim_results", False)}
    if channels > 1 and not multichannel:  # the dialect mixes the channels to 16 kHz mono
        options.update(encoding="pcm_f32le", sample_rate=16000, channels=1)
    else:
        options.update(encoding=encoding, sample_rate=sample_rate, channels=channels)
    endpointing, hangover_ms = _endpointing(query.get("endpointing"))
    if hangover_ms is not None:
        options["hangover_ms"] = hangover_ms
    if query.get("language", "").strip():
        options["language"] = query["language"].strip().split("-")[0].lower()
    utterance_end_ms = _int(query, "utterance_end_ms", 0) if "utterance_end_ms" in query else None
    if utterance_end_ms is not None and utterance_end_ms <= 0:
        raise ParamError(f"utterance_end_ms={utterance_end_ms}: expected milliseconds above 0")
    hotwords = [query["keyterm"].strip()] if query.get("keyterm", "").strip() else []
    if query.get("keywords", "").strip():  # "word:intensifier"; the intensifier is not used
        hotwords.append(query["keywords"].strip().rsplit(":", 1)[0].strip())
    return ListenParams(
        options=options,
        hotwords=tuple(hotwords),
        encoding=encoding,
        sample_rate=sample_rate,
        channels=channels,
        multichannel=multichannel,
        endpointing=endpointing,
        utterance_end_s=None if utterance_end_ms is None else utterance_end_ms / 1000,
        vad_events=_bool(query, "vad_events", False),
    )


def _bool(query: Mapping[str, str], name: str, default: bool) -> bool:
    if name not in query:
        return default
    try:
        return parse_bool(query[name])
    except ValueError:
        raise ParamError(f"{name}={query[name]!r}: expected true or false (or 1/0)") from None


def _int(query: Mapping[str, str], name: str, default: int) -> int:
    if name not in query:
        return default
    try:
        return int(query[name].strip())
    except ValueError:
        raise ParamError(f"{name}={query[name]!r}: expected an integer") from None


def _endpointing(value: str | None) -> tuple[bool, int | None]:
    """(endpointing on, hangover in ms or None for the server's default)."""
    if value is None or value.strip().lower() == "true":
        return True, None
    if value.strip().lower() == "false":
        return False, None
    try:
        ms = int(value.strip())
    except ValueError:
        raise ParamError(
            f"endpointing={value!r}: expected milliseconds of silence, or false"
        ) from None
    if ms < 0:
        raise ParamError(f"endpointing={ms}: expected milliseconds of silence, or false")
    return True, min(max(ms, MIN_HANGOVER_MS), MAX_HANGOVER_MS)


class UtteranceEnds:
    """When an UtteranceEnd is due: `gap_s` of audio has followed the last word of a channel's
    latest final without new speech on that channel.

    Known from events and the audio clock (seconds received): the message goes out with the
    first event or audio frame (`DeepgramDialect.due`) at which the gap is known to have passed.
    """

    def __init__(self, gap_s: float) -> None:
        self.gap_s = gap_s
        self.waiting: dict[int, float] = {}  # channel -> last word end of its latest final
        self.onset: dict[int, float] = {}  # channel -> start of its latest speech

    def speech(self, channel: int, onset_s: float) -> list[tuple[int, float]]:
        self.onset[channel] = onset_s
        last = self.waiting.pop(channel, None)
        return [(channel, last)] if last is not None and onset_s - last >= self.gap_s else []

    def words(self, channel: int) -> None:
        """New words on a channel: its utterance goes on."""
        self.waiting.pop(channel, None)

    def final(
        self, channel: int, last_word_end_s: float, clock_s: float
    ) -> list[tuple[int, float]]:
        onset = self.onset.get(channel)
        if onset is not None and onset > last_word_end_s:  # the next speech already began
            return [(channel, last_word_end_s)] if onset - last_word_end_s >= self.gap_s else []
        self.waiting[channel] = last_word_end_s
        return self.due(clock_s)

    def due(self, clock_s: float) -> list[tuple[int, float]]:
        ready = [(c, last) for c, last in self.waiting.items() if clock_s - last >= self.gap_s]
        for channel, _ in ready:
            del self.waiting[channel]
        return ready


@dataclass(frozen=True)
class UtteranceEndDue:
    """An UtteranceEnd found due between events (`DeepgramDialect.due`)."""

    channel: int
    last_word_end_s: float


class DeepgramDialect(Dialect):
    name = "deepgram"
    binary_audio = True

    def __init__(self) -> None:
        self.params: ListenParams | None = None
        self.request_id = str(uuid.uuid4())
        created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self.created = created.replace("+00:00", "Z")
        self.received = 0  # wire bytes of audio
        self.digest = hashlib.sha256()
        self.mixer: AudioDecoder | None = None
        self.utterances: UtteranceEnds | None = None

    # --- client to server -------------------------------------------------------------------

    def opening(self, query: Mapping[str, str]) -> Opening:
        try:
            params = parse_params(query)
        except ParamError as err:
            return Opening(error=f"invalid query parameter: {err}")
        ignored = sorted(set(query) - KNOWN_PARAMS)
        if ignored:
            log.debug("deepgram parameters ignored", extra={"parameters": ignored})
        self.params = params
        if params.mixed:
            fmt = AudioFormat(params.encoding, params.sample_rate, params.channels)
            self.mixer = AudioDecoder(fmt)
        if params.utterance_end_s is not None:
            self.utterances = UtteranceEnds(params.utterance_end_s)
        return Opening(dict(params.options), params.hotwords)

    def on_binary(self, data: bytes) -> list[Command]:
        if not data:  # Deepgram's older way to say CloseStream
            return self._close()
        self.received += len(data)
        self.digest.update(data)
        if self.mixer is None:
            return [Audio(data)]
        return [Audio(_mono(self.mixer.feed(data)))]

    def on_text(self, text: str) -> list[Command]:
        message = parse_message(text)
        if isinstance(message, Reject):
            return [message]
        kind = message["type"]
        if kind == "KeepAlive":
            return [KeepAlive()]
        if kind == "Finalize":  # every channel, also when one is named
            return [Finalize()]
        if kind == "CloseStream":
            return self._close()
        return [
            Reject(
                "unknown_type",
                f"unknown message type {kind!r}; expected KeepAlive, Finalize or CloseStream",
            )
        ]

    def _close(self) -> list[Command]:
        """Close, after the audio the mixer's resampler still holds."""
        if self.mixer is None:
            return [Close()]
        return [Audio(_mono(self.mixer.flush())), Close()]

    # --- server to client -------------------------------------------------------------------

    @property
    def clock_s(self) -> float:
        """Seconds of audio received."""
        params = self.params
        return (self.received // params.frame_bytes) / params.sample_rate if params else 0.0

    @property
    def total_channels(self) -> int:
        params = self.params
        return 1 if params is None or params.mixed else params.channels

    def due(self) -> list[Reply]:
        """UtteranceEnds whose silence the audio received now shows, without waiting for the
        next event (a voice bot ends its turn on them)."""
        if self.utterances is None or not self.utterances.waiting:
            return []
        return [Reply(UtteranceEndDue(c, last)) for c, last in self.utterances.due(self.clock_s)]

    def encode(self, event: Event) -> list[str | bytes]:
        if isinstance(event, UtteranceEndDue):
            return [json.dumps(self._utterance_end(event.channel, event.last_word_end_s))]
        before: list[tuple[int, float]] = []
        after: list[tuple[int, float]] = []
        utterances = self.utterances
        if utterances is not None:
            if isinstance(event, SpeechStarted):
                before += utterances.speech(event.channel, event.ms / 1000)
            elif isinstance(event, PartialTranscript) and event.words:
                utterances.words(event.channel)
            before += utterances.due(self.clock_s)
            if isinstance(event, FinalTranscript) and event.words:
                after += utterances.final(
                    event.channel, event.words[-1].end_ms / 1000, self.clock_s
                )
        message = self._message(event)
        messages = [
            *(self._utterance_end(c, last) for c, last in before),
            *([message] if message is not None else []),
            *(self._utterance_end(c, last) for c, last in after),
        ]
        return [json.dumps(m) for m in messages]

    def _message(self, event: Event) -> dict | None:
        if isinstance(event, SessionStarted):
            self.request_id = str(uuid.UUID(hex=event.session_id))
            return None
        if isinstance(event, SpeechStarted):
            if self.params is None or not self.params.vad_events:
                return None
            return {
                "type": "SpeechStarted",
                "channel": [event.channel, self.total_channels],
                "timestamp": event.ms / 1000,
            }
        if isinstance(event, PartialTranscript):
            text = " ".join(t for t in (event.stable_text, event.volatile_text) if t)
            return self._results(event, text, _mean_confidence(event.words))
        if isinstance(event, FinalTranscript):
            return self._results(event, event.text, event.confidence)
        if isinstance(event, ErrorEvent):
            return self._error(event)
        if isinstance(event, SessionClosed):
            return {
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": self.request_id,
                "sha256": self.digest.hexdigest(),
                "created": self.created,
                "duration": event.audio_ms / 1000,
                "channels": self.params.channels if self.params else 1,
                "models": [MODEL_UUID],
                "model_info": {MODEL_UUID: MODEL_INFO},
            }
        return None  # speech stopped, status: nothing in Deepgram's protocol

    def _results(
        self, event: PartialTranscript | FinalTranscript, text: str, confidence: float
    ) -> dict:
        final = isinstance(event, FinalTranscript)
        return {
            "type": "Results",
            "channel_index": [event.channel, self.total_channels],
            "duration": (event.end_ms - event.start_ms) / 1000,
            "start": event.start_ms / 1000,
            "is_final": final,
            "speech_final": final and event.reason == "endpoint" and self.params.endpointing,
            "from_finalize": final and event.from_finalize,
            "channel": {
                "alternatives": [
                    {
                        "transcript": text,
                        "confidence": round(confidence, 4),
                        "words": [_word(w) for w in event.words],
                    }
                ]
            },
            "metadata": {
                "request_id": self.request_id,
                "model_info": MODEL_INFO,
                "model_uuid": MODEL_UUID,
            },
        }

    def _error(self, event: ErrorEvent) -> dict:
        return {
            "type": "Error",
            "variant": "SchemaError" if event.code in SCHEMA_ERRORS else event.code,
            "description": event.message,
            "code": event.code,
        }

    def _utterance_end(self, channel: int, last_word_end_s: float) -> dict:
        return {
            "type": "UtteranceEnd",
            "channel": [channel, self.total_channels],
            "last_word_end": last_word_end_s,
        }


def _mono(channels: np.ndarray) -> bytes:
    """The mix of decoded channels ([channels, n] float32, 16 kHz) as pcm_f32le."""
    return channels.mean(axis=0).astype("<f4").tobytes()


def _word(w: Word) -> dict:
    bare = w.word.strip(_PUNCTUATION).lower() or w.word
    return {
        "word": bare,
        "start": w.start_ms / 1000,
        "end": w.end_ms / 1000,
        "confidence": round(w.confidence, 4),
        "punctuated_word": w.word,
    }


def _mean_confidence(words: list[Word]) -> float:
    return float(np.mean([w.confidence for w in words])) if words else 0.0

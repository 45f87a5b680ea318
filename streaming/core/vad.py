"""Per-channel voice activity segmenter: cuts a live 16 kHz stream into speech segments.

Each channel of a session owns one `Segmenter`. It is fed float32 samples as they arrive and
answers with events in audio time (sample indices from the start of the stream), so the session
can tell the client when speech starts and stops and hand each closed segment to the engine as a
final request. `open_segment()` gives the audio of the segment still being spoken, for partials.

A frame is voiced when its RMS reaches `energy_gate_dbfs` *and* webrtcvad calls it speech. The
gate keeps out what webrtcvad alone often calls speech: low hiss and hum, the quiet after a
click, a far-away talker. (Hum loud enough to pass the gate, about -30 dBFS with harmonics, is
taken for speech by webrtcvad and still opens segments.)
A segment opens when `start_ms` of voiced frames fall within `start_window_ms` (one click is
not enough), is kept only once it holds `min_segment_ms` of speech (shorter bursts become a
`Gap`), ends after `hangover_ms` without a voiced frame and carries `speech_pad_ms` of audio on
either side (after speech, at most the hangover). A segment that would grow past
`max_segment_ms` is cut at its quietest frame.

Guarantees the session relies on:
- segments and gaps never overlap, and padding never reaches into an earlier segment or gap;
- a segment's `audio` is exactly stream samples [start_sample, end_sample);
- a max-length split loses and duplicates nothing: the next segment starts at the cut;
- feeding the same audio in different chunk sizes gives the same events;
- memory is bounded: only the open segment (at most `max_segment_ms`) and the padding window
  are kept.

`SpeechStarted` is emitted once the segment is kept (so every started segment gets closed, and
the id is never taken by a discarded burst); its `sample` is the speech onset, which lies
`min_segment_ms` or so in the past. Speech events describe voice activity, not segments: a
max-length split closes one segment and opens the next without a stop/start pair.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
import webrtcvad

from engine.api import TARGET_SAMPLE_RATE

SAMPLE_RATE = TARGET_SAMPLE_RATE
_SAMPLES_PER_MS = SAMPLE_RATE // 1000
# Audio is framed in pieces of at most this many samples, so one huge feed (a whole file) does
# not allocate per-frame arrays for all of it at once.
_BLOCK_SAMPLES = SAMPLE_RATE
# Bounds for int16 PCM, as long as the most a block can frame (its samples and a partial frame
# left from before): resampled audio can overshoot [-1, 1] a little. Scaling first and then
# clamping gives the same values as clamping to [-1, 1] first (the product is monotonic), and
# np.maximum/np.minimum against whole arrays take numpy's fast loop, which they do not against a
# scalar (there they cost more than the scaling; np.clip more still).
_PCM_LOW = np.full(_BLOCK_SAMPLES + 30 * _SAMPLES_PER_MS, -32767.0, np.float32)
_PCM_HIGH = -_PCM_LOW
_PCM_LOW.flags.writeable = _PCM_HIGH.flags.writeable = False
_PCM16_SCALE = np.float32(1 / 32768)  # 16-bit PCM to float, as the session's decoder does


def _pcm16_bytes(samples: np.ndarray) -> bytes:
    """Float samples as the 16-bit PCM webrtcvad reads (native byte order), clipped to full
    scale."""
    scaled = samples * 32767.0
    np.maximum(scaled, _PCM_LOW[: len(scaled)], out=scaled)
    np.minimum(scaled, _PCM_HIGH[: len(scaled)], out=scaled)
    return scaled.astype(np.int16).tobytes()

CloseReason = Literal["endpoint", "max_length", "flush"]
GapReason = Literal["too_short"]


def _to_ms(sample: int) -> float:
    return sample * 1000 / SAMPLE_RATE


@dataclass(frozen=True)
class SegmenterConfig:
    """Segmenter settings; every value is checked here so a session can reject bad ones early.

    Millisecond lengths counted in frames (`start_ms`, `start_window_ms`, `hangover_ms`) are
    rounded up to whole frames. The default gate, -45 dBFS, sits 15-20 dB below conversational
    speech (whose frames are mostly -35 to -15 dBFS) and a few dB above the loudest background a
    quiet room or a clean phone line has (-60 to -50 dBFS).
    """

    frame_ms: int = 20
    aggressiveness: int = 2
    speech_pad_ms: int = 300
    hangover_ms: int = 500
    start_ms: int = 60
    start_window_ms: int = 100
    min_segment_ms: int = 250
    max_segment_ms: int = 15000
    energy_gate_dbfs: float = -45.0

    def __post_init__(self) -> None:
        for name in (
            "frame_ms",
            "aggressiveness",
            "speech_pad_ms",
            "hangover_ms",
            "start_ms",
            "start_window_ms",
            "min_segment_ms",
            "max_segment_ms",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"frame_ms must be 10, 20 or 30, got {self.frame_ms}")
        if not 0 <= self.aggressiveness <= 3:
            raise ValueError(f"aggressiveness must be 0..3, got {self.aggressiveness}")
        for name in ("speech_pad_ms", "min_segment_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("hangover_ms", "start_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.start_window_ms < self.start_ms:
            raise ValueError(
                f"start_window_ms must be >= start_ms ({self.start_ms}), got {self.start_window_ms}"
            )
        # A burst must be judged, and a split point found before the last hangover, well
        # inside the limit; a third of it is where the split looks for the quietest frame.
        least = 3 * (
            self.speech_pad_ms + self.min_segment_ms + self.hangover_ms + 2 * self.frame_ms
        )
        if self.max_segment_ms < least:
            raise ValueError(
                "max_segment_ms must be >= 3 * (speech_pad_ms + min_segment_ms + hangover_ms "
                f"+ 2 * frame_ms) = {least}, got {self.max_segment_ms}"
            )
        gate = self.energy_gate_dbfs
        if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not gate <= 0:
            raise ValueError(f"energy_gate_dbfs must be a number <= 0 (-inf: none), got {gate!r}")


@dataclass(frozen=True)
class _SpeechEdge:
    segment_id: int
    sample: int

    @property
    def ms(self) -> float:
        return _to_ms(self.sample)


@dataclass(frozen=True)
class SpeechStarted(_SpeechEdge):
    """Voice activity began at `sample` (the onset, before any padding)."""


@dataclass(frozen=True)
class SpeechStopped(_SpeechEdge):
    """Voice activity ended at `sample` (end of the last voiced frame, before padding)."""


class _SampleSpan:
    """Millisecond views of a span's `start_sample` and `end_sample`."""

    start_sample: int
    end_sample: int

    @property
    def start_ms(self) -> float:
        return _to_ms(self.start_sample)

    @property
    def end_ms(self) -> float:
        return _to_ms(self.end_sample)


@dataclass(frozen=True, eq=False)
class SegmentClosed(_SampleSpan):
    """A finished segment: `audio` is stream samples [start_sample, end_sample), read-only."""

    segment_id: int
    start_sample: int
    end_sample: int
    audio: np.ndarray
    reason: CloseReason


@dataclass(frozen=True)
class Gap(_SampleSpan):
    """Received audio deliberately left untranscribed (a burst shorter than min_segment_ms)."""

    start_sample: int
    end_sample: int
    reason: GapReason


Event = SpeechStarted | SpeechStopped | SegmentClosed | Gap


@dataclass(frozen=True, eq=False)
class OpenSegment:
    """The segment being spoken: its audio so far (read-only, never changed), for partials."""

    segment_id: int
    start_sample: int
    audio: np.ndarray

    @property
    def end_sample(self) -> int:
        return self.start_sample + len(self.audio)

    @property
    def start_ms(self) -> float:
        return _to_ms(self.start_sample)


_IDLE, _PENDING, _OPEN = 0, 1, 2


class Segmenter:
    """Sans-I/O segmenter for one channel: `feed` samples, get events back.

    The audio still needed (the open segment, or while idle the padding window) is held in one
    buffer that runs to the last sample fed, so a segment's audio is a view of it, not a copy.
    The memory under a view handed out is never written again, as its holder (a scheduler on
    another thread) may keep it: samples are only ever added at the end, and once a view has
    been taken, moving the samples still needed to the front (to drop the rest, or when the
    buffer is full) takes a fresh buffer. So each segment after a close or a split starts in a
    fresh one.
    """

    def __init__(self, cfg: SegmenterConfig | None = None) -> None:
        self.cfg = cfg = cfg or SegmenterConfig()
        self._frame = frame = cfg.frame_ms * _SAMPLES_PER_MS
        self._vad = webrtcvad.Vad(cfg.aggressiveness)
        # Sum of squares of one frame's float samples at the gate; -inf dBFS gives 0 (no gate).
        self._gate_energy = 10.0 ** (cfg.energy_gate_dbfs / 10.0) * frame
        self._start_frames = math.ceil(cfg.start_ms / cfg.frame_ms)
        self._window = math.ceil(cfg.start_window_ms / cfg.frame_ms) * frame
        hangover_frames = math.ceil(cfg.hangover_ms / cfg.frame_ms)
        self._hangover_frames = hangover_frames
        self._pad = cfg.speech_pad_ms * _SAMPLES_PER_MS
        # The segment closes when the hangover runs out, so no more than that can follow speech.
        self._end_pad = min(self._pad, hangover_frames * frame)
        self._min = cfg.min_segment_ms * _SAMPLES_PER_MS
        self._max = cfg.max_segment_ms * _SAMPLES_PER_MS
        # The open segment never reaches max_segment_ms and a block adds at most one second,
        # so the buffer need not grow past this (a long start window may still need more).
        self._limit = self._max + _BLOCK_SAMPLES

        self._seen = 0  # samples fed so far
        self._pos = 0  # start of the next frame; samples before it have been judged
        self._buf = np.empty(0, np.float32)  # stream samples [base, seen), then free room
        self._base = 0
        self._shared = False  # a view of _buf has been handed out
        self._pcm_rest: bytes | None = None  # fed 16-bit PCM: its samples [pos, seen), as sent
        self._floor = 0  # nothing before this may join a new segment or gap
        self._next_id = 0

        self._state = _IDLE
        self._recent: deque[int] = deque()  # starts of recent voiced frames, while idle
        self._seg_id = -1
        self._seg_start = 0
        self._onset = 0
        self._speech_end = 0
        self._silent_frames = 0

    @property
    def samples_seen(self) -> int:
        """Samples fed since the stream began."""
        return self._seen

    @property
    def buffered_samples(self) -> int:
        """Samples held in memory (open segment, padding window, a partial frame, and what is
        no longer needed until the buffer is next moved); its free room is not counted."""
        return self._seen - self._base

    def feed(self, samples: np.ndarray) -> list[Event]:
        """Take the next samples of the stream (float, mono, 16 kHz, any length)."""
        samples = np.asarray(samples)
        if samples.dtype.kind != "f":
            raise TypeError(f"samples must be floating point in [-1, 1], got {samples.dtype}")
        return self._feed(samples, pcm16=False)

    def feed_pcm16(self, samples: np.ndarray) -> list[Event]:
        """Like `feed`, for 16-bit PCM as a client sends it (mono, 16 kHz): webrtcvad reads
        these very samples, with no round trip through float, and segments hold them as
        float32 / 32768, exactly what `feed` keeps of decoded 16-bit audio. A stream is fed
        one way or the other throughout."""
        samples = np.asarray(samples)
        if samples.dtype != np.int16:
            raise TypeError(f"samples must be int16, got {samples.dtype}")
        return self._feed(samples, pcm16=True)

    def _feed(self, samples: np.ndarray, pcm16: bool) -> list[Event]:
        if samples.ndim != 1:
            raise ValueError(f"samples must be one-dimensional (mono), got shape {samples.shape}")
        if pcm16 and not self._seen:
            self._pcm_rest = b""
        if (self._pcm_rest is not None) != pcm16:
            raise ValueError("a stream is fed floats or 16-bit PCM throughout, not both")
        events: list[Event] = []
        if len(samples) <= _BLOCK_SAMPLES:  # as a stream sends it: no slicing
            self._feed_block(samples, events)
            return events
        for begin in range(0, len(samples), _BLOCK_SAMPLES):
            self._feed_block(samples[begin : begin + _BLOCK_SAMPLES], events)
        return events

    def flush(self) -> list[Event]:
        """Close whatever is open now, up to the last sample received (end of stream, finalize).

        A kept segment closes with reason "flush"; a burst still shorter than min_segment_ms
        becomes a Gap. The segmenter goes on working for later audio.
        """
        if self._state == _IDLE:
            return []
        self._pos = self._seen  # the partial frame belongs to what is being closed
        if self._pcm_rest:
            self._pcm_rest = b""
        events: list[Event] = []
        self._close(self._seen, "flush", events)
        self._drop_unneeded()
        return events

    def open_segment(self) -> OpenSegment | None:
        """The kept segment still open, with its audio up to the last whole frame, if any."""
        if self._state != _OPEN:
            return None
        return OpenSegment(self._seg_id, self._seg_start, self._audio(self._seg_start, self._pos))

    def open_span(self) -> tuple[int, int, int] | None:
        """(segment_id, start_sample, end_sample) of the open segment, without copying its
        audio: the session asks on every frame, and wants the audio only when a partial is due."""
        if self._state != _OPEN:
            return None
        return self._seg_id, self._seg_start, self._pos

    def _feed_block(self, samples: np.ndarray, events: list[Event]) -> None:
        held = self._seen - self._base
        if held + len(samples) > len(self._buf):
            self._move(len(samples))
            held = self._seen - self._base
        # Our own copy, so kept audio does not alias the caller's buffer; float32 from here on.
        kept = self._buf[held : held + len(samples)]
        pcm16 = self._pcm_rest is not None
        if pcm16:
            np.multiply(samples, _PCM16_SCALE, out=kept)
        else:
            kept[:] = samples
        self._seen += len(samples)
        frame = self._frame
        start = self._pos
        count = (self._seen - start) // frame
        if pcm16:  # webrtcvad reads the samples as they came; a partial frame waits
            received = self._pcm_rest + samples.tobytes() if self._pcm_rest else samples.tobytes()
            pcm, self._pcm_rest = received[: 2 * count * frame], received[2 * count * frame :]
        if count == 0:
            return
        first = start - self._base
        whole = self._buf[first : first + count * frame]
        frames = whole.reshape(count, frame)
        energies = np.vecdot(frames, frames).tolist()
        if not pcm16:
            pcm = _pcm16_bytes(whole)

        is_speech = self._vad.is_speech
        gate = self._gate_energy
        step = self._step
        size = 2 * frame
        for i, energy in enumerate(energies):
            # webrtcvad sees every frame, so its noise model adapts to the real background.
            voiced = is_speech(pcm[i * size : (i + 1) * size], SAMPLE_RATE) and energy >= gate
            if voiced or self._state != _IDLE:
                step(start + i * frame, voiced, events)
        self._pos = start + count * frame
        self._drop_unneeded()

    def _step(self, start: int, voiced: bool, events: list[Event]) -> None:
        """Advance the state machine by one frame [start, start + frame)."""
        end = start + self._frame
        if self._state == _IDLE:
            if voiced:
                self._maybe_open(start, events)
            return
        if voiced:
            self._speech_end = end
            self._silent_frames = 0
            if self._state == _PENDING and end - self._onset >= self._min:
                self._keep(events)
        else:
            self._silent_frames += 1
            if self._silent_frames >= self._hangover_frames:
                self._close(self._speech_end + self._end_pad, "endpoint", events)
                return
        # Split before the next frame could take the segment past the limit.
        if self._state == _OPEN and end + self._frame - self._seg_start > self._max:
            self._split(end, events)

    def _maybe_open(self, start: int, events: list[Event]) -> None:
        recent = self._recent
        recent.append(start)
        while recent[0] <= start - self._window:
            recent.popleft()
        if len(recent) < self._start_frames:
            return
        self._onset = recent[0]
        recent.clear()
        self._seg_start = max(self._onset - self._pad, self._floor)
        self._speech_end = start + self._frame
        self._silent_frames = 0
        self._state = _PENDING
        if self._speech_end - self._onset >= self._min:
            self._keep(events)

    def _keep(self, events: list[Event]) -> None:
        """The pending burst is long enough: it becomes a segment with an id."""
        self._state = _OPEN
        self._seg_id = self._new_id()
        events.append(SpeechStarted(self._seg_id, self._onset))

    def _close(self, end: int, reason: CloseReason, events: list[Event]) -> None:
        if self._state == _OPEN:
            events.append(SpeechStopped(self._seg_id, self._speech_end))
            events.append(self._segment(end, reason))
        else:
            events.append(Gap(self._seg_start, end, "too_short"))
        self._floor = end
        self._state = _IDLE

    def _split(self, end: int, events: list[Event]) -> None:
        """Cut at the middle of the quietest frame in the last third of the segment.

        The search stops at the last voiced frame, so the next segment always holds speech.
        """
        frame = self._frame
        hi = self._speech_end
        lo = self._seg_start + 2 * (end - self._seg_start) // 3
        count = (hi - lo) // frame
        frames = self._audio(hi - count * frame, hi).reshape(count, frame)
        quietest = int(np.argmin(np.vecdot(frames, frames)))
        cut = hi - (count - quietest) * frame + frame // 2
        events.append(self._segment(cut, "max_length"))
        self._seg_id = self._new_id()
        self._seg_start = cut

    def _segment(self, end: int, reason: CloseReason) -> SegmentClosed:
        audio = self._audio(self._seg_start, end)
        return SegmentClosed(self._seg_id, self._seg_start, end, audio, reason)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _audio(self, begin: int, end: int) -> np.ndarray:
        """Stream samples [begin, end), all of which are held, as a read-only view whose memory
        is never written again."""
        audio = self._buf[begin - self._base : end - self._base]
        audio.flags.writeable = False
        self._shared = True
        return audio

    def _first_needed(self) -> int:
        """The first sample still needed: the open segment's start, or while idle that of the
        padding and start window of a segment that may open next (never before the floor)."""
        if self._state == _IDLE:
            return max(self._floor, self._pos - self._window - self._pad)
        return self._seg_start

    def _move(self, room: int) -> None:
        """Move the samples still needed to the front of the buffer, with `room` free after
        them: in place if they fit and no view of the buffer was handed out, else to a fresh
        buffer, twice as large as needed (up to the limit) so that moves stay rare."""
        keep = self._first_needed()
        live = self._buf[keep - self._base : self._seen - self._base]
        need = len(live) + room
        buf = self._buf
        if self._shared or need > len(buf):
            buf = np.empty(max(need, min(2 * need, self._limit)), np.float32)
            self._shared = False
        buf[: len(live)] = live  # numpy copies overlapping memory correctly
        self._buf, self._base = buf, keep

    def _drop_unneeded(self) -> None:
        """Leave a buffer a view was taken of to the views once it holds audio no segment can
        reach any more (a segment closed or was split), so memory stays bounded. A buffer
        nobody else sees is moved in place only when it is full."""
        if self._shared and self._base < self._first_needed():
            self._move(0)

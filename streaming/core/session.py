"""The sans-I/O session core: one per stream, the same for every wire dialect.

Fed audio bytes and control calls, it returns events for the client and engine requests for the
scheduler; fed engine results, it returns more events. It never touches a socket, a clock or a
model, so every rule (segmenting, partial pacing, stable text, flushing, nothing lost) is
testable with arrays.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from engine.api import TARGET_SAMPLE_RATE, Hypothesis, Word, primary_language
from streaming.core.audio import AudioDecoder, AudioFormat
from streaming.core.captions import CaptionConfig, Captions
from streaming.core.events import (
    EngineRequest,
    ErrorEvent,
    Event,
    FinalTranscript,
    Latency,
    PartialTranscript,
    RefinedTranscript,
    SessionClosed,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    Status,
    TranslatedTranscript,
)
from streaming.core.stability import StabilityConfig, StabilityTracker
from streaming.core.vad import Gap, SegmentClosed, Segmenter, SegmenterConfig
from streaming.core.vad import SpeechStarted as VadSpeechStarted
from streaming.core.vad import SpeechStopped as VadSpeechStopped
from streaming.ops.config import SessionConfig

Output = Event | EngineRequest


def ms(samples: int) -> int:
    return samples * 1000 // TARGET_SAMPLE_RATE


def to_samples(milliseconds: int) -> int:
    return milliseconds * TARGET_SAMPLE_RATE // 1000


@dataclass
class PendingFinal:
    start_sample: int
    end_sample: int
    close_sample: int  # how much audio the channel had seen when the segment was closed
    reason: str
    from_finalize: bool
    tracker: StabilityTracker | None
    held: HeldFinal | None = None  # refine_mode sync: the primary's final, waiting for refine


@dataclass(frozen=True)
class HeldFinal:
    """A primary final kept back until the refine model's text comes (refine_mode sync)."""

    hypothesis: Hypothesis
    queue_ms: float
    compute_ms: float


@dataclass(frozen=True)
class RefineWait:
    """A final already sent whose refined text is on its way (refine_mode async)."""

    start_ms: int
    end_ms: int
    text: str


@dataclass(frozen=True)
class TranslateWait:
    """A final already sent whose translation (`translate_to`) is on its way."""

    start_ms: int
    end_ms: int


@dataclass
class ChannelState:
    index: int
    segmenter: Segmenter
    trackers: dict[int, StabilityTracker] = field(default_factory=dict)  # open segment -> tracker
    partial_audio_ms: dict[int, int] = field(default_factory=dict)  # audio covered by last ask
    partial_rev: dict[int, int] = field(default_factory=dict)  # last rev asked
    shown_rev: dict[int, int] = field(default_factory=dict)  # last rev sent to the client
    texted: set[int] = field(default_factory=set)  # open segments whose partials showed words
    pending: dict[int, PendingFinal] = field(default_factory=dict)
    refining: dict[int, RefineWait] = field(default_factory=dict)  # async refine in flight
    translating: dict[int, TranslateWait] = field(default_factory=dict)  # translation in flight


@dataclass
class SessionStats:
    segments: int = 0
    gaps: int = 0
    partials_sent: int = 0
    stable_words_changed: int = 0
    stable_words_shown: int = 0


class Session:
    def __init__(
        self,
        session_id: str,
        options: SessionConfig,
        *,
        refine_model: bool = False,
        refined_messages: bool = True,
    ) -> None:
        """`refine_model`: a refine model is loaded; `refined_messages`: the dialect can carry
        `transcript.refined` (else refine runs in sync mode: the final waits for it)."""
        self.id = session_id
        self.options = options
        self.refine_model = refine_model
        self.refined_messages = refined_messages
        self.decoder = AudioDecoder(
            AudioFormat(options.encoding, options.sample_rate, options.channels)
        )
        vad = SegmenterConfig(
            frame_ms=options.vad_frame_ms,
            aggressiveness=options.vad_aggressiveness,
            speech_pad_ms=options.speech_pad_ms,
            hangover_ms=options.hangover_ms,
            min_segment_ms=options.min_segment_ms,
            max_segment_ms=options.max_segment_ms,
            energy_gate_dbfs=options.energy_gate_dbfs,
        )
        self.stability = StabilityConfig(
            agreement=options.stable_agreement, settle_ms=options.stable_settle_ms
        )
        self.channels = [ChannelState(i, Segmenter(vad)) for i in range(options.channels)]
        self.state = "open"  # open -> closing (flushed, finals pending) -> closed
        self.close_reason = ""
        self.samples = 0  # 16 kHz samples received per channel
        self.stats = SessionStats()
        self.hotwords: tuple[str, ...] = ()
        self.captions = Captions(
            CaptionConfig(
                mode=options.captions_mode,
                preset=options.captions_preset,
                rows=options.captions_rows,
                hold_back_words=options.captions_hold_back_words,
                timecode_origin_ms=options.timecode_origin_ms,
            ),
            options.channels,
        )

    # --- calls from the dialect -------------------------------------------------------------

    def start(self) -> list[Output]:
        return [SessionStarted(self.id, dataclasses.asdict(self.options))]

    def feed_audio(self, data: bytes) -> list[Output]:
        if self.state != "open":
            return [ErrorEvent("session_closing", "audio after close is ignored")]
        if self.decoder.pcm16_direct:
            return self._consume(self.decoder.feed_pcm16(data), from_finalize=False)
        return self._consume(self.decoder.feed(data), from_finalize=False)

    def finalize(self) -> list[Output]:
        """Close every open segment now and keep the stream going (push-to-talk, turn end)."""
        if self.state != "open":
            return []
        return self._flush_segmenters(from_finalize=True)

    def close(self, reason: str = "client") -> list[Output]:
        """Flush everything; `SessionClosed` follows once the last final is out."""
        if self.state != "open":
            return []
        out = self._consume(self.decoder.flush(), from_finalize=False)
        out += self._flush_segmenters(from_finalize=True)
        self.state = "closing"
        self.close_reason = reason
        return out + self._maybe_closed()

    def status(self, lag_ms: float, queued_audio_ms: float) -> list[Output]:
        return [Status(int(lag_ms), int(queued_audio_ms))]

    @property
    def pending_finals(self) -> int:
        return sum(len(ch.pending) for ch in self.channels)

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    @property
    def audio_ms(self) -> int:
        return ms(self.samples)

    # --- results from the scheduler ---------------------------------------------------------

    def on_result(
        self,
        request: EngineRequest,
        hypothesis: Hypothesis | None,
        *,
        error: str = "",
        queue_ms: float = 0.0,
        compute_ms: float = 0.0,
    ) -> list[Output]:
        """A scheduler outcome: `hypothesis` None means dropped (partials, refine) or failed
        (`error`)."""
        channel = self.channels[request.channel]
        if request.kind == "partial":
            return self._on_partial(channel, request, hypothesis)
        if request.kind == "refine" and request.translate_to is not None:
            return self._on_translated(channel, request, hypothesis, error)
        if request.kind == "refine":
            return self._on_refined(channel, request, hypothesis, error, queue_ms, compute_ms)
        pending = channel.pending.get(request.segment_id)
        if pending is None:
            return []
        if hypothesis is None:
            del channel.pending[request.segment_id]
            out: list[Output] = [
                ErrorEvent(
                    "engine_error",
                    f"segment {request.segment_id} could not be transcribed: {error or 'dropped'}",
                    channel=request.channel,
                    segment_id=request.segment_id,
                ),
                *self.captions.final(request.channel, request.segment_id, None),
            ]
            return out + self._maybe_closed()
        mode = self.refine_mode
        if mode == "sync" and hypothesis.words:
            pending.held = HeldFinal(hypothesis, queue_ms, compute_ms)
            return [self._refine_request(request)]
        del channel.pending[request.segment_id]
        out = self._send_final(channel, request, pending, hypothesis, queue_ms, compute_ms)
        if mode == "async" and hypothesis.words:
            final = out[0]
            channel.refining[request.segment_id] = RefineWait(
                final.start_ms, final.end_ms, final.text
            )
            out.insert(1, self._refine_request(request))
        if hypothesis.words:
            out += self._translate(channel, request, out[0])
        return out + self._maybe_closed()

    @property
    def refine_mode(self) -> str | None:
        """How finals are refined now: None (not at all), "async" or "sync"."""
        if not (self.refine_model and self.options.refine):
            return None
        return self.options.refine_mode if self.refined_messages else "sync"

    @property
    def refines_pending(self) -> int:
        return sum(len(ch.refining) for ch in self.channels)

    @property
    def translations_pending(self) -> int:
        return sum(len(ch.translating) for ch in self.channels)

        # --- internals ---------------------------------------------------------------------------

    def _consume(self, audio: np.ndarray, from_finalize: bool) -> list[Output]:
        out: list[Output] = []
        if audio.shape[-1] == 0:
            return out
        self.samples += audio.shape[-1]
        pcm16 = audio.dtype == np.int16  # undecoded 16-bit PCM (AudioDecoder.pcm16_direct)
        for channel in self.channels:
            segmenter = channel.segmenter
            feed = segmenter.feed_pcm16 if pcm16 else segmenter.feed
            for event in feed(audio[channel.index]):
                out += self._on_vad_event(channel, event, from_finalize)
            out += self._maybe_partial(channel)
        return out

    def _flush_segmenters(self, from_finalize: bool) -> list[Output]:
        out: list[Output] = []
        for channel in self.channels:
            for event in channel.segmenter.flush():
                out += self._on_vad_event(channel, event, from_finalize)
        return out

    def _on_vad_event(self, channel: ChannelState, event, from_finalize: bool) -> list[Output]:
        if isinstance(event, VadSpeechStarted):
            return [SpeechStarted(channel.index, event.segment_id, ms(event.sample))]
        if isinstance(event, VadSpeechStopped):
            return [SpeechStopped(channel.index, event.segment_id, ms(event.sample))]
        if isinstance(event, Gap):
            self.stats.gaps += 1
            return []
        if isinstance(event, SegmentClosed):
            return self._on_closed(channel, event, from_finalize)
        return []

    def _on_closed(self, channel: ChannelState, event: SegmentClosed, from_finalize: bool):
        seg = event.segment_id
        self.stats.segments += 1
        channel.pending[seg] = PendingFinal(
            start_sample=event.start_sample,
            end_sample=event.end_sample,
            close_sample=channel.segmenter.samples_seen,
            reason=event.reason,
            from_finalize=from_finalize and event.reason == "flush",
            tracker=channel.trackers.pop(seg, None),
        )
        channel.partial_audio_ms.pop(seg, None)
        channel.partial_rev.pop(seg, None)
        channel.shown_rev.pop(seg, None)
        channel.texted.discard(seg)
        self.captions.closed(channel.index, seg)
        return [
            EngineRequest(
                "final",
                channel.index,
                seg,
                0,
                event.audio,
                self.hotwords,
                language=self._language(),
            )
        ]

    def _maybe_partial(self, channel: ChannelState) -> list[Output]:
        if not self.options.interim_results:
            return []
        span = channel.segmenter.open_span()
        if span is None:
            return []
        segment_id, start, end = span
        covered = ms(end - start)
        if covered - channel.partial_audio_ms.get(segment_id, 0) < self.options.partial_interval_ms:
            return []
        # A segment opens with speech, or continues speech after a split at the maximum length.
        tracker = channel.trackers.get(segment_id)
        if tracker is None:
            tracker = channel.trackers[segment_id] = StabilityTracker(self.stability)
        rev = channel.partial_rev.get(segment_id, 0) + 1
        channel.partial_rev[segment_id] = rev
        channel.partial_audio_ms[segment_id] = covered
        # Only the audio after the committed words, with a little context, is decoded again.
        window = tracker.window(self.options.partial_window_ms)
        audio = channel.segmenter.open_segment().audio[to_samples(window.start_ms) :]
        return [
            EngineRequest(
                "partial",
                channel.index,
                segment_id,
                rev,
                audio,
                self.hotwords,
                window=window,
                first_text=segment_id not in channel.texted,
                language=self._language(),
            )
        ]

    def _language(self) -> str | None:
        """The session's `language` as engines take it (read per request: `session.update`
        may change it); empty leaves it to the model."""
        return primary_language(self.options.language) or None

    def _on_partial(
        self, channel: ChannelState, request: EngineRequest, hypothesis: Hypothesis | None
    ) -> list[Output]:
        tracker = channel.trackers.get(request.segment_id)
        shown = channel.shown_rev.get(request.segment_id, 0)
        if hypothesis is None or tracker is None or request.rev <= shown:
            return []  # dropped, segment already final, or an older answer arriving late
        span = channel.segmenter.open_span()
        if span is None or span[0] != request.segment_id:
            return []
        channel.shown_rev[request.segment_id] = request.rev
        covered = request.window.start_ms + ms(len(request.audio))
        partial = tracker.update(hypothesis.words, covered, request.window)
        self.stats.partials_sent += 1
        if partial.stable or partial.volatile:
            channel.texted.add(request.segment_id)
        start_ms = ms(span[1])
        words = _shift([*partial.stable, *partial.volatile], start_ms)
        return [
            PartialTranscript(
                channel=channel.index,
                segment_id=request.segment_id,
                rev=partial.rev,
                start_ms=start_ms,
                end_ms=start_ms + covered,
                stable_text=partial.stable_text,
                volatile_text=partial.volatile_text,
                words=words,
            ),
            *self.captions.stable(channel.index, request.segment_id, words[: len(partial.stable)]),
        ]

    def _final(
        self,
        channel: ChannelState,
        request: EngineRequest,
        pending: PendingFinal,
        hyp: Hypothesis,
        queue_ms: float,
        compute_ms: float,
    ) -> FinalTranscript:
        start_ms = ms(pending.start_sample)
        words = _shift(hyp.words, start_ms)
        if pending.tracker is not None:
            result = pending.tracker.final(hyp.words)
            self.stats.stable_words_changed += result.changed_stable
            self.stats.stable_words_shown += len(pending.tracker.stable)
        speech_end = words[-1].end_ms if words else ms(pending.end_sample)
        return FinalTranscript(
            channel=channel.index,
            segment_id=request.segment_id,
            start_ms=start_ms,
            end_ms=ms(pending.end_sample),
            text=hyp.text,
            words=words,
            confidence=hyp.confidence,
            latency=Latency(
                endpoint_ms=max(0, ms(pending.close_sample) - speech_end),
                queue_ms=int(queue_ms),
                compute_ms=int(compute_ms),
            ),
            reason=pending.reason,
            from_finalize=pending.from_finalize,
        )

    def _send_final(
        self,
        channel: ChannelState,
        request: EngineRequest,
        pending: PendingFinal,
        hypothesis: Hypothesis,
        queue_ms: float,
        compute_ms: float,
    ) -> list[Output]:
        final = self._final(channel, request, pending, hypothesis, queue_ms, compute_ms)
        return [final, *self.captions.final(request.channel, request.segment_id, final.words)]

    def _refine_request(self, final: EngineRequest) -> EngineRequest:
        """The refine model's turn at a final's audio: same language and hotwords."""
        return EngineRequest(
            "refine",
            final.channel,
            final.segment_id,
            0,
            final.audio,
            self.hotwords,
            language=self._language(),
            deadline_ms=self.options.refine_deadline_ms,
        )

    def _on_refined(
        self,
        channel: ChannelState,
        request: EngineRequest,
        hypothesis: Hypothesis | None,
        error: str,
        queue_ms: float,
        compute_ms: float,
    ) -> list[Output]:
        """Sync: the held final goes out with the refined text (or its own, when refine did not
        run). Async: `transcript.refined` follows the final already sent."""
        segment_id = request.segment_id
        pending = channel.pending.get(segment_id)
        if pending is not None and pending.held is not None:
            del channel.pending[segment_id]
            held = pending.held
            chosen = hypothesis if hypothesis is not None else held.hypothesis
            out = self._send_final(
                channel,
                request,
                pending,
                chosen,
                held.queue_ms + queue_ms,
                held.compute_ms + compute_ms,
            )
            return out + self._translate(channel, request, out[0]) + self._maybe_closed()
        wait = channel.refining.pop(segment_id, None)
        if wait is None:
            return []  # answered already (its deadline passed)
        if hypothesis is None:
            refined = RefinedTranscript(
                channel.index, segment_id, wait.start_ms, wait.end_ms, wait.text, [], 0.0,
                int(queue_ms), int(compute_ms), changed=False, skipped=True,
                reason=error or "dropped",
            )  # fmt: skip
        else:
            refined = RefinedTranscript(
                channel.index, segment_id, wait.start_ms, wait.end_ms, hypothesis.text,
                _shift(hypothesis.words, wait.start_ms), hypothesis.confidence,
                int(queue_ms), int(compute_ms), changed=hypothesis.text != wait.text,
            )  # fmt: skip
        return [refined, *self._maybe_closed()]

    def _translate(
        self, channel: ChannelState, request: EngineRequest, final: FinalTranscript
    ) -> list[Output]:
        """The refine model's translation of a final with words just sent (`translate_to`),
        whatever the refine mode: asked for once the final is out, so `transcript.translated`
        always follows its final."""
        target = primary_language(self.options.translate_to)
        if not (target and self.refine_model):
            return []
        channel.translating[final.segment_id] = TranslateWait(final.start_ms, final.end_ms)
        return [
            EngineRequest(
                "refine",
                request.channel,
                request.segment_id,
                0,
                request.audio,
                self.hotwords,
                language=self._language(),
                deadline_ms=self.options.refine_deadline_ms,
                translate_to=target,
            )
        ]

    def _on_translated(
        self,
        channel: ChannelState,
        request: EngineRequest,
        hypothesis: Hypothesis | None,
        error: str,
    ) -> list[Output]:
        """`transcript.translated` for a final already sent; skipped when it did not run."""
        wait = channel.translating.pop(request.segment_id, None)
        if wait is None:
            return []  # answered already (its deadline passed)
        translated = TranslatedTranscript(
            channel.index,
            request.segment_id,
            wait.start_ms,
            wait.end_ms,
            request.translate_to or "",
            hypothesis.text if hypothesis is not None else "",
            skipped=hypothesis is None,
            reason="" if hypothesis is not None else error or "dropped",
        )
        return [translated, *self._maybe_closed()]

    def _maybe_closed(self) -> list[Output]:
        if (
            self.state != "closing"
            or self.pending_finals
            or self.refines_pending
            or self.translations_pending
        ):
            return []
        self.state = "closed"
        return [SessionClosed(self.audio_ms, self.stats.segments, self.close_reason)]


def _shift(words: list[Word], offset_ms: int) -> list[Word]:
    """Segment-relative words in stream time (built directly: `dataclasses.replace` costs 3x,
    and every partial of every stream shifts all its words)."""
    return [Word(w.word, w.start_ms + offset_ms, w.end_ms + offset_ms, w.confidence) for w in words]

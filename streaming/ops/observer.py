"""A stream's measurements: the Prometheus metrics and the pop-on caption store it feeds.

The stream protocol reports each event as it leaves and its audio now and then; this turns
them into metric updates, so the protocol itself stays free of metrics.
"""

from __future__ import annotations

from streaming.core.captions import CaptionStore
from streaming.core.events import (
    CaptionAppend,
    CaptionCue,
    ErrorEvent,
    Event,
    FinalTranscript,
    PartialTranscript,
    SessionStarted,
)
from streaming.ops.metrics import Metrics


class MetricsObserver:
    """One stream's observer (it remembers which partials were its segments' first)."""

    def __init__(
        self, metrics: Metrics, session_id: str, captions: CaptionStore | None = None
    ) -> None:
        self.metrics = metrics
        self.session_id = session_id
        self.captions = captions  # pop-on cues kept for GET .../captions.vtt|srt
        self.counted_audio_ms = 0  # audio already added to the audio-seconds counter
        self.first_partial_sent: set[tuple[int, int]] = set()

    def audio(self, audio_ms: int) -> None:
        """The audio-seconds counter moves in steps (once a second and at the end), not per
        frame: a counter increment takes a lock."""
        self.metrics.audio_seconds.inc((audio_ms - self.counted_audio_ms) / 1000)
        self.counted_audio_ms = audio_ms

    def event(self, event: Event, audio_ms: int) -> None:
        metrics = self.metrics
        if isinstance(event, FinalTranscript):
            metrics.finals.inc()
            for stage in ("endpoint_ms", "queue_ms", "compute_ms"):
                metrics.final_latency.labels(stage[:-3]).observe(
                    getattr(event.latency, stage) / 1000
                )
        elif isinstance(event, PartialTranscript):
            metrics.partials.inc()
            key = (event.channel, event.segment_id)
            if key not in self.first_partial_sent and (event.stable_text or event.volatile_text):
                self.first_partial_sent.add(key)
                metrics.first_partial_latency.observe(max(0, audio_ms - event.start_ms) / 1000)
        elif isinstance(event, ErrorEvent):
            metrics.errors.labels(event.code).inc()
        elif isinstance(event, CaptionAppend):
            delay = max(0, audio_ms - event.end_ms) / 1000
            metrics.caption_delay.labels("append").observe(delay)
        elif isinstance(event, CaptionCue):
            delay = max(0, audio_ms - event.speech_end_ms) / 1000
            metrics.caption_delay.labels("cue").observe(delay)
            if self.captions is not None:
                self.captions.add(self.session_id, event)
        elif isinstance(event, SessionStarted) and self.captions is not None:
            if event.options.get("captions_mode") == "popon":
                self.captions.open(self.session_id, event.options["timecode_origin_ms"])

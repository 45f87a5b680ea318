"""The `noop` family: answers instantly without a model, for load tests of the gateway alone.

Each segment gets one placeholder word per 300 ms of audio, so every event path (partials,
stable text, finals with word times) carries realistic traffic while the engine costs nothing.
An optional delay per call imitates a model's compute time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .api import DEFAULT_OPTIONS, TARGET_SAMPLE_RATE, EngineOptions, Hypothesis, Segment, Word

WORD_MS = 300


class NoopEngine:
    family = "noop"
    device = "cpu"
    languages = None  # placeholder words in any language a client names

    def __init__(self, delay_ms: float = 0.0) -> None:
        self.delay_ms = delay_ms

    def draft(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        return self._answer(segments)

    def transcribe(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        return self._answer(segments)

    def _answer(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)
        out = []
        for segment in segments:
            duration_ms = len(segment.audio) * 1000 // (segment.sample_rate or TARGET_SAMPLE_RATE)
            words = [
                Word(f"w{i}", i * WORD_MS, (i + 1) * WORD_MS, 1.0)
                for i in range(duration_ms // WORD_MS)
            ]
            text = " ".join(w.word for w in words)
            out.append(Hypothesis(text, words=words, confidence=1.0, duration_ms=duration_ms))
        return out


def load_engine(source: str = "", options: EngineOptions = DEFAULT_OPTIONS) -> NoopEngine:
    """`source` may give a per-call delay in milliseconds (e.g. "noop:20" -> source "20");
    `options` change nothing: there is no model to place or batch."""
    return NoopEngine(float(source) if source else 0.0)

"""The engine interface shared by every model family, and the family registry.

Callers (the CLI, later the scheduler) only see `Segment` in and `Hypothesis` out, so model
families can be swapped without touching anything above `engine/`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

TARGET_SAMPLE_RATE = 16000

# Lengths of audio that the scheduler batches together, in seconds: partials share a batch only
# within one bucket, so a short partial is never padded to a long one's length.
LENGTH_BUCKETS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def length_bucket(seconds: float) -> float:
    """The smallest bucket that holds `seconds` of audio (multiples of the largest beyond it)."""
    for bound in LENGTH_BUCKETS_S:
        if seconds <= bound:
            return bound
    top = LENGTH_BUCKETS_S[-1]
    return top * math.ceil(seconds / top)


@dataclass(frozen=True)
class Word:
    word: str
    start_ms: int
    end_ms: int
    confidence: float


@dataclass(frozen=True)
class Segment:
    """One piece of mono audio to recognise.

    `audio` may be any numeric dtype (int16 is scaled by 1/32768, floats are taken as [-1, 1]);
    `sample_rate` other than 16 kHz is resampled by the engine.

    `prefix`: words already known to be spoken at the start of the audio, with their times in
    it (a partial's left context: text the client was shown as committed). A family with a
    text decoder may continue from them instead of deciding them again; one whose draft is
    frame-local (CTC) ignores them. Either way the hypothesis covers the whole audio, and a
    family that decodes from the prefix returns the prefix words first, exactly as given.

    `language`: the spoken language as a lowercase primary subtag ("fr", see
    `primary_language`), one of the engine's `languages`; None leaves it to the model (its
    default, or detection). A family that can be told the language decodes in it, so speech
    is not written out as the language the model guessed.

    `translate_to`: a target language (primary subtag, one of the engine's `translations`)
    to write the speech out in instead of transcribing it; None transcribes. The hypothesis
    is then the translation, its word times only spread over the audio.
    """

    audio: np.ndarray
    sample_rate: int = TARGET_SAMPLE_RATE
    hotwords: tuple[str, ...] = ()
    prefix: tuple[Word, ...] = ()
    language: str | None = None
    translate_to: str | None = None


@dataclass(frozen=True)
class Hypothesis:
    """What a family returns per segment; times are milliseconds from the segment's start."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    confidence: float = 0.0
    duration_ms: int = 0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "confidence": round(self.confidence, 4),
            "duration_ms": self.duration_ms,
            "words": [
                {
                    "word": w.word,
                    "start_ms": w.start_ms,
                    "end_ms": w.end_ms,
                    "confidence": round(w.confidence, 4),
                }
                for w in self.words
            ],
        }


class Engine(Protocol):
    """A loaded model. Both calls are batched: one hypothesis per segment, in order.

    `languages`: the primary subtags of the languages the model transcribes, so a session
    can refuse one it would only turn into wrong text; None means any language a caller names
    (a model without language, such as noop).

    An engine that translates also has `translations`: the primary subtags of the languages
    it translates into (`Segment.translate_to`); see `engine_translations`.
    """

    family: str
    device: str
    languages: frozenset[str] | None

    def draft(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        """Cheap text for partials (may be less accurate than `transcribe`)."""
        ...

    def transcribe(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        """Final text with word times and confidences."""
        ...


def engine_languages(engine: Engine) -> frozenset[str] | None:
    """The engine's `languages`; None (any) for an engine that does not declare them."""
    return getattr(engine, "languages", None)


def engine_translations(engine: Engine) -> frozenset[str]:
    """The engine's `translations`; none for an engine that does not declare them (only
    transcribes)."""
    return getattr(engine, "translations", frozenset())


def primary_language(code: str) -> str:
    """The lowercase primary subtag of a language tag (`en-US` -> `en`), as engines take it."""
    return code.strip().split("-")[0].lower()


class ModelLoadError(RuntimeError):
    """A model that was asked for cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class EngineOptions:
    """How to load and feed a model, the same for every family: each loader is called as
    `loader(source, options)`, so a new option is added here, not to every family.

    `device`: auto, cpu, cuda or cuda:N; `dtype`: auto, float32, bfloat16 or float16 (a family
    maps it to what its runtime offers); `max_batch`: most segments per model call; `window_s`
    and `window_overlap_s`: the windows long audio is cut into (a family that cuts audio itself
    ignores them); `hub_timeout_s`: how long an unreachable model hub may take to fail;
    `ctc_confidence_skip` (granite-nar only, others ignore it): a final whose CTC draft
    confidence reaches it keeps the draft and skips the editor (0, the default, turns it off);
    `compile` (granite-nar only): run the model through the compiled runner (length buckets,
    FlexAttention, torch.compile) instead of the eager reference.
    """

    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 16
    window_s: float = 30.0
    window_overlap_s: float = 5.0
    hub_timeout_s: float = 10.0
    ctc_confidence_skip: float = 0.0
    compile: bool = False


DEFAULT_OPTIONS = EngineOptions()


# family name -> "module:function" that loads it; imported lazily so that a family's heavy
# dependencies are only needed when that family is used.
FAMILIES: dict[str, str] = {
    "granite-ar": "engine.granite_ar:load_engine",
    "granite-nar": "engine.granite_nar.engine:load_engine",
    "whisper": "engine.whisper:load_engine",
    "noop": "engine.noop:load_engine",
}


def family_loader(family: str) -> Callable[[str, EngineOptions], Engine]:
    try:
        target = FAMILIES[family]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ModelLoadError(f"unknown model family {family!r}; known families: {known}") from None
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)

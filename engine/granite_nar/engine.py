"""The `granite-nar` family: batched `draft` (CTC only) and `transcribe` (CTC + editor).

With `ctc_confidence_skip` > 0, `transcribe` routes each window whose CTC draft confidence
(`draft_confidence`) reaches it past the projector and editor: its result is the CTC draft, as
`draft` gives it (spec §8, the TURBO repo's CTC-first adaptive routing, reduced to one knob).

Turns segments into model batches (length-sorted, one length bucket per batch, long audio cut
into windows that fit the editor's position limit) and model outputs into text, timed words and
confidences.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from ..api import (
    DEFAULT_OPTIONS,
    TARGET_SAMPLE_RATE,
    EngineOptions,
    Hypothesis,
    ModelLoadError,
    Segment,
    Word,
    length_bucket,
)
from ..audio import prepare_waveform
from .checkpoint import CheckpointError, load_model, resolve_source
from .decoding import (
    TokenSpan,
    build_slots,
    draft_confidence,
    draft_spans,
    editor_spans,
    group_words,
    slot_times,
)
from .model import GraniteSpeechNar
from .runner import EncodedBatch, ModelRunner
from .windows import merge_words, plan_windows

log = logging.getLogger("engine.granite_nar")

SAMPLES_PER_FRAME = 320  # one encoder frame = 20 ms at 16 kHz
SILENCE_PEAK = 1e-4  # below -80 dBFS nothing can be speech: answer empty without the model
# Editor positions per second of audio, worst case: 10 audio rows + 2 slots per 80 ms window.
POSITIONS_PER_SECOND = 10 + 2 * 12.5
# The languages IBM publishes results for (Common Voice 15: en, de, es, fr, pt; spec §7). The
# model takes no language input: CTC and the editor write what they hear, so a segment's
# `language` only has to be one of these.
LANGUAGES = frozenset({"en", "de", "es", "fr", "pt"})


class StageClock:
    """Seconds spent per stage, for benchmarks; off by default (timing a GPU stage needs a
    synchronisation that would otherwise slow the pipeline)."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str, device: torch.device) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[stage] += time.perf_counter() - start


class GraniteNarEngine:
    family = "granite-nar"
    languages = LANGUAGES

    def __init__(
        self,
        model: GraniteSpeechNar,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 16,
        window_s: float = 30.0,
        window_overlap_s: float = 5.0,
        ctc_confidence_skip: float = 0.0,
        compiled: bool = False,
    ) -> None:
        self.model = model
        self.runner = ModelRunner(model, "compiled" if compiled else "eager")
        self.tokenizer = tokenizer
        self.device = str(model.device)
        self.max_batch = max_batch
        self.ctc_confidence_skip = ctc_confidence_skip
        self.clock = StageClock()
        cfg = model.cfg
        self.blank = cfg.blank_token_id
        limit_s = (cfg.text.max_position_embeddings - 2) / POSITIONS_PER_SECOND
        window = min(window_s, limit_s)
        self.window = int(window * TARGET_SAMPLE_RATE)
        self.overlap = int(min(window_overlap_s, window / 3) * TARGET_SAMPLE_RATE)
        self.special = {
            token_id
            for token_id, added in tokenizer.get_added_tokens_decoder().items()
            if added.special
        }

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str, device: str = "auto", dtype: str = "auto", **options
    ) -> GraniteNarEngine:
        """Model and tokenizer from a checkpoint folder or a hub id (see `load_engine`)."""
        return load_engine(path_or_hub_id, EngineOptions(device=device, dtype=dtype, **options))

    def draft(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        return self._recognise(segments, edit=False)

    def transcribe(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        return self._recognise(segments, edit=True)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_batch(self, id_lists: list[list[int]]) -> list[str]:
        return self.tokenizer.decode_batch(id_lists, skip_special_tokens=True)

    @torch.inference_mode()
    def _recognise(self, segments: Sequence[Segment], edit: bool) -> list[Hypothesis]:
        waves = [prepare_waveform(s.audio, s.sample_rate) for s in segments]
        pieces: list[tuple[int, int, int]] = []  # (segment, start, end) in samples
        plans: list[list[tuple[int, int]]] = []
        for index, wave in enumerate(waves):
            silent = wave.size == 0 or float(np.abs(wave).max()) < SILENCE_PEAK
            plan = [] if silent else plan_windows(wave.size, self.window, self.overlap)
            plan = [(a, b) for a, b in plan if b - a >= SAMPLES_PER_FRAME]
            plans.append(plan)
            pieces += [(index, a, b) for a, b in plan]
        results: dict[tuple[int, int, int], list[tuple[Word, list[int]]]] = {}
        for batch in bucket_batches(pieces, self.max_batch):
            words = self._run_batch([waves[i][a:b] for i, a, b in batch], edit)
            results.update(zip(batch, words, strict=True))
        hypotheses = []
        for index, (wave, plan) in enumerate(zip(waves, plans, strict=True)):
            per_window = [results[(index, a, b)] for a, b in plan]
            kept = merge_words(per_window, plan, TARGET_SAMPLE_RATE)
            hypotheses.append(self._hypothesis(kept, wave.size))
        return hypotheses

    def _run_batch(self, waves: list[np.ndarray], edit: bool) -> list[list[tuple[Word, list[int]]]]:
        runner, clock, device = self.runner, self.clock, self.model.device
        with clock("encoder", device):
            batch = runner.encode(waves, with_taps=edit)
        spans = [
            draft_spans(ids, probs, self.blank)
            for ids, probs in zip(batch.ctc_ids, batch.ctc_probs, strict=True)
        ]
        if edit:
            keep = [
                i
                for i, sp in enumerate(spans)
                if not self.ctc_confidence_skip or draft_confidence(sp) < self.ctc_confidence_skip
            ]
            if keep:
                with clock("editor", device):
                    edited = self._edit(batch, keep, [spans[i] for i in keep], waves)
                for i, sp in zip(keep, edited, strict=True):
                    spans[i] = sp
        with clock("words", device):
            return [group_words(sp, self.decode_batch, self.special) for sp in spans]

    def _edit(
        self,
        batch: EncodedBatch,
        keep: list[int],
        spans: list[list[TokenSpan]],
        waves: list[np.ndarray],
    ) -> list[list[TokenSpan]]:
        """One editor pass over the CTC drafts `spans` of the windows `keep`; the editor's
        tokens with times."""
        shortest = self.model.cfg.min_edit_sequence_length
        slots = [build_slots([s.token_id for s in sp], self.blank, shortest) for sp in spans]
        outputs = self.runner.edit(batch, keep, slots)
        return [
            editor_spans(
                ids,
                probs,
                slot_times(sp, len(s), len(waves[i]) * 1000 // TARGET_SAMPLE_RATE),
                self.blank,
            )
            for (ids, probs), sp, s, i in zip(outputs, spans, slots, keep, strict=True)
        ]

    def _hypothesis(self, kept: list[tuple[Word, list[int]]], n_samples: int) -> Hypothesis:
        words = [w for w, _ in kept]
        ids = [i for _, word_ids in kept for i in word_ids]
        confidence = (
            math.exp(sum(math.log(max(w.confidence, 1e-12)) for w in words) / len(words))
            if words
            else 0.0
        )
        return Hypothesis(
            text=self.decode(ids).strip(),
            token_ids=ids,
            words=words,
            confidence=confidence,
            duration_ms=n_samples * 1000 // TARGET_SAMPLE_RATE,
        )


def bucket_batches(
    pieces: list[tuple[int, int, int]], max_batch: int
) -> list[list[tuple[int, int, int]]]:
    """Windows (segment, start, end) sorted by length and cut into model batches of one length
    bucket each (`length_bucket`, as the scheduler's partial batches), at most `max_batch` long:
    a short window is never padded to a much longer one's length, which the encoder would pay
    for in every frame (the editor's packed rows do not pad)."""
    order = sorted(pieces, key=lambda p: p[2] - p[1])
    batches: list[list[tuple[int, int, int]]] = []
    for _, group in itertools.groupby(
        order, key=lambda p: length_bucket((p[2] - p[1]) / TARGET_SAMPLE_RATE)
    ):
        group = list(group)
        batches += [group[i : i + max_batch] for i in range(0, len(group), max_batch)]
    return batches


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but torch sees no CUDA device")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
    except KeyError:
        raise ModelLoadError(
            f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16"
        ) from None


def load_tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no tokenizer.json")
    return Tokenizer.from_file(str(path))


def load_engine(source: str, options: EngineOptions = DEFAULT_OPTIONS) -> GraniteNarEngine:
    """Load a checkpoint folder or hub id into a ready engine."""
    folder = resolve_source(source, options.hub_timeout_s)
    torch_device = pick_device(options.device)
    model = load_model(folder, torch_device, pick_dtype(options.dtype, torch_device))
    log.info("granite-nar loaded", extra={"source": str(folder), "device": str(torch_device)})
    engine = GraniteNarEngine(
        model,
        load_tokenizer(folder),
        max_batch=options.max_batch,
        window_s=options.window_s,
        window_overlap_s=options.window_overlap_s,
        ctc_confidence_skip=options.ctc_confidence_skip,
        compiled=options.compile,
    )
    if options.compile:
        seconds = engine.runner.warm_up(engine.window / TARGET_SAMPLE_RATE, engine.max_batch)
        log.info("granite-nar compiled", extra={"seconds": round(seconds, 1)})
    return engine

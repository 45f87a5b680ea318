"""CTC-confidence routing of the granite-nar engine (`ctc_confidence_skip`): windows whose CTC
draft is confident enough keep the draft and skip the editor; the rest are edited as before."""

from __future__ import annotations

import numpy as np
import pytest

from engine import selection
from engine.api import EngineOptions, Segment
from engine.granite_nar import engine as nar
from engine.granite_nar.decoding import TokenSpan, draft_confidence
from engine.granite_nar.engine import GraniteNarEngine, load_engine
from engine.granite_nar.runner import ModelRunner
from streaming.ops.config import load_config

RATE = 16000


def noise(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * 0.1).astype(
        np.float32
    )


SEGMENTS = [Segment(noise(1.0 + 0.5 * seed, seed)) for seed in range(6)]  # shortest first


def routed_engine(tiny_engine: GraniteNarEngine, threshold: float) -> GraniteNarEngine:
    return GraniteNarEngine(tiny_engine.model, tiny_engine.tokenizer, ctc_confidence_skip=threshold)


@pytest.fixture
def editor_calls(tiny_engine, monkeypatch):
    """Windows in each editor call (the model is shared, so any engine on it counts)."""
    calls: list[int] = []
    edit = ModelRunner.edit

    def counting(self, batch, keep, slots):
        calls.append(len(keep))
        return edit(self, batch, keep, slots)

    monkeypatch.setattr(ModelRunner, "edit", counting)
    return calls


def test_draft_confidence_is_the_mean_token_probability():
    spans = [TokenSpan(5, 0, 80, 0.5), TokenSpan(6, 80, 160, 1.0)]
    assert draft_confidence(spans) == 0.75
    assert draft_confidence([]) == 0.0  # nothing emitted: never routed, the editor may insert


def test_off_by_default_and_zero_is_bit_identical(tiny_engine, editor_calls):
    assert tiny_engine.ctc_confidence_skip == 0.0
    expected = tiny_engine.transcribe(SEGMENTS)
    assert routed_engine(tiny_engine, 0.0).transcribe(SEGMENTS) == expected
    assert sum(editor_calls) == 2 * len(SEGMENTS)


def test_a_threshold_above_any_confidence_is_the_editor_path(tiny_engine, editor_calls):
    expected = tiny_engine.transcribe(SEGMENTS)
    assert routed_engine(tiny_engine, 1.01).transcribe(SEGMENTS) == expected
    assert sum(editor_calls) == 2 * len(SEGMENTS)


def confidences(tiny_engine, monkeypatch) -> list[float]:
    """Each segment's draft confidence as the engine computes it in the batch of all SEGMENTS
    (each batch holds one length bucket; padding to its longest changes the encoder output a
    little, so not one segment per call).
    The engine runs a batch shortest first; SEGMENTS are in that order already."""
    seen: list[float] = []

    def recording(draft):
        seen.append(draft_confidence(draft))
        return seen[-1]

    monkeypatch.setattr(nar, "draft_confidence", recording)
    routed_engine(tiny_engine, 1.01).transcribe(SEGMENTS)
    monkeypatch.setattr(nar, "draft_confidence", draft_confidence)
    assert len(seen) == len(SEGMENTS)
    return seen


def test_a_threshold_between_confidences_routes_some(tiny_engine, editor_calls, monkeypatch):
    scores = confidences(tiny_engine, monkeypatch)
    ranked = sorted(scores)
    gap = max(range(len(ranked) - 1), key=lambda i: ranked[i + 1] - ranked[i])
    assert ranked[gap + 1] - ranked[gap] > 1e-6, "segments too alike to split"
    threshold = (ranked[gap] + ranked[gap + 1]) / 2
    routed = [score >= threshold for score in scores]
    assert any(routed) and not all(routed)
    editor_calls.clear()

    drafts = tiny_engine.draft(SEGMENTS)
    edited = tiny_engine.transcribe(SEGMENTS)
    editor_calls.clear()
    out = routed_engine(tiny_engine, threshold).transcribe(SEGMENTS)

    assert sum(editor_calls) == routed.count(False)
    for hyp, draft, full, skip in zip(out, drafts, edited, routed, strict=True):
        expected = draft if skip else full
        assert hyp.text == expected.text and hyp.token_ids == expected.token_ids
        assert hyp.words == expected.words
        assert hyp.duration_ms == expected.duration_ms
        assert hyp.text == tiny_engine.decode(hyp.token_ids).strip()


def test_all_routed_runs_no_editor(tiny_engine, editor_calls):
    out = routed_engine(tiny_engine, 1e-9).transcribe(SEGMENTS)
    assert editor_calls == []
    assert out == tiny_engine.draft(SEGMENTS)


def test_the_setting_reaches_the_engine(tiny_checkpoint):
    engine = load_engine(
        str(tiny_checkpoint), EngineOptions(device="cpu", dtype="float32", ctc_confidence_skip=0.9)
    )
    assert engine.ctc_confidence_skip == 0.9
    cfg = load_config(env={}, overrides={"engine.ctc_confidence_skip": "0.9"})
    assert cfg.engine.ctc_confidence_skip == 0.9
    keywords = cfg.engine.load_keywords(str(tiny_checkpoint))
    keywords.update(device="cpu", dtype="float32")
    assert selection.load_engine(**keywords).ctc_confidence_skip == 0.9

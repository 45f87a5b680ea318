"""The granite-nar family through its public interface: defined behaviour for awkward input."""

from __future__ import annotations

import numpy as np
import pytest

from engine.api import EngineOptions, Hypothesis, ModelLoadError, Segment
from engine.granite_nar.engine import load_engine

RATE = 16000


def noise(seconds: float, seed: int = 0, rate: int = RATE) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * rate)) * 0.1).astype(
        np.float32
    )


def check_words(hyp: Hypothesis) -> None:
    for word in hyp.words:
        assert 0 <= word.start_ms <= word.end_ms <= hyp.duration_ms + 80
        assert 0.0 <= word.confidence <= 1.0
    starts = [w.start_ms for w in hyp.words]
    assert starts == sorted(starts)


def test_draft_and_transcribe_return_one_hypothesis_per_segment(tiny_engine):
    segments = [Segment(noise(s, seed=int(s))) for s in (3.0, 1.0, 2.0)]
    for call in (tiny_engine.draft, tiny_engine.transcribe):
        out = call(segments)
        assert len(out) == 3
        assert [h.duration_ms for h in out] == [3000, 1000, 2000]
        assert any(h.text for h in out), "tiny checkpoint should emit tokens on noise"
        for hyp in out:
            check_words(hyp)
            assert hyp.text == tiny_engine.decode(hyp.token_ids).strip()


def test_batch_order_does_not_matter(tiny_engine):
    a, b = Segment(noise(2.0, seed=1)), Segment(noise(2.0, seed=2))
    assert tiny_engine.transcribe([a, b]) == tiny_engine.transcribe([b, a])[::-1]


def test_empty_audio_gives_empty_hypothesis(tiny_engine):
    (hyp,) = tiny_engine.transcribe([Segment(np.zeros(0, dtype=np.float32))])
    assert hyp == Hypothesis(text="", duration_ms=0)


def test_audio_shorter_than_one_frame_gives_empty_text(tiny_engine):
    short = Segment(noise(0.019))  # 304 samples < 320
    out = tiny_engine.transcribe([short, Segment(noise(1.0))])
    assert out[0].text == "" and out[0].words == [] and out[0].duration_ms == 19
    assert out[1].duration_ms == 1000


def test_digital_silence_gives_empty_text(tiny_engine):
    (hyp,) = tiny_engine.transcribe([Segment(np.zeros(5 * RATE, dtype=np.float32))])
    assert hyp.text == "" and hyp.duration_ms == 5000


def test_non_finite_samples_are_zeroed(tiny_engine):
    clean = noise(1.0, seed=3)
    dirty = clean.copy()
    dirty[[10, 500, 9000]] = [np.nan, np.inf, -np.inf]
    patched = clean.copy()
    patched[[10, 500, 9000]] = 0.0
    assert tiny_engine.transcribe([Segment(dirty)]) == tiny_engine.transcribe([Segment(patched)])


def test_int16_and_float64_input_match_float32(tiny_engine):
    pcm = (noise(1.0, seed=4) * 32768).astype(np.int16)
    as_float = pcm.astype(np.float32) / 32768
    expected = tiny_engine.transcribe([Segment(as_float)])
    assert tiny_engine.transcribe([Segment(pcm)]) == expected
    assert tiny_engine.transcribe([Segment(as_float.astype(np.float64))]) == expected


def test_other_sample_rates_are_resampled(tiny_engine):
    (hyp,) = tiny_engine.transcribe([Segment(noise(2.0, rate=8000), sample_rate=8000)])
    assert hyp.duration_ms == 2000
    check_words(hyp)


def test_long_audio_is_windowed_without_duplicates(tiny_engine):
    # The tiny editor has 512 positions: windows of ~14.6 s, so 40 s needs several.
    assert tiny_engine.window < 40 * RATE
    (hyp,) = tiny_engine.transcribe([Segment(noise(40.0, seed=5))])
    assert hyp.duration_ms == 40000
    check_words(hyp)
    spans = [(w.start_ms, w.end_ms) for w in hyp.words]
    assert len(spans) == len(set(spans))
    assert hyp.words and hyp.words[-1].end_ms > 30000  # the end of the audio is covered


def test_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_engine(str(tmp_path), EngineOptions(device="cpu"))


def test_unreachable_hub_fails_fast():
    import time

    start = time.monotonic()
    with pytest.raises(ModelLoadError):
        load_engine("nobody-here/no-such-model", EngineOptions(device="cpu", hub_timeout_s=2.0))
    assert time.monotonic() - start < 15


def test_from_pretrained_loads_folder_with_tokenizer(tiny_checkpoint):
    from engine.granite_nar.engine import GraniteNarEngine

    engine = GraniteNarEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="float32")
    assert engine.family == "granite-nar" and engine.device == "cpu"
    assert engine.tokenizer.token_to_id("<|end_of_text|>") == engine.blank


def test_cli_transcribes_with_the_tiny_checkpoint(tmp_path, tiny_checkpoint, tiny_engine):
    import json
    import subprocess
    import sys

    import soundfile as sf

    audio = noise(2.0, seed=7)
    path = tmp_path / "clip.wav"
    sf.write(path, audio, RATE, subtype="FLOAT")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "streaming",
            "transcribe",
            "--model",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    (line,) = out.stdout.splitlines()
    record = json.loads(line)
    (expected,) = tiny_engine.transcribe([Segment(audio)])
    assert record["file"] == str(path)
    assert record["text"] == expected.text
    assert [w["word"] for w in record["words"]] == [w.word for w in expected.words]
    assert {"start_ms", "end_ms", "confidence"} <= set(record["words"][0])

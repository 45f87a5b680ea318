"""Reading and writing checkpoints in the official layout: config.json + safetensors.

Loading is strict: every tensor the model has must be in the files with the right shape, and the
files must hold nothing else. All problems are reported together in one `CheckpointError`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import hub
from ..api import ModelLoadError
from .config import ConfigFormatError, NarConfig
from .model import GraniteSpeechNar

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HUB_PATTERNS = ["config.json", "*.safetensors", INDEX_FILE, *TOKENIZER_FILES]


class CheckpointError(ModelLoadError):
    """The files do not hold the tensors this model needs (lists every problem)."""


def read_config(folder: Path) -> NarConfig:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json (not a Granite NAR checkpoint)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None
    try:
        return NarConfig.from_dict(raw)
    except ConfigFormatError as err:
        raise CheckpointError(f"{path}: {err}") from None


def weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in shards]
    single = folder / WEIGHTS_FILE
    if single.exists():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} and no {INDEX_FILE}")
    return found


def read_state_dict(folder: Path, device: torch.device) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        if not path.exists():
            raise CheckpointError(f"{path}: shard listed in the index is missing")
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def check_state_dict(model: GraniteSpeechNar, tensors: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [
        f"{name}: file {tuple(tensors[name].shape)}, model {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(tensors))
        if tensors[name].shape != expected[name].shape
    ]
    if missing or unexpected or misshaped:
        lines = [f"{where}: checkpoint does not match the Granite NAR model"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", misshaped),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {item}" for item in items]
        raise CheckpointError("\n".join(lines))


def load_model(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GraniteSpeechNar:
    """Build the model from a local checkpoint folder, strictly, in `dtype` on `device`."""
    folder = Path(folder)
    cfg = read_config(folder)
    device = torch.device(device)
    with torch.device("meta"):
        model = GraniteSpeechNar(cfg)
    tensors = read_state_dict(folder, device)
    check_state_dict(model, tensors, str(folder))
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            tensors[name] = tensor.to(dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def save_model(
    model: GraniteSpeechNar,
    folder: str | os.PathLike,
    tokenizer_from: str | os.PathLike | None = None,
) -> Path:
    """Write config.json and model.safetensors (and copy the tokenizer files if given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_from) / name
            if source.exists():
                shutil.copyfile(source, folder / name)
    return folder


def resolve_source(source: str, hub_timeout_s: float) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or found in the local cache) within
    `hub_timeout_s`."""
    return hub.resolve_source(
        source, hub_timeout_s, patterns=HUB_PATTERNS, setting="engine.granite_nar_model"
    )

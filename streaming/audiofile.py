"""Read an audio file from disk into the mono float32 samples the engine takes.

Any format libsndfile decodes (WAV incl. mu-law/A-law, FLAC, OGG, ...) is accepted. Failures
become `AudioFileError` with the path and a one-line reason, so the CLI can print it instead of
a soundfile traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf

from engine.api import TARGET_SAMPLE_RATE
from engine.audio import resample


class AudioFileError(ValueError):
    """An audio file cannot be used; the message names the file and says why."""


def _check_path(path: Path) -> None:
    """Give plain reasons for the common failures that libsndfile reports cryptically."""
    if not path.exists():
        raise AudioFileError(f"{path}: no such file")
    if not path.is_file():
        raise AudioFileError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise AudioFileError(f"{path}: permission denied")
    if path.stat().st_size == 0:
        raise AudioFileError(f"{path}: file is empty")


def read_channels(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Return (samples [frames, channels] float32, sample_rate) at the file's own rate."""
    path = Path(path)
    _check_path(path)
    try:
        data, sample_rate = sf.read(path, dtype="float32", always_2d=True)
    except sf.SoundFileError as err:
        reason = getattr(err, "error_string", "") or str(err)
        raise AudioFileError(f"{path}: cannot read audio ({reason.strip()})") from None
    if data.shape[0] == 0:
        raise AudioFileError(f"{path}: contains no audio samples")
    return data, int(sample_rate)


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Return (samples, sample_rate): float32 mono at the file's own rate.

    Multi-channel files are mixed down by averaging the channels.
    """
    data, sample_rate = read_channels(path)
    samples = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
    return np.ascontiguousarray(samples, dtype=np.float32), sample_rate


def read_audio_16k(path: str | os.PathLike) -> np.ndarray:
    """Return the file's samples as float32 mono at 16 kHz, the rate every model takes."""
    samples, sample_rate = read_audio(path)
    try:
        return resample(samples, sample_rate, TARGET_SAMPLE_RATE)
    except ValueError as err:  # a header claiming an impossible sample rate
        raise AudioFileError(f"{path}: {err}") from None

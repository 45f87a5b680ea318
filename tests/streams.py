"""Building test streams from real speech: LibriVox clips joined by silences, as PCM bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
RATE = 16000


def librivox_clips() -> list[tuple[str, np.ndarray, str]]:
    """(id, float32 16 kHz audio, reference) for each clip; skips the test if not installed."""
    listing = LIBRIVOX / "transcription"
    if not listing.exists():
        pytest.skip("Debian package pocketsphinx-testdata is not installed")
    clips = []
    for line in listing.read_text().splitlines():
        text, _, rest = line.rpartition("(")
        clip_id = rest.strip(") ")
        reference = text.replace("<s>", "").replace("</s>", "").strip()
        audio, rate = sf.read(LIBRIVOX / f"{clip_id}.wav", dtype="float32")
        assert rate == RATE
        clips.append((clip_id, audio, reference))
    return clips


def joined(clips: list[np.ndarray], silence_s: float = 2.0, seed: int = 0) -> np.ndarray:
    """Clips separated (and surrounded) by silence with faint noise, like a quiet line."""
    rng = np.random.default_rng(seed)
    gap = int(silence_s * RATE)
    parts = []
    for clip in clips:
        parts += [1e-3 * rng.standard_normal(gap).astype(np.float32), clip]
    parts.append(1e-3 * rng.standard_normal(gap).astype(np.float32))
    return np.concatenate(parts)


def to_s16le(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]

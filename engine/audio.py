"""Turn whatever audio a caller hands in into the one waveform every model family expects.

All families take mono float32 at 16 kHz in [-1, 1]; doing the conversion once here keeps dtype
scaling, bad-sample handling and resampling identical across families and the file reader.
"""

from __future__ import annotations

import logging
import operator
import sys
from math import gcd

import numpy as np
from scipy.signal import resample_poly

from engine.api import TARGET_SAMPLE_RATE

logger = logging.getLogger(__name__)

# Highest rate any real capture device produces; anything above is almost certainly a units bug.
MAX_SAMPLE_RATE = 384000

# Integer PCM dtypes: (offset subtracted, scale multiplied) to land in [-1, 1).
_INTEGER_PCM: dict[np.dtype, tuple[float, float]] = {
    np.dtype(np.int16): (0.0, 1.0 / 32768),
    np.dtype(np.int32): (0.0, 1.0 / 2**31),
    np.dtype(np.uint8): (128.0, 1.0 / 128),
}


def _check_rate(sample_rate: int, what: str) -> int:
    """Reject rates that cannot be real so a units mistake fails loudly, not as garbage text."""
    try:
        rate = operator.index(sample_rate)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {sample_rate!r}") from None
    if isinstance(sample_rate, bool) or not 0 < rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"{what} must be in 1..{MAX_SAMPLE_RATE} Hz, got {sample_rate!r}")
    return rate


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample 1-D float audio with an anti-aliasing polyphase filter, returning float32.

    Polyphase (scipy `resample_poly`, Kaiser-windowed FIR) rather than FFT resampling so that
    streamed chunks do not pick up wrap-around artefacts and content above the new Nyquist
    frequency is filtered out instead of folding back into the speech band. The output has
    ceil(len * target_sr / orig_sr) samples. Equal rates return a float32 copy.
    """
    orig = _check_rate(orig_sr, "source sample rate")
    target = _check_rate(target_sr, "target sample rate")
    samples = np.asarray(audio)
    if samples.ndim != 1:
        raise ValueError(f"1-D audio expected, got shape {samples.shape}")
    if orig == target or samples.size == 0:
        return samples.astype(np.float32)
    g = gcd(orig, target)
    # Filter in float64: long filters (e.g. 44.1 kHz -> 16 kHz) accumulate rounding in float32.
    out = resample_poly(samples.astype(np.float64), target // g, orig // g)
    return out.astype(np.float32)


def _as_numpy(audio: object) -> np.ndarray:
    """Accept numpy arrays, sequences and torch tensors (on any device) alike."""
    torch = sys.modules.get("torch")  # if torch was never imported, nothing can be a tensor
    if torch is not None and isinstance(audio, torch.Tensor):
        tensor = audio.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()  # bfloat16 has no numpy equivalent
        return tensor.numpy()
    return np.asarray(audio)


def _to_float32(samples: np.ndarray) -> np.ndarray:
    """Scale integer PCM to [-1, 1) and cast floats, always returning a new array."""
    if samples.dtype in _INTEGER_PCM:
        offset, scale = _INTEGER_PCM[samples.dtype]
        return ((samples.astype(np.float64) - offset) * scale).astype(np.float32)
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float32)  # astype copies, so the caller's buffer is never touched
    supported = ", ".join(str(d) for d in _INTEGER_PCM)
    raise ValueError(f"unsupported sample dtype {samples.dtype}; use float or {supported}")


def _zero_non_finite(samples: np.ndarray) -> np.ndarray:
    """Replace NaN/inf in place: one bad sample would otherwise poison a whole batch's features."""
    bad = ~np.isfinite(samples)
    count = int(bad.sum())
    if count:
        samples[bad] = 0.0
        logger.warning("replaced %d non-finite audio sample(s) with 0.0", count)
    return samples


def prepare_waveform(audio: object, sample_rate: int) -> np.ndarray:
    """Return `audio` as a new mono float32 16 kHz array, ready for any model family.

    - int16 is scaled by 1/32768, int32 by 1/2**31, uint8 is 8-bit unsigned PCM centred at 128;
      other integer dtypes are ambiguous and raise ValueError.
    - float64 (and float16/bfloat16) become float32; float values are NOT clipped or normalised.
    - NaN/+-inf samples become 0.0, with one warning per call (logger "engine.audio").
    - A torch tensor on any device is accepted and copied to host memory.
    - Shape (n,), (n, 1) and (1, n) are accepted; other 2-D shapes raise
      ValueError("mono audio expected; mix channels first ..."), 0-D or 3-D+ shapes
      ValueError("1-D mono audio expected ...").
    - Empty audio gives an empty float32 array.
    - Any rate other than 16 kHz is resampled with `resample`; a rate <= 0 or > 384 kHz
      raises ValueError.

    The result never shares memory with the input, because streaming callers reuse buffers.
    """
    rate = _check_rate(sample_rate, "sample rate")
    samples = _as_numpy(audio)
    if samples.ndim == 2 and 1 in samples.shape:
        samples = samples.reshape(-1)
    if samples.ndim == 2:
        raise ValueError(f"mono audio expected; mix channels first (got shape {samples.shape})")
    if samples.ndim != 1:
        raise ValueError(f"1-D mono audio expected, got shape {samples.shape}")
    samples = _zero_non_finite(_to_float32(samples))
    if rate != TARGET_SAMPLE_RATE:
        samples = resample(samples, rate, TARGET_SAMPLE_RATE)
    return samples

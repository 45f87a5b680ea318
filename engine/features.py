"""Granite Speech log-mel front end in plain torch, batched and runnable on any device.

torchaudio is not available, so the reference `MelSpectrogram` recipe (periodic Hann 400 in a
512-point FFT, hop 160, centred reflect padding, power 2, 80 HTK mels 0-8 kHz, no norm) is
rebuilt from `torch.stft` and transformers' mel filter bank. Everything runs in float32, as
the reference does, and the whole batch goes through a single STFT.

Batching follows the reference exactly, because the encoder was trained on it: waveforms are
right-padded with zeros to the longest one *before* the STFT and the log floor uses each row's
maximum over the padded batch, so a short clip's last frames differ slightly from an unbatched
run. With TF32 matmuls enabled globally, the mel projection inherits TF32 precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers.audio_utils import mel_filter_bank

SAMPLE_RATE = 16000
N_FFT = 512
WIN_LENGTH = 400
HOP_LENGTH = 160
N_MELS = 80
FEATURE_DIM = 2 * N_MELS  # two stacked mel frames per encoder frame
SAMPLES_PER_FEATURE = 2 * HOP_LENGTH  # 320 samples = 20 ms per encoder frame
# torch.stft's reflect padding (N_FFT // 2 per side) needs strictly more input samples than that.
MIN_REFLECT_SAMPLES = N_FFT // 2 + 1
LOG_FLOOR_DECADES = 8.0

Waveform = torch.Tensor | np.ndarray


@cache
def _mel_filters(device: torch.device) -> torch.Tensor:
    """[257, 80] HTK filter bank, built once per device."""
    bank = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm=None,
        mel_scale="htk",
    )
    return torch.from_numpy(bank).to(device=device, dtype=torch.float32)


@cache
def _window(device: torch.device) -> torch.Tensor:
    return torch.hann_window(WIN_LENGTH, periodic=True, dtype=torch.float32, device=device)


def _to_tensor(waveform: Waveform, device: torch.device) -> torch.Tensor:
    if isinstance(waveform, np.ndarray):
        # torch.tensor copies, so read-only or negatively strided arrays are fine.
        waveform = torch.tensor(waveform, dtype=torch.float32)
    if waveform.ndim != 1:
        raise ValueError(f"each waveform must be 1-D, got shape {tuple(waveform.shape)}")
    return waveform.to(device=device, dtype=torch.float32)


def _pad_batch(
    waveforms: Sequence[Waveform], device: torch.device | str | None
) -> tuple[torch.Tensor, list[int]]:
    """Right-pad to the longest waveform with zeros: [B, n_max] float32, plus each length."""
    if len(waveforms) == 0:
        raise ValueError("empty batch: at least one waveform is needed")
    if device is None:
        on_device = (w.device for w in waveforms if isinstance(w, torch.Tensor))
        device = next(on_device, torch.device("cpu"))
    if all(isinstance(w, np.ndarray) and w.ndim == 1 for w in waveforms):
        return _pad_on_host(waveforms, torch.device(device))
    tensors = [_to_tensor(w, torch.device(device)) for w in waveforms]
    return pad_sequence(tensors, batch_first=True), [t.shape[0] for t in tensors]


def _pad_on_host(
    waveforms: Sequence[np.ndarray], device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """Host arrays padded into one buffer, then one copy to the device (pinned, not waited
    for, on a GPU) instead of one small copy per waveform."""
    sizes = [w.shape[0] for w in waveforms]
    padded = np.zeros((len(waveforms), max(sizes)), dtype=np.float32)
    for row, wave in zip(padded, waveforms, strict=True):
        row[: wave.shape[0]] = wave
    host = torch.from_numpy(padded)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True), sizes
    return host.to(device), sizes


def _log_mel(padded: torch.Tensor, n_frames: int | None = None) -> torch.Tensor:
    """Scaled log-mel [B, T, 80] of a padded batch, keeping the first `n_frames` STFT frames.

    Frames are cut before the log so the per-row maximum only sees the frames that are kept.
    """
    spec = torch.stft(
        padded,
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH,
        window=_window(padded.device),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    power = spec.abs() ** 2  # [B, 257, 1 + n_max // 160]
    mel = power.transpose(1, 2)[:, :n_frames] @ _mel_filters(padded.device)
    x = mel.clamp(min=1e-10).log10()
    peak = x.amax(dim=(1, 2), keepdim=True)
    x = torch.maximum(x, peak - LOG_FLOOR_DECADES)
    return x / 4 + 1


def _stack_pairs(x: torch.Tensor) -> torch.Tensor:
    """[B, 2T, 80] -> [B, T, 160]: frame 2k fills dims 0-79, frame 2k+1 dims 80-159."""
    return x.reshape(x.shape[0], x.shape[1] // 2, FEATURE_DIM)


def _lengths(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(lengths, dtype=torch.int64, device=device)


@torch.no_grad()
def nar_batch(
    waveforms: Sequence[Waveform], device: torch.device | str | None = None
) -> tuple[torch.Tensor, list[int]]:
    """`nar_features` with the lengths as a host list, for callers that must not wait on the
    device to learn them."""
    padded, sizes = _pad_batch(waveforms, device)
    lengths = [n // SAMPLES_PER_FEATURE for n in sizes]
    t_max = padded.shape[1] // SAMPLES_PER_FEATURE
    if t_max == 0:
        return padded.new_zeros(len(sizes), 0, FEATURE_DIM), lengths
    return _stack_pairs(_log_mel(padded, 2 * t_max)), lengths


@torch.no_grad()
def nar_features(
    waveforms: Sequence[Waveform], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder input for the NAR model: features [B, T_max, 160] float32 and lengths [B] int64.

    Waveforms are 16 kHz mono (any float dtype; cast to float32). L_i = n_i // 320 and
    T_max = n_max // 320: the mel is cut to 2 * T_max frames of the padded batch. When the
    longest waveform is under 320 samples (the reference crashes there) the result is
    [B, 0, 160] with all lengths 0. `device` defaults to that of the first tensor in the batch,
    else CPU; lengths live on the same device. An empty batch is a ValueError.
    """
    features, lengths = nar_batch(waveforms, device)
    return features, _lengths(lengths, features.device)


@torch.no_grad()
def ar_features(
    waveforms: Sequence[Waveform], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder input for the autoregressive model: like `nar_features` but without the cut.

    All 1 + n_max // 160 mel frames enter the log floor; the last one is then dropped if the
    count is odd, so L_i = (n_i // 160 + 1) // 2 (one more than NAR for some lengths). When the
    longest waveform is under 257 samples (too short for reflect padding; the reference crashes)
    the result is [B, 0, 160] with all lengths 0.
    """
    padded, sizes = _pad_batch(waveforms, device)
    if padded.shape[1] < MIN_REFLECT_SAMPLES:
        features = padded.new_zeros(len(sizes), 0, FEATURE_DIM)
        return features, _lengths([0] * len(sizes), padded.device)
    x = _log_mel(padded)
    features = _stack_pairs(x[:, : x.shape[1] // 2 * 2])
    return features, _lengths([(n // HOP_LENGTH + 1) // 2 for n in sizes], padded.device)

"""engine.features against an independent numpy oracle of the Granite front-end recipe.

The oracle frames the reflect-padded signal by hand, applies a periodic Hann(400) centred in a
512-point FFT, and builds the HTK filter bank from the HTK formula, all in float64, so it shares
no code with the torch implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.audio_utils import mel_filter_bank

from engine.features import ar_features, nar_features

TOLERANCE = 1e-4  # absolute, in the scaled log domain (x/4 + 1)


def htk_filter_bank() -> np.ndarray:
    """[257, 80] triangles on 82 points evenly spaced in HTK mel between 0 and 8 kHz."""

    def hz_to_mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def mel_to_hz(mel):
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(8000.0), 82))
    bins = np.linspace(0.0, 8000.0, 257)[:, None]
    low, centre, high = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins - low) / (centre - low)
    falling = (high - bins) / (high - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def oracle_mel(signal: np.ndarray) -> np.ndarray:
    """[1 + n // 160, 80] mel power of one signal, centred STFT with reflect padding."""
    padded = np.pad(signal.astype(np.float64), 256, mode="reflect")
    window = np.zeros(512)
    window[56:456] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)  # periodic Hann
    starts = np.arange(1 + len(signal) // 160) * 160
    frames = padded[starts[:, None] + np.arange(512)] * window
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    return power @ htk_filter_bank()


def oracle_features(signal: np.ndarray, mode: str) -> np.ndarray:
    """[T, 160] features of one (already batch-padded) signal, `mode` "nar" or "ar"."""
    mel = oracle_mel(signal)
    if mode == "nar":
        mel = mel[: 2 * (len(signal) // 320)]
    x = np.log10(np.maximum(mel, 1e-10))
    x = np.maximum(x, x.max() - 8.0) / 4.0 + 1.0
    if mode == "ar" and len(x) % 2:
        x = x[:-1]
    return x.reshape(len(x) // 2, 160)


def speech_like(n: int, seed: int = 0) -> np.ndarray:
    """Noise bursts plus harmonics with a silent gap: wide dynamic range, exact zeros included."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t + seed)
    voiced = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12))
    signal = envelope * (0.05 * rng.standard_normal(n) + 0.1 * voiced)
    signal[n // 3 : n // 3 + n // 10] = 0.0
    return signal.astype(np.float32)


def zero_pad(signal: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([signal, np.zeros(n - len(signal), dtype=signal.dtype)])


def max_diff(ours: torch.Tensor, oracle: np.ndarray) -> float:
    assert tuple(ours.shape) == oracle.shape
    return float(np.abs(ours.numpy().astype(np.float64) - oracle).max(initial=0.0))


def test_htk_filter_bank_matches_transformers():
    bank = mel_filter_bank(
        num_frequency_bins=257,
        num_mel_filters=80,
        min_frequency=0,
        max_frequency=8000,
        sampling_rate=16000,
        norm=None,
        mel_scale="htk",
    )
    np.testing.assert_allclose(htk_filter_bank(), bank, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [320, 321, 16000, 16001, 47999])
def test_nar_single_clip_matches_oracle(n):
    signal = speech_like(n)
    features, lengths = nar_features([signal])
    assert features.dtype == torch.float32 and lengths.dtype == torch.int64
    assert lengths.tolist() == [n // 320]
    assert max_diff(features[0], oracle_features(signal, "nar")) < TOLERANCE


@pytest.mark.parametrize("n", [257, 320, 321, 16000, 16001, 16160, 47999])
def test_ar_single_clip_matches_oracle(n):
    signal = speech_like(n, seed=1)
    features, lengths = ar_features([signal])
    assert lengths.tolist() == [(n // 160 + 1) // 2]
    assert max_diff(features[0], oracle_features(signal, "ar")) < TOLERANCE


@pytest.mark.parametrize("features_fn, mode", [(nar_features, "nar"), (ar_features, "ar")])
def test_batch_rows_match_oracle_on_zero_padded_signals(features_fn, mode):
    sizes = [16000, 47999, 8007, 100, 0]
    signals = [speech_like(n, seed=i) for i, n in enumerate(sizes)]
    features, _ = features_fn(signals)
    n_max = max(sizes)
    for row, signal in zip(features, signals, strict=True):
        # Every row, padding frames included, is the oracle on the zero-padded signal.
        assert max_diff(row, oracle_features(zero_pad(signal, n_max), mode)) < TOLERANCE


@pytest.mark.parametrize(
    "features_fn, mode, n, burst_from",
    [
        # NAR keeps mel frames 0-99 of 16300 samples: the burst is only seen by frame 101,
        # which is cut before the log, so it must not set the floor.
        (nar_features, "nar", 16300, 16210),
        # AR computes 101 frames for 16100 samples: the burst is only seen by frame 100,
        # which is dropped after the log, so it must still set the floor.
        (ar_features, "ar", 16100, 16050),
    ],
)
def test_log_floor_sees_exactly_the_reference_frames(features_fn, mode, n, burst_from):
    signal = 1e-3 * speech_like(n, seed=6)
    signal[burst_from:] = 1.0
    features, _ = features_fn([signal])
    assert max_diff(features[0], oracle_features(signal, mode)) < TOLERANCE


def test_batched_clip_differs_from_unbatched_only_at_the_tail():
    short, long = speech_like(16000, seed=3), speech_like(48000, seed=4)
    batched, lengths = nar_features([short, long])
    alone, _ = nar_features([short])
    own = batched[0, : lengths[0]]
    assert own.shape == alone[0].shape
    # Mel frame j sees samples [160 j - 200, 160 j + 200); frames reaching past the end see
    # zeros in the batch but reflected samples alone. Stacked frame k holds mel frames 2k, 2k+1.
    clean = (16000 - 200) // 160 // 2
    torch.testing.assert_close(own[:clean], alone[0, :clean], rtol=0, atol=1e-5)
    assert (own[-1] - alone[0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("n", [0, 159, 319, 320, 479, 480, 16000, 16159, 16160, 16161])
def test_lengths_nar_versus_ar(n):
    # A partner clip keeps the batch long enough for both front ends to run.
    signals = [speech_like(n), speech_like(1000)]
    _, nar = nar_features(signals)
    _, ar = ar_features(signals)
    assert nar[0] == n // 320
    assert ar[0] == (n // 160 + 1) // 2
    assert ar[0] - nar[0] in (0, 1)


def test_ar_can_be_one_frame_longer_than_nar():
    nar, nar_len = nar_features([speech_like(16160)])
    ar, ar_len = ar_features([speech_like(16160)])
    assert (nar_len.item(), ar_len.item()) == (50, 51)
    assert nar.shape == (1, 50, 160) and ar.shape == (1, 51, 160)


def test_audio_too_short_gives_no_frames_without_stft(monkeypatch):
    def no_stft(*args, **kwargs):
        raise AssertionError("stft must not run on audio this short")

    monkeypatch.setattr(torch, "stft", no_stft)
    features, lengths = nar_features([np.zeros(319, np.float32), np.zeros(5, np.float32)])
    assert features.shape == (2, 0, 160) and lengths.tolist() == [0, 0]
    features, lengths = ar_features([np.zeros(256, np.float32)])
    assert features.shape == (1, 0, 160) and lengths.tolist() == [0]
    features, lengths = nar_features([np.zeros(0, np.float32)])
    assert features.shape == (1, 0, 160) and lengths.tolist() == [0]


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty batch"):
        nar_features([])
    with pytest.raises(ValueError, match="empty batch"):
        ar_features([])


def test_multichannel_waveform_is_an_error():
    with pytest.raises(ValueError, match="1-D"):
        nar_features([np.zeros((2, 16000), np.float32)])


def test_float64_tensors_numpy_and_tensors_mix():
    signal = speech_like(16001, seed=5)
    expected, _ = nar_features([signal])
    from_f64, _ = nar_features([torch.from_numpy(signal.astype(np.float64))])
    assert from_f64.dtype == torch.float32
    torch.testing.assert_close(from_f64, expected, rtol=0, atol=0)
    read_only = np.frombuffer(signal.tobytes(), dtype=np.float32)
    mixed, _ = nar_features([read_only, torch.from_numpy(signal.copy())])
    torch.testing.assert_close(mixed, expected.expand(2, -1, -1), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    signals = [speech_like(n, seed=n) for n in (16000, 47999, 8007)]
    cpu, cpu_len = nar_features(signals)
    gpu, gpu_len = nar_features([torch.from_numpy(s).cuda() for s in signals])
    assert gpu.device.type == "cuda" and gpu_len.device.type == "cuda"
    assert torch.equal(gpu_len.cpu(), cpu_len)
    assert (gpu.cpu() - cpu).abs().max() < TOLERANCE

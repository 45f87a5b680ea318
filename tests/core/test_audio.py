"""engine.audio.prepare_waveform / resample and streaming.core.audiofile readers."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from engine.audio import prepare_waveform, resample
from streaming.core.audiofile import AudioFileError, read_audio, read_audio_16k


def sine(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def amplitude(signal: np.ndarray) -> float:
    """Peak amplitude of a steady sine, measured away from the filter's edge transients."""
    middle = signal[len(signal) // 8 : -len(signal) // 8].astype(np.float64)
    return math.sqrt(2 * np.mean(middle**2))


# --- dtype handling ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "samples, expected",
    [
        (np.array([0, 16384, -32768, 32767], np.int16), [0.0, 0.5, -1.0, 32767 / 32768]),
        (np.array([0, 2**30, -(2**31)], np.int32), [0.0, 0.5, -1.0]),
        (np.array([0, 64, 128, 255], np.uint8), [-1.0, -0.5, 0.0, 127 / 128]),
    ],
)
def test_integer_pcm_is_scaled(samples, expected):
    out = prepare_waveform(samples, 16000)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array(expected, np.float32))


def test_float64_becomes_float32_without_clipping_or_normalising():
    samples = np.array([0.25, -3.0, 2.5, 1e-3], np.float64)
    out = prepare_waveform(samples, 16000)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, samples.astype(np.float32))


def test_float32_is_kept_and_copied():
    samples = np.array([0.1, -0.2, 1.5], np.float32)
    out = prepare_waveform(samples, 16000)
    np.testing.assert_array_equal(out, samples)
    out[0] = 9.0
    assert samples[0] == np.float32(0.1)


def test_ambiguous_integer_dtype_is_an_error():
    with pytest.raises(ValueError, match="unsupported sample dtype int64"):
        prepare_waveform(np.array([1, 2, 3], np.int64), 16000)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor([0.5, -0.25]),
        torch.tensor([0.5, -0.25], dtype=torch.float64),
        torch.tensor([0.5, -0.25], dtype=torch.bfloat16),
        torch.tensor([16384, -8192], dtype=torch.int16),
    ],
)
def test_torch_tensors_are_accepted(tensor):
    out = prepare_waveform(tensor, 16000)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, [0.5, -0.25])


# --- bad samples, shapes, empty ---------------------------------------------------------------


def test_non_finite_samples_become_zero_with_one_warning(caplog):
    samples = np.array([0.5, np.nan, np.inf, -np.inf, -0.5], np.float32)
    with caplog.at_level(logging.WARNING, logger="engine.audio"):
        out = prepare_waveform(samples, 16000)
    np.testing.assert_array_equal(out, [0.5, 0.0, 0.0, 0.0, -0.5])
    assert np.isnan(samples[1])  # the caller's array is untouched
    records = [r for r in caplog.records if r.name == "engine.audio"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "3" in records[0].getMessage()


def test_finite_audio_logs_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="engine.audio"):
        prepare_waveform(np.zeros(10, np.float32), 16000)
    assert not caplog.records


def test_non_finite_samples_are_zeroed_before_resampling():
    samples = sine(1000, 8000)
    samples[4000] = np.nan
    out = prepare_waveform(samples, 8000)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("shape", [(2, 100), (100, 2)])
def test_multichannel_is_an_error(shape):
    with pytest.raises(ValueError, match="mono audio expected; mix channels first"):
        prepare_waveform(np.zeros(shape, np.float32), 16000)


@pytest.mark.parametrize("shape", [(), (1, 2, 100)])
def test_other_ranks_are_an_error(shape):
    with pytest.raises(ValueError, match="1-D mono audio expected"):
        prepare_waveform(np.zeros(shape, np.float32), 16000)


@pytest.mark.parametrize("shape", [(100, 1), (1, 100)])
def test_single_channel_2d_is_squeezed(shape):
    samples = np.arange(100, dtype=np.float32).reshape(shape) / 100
    out = prepare_waveform(samples, 16000)
    assert out.shape == (100,)
    np.testing.assert_array_equal(out, np.arange(100, dtype=np.float32) / 100)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
@pytest.mark.parametrize("rate", [16000, 8000])
def test_empty_audio_gives_empty_float32(dtype, rate):
    out = prepare_waveform(np.array([], dtype), rate)
    assert out.shape == (0,) and out.dtype == np.float32


# --- sample rates and resampling ------------------------------------------------------------


@pytest.mark.parametrize("rate", [0, -16000, 384001, 10**9, 16000.0, True, "16000"])
def test_bad_sample_rate_is_an_error(rate):
    with pytest.raises(ValueError, match="sample rate"):
        prepare_waveform(np.zeros(10, np.float32), rate)


def test_highest_sample_rate_is_accepted():
    assert prepare_waveform(np.zeros(384, np.float32), 384000).shape == (16,)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("seconds", [1.0, 0.0123])
def test_resampled_length(rate, seconds):
    n = int(rate * seconds)
    out = prepare_waveform(np.zeros(n, np.float32), rate)
    assert out.dtype == np.float32
    assert len(out) == math.ceil(n * 16000 / rate)


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_1khz_sine_keeps_frequency_and_amplitude(rate):
    out = prepare_waveform(sine(1000, rate), rate)
    assert len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    assert abs(int(np.argmax(spectrum)) - 1000) <= 1  # 1 Hz bins for one second at 16 kHz
    assert amplitude(out) == pytest.approx(0.5, rel=0.03)


def test_anti_aliasing_passes_7khz_and_removes_12khz():
    passed = prepare_waveform(sine(7000, 48000), 48000)
    assert amplitude(passed) == pytest.approx(0.5, rel=0.05)
    # 12 kHz would fold back to 4 kHz at 16 kHz without the filter.
    removed = prepare_waveform(sine(12000, 48000), 48000)
    assert 20 * math.log10(amplitude(removed) / 0.5) < -40


def test_resample_same_rate_returns_float32_copy():
    samples = np.array([0.1, 0.2], np.float64)
    out = resample(samples, 22050, 22050)
    assert out.dtype == np.float32 and out is not samples
    np.testing.assert_array_equal(out, samples.astype(np.float32))


def test_resample_between_arbitrary_rates():
    out = resample(sine(440, 22050), 22050, 11025)
    assert len(out) == 11025 and out.dtype == np.float32
    assert amplitude(out) == pytest.approx(0.5, rel=0.03)


def test_resample_rejects_bad_input():
    with pytest.raises(ValueError, match="target sample rate"):
        resample(np.zeros(10, np.float32), 16000, 0)
    with pytest.raises(ValueError, match="1-D"):
        resample(np.zeros((2, 10), np.float32), 8000, 16000)


# --- audio files ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, suffix", [("WAV", "wav"), ("FLAC", "flac")])
def test_stereo_44k_file_is_mixed_to_mono(tmp_path, fmt, suffix):
    left, right = sine(440, 44100), sine(1000, 44100, amplitude=0.25)
    path = tmp_path / f"stereo.{suffix}"
    sf.write(path, np.stack([left, right], axis=1), 44100, format=fmt, subtype="PCM_16")
    samples, rate = read_audio(path)
    assert rate == 44100 and samples.dtype == np.float32 and samples.shape == (44100,)
    np.testing.assert_allclose(samples, (left + right) / 2, atol=2 / 32768)
    at_16k = read_audio_16k(str(path))
    assert at_16k.dtype == np.float32 and len(at_16k) == 16000


def test_many_channels_are_averaged(tmp_path):
    channels = np.stack([sine(300 * (c + 1), 16000) for c in range(5)], axis=1)
    path = tmp_path / "five.wav"
    sf.write(path, channels, 16000, subtype="FLOAT")
    samples, _ = read_audio(path)
    np.testing.assert_allclose(samples, channels.mean(axis=1), atol=1e-6)


def test_int16_wav_reads_exactly(tmp_path):
    pcm = np.array([0, 1, -1, 16384, -32768, 32767] * 100, np.int16)
    path = tmp_path / "int16.wav"
    sf.write(path, pcm, 8000, subtype="PCM_16")
    samples, rate = read_audio(path)
    assert rate == 8000
    np.testing.assert_array_equal(samples, pcm.astype(np.float32) / 32768)
    assert len(read_audio_16k(path)) == 2 * len(pcm)


def test_mulaw_wav_is_decoded(tmp_path):
    original = sine(440, 8000)
    path = tmp_path / "mulaw.wav"
    sf.write(path, original, 8000, subtype="ULAW")
    assert sf.info(path).subtype == "ULAW"
    samples, rate = read_audio(path)
    assert rate == 8000 and samples.dtype == np.float32
    np.testing.assert_allclose(samples, original, atol=0.02)  # 8-bit mu-law quantisation


def _audio_file_error(path) -> AudioFileError:
    with pytest.raises(AudioFileError) as info:
        read_audio(path)
    error = info.value
    assert isinstance(error, ValueError)
    assert str(path) in str(error)
    # No chained soundfile traceback is shown to the user.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    return error


def test_missing_file_is_an_audio_file_error(tmp_path):
    assert "no such file" in str(_audio_file_error(tmp_path / "missing.wav"))


def test_text_file_named_wav_is_an_audio_file_error(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio, just text\n" * 10)
    assert "cannot read audio" in str(_audio_file_error(path))


def test_truncated_header_is_an_audio_file_error(tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(path, sine(440, 8000), 8000)
    path.write_bytes(path.read_bytes()[:30])
    assert "cannot read audio" in str(_audio_file_error(path))


def test_empty_files_are_audio_file_errors(tmp_path):
    zero_bytes = tmp_path / "zero.wav"
    zero_bytes.write_bytes(b"")
    assert "file is empty" in str(_audio_file_error(zero_bytes))
    no_frames = tmp_path / "no_frames.wav"
    sf.write(no_frames, np.zeros((0, 2), np.float32), 16000)
    assert "no audio samples" in str(_audio_file_error(no_frames))


def test_directory_is_an_audio_file_error(tmp_path):
    assert "not a regular file" in str(_audio_file_error(tmp_path))


def test_impossible_header_rate_is_an_audio_file_error(tmp_path):
    path = tmp_path / "fast.wav"
    sf.write(path, np.zeros(1000, np.float32), 1_000_000)
    with pytest.raises(AudioFileError, match="fast.wav.*sample rate"):
        read_audio_16k(path)

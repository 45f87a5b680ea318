"""streaming.core.audio: wire formats, G.711, the chunk-invariant resampler and the session
decoder."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from scipy.signal import freqz, resample_poly

from streaming.core.audio import (
    SAMPLE_RATES,
    AudioDecoder,
    AudioFormat,
    AudioFormatError,
    StreamResampler,
    decode_alaw,
    decode_mulaw,
    design_lowpass,
    encode_alaw,
    encode_mulaw,
)

OTHER_RATES = [rate for rate in SAMPLE_RATES if rate != 16000]
ALL_INT16 = np.arange(-32768, 32768)


def sine(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def tone_amplitude(signal: np.ndarray, freq: float, rate: int) -> float:
    """Amplitude of the `freq` component, fitted away from the filter's edge transients."""
    n = np.arange(signal.size)
    keep = slice(signal.size // 8, -signal.size // 8)
    phase = 2 * np.pi * freq * n[keep] / rate
    basis = np.stack([np.sin(phase), np.cos(phase)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, signal[keep].astype(np.float64), rcond=None)
    return math.hypot(*coef)


def resample_all(resampler: StreamResampler, chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([resampler.feed(c) for c in chunks] + [resampler.flush()])


def random_chunks(x: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Chunks of 0, 1, a few and a few hundred samples, in random order."""
    chunks, start = [], 0
    while start < x.size:
        size = int(rng.choice([0, 1, 1, 2, 3, int(rng.integers(4, 700))]))
        chunks.append(x[start : start + size])
        start += size
    return chunks


# --- AudioFormat --------------------------------------------------------------------------------


def test_format_defaults_and_sizes():
    assert AudioFormat() == AudioFormat("pcm_s16le", 16000, 1)
    sizes = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}
    for encoding, size in sizes.items():
        for channels in (1, 2):
            fmt = AudioFormat(encoding, 8000, channels)
            assert fmt.bytes_per_sample == size
            assert fmt.frame_bytes == size * channels


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("encoding", "opus", "alaw"),
        ("encoding", "PCM_S16LE", "pcm_f32le"),
        ("sample_rate", 11025, "44100"),
        ("sample_rate", 16000.0, "16000"),
        ("sample_rate", "8000", "8000"),
        ("channels", 3, "1, 2"),
        ("channels", 0, "1, 2"),
        ("channels", True, "1, 2"),
    ],
)
def test_format_errors_name_field_value_and_choices(field, value, allowed):
    kwargs = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1, field: value}
    with pytest.raises(AudioFormatError) as info:
        AudioFormat(**kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert field in message and repr(value) in message and allowed in message
    assert (info.value.field, info.value.value) == (field, value)


def test_format_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AudioFormat().sample_rate = 8000


# --- G.711 ---------------------------------------------------------------------------------------

# Codeword -> 16-bit linear value (G.711 14-bit mu-law values x4, 13-bit A-law values x8).
MULAW_KNOWN = {0xFF: 0, 0x7F: 0, 0xFE: 8, 0x7E: -8, 0xEF: 132, 0x00: -32124, 0x80: 32124}
ALAW_KNOWN = {0xD5: 8, 0x55: -8, 0xD4: 24, 0xC5: 264, 0xAA: 32256, 0x2A: -32256}


@pytest.mark.parametrize(
    ("decode", "known"), [(decode_mulaw, MULAW_KNOWN), (decode_alaw, ALAW_KNOWN)]
)
def test_g711_known_codewords(decode, known):
    decoded = decode(bytes(known))
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded * 32768, list(known.values()))


@pytest.mark.parametrize("decode", [decode_mulaw, decode_alaw])
def test_g711_tables_are_symmetric_and_monotonic(decode):
    table = decode(bytes(range(256))).astype(np.float64)
    np.testing.assert_array_equal(table[:128], -table[128:])  # bit 7 is the sign
    assert np.all(np.diff(np.sort(table[128:])) > 0)  # 128 distinct levels per sign


def itu_mulaw(v: int) -> int:
    """One sample through ITU-T G.191's ulaw_compress, written out with a segment search."""
    magnitude = min(((~v if v < 0 else v) >> 2) + 33, 0x1FFF)
    segment = next(s for s in range(8) if magnitude < 64 << s)
    code = 0x7F ^ ((segment << 4) | ((magnitude >> (segment + 1)) & 0xF))
    return code if v < 0 else code | 0x80


def itu_alaw(v: int) -> int:
    """One sample through ITU-T G.191's alaw_compress, written out with a segment search."""
    magnitude = (~v if v < 0 else v) >> 4
    segment = next(s for s in range(8) if magnitude < 16 << s)
    step = magnitude if segment == 0 else (magnitude >> (segment - 1)) - 16
    code = (segment << 4) | step | (0 if v < 0 else 0x80)
    return code ^ 0x55


@pytest.mark.parametrize(("encode", "oracle"), [(encode_mulaw, itu_mulaw), (encode_alaw, itu_alaw)])
def test_g711_encoders_match_the_itu_reference_for_every_int16(encode, oracle):
    expected = bytes(oracle(int(v)) for v in ALL_INT16)
    assert encode(ALL_INT16 / 32768) == expected


def test_g711_matches_audioop_where_it_exists():
    """audioop (Python <= 3.12) is an independent implementation; its mu-law encoder rounds
    negative values differently from the ITU reference, so only the others are compared."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    codes = bytes(range(256))
    for decode, expand in ((decode_mulaw, audioop.ulaw2lin), (decode_alaw, audioop.alaw2lin)):
        np.testing.assert_array_equal(decode(codes) * 32768, np.frombuffer(expand(codes, 2), "<i2"))
    pcm = ALL_INT16.astype("<i2").tobytes()
    assert encode_alaw(ALL_INT16 / 32768) == audioop.lin2alaw(pcm, 2)


@pytest.mark.parametrize(
    ("encode", "decode"), [(encode_mulaw, decode_mulaw), (encode_alaw, decode_alaw)]
)
def test_g711_round_trip(encode, decode):
    codes = bytes(c for c in range(256) if c != 0x7F)  # mu-law -0 encodes back to +0 (0xFF)
    assert encode(decode(codes)) == codes
    levels = np.unique(decode(bytes(range(256))).astype(np.float64))
    x = np.random.default_rng(1).uniform(-1.2, 1.2, 20000)
    y = decode(encode(x)).astype(np.float64)
    # The result is one of the two levels around x (beyond the last level: that level).
    index = np.clip(np.searchsorted(levels, x), 1, levels.size - 1)
    below, above = levels[index - 1], levels[index]
    assert np.all((y == below) | (y == above))
    inside = (x > levels[0]) & (x < levels[-1])
    assert np.all(np.abs(y - x)[inside] <= (above - below)[inside])
    assert np.all(y[x >= 1] == levels[-1]) and np.all(y[x <= -1] == levels[0])


@pytest.mark.parametrize("encode", [encode_mulaw, encode_alaw])
def test_g711_encoders_take_nan_as_silence(encode):
    assert encode(np.array([np.nan])) == encode(np.array([0.0]))


# --- StreamResampler -----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", SAMPLE_RATES)
def test_resampler_output_does_not_depend_on_chunking(rate):
    rng = np.random.default_rng(rate)
    x = rng.uniform(-1, 1, rate // 2).astype(np.float32)
    whole = resample_all(StreamResampler(rate), [x])
    for _ in range(3):
        chunked = resample_all(StreamResampler(rate), random_chunks(x, rng))
        assert chunked.shape == whole.shape
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rate", OTHER_RATES)
def test_resampler_equals_scipy_polyphase_with_the_same_filter(rate):
    """resample_poly with our taps is an independent polyphase implementation (same alignment:
    output n is the filter centred on input time n / 16000)."""
    x = np.random.default_rng(2).uniform(-1, 1, 3001)
    g = math.gcd(rate, 16000)
    expected = resample_poly(x, 16000 // g, rate // g, window=np.array(design_lowpass(rate, 16000)))
    np.testing.assert_allclose(resample_all(StreamResampler(rate), [x]), expected, atol=1e-5)


@pytest.mark.parametrize("rate", SAMPLE_RATES)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 440, 441, 1000, 4801])
def test_resampler_output_length_is_ceil(rate, n):
    x = np.ones(n, dtype=np.float32)
    assert resample_all(StreamResampler(rate), [x]).size == math.ceil(n * 16000 / rate)


@pytest.mark.parametrize("rate", OTHER_RATES)
def test_resampler_keeps_an_impulse_in_time(rate):
    down = rate // math.gcd(rate, 16000)
    n = 10 * down + 1
    for at in (0, 3 * down, n - 1 - (n - 1) % down):  # start, middle, last whole-ratio sample
        x = np.zeros(n, dtype=np.float32)
        x[at] = 1.0
        y = resample_all(StreamResampler(rate), [x])
        peak = at * 16000 // rate
        assert int(np.argmax(y)) == peak
        k = min(peak, y.size - 1 - peak, 20)  # a linear-phase response is symmetric about it
        np.testing.assert_allclose(y[peak - k : peak], y[peak + k : peak : -1], atol=1e-6)
    x = np.zeros(n, dtype=np.float32)
    x[5] = 1.0  # off the common grid: the peak is the nearest output sample
    assert int(np.argmax(resample_all(StreamResampler(rate), [x]))) == round(5 * 16000 / rate)


@pytest.mark.parametrize("rate", SAMPLE_RATES)
def test_resampler_passband_keeps_amplitude_and_phase(rate):
    y = resample_all(StreamResampler(rate), [sine(1000, rate)])
    assert tone_amplitude(y, 1000, 16000) == pytest.approx(0.5, rel=0.01)
    middle = slice(1000, -1000)
    np.testing.assert_allclose(y[middle], sine(1000, 16000)[middle], atol=0.005)


@pytest.mark.parametrize("rate", [r for r in SAMPLE_RATES if r > 16000])
@pytest.mark.parametrize("freq", [8200, 10000])
def test_resampler_stopband_removes_what_would_alias(rate, freq):
    x = sine(freq, rate, amplitude=1.0)
    y = resample_all(StreamResampler(rate), [x])
    alias = 16000 - freq
    assert 20 * math.log10(tone_amplitude(y, alias, 16000)) <= -60


def test_resampler_upsampling_suppresses_images():
    y = resample_all(StreamResampler(8000), [sine(3000, 8000, amplitude=1.0)])
    assert tone_amplitude(y, 3000, 16000) == pytest.approx(1.0, rel=0.01)
    assert 20 * math.log10(tone_amplitude(y, 5000, 16000)) <= -60  # image at 8000 - 3000 Hz


@pytest.mark.parametrize("rate", OTHER_RATES)
def test_filter_design_stopband_and_passband(rate):
    taps = design_lowpass(rate, 16000)
    fs = rate * (16000 // math.gcd(rate, 16000))
    nyquist = min(rate, 16000) / 2
    _, stop = freqz(taps, worN=np.linspace(nyquist, fs / 2, 20000), fs=fs)
    _, passband = freqz(taps, worN=np.linspace(0, 0.8 * nyquist, 200), fs=fs)
    assert len(taps) % 2 == 1
    assert 20 * np.log10(np.abs(stop).max()) <= -60
    np.testing.assert_allclose(np.abs(passband), 1.0, atol=0.002)


def test_resampler_passes_equal_rates_through():
    x = np.random.default_rng(3).uniform(-1, 1, 1000).astype(np.float32)
    resampler = StreamResampler(16000)
    out = resampler.feed(x)
    np.testing.assert_array_equal(out, x)
    out[:] = 0  # a copy: the caller's buffer is untouched
    assert np.any(x != 0)
    assert resampler.flush().size == 0


def test_resampler_flush_starts_a_new_stream():
    x = sine(440, 48000, seconds=0.1)
    resampler = StreamResampler(48000)
    first = resample_all(resampler, [x])
    np.testing.assert_array_equal(resample_all(resampler, [x]), first)


def test_resampler_rejects_unsupported_rates_and_shapes():
    with pytest.raises(AudioFormatError, match="orig_rate 11025"):
        StreamResampler(11025)
    with pytest.raises(ValueError, match=r"shape \[n\] expected"):
        StreamResampler(8000).feed(np.zeros((2, 10)))
    with pytest.raises(ValueError, match=r"shape \[2, n\] expected"):
        StreamResampler(8000, channels=2).feed(np.zeros(10))


@pytest.mark.parametrize("rate", [8000, 16000, 44100])
def test_resampler_channels_are_independent(rate):
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (2, rate // 10)).astype(np.float32)
    together = StreamResampler(rate, channels=2)
    out = np.concatenate([together.feed(c) for c in np.array_split(x, 7, axis=1)], axis=1)
    out = np.concatenate([out, together.flush()], axis=1)
    for channel in range(2):
        alone = resample_all(StreamResampler(rate), [x[channel]])
        np.testing.assert_allclose(out[channel], alone, rtol=0, atol=1e-6)


# --- AudioDecoder --------------------------------------------------------------------------------


def wire(fmt: AudioFormat, samples: np.ndarray) -> bytes:
    """Interleaved [frames, channels] float samples in `fmt`'s encoding."""
    flat = samples.reshape(-1)
    if fmt.encoding == "mulaw":
        return encode_mulaw(flat)
    if fmt.encoding == "alaw":
        return encode_alaw(flat)
    if fmt.encoding == "pcm_f32le":
        return flat.astype("<f4").tobytes()
    return np.clip(np.rint(flat * 32768), -32768, 32767).astype("<i2").tobytes()


@pytest.mark.parametrize(
    "fmt",
    [
        AudioFormat("pcm_s16le", 44100, 2),
        AudioFormat("pcm_f32le", 24000, 2),
        AudioFormat("mulaw", 8000, 1),
        AudioFormat("alaw", 8000, 2),
    ],
)
def test_decoder_byte_at_a_time_equals_one_feed(fmt):
    frames = np.random.default_rng(4).uniform(-0.9, 0.9, (fmt.sample_rate // 20, fmt.channels))
    data = wire(fmt, frames)
    whole = AudioDecoder(fmt)
    expected = np.concatenate([whole.feed(data), whole.flush()], axis=1)
    decoder = AudioDecoder(fmt)
    parts = [decoder.feed(data[i : i + 1]) for i in range(len(data))] + [decoder.flush()]
    assert all(p.dtype == np.float32 and p.shape[0] == fmt.channels for p in parts)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), expected, rtol=0, atol=1e-6)
    assert expected.shape == (fmt.channels, math.ceil(frames.shape[0] * 16000 / fmt.sample_rate))
    assert decoder.samples_in == frames.shape[0] and decoder.samples_out == expected.shape[1]
    assert decoder.dropped_bytes == 0


def test_decoder_holds_a_split_frame_until_it_completes():
    decoder = AudioDecoder(AudioFormat("pcm_s16le", 16000, 2))
    data = np.array([100, -200, 300, -400], dtype="<i2").tobytes()
    assert decoder.feed(data[:3]).shape == (2, 0)
    assert (decoder.pending_bytes, decoder.samples_in) == (3, 0)
    out = decoder.feed(data[3:])
    np.testing.assert_array_equal(out * 32768, [[100, 300], [-200, -400]])
    assert (decoder.pending_bytes, decoder.samples_in, decoder.samples_out) == (0, 2, 2)


def test_16khz_pcm16_is_handed_over_undecoded_with_split_frames_held():
    fmt = AudioFormat("pcm_s16le", 16000, 2)
    assert AudioDecoder(fmt).pcm16_direct
    assert not AudioDecoder(AudioFormat("pcm_s16le", 8000, 1)).pcm16_direct
    assert not AudioDecoder(AudioFormat("mulaw", 16000, 1)).pcm16_direct
    data = np.array([100, -200, 300, -400, 500, -600], dtype="<i2").tobytes()
    decoder, floats = AudioDecoder(fmt), AudioDecoder(fmt)
    parts = [decoder.feed_pcm16(data[:5]), decoder.feed_pcm16(data[5:])]
    assert [p.shape for p in parts] == [(2, 1), (2, 2)] and parts[0].dtype == np.int16
    joined = np.concatenate(parts, axis=1)
    np.testing.assert_array_equal(joined, [[100, 300, 500], [-200, -400, -600]])
    np.testing.assert_array_equal(joined / 32768, floats.feed(data))
    assert (decoder.samples_in, decoder.samples_out, decoder.pending_bytes) == (3, 3, 0)
    with pytest.raises(ValueError, match="pcm_s16le at 16 kHz"):
        AudioDecoder(AudioFormat("pcm_s16le", 48000, 1)).feed_pcm16(data)


@pytest.mark.parametrize("rate", [16000, 48000])
def test_decoder_deinterleaves_channels(rate):
    left, right = sine(1000, rate, 0.5), sine(3000, rate, 0.5)
    fmt = AudioFormat("pcm_s16le", rate, 2)
    decoder = AudioDecoder(fmt)
    data = wire(fmt, np.stack([left, right], axis=1))
    out = np.concatenate([decoder.feed(data), decoder.flush()], axis=1)
    assert tone_amplitude(out[0], 1000, 16000) == pytest.approx(0.5, rel=0.01)
    assert tone_amplitude(out[1], 3000, 16000) == pytest.approx(0.5, rel=0.01)
    assert tone_amplitude(out[0], 3000, 16000) < 1e-3
    assert tone_amplitude(out[1], 1000, 16000) < 1e-3


def test_decoder_scales_s16_to_unit_range():
    decoder = AudioDecoder(AudioFormat("pcm_s16le", 16000, 1))
    data = np.array([-32768, -16384, 0, 16384, 32767], dtype="<i2").tobytes()
    out = decoder.feed(bytearray(data))  # any bytes-like object
    np.testing.assert_array_equal(out, [[-1.0, -0.5, 0.0, 0.5, 32767 / 32768]])


def test_decoder_replaces_non_finite_f32_and_clips():
    decoder = AudioDecoder(AudioFormat("pcm_f32le", 16000, 1))
    x = np.array([0.25, np.nan, np.inf, -np.inf, 2.0, -3.0, -1.0], dtype="<f4")
    out = decoder.feed(memoryview(x.tobytes()))
    np.testing.assert_array_equal(out, [[0.25, 0.0, 0.0, 0.0, 1.0, -1.0, -1.0]])
    assert (decoder.invalid_samples, decoder.clipped_samples) == (3, 2)


@pytest.mark.parametrize(("encoding", "decode"), [("mulaw", decode_mulaw), ("alaw", decode_alaw)])
def test_decoder_g711_is_the_codec_then_the_resampler(encoding, decode):
    data = (
        encode_mulaw(sine(300, 8000, 0.2))
        if encoding == "mulaw"
        else encode_alaw(sine(300, 8000, 0.2))
    )
    decoder = AudioDecoder(AudioFormat(encoding, 8000, 1))
    out = np.concatenate([decoder.feed(data), decoder.flush()], axis=1)
    np.testing.assert_array_equal(out[0], resample_all(StreamResampler(8000), [decode(data)]))


def test_decoder_drops_stray_bytes_at_flush():
    decoder = AudioDecoder(AudioFormat("pcm_f32le", 16000, 2))
    assert decoder.feed(bytes(8 + 5)).shape == (2, 1)
    assert decoder.pending_bytes == 5
    assert decoder.flush().shape == (2, 0)
    assert (decoder.dropped_bytes, decoder.pending_bytes) == (5, 0)


def test_decoder_empty_feed_gives_empty_channels():
    decoder = AudioDecoder(AudioFormat("mulaw", 8000, 2))
    out = decoder.feed(b"")
    assert out.shape == (2, 0) and out.dtype == np.float32

"""Live audio input: the bytes of WebSocket frames in, per-channel float32 16 kHz arrays out.

Each session decodes its wire format once (PCM s16/f32, G.711 mu-law/A-law), splits the channels
and resamples them to 16 kHz, each channel with its own filter state. Everything here is sans-I/O
and vectorised: it runs for every frame of every stream the server carries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from math import gcd

import numpy as np
from scipy.signal import firwin, kaiserord

from engine.api import TARGET_SAMPLE_RATE

# Bytes per sample of every wire encoding.
ENCODINGS: dict[str, int] = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}
SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
CHANNELS = (1, 2)

# Anti-aliasing filter: -6 dB at 90 % of the lower Nyquist frequency, full stopband attenuation
# from that Nyquist frequency up (so passband to 80 %: 6.4 kHz at 16 kHz, 3.2 kHz at 8 kHz).
ROLLOFF = 0.9
STOPBAND_DB = 65.0  # the Kaiser length estimate is empirical; 5 dB of margin keeps >= 60 dB


class AudioFormatError(ValueError):
    """An audio format field has a value this server cannot decode."""

    def __init__(self, field: str, value: object, allowed: tuple) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        choices = ", ".join(str(a) for a in allowed)
        super().__init__(f"unsupported {field} {value!r}; allowed: {choices}")


def _check(field: str, value: object, allowed: tuple) -> None:
    # bool is an int and 8000.0 == 8000: compare types too, so a units or parsing slip is caught.
    kind = type(allowed[0])
    if isinstance(value, bool) or not isinstance(value, kind) or value not in allowed:
        raise AudioFormatError(field, value, allowed)


@dataclass(frozen=True)
class AudioFormat:
    """What the client says its audio bytes are; checked on construction."""

    encoding: str = "pcm_s16le"
    sample_rate: int = TARGET_SAMPLE_RATE
    channels: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise AudioFormatError naming the first bad field, its value and the allowed ones."""
        _check("encoding", self.encoding, tuple(ENCODINGS))
        _check("sample_rate", self.sample_rate, SAMPLE_RATES)
        _check("channels", self.channels, CHANNELS)

    @property
    def bytes_per_sample(self) -> int:
        return ENCODINGS[self.encoding]

    @property
    def frame_bytes(self) -> int:
        """Bytes of one multi-channel sample frame: the unit a WebSocket frame may split."""
        return self.bytes_per_sample * self.channels


# --- G.711 -----------------------------------------------------------------------------------
# Both laws store sign, a 3-bit segment (exponent) and a 4-bit step (mantissa). Tables hold the
# 16-bit linear value / 32768 of every codeword, computed from the standard's segment formulas.


def _mulaw_linear() -> np.ndarray:
    code = ~np.arange(256) & 0xFF  # mu-law codewords are sent with every bit inverted
    exponent, mantissa = (code >> 4) & 0x7, code & 0xF
    magnitude = (((2 * mantissa + 33) << exponent) - 33) * 4  # 14-bit value, scaled to 16 bits
    return np.where(code & 0x80, -magnitude, magnitude)


def _alaw_linear() -> np.ndarray:
    code = np.arange(256) ^ 0x55  # A-law codewords are sent with the even bits inverted
    exponent, mantissa = (code >> 4) & 0x7, code & 0xF
    # Segment 0 is linear; segment e > 0 starts at 16 << e with steps of 2 << (e - 1).
    shifted = (2 * mantissa + 33) << np.maximum(exponent - 1, 0)
    magnitude = np.where(exponent == 0, 2 * mantissa + 1, shifted) * 8  # 13-bit, scaled to 16
    return np.where(code & 0x80, magnitude, -magnitude)


_MULAW = (_mulaw_linear() / 32768).astype(np.float32)
_ALAW = (_alaw_linear() / 32768).astype(np.float32)


def decode_mulaw(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes to float32 in [-1, 1)."""
    return _MULAW.take(np.frombuffer(data, dtype=np.uint8))


def decode_alaw(data: bytes) -> np.ndarray:
    """G.711 A-law bytes to float32 in [-1, 1)."""
    return _ALAW.take(np.frombuffer(data, dtype=np.uint8))


def _int16(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float samples as 16-bit linear (NaN as 0, clipped), split into (is negative, magnitude).

    The magnitude of a negative value v is ~v = -v - 1, as in the ITU-T G.191 reference coders,
    so that v and -v - 1 get mirror-image codewords and the quantiser is symmetric.
    """
    x = np.nan_to_num(np.asarray(samples, dtype=np.float64), nan=0.0)
    v = np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int32)
    negative = v < 0
    return negative, np.where(negative, ~v, v)


def _bit_length(values: np.ndarray) -> np.ndarray:
    return np.frexp(values.astype(np.float64))[1]


def encode_mulaw(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] to G.711 mu-law bytes (for tests and telephony simulators)."""
    negative, magnitude = _int16(samples)
    biased = np.minimum((magnitude >> 2) + 33, 0x1FFF)  # 14-bit magnitude plus the bias, clipped
    exponent = _bit_length(biased) - 6
    mantissa = (biased >> (exponent + 1)) & 0xF
    code = (0x7F ^ ((exponent << 4) | mantissa)) | np.where(negative, 0, 0x80)
    return code.astype(np.uint8).tobytes()


def encode_alaw(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] to G.711 A-law bytes (for tests and telephony simulators)."""
    negative, magnitude = _int16(samples)
    magnitude = magnitude >> 4  # 12-bit magnitude
    exponent = np.maximum(_bit_length(magnitude) - 4, 0)
    mantissa = (magnitude >> np.maximum(exponent - 1, 0)) & 0xF
    code = (exponent << 4) | mantissa | np.where(negative, 0, 0x80)
    return (code ^ 0x55).astype(np.uint8).tobytes()


# --- Resampling ------------------------------------------------------------------------------


@functools.cache
def design_lowpass(orig_rate: int, target_rate: int) -> np.ndarray:
    """The anti-aliasing FIR at the upsampled rate (orig * up): Kaiser window, unit DC gain.

    Its length is odd, so its group delay is a whole number of upsampled samples and can be
    compensated exactly. The array is shared and read-only.
    """
    up = target_rate // gcd(orig_rate, target_rate)
    rate = orig_rate * up
    nyquist = min(orig_rate, target_rate) / 2
    numtaps, beta = kaiserord(STOPBAND_DB, 2 * (1 - ROLLOFF) * nyquist / (rate / 2))
    taps = firwin(numtaps | 1, ROLLOFF * nyquist, window=("kaiser", beta), fs=rate)
    taps.flags.writeable = False
    return taps


@dataclass(frozen=True)
class _Part:
    """Some of a block's outputs: inputs [offset, offset + width) of the block's window, times
    `matrix` [width, outputs], whose columns hold each output's taps."""

    offset: int
    width: int
    outputs: slice
    matrix: np.ndarray


@dataclass(frozen=True)
class _Plan:
    """Polyphase filtering as a few matrix products per chunk, shared by all streams of a rate.

    Outputs are computed in blocks of `block_out`, a whole number of polyphase periods, so every
    block has the same shape: block b reads inputs b * block_in + [lo, lo + width). Where a block
    spans many more inputs than the filter (e.g. 441 at 44.1 kHz), it is cut into parts that
    each read only the inputs their outputs need, so the products stay mostly non-zero taps.
    """

    up: int
    down: int
    block_in: int
    block_out: int
    lo: int
    width: int
    parts: tuple[_Part, ...]


@functools.cache
def _plan(orig_rate: int, target_rate: int) -> _Plan:
    g = gcd(orig_rate, target_rate)
    up, down = target_rate // g, orig_rate // g
    taps = design_lowpass(orig_rate, target_rate) * up  # zero stuffing divides the gain by up
    delay = (len(taps) - 1) // 2
    per_phase = -(-len(taps) // up)
    # A block (or part) should read about as many new inputs as the filter is long: fewer means
    # more Python calls per chunk, more means mostly zeros in the matrices.
    periods = -(-per_phase // down)
    block_out, block_in = periods * up, periods * down
    # Output n sits at upsampled position n * down; adding the delay centres the filter on it.
    # Its newest input is `last`, multiplied by tap `phase`; older inputs take every up-th tap.
    last, phase = np.divmod(np.arange(block_out) * down + delay, up)
    first = last - per_phase + 1
    padded = np.zeros(per_phase * up)
    padded[: len(taps)] = taps
    age = np.arange(per_phase)
    parts = []
    for outputs in np.array_split(np.arange(block_out), max(1, round(block_in / per_phase))):
        start, stop = int(first[outputs[0]]), int(last[outputs[-1]]) + 1
        matrix = np.zeros((stop - start, outputs.size), dtype=np.float32)
        column = np.arange(outputs.size)[:, None]
        matrix[last[outputs, None] - age - start, column] = padded[phase[outputs, None] + age * up]
        matrix.flags.writeable = False
        span = slice(int(outputs[0]), int(outputs[-1]) + 1)
        parts.append(_Part(start - int(first[0]), stop - start, span, matrix))
    width = int(last[-1] - first[0]) + 1
    return _Plan(up, down, block_in, block_out, int(first[0]), width, tuple(parts))


class StreamResampler:
    """Stateful polyphase resampler whose output does not depend on how the input is chunked.

    Output sample n is the filtered input at time n / target_rate (the FIR's group delay is
    compensated, silence is assumed before the stream starts), so a click keeps its time. `feed`
    returns each output once all its input is in (a few ms later); `flush` treats the rest of
    the stream as silence and returns the tail, for ceil(n_in * target / orig) outputs in all
    (the same count as scipy's resample_poly), then starts a new stream. Equal rates pass
    through unfiltered.

    `channels` independent signals are resampled together ([channels, n] in and out; 1-D for
    one channel): one call per chunk instead of one per channel halves the per-frame cost of a
    stereo call. State: a short input window per channel (at most a few hundred samples).
    """

    def __init__(
        self, orig_rate: int, target_rate: int = TARGET_SAMPLE_RATE, channels: int = 1
    ) -> None:
        _check("orig_rate", orig_rate, SAMPLE_RATES)
        _check("target_rate", target_rate, SAMPLE_RATES)
        _check("channels", channels, CHANNELS)
        self.orig_rate, self.target_rate, self.channels = orig_rate, target_rate, channels
        self._plan = None if orig_rate == target_rate else _plan(orig_rate, target_rate)
        self._reset()

    def _reset(self) -> None:
        # The window of the next block, starting at input index lo < 0: silence before the start.
        size = -self._plan.lo if self._plan else 0
        self._window = np.zeros((self.channels, size), dtype=np.float32)
        self._received = 0
        self._produced = 0

    def feed(self, samples: np.ndarray) -> np.ndarray:
        """Take the next chunk (any length, empty included); return the outputs now complete."""
        x = np.asarray(samples, dtype=np.float32)
        one = x.ndim == 1
        if one:
            x = x[np.newaxis]
        if x.ndim != 2 or x.shape[0] != self.channels:
            expected = "[n]" if self.channels == 1 else f"[{self.channels}, n]"
            raise ValueError(f"samples of shape {expected} expected, got {np.shape(samples)}")
        self._received += x.shape[1]
        if self._plan is None:
            self._produced += x.shape[1]
            out = x.copy()
        else:
            self._window = np.concatenate((self._window, x), axis=1)
            out = self._run()
        return out[0] if one else out

    def flush(self) -> np.ndarray:
        """End the stream: return the remaining outputs and start afresh."""
        plan = self._plan
        missing = 0
        if plan is not None:
            missing = -(-self._received * plan.up // plan.down) - self._produced
        out = np.zeros((self.channels, 0), dtype=np.float32)
        if missing > 0:
            blocks = -(-missing // plan.block_out)
            silence = max((blocks - 1) * plan.block_in + plan.width - self._window.shape[1], 0)
            tail = np.zeros((self.channels, silence), dtype=np.float32)
            self._window = np.concatenate((self._window, tail), axis=1)
            out = self._run()[:, :missing]
        self._reset()
        return out[0] if self.channels == 1 else out

    def _run(self) -> np.ndarray:
        """Compute every block whose input window is complete and drop the inputs it used up."""
        plan, window = self._plan, self._window
        blocks = max((window.shape[1] - plan.width) // plan.block_in + 1, 0)
        out = np.empty((self.channels, blocks, plan.block_out), dtype=np.float32)
        if blocks:
            step = window.itemsize
            for part in plan.parts:
                # Overlapping windows, one per block and channel, as a view into the window.
                rows = np.ndarray(
                    (self.channels, blocks, part.width),
                    np.float32,
                    window,
                    part.offset * step,
                    (window.strides[0], plan.block_in * step, step),
                )
                np.matmul(rows, part.matrix, out=out[:, :, part.outputs])
            # Keep only what later blocks need, in a new array: the state stays small.
            self._window = window[:, blocks * plan.block_in :].copy()
        self._produced += blocks * plan.block_out
        return out.reshape(self.channels, -1)


# --- Decoding --------------------------------------------------------------------------------


class AudioDecoder:
    """One session's audio: wire bytes in any frame split, [channels, n] float32 16 kHz out.

    Counters: `samples_in` (input sample frames), `samples_out` (16 kHz samples per channel),
    `invalid_samples` (pcm_f32le NaN/inf, replaced by 0), `clipped_samples` (pcm_f32le beyond
    +-1, clipped: many of them usually mean the client sends unscaled integers as floats),
    `dropped_bytes` (stray bytes of an incomplete sample frame at flush).
    """

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        # None at 16 kHz: the decoded array is already ours, so not even the pass-through copy.
        self._resampler = (
            None
            if fmt.sample_rate == TARGET_SAMPLE_RATE
            else StreamResampler(fmt.sample_rate, channels=fmt.channels)
        )
        self._pending = b""
        self.samples_in = 0
        self.samples_out = 0
        self.invalid_samples = 0
        self.clipped_samples = 0
        self.dropped_bytes = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete sample frame held until the next feed."""
        return len(self._pending)

    @property
    def pcm16_direct(self) -> bool:
        """16-bit PCM at 16 kHz needs no decoding: `feed_pcm16` hands the samples over as they
        are (the VAD reads them so, and stores them as float32 itself)."""
        return self.format.encoding == "pcm_s16le" and self._resampler is None

    def feed(self, data: bytes) -> np.ndarray:
        """Decode one frame's bytes (a sample may be split across frames)."""
        # Deinterleave as a view: channel c is every channels-th sample from the c-th.
        channels = self._decode(self._whole_frames(data)).reshape(-1, self.format.channels).T
        self.samples_in += channels.shape[1]
        out = channels if self._resampler is None else self._resampler.feed(channels)
        self.samples_out += out.shape[1]
        return out

    def feed_pcm16(self, data: bytes) -> np.ndarray:
        """[channels, n] int16 samples of one frame's bytes, undecoded (see `pcm16_direct`)."""
        if not self.pcm16_direct:
            raise ValueError(f"feed_pcm16 needs pcm_s16le at 16 kHz, not {self.format}")
        samples = np.frombuffer(self._whole_frames(data), dtype="<i2")
        channels = samples.reshape(-1, self.format.channels).T
        self.samples_in += channels.shape[1]
        self.samples_out += channels.shape[1]
        return channels

    def _whole_frames(self, data: bytes) -> bytes | memoryview:
        """The bytes of the whole sample frames received so far; the rest waits for more."""
        if not self._pending and len(data) % self.format.frame_bytes == 0:
            return data  # the usual frame: whole samples only
        view = memoryview(data).cast("B")
        if self._pending:
            view = memoryview(self._pending + view)
        whole = view.nbytes - view.nbytes % self.format.frame_bytes
        if whole < view.nbytes:
            self._pending = bytes(view[whole:])
            return view[:whole]
        self._pending = b""
        return view

    def flush(self) -> np.ndarray:
        """End the stream: drop stray bytes, return the resampler's tail."""
        self.dropped_bytes += len(self._pending)
        self._pending = b""
        if self._resampler is None:
            return np.zeros((self.format.channels, 0), np.float32)
        out = self._resampler.flush().reshape(self.format.channels, -1)
        self.samples_out += out.shape[1]
        return out

    def _decode(self, raw: bytes | memoryview) -> np.ndarray:
        """Interleaved samples of whole frames as float32 in [-1, 1]."""
        encoding = self.format.encoding
        if encoding == "mulaw":
            return decode_mulaw(raw)
        if encoding == "alaw":
            return decode_alaw(raw)
        if encoding == "pcm_s16le":
            samples = np.frombuffer(raw, dtype="<i2").astype(np.float32)
            samples *= np.float32(1 / 32768)
            return samples
        samples = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        bad = ~np.isfinite(samples)
        invalid = int(np.count_nonzero(bad))
        if invalid:
            samples[bad] = 0.0
            self.invalid_samples += invalid
        loud = np.abs(samples) > 1
        clipped = int(np.count_nonzero(loud))
        if clipped:
            np.clip(samples, -1.0, 1.0, out=samples)
            self.clipped_samples += clipped
        return samples

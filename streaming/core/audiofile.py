"""Read an audio file from disk into the mono float32 samples the engine takes.

Any format libsndfile decodes (WAV incl. mu-law/A-law, FLAC, OGG Vorbis/Opus, MP3, AIFF, ...) is
read with it; anything else goes to FFmpeg through PyAV when that is installed (faster-whisper,
the `cpu` extra, brings it): M4A/AAC, MP4, WebM, ... Failures become `AudioFileError` with the
path, a one-line reason and the formats that can be read, so the CLI can print it instead of a
decoder traceback.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from engine.api import TARGET_SAMPLE_RATE
from engine.audio import resample

# The libsndfile formats people meet; it reads a few more (see soundfile.available_formats()).
SOUNDFILE_FORMATS = "WAV (PCM, float, mu-law, A-law), FLAC, OGG Vorbis/Opus, MP3, AIFF, CAF"


class AudioFileError(ValueError):
    """An audio file cannot be used; the message names the file and says why."""


def pyav_available() -> bool:
    return importlib.util.find_spec("av") is not None


def readable_formats() -> str:
    """What this installation reads, for help texts and error messages."""
    if pyav_available():
        return f"{SOUNDFILE_FORMATS}, and whatever FFmpeg decodes (M4A/AAC, MP4, WebM, ...)"
    return f"{SOUNDFILE_FORMATS} (pip install av for M4A/AAC, MP4, WebM, ...)"


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
        if not pyav_available():
            reason = getattr(err, "error_string", "") or str(err)
            raise _unreadable(path, reason) from None
        data, sample_rate = _read_with_pyav(path)
    if data.shape[0] == 0:
        raise AudioFileError(f"{path}: contains no audio samples")
    return data, int(sample_rate)


def probe(path: str | os.PathLike) -> None:
    """Raise `AudioFileError` unless the file looks readable, reading only its header: lets a
    command refuse bad inputs before a slow model load."""
    path = Path(path)
    _check_path(path)
    try:
        sf.info(path)
        return
    except (sf.SoundFileError, RuntimeError) as err:
        if not pyav_available():
            raise _unreadable(path, str(err).splitlines()[0]) from None
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioFileError(f"{path}: has no audio stream")
    except av.FFmpegError as err:
        raise _unreadable(path, _ffmpeg_reason(err)) from None


def _read_with_pyav(path: Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with FFmpeg, keeping its rate and channels."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioFileError(f"{path}: has no audio stream")
            stream = container.streams.audio[0]
            channels = stream.codec_context.channels
            resampler = av.AudioResampler(format="flt", layout=stream.layout, rate=stream.rate)
            chunks = [
                out.to_ndarray().reshape(-1, channels)
                for frame in container.decode(stream)
                for out in resampler.resample(frame)
            ]
            chunks += [out.to_ndarray().reshape(-1, channels) for out in resampler.resample(None)]
            rate = stream.rate
    except av.FFmpegError as err:
        raise _unreadable(path, _ffmpeg_reason(err)) from None
    data = np.concatenate(chunks) if chunks else np.zeros((0, channels), np.float32)
    return np.ascontiguousarray(data, dtype=np.float32), int(rate)


def _ffmpeg_reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)


def _unreadable(path: Path, reason: str) -> AudioFileError:
    return AudioFileError(
        f"{path}: cannot read audio ({reason.strip()}); readable formats: {readable_formats()}"
    )


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

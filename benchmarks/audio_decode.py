"""Throughput of the live-audio input stage (decode + resample to 16 kHz) per CPU core.

Many streams are fed 100 ms frames in turn, as a server interleaves them, so each stream's
state is cold in the cache as it would be in production. The figure is real-time streams per
core: audio seconds decoded per CPU second (process time, so BLAS threads are counted too).

    python -m benchmarks.audio_decode
    python -m benchmarks.audio_decode --streams 500 --seconds 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.results import write_result
from streaming.core.audio import AudioDecoder, AudioFormat, encode_mulaw

CASES = (
    AudioFormat("mulaw", 8000, 1),
    AudioFormat("mulaw", 8000, 2),
    AudioFormat("pcm_s16le", 16000, 1),
    AudioFormat("pcm_s16le", 44100, 1),
    AudioFormat("pcm_s16le", 48000, 1),
)


def wire_frames(fmt: AudioFormat, frame_ms: int, count: int, seed: int) -> list[bytes]:
    """`count` frames of noisy speech-band audio in `fmt`'s wire encoding."""
    rng = np.random.default_rng(seed)
    n = fmt.sample_rate * frame_ms // 1000 * count
    audio = 0.1 * rng.standard_normal(n * fmt.channels)
    if fmt.encoding == "mulaw":
        data = encode_mulaw(audio)
    else:
        data = np.clip(np.rint(audio * 32768), -32768, 32767).astype("<i2").tobytes()
    size = len(data) // count
    return [data[i * size : (i + 1) * size] for i in range(count)]


def streams_per_core(fmt: AudioFormat, streams: int, seconds: float, frame_ms: int) -> dict:
    frames_per_stream = round(seconds * 1000 / frame_ms)
    frames = wire_frames(fmt, frame_ms, frames_per_stream, seed=0)
    decoders = [AudioDecoder(fmt) for _ in range(streams)]
    for decoder in decoders:  # warm-up: filter design and first allocations
        decoder.feed(frames[0])
    start = time.process_time()
    for frame in frames:
        for decoder in decoders:
            decoder.feed(frame)
    cpu = time.process_time() - start
    audio_s = streams * frames_per_stream * frame_ms / 1000
    return {
        "streams_per_core": round(audio_s / cpu),
        "us_per_frame": round(cpu / (streams * frames_per_stream) * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200, help="streams fed in turn")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per stream")
    parser.add_argument("--frame-ms", type=int, default=100, help="audio per WebSocket frame")
    args = parser.parse_args()
    figures = {}
    for fmt in CASES:
        name = f"{fmt.encoding}_{fmt.sample_rate}hz_{fmt.channels}ch"
        figures[name] = streams_per_core(fmt, args.streams, args.seconds, args.frame_ms)
        print(
            f"{name:26} {figures[name]['streams_per_core']:>7} real-time streams per core"
            f"  ({figures[name]['us_per_frame']} us per {args.frame_ms} ms frame)"
        )
    settings = {"streams": args.streams, "seconds": args.seconds, "frame_ms": args.frame_ms}
    print(write_result("audio_decode", figures, settings))


if __name__ == "__main__":
    main()

"""CPU cost of the per-channel VAD segmenter, as real-time streams per CPU core.

Every channel of every stream runs a segmenter, so its cost bounds how many streams a gateway
core can take. The stream is real read speech (the LibriVox clips of pocketsphinx-testdata)
with 1 s pauses under -60 dBFS noise (a talkative channel: the share of audio that ends up
in segments is reported too), fed in fixed-size pieces as a client would send it. Reported:
CPU milliseconds per second of audio (best of the repeats, after a warm-up) and the streams one
core keeps up with at that cost; the second figure also takes an `open_segment()` snapshot
every 400 ms, as partials do.

    python -m benchmarks.vad_cost                      # 100 ms pieces, 20 ms frames
    python -m benchmarks.vad_cost --feed-ms 20 --frame-ms 10
"""

from __future__ import annotations

import argparse
import glob
import time

import numpy as np
import soundfile as sf

from benchmarks.results import streams_per_core, write_result
from streaming.core.vad import SAMPLE_RATE, SegmentClosed, Segmenter, SegmenterConfig

CLIPS = "/usr/share/pocketsphinx/test/data/librivox/*.wav"
PARTIAL_INTERVAL_S = 0.4


def speech_stream(seconds: float) -> np.ndarray:
    """The clips, each followed by 1 s of quiet, repeated to `seconds`, under -60 dBFS noise."""
    paths = sorted(glob.glob(CLIPS))
    if not paths:
        raise SystemExit(f"no speech found at {CLIPS} (apt-get install pocketsphinx-testdata)")
    pause = np.zeros(SAMPLE_RATE, np.float32)
    one_round = np.concatenate(
        [part for p in paths for part in (sf.read(p, dtype="float32")[0], pause)]
    )
    rounds = int(np.ceil(seconds * SAMPLE_RATE / len(one_round)))
    stream = np.tile(one_round, rounds)[: int(seconds * SAMPLE_RATE)]
    rng = np.random.default_rng(0)
    return (stream + rng.normal(0.0, 1e-3, len(stream))).astype(np.float32)


def cpu_seconds(stream: np.ndarray, cfg: SegmenterConfig, feed: int, partials: bool) -> float:
    pieces = [stream[i : i + feed] for i in range(0, len(stream), feed)]
    every = max(1, round(PARTIAL_INTERVAL_S * SAMPLE_RATE / feed))
    segmenter = Segmenter(cfg)
    start = time.process_time()
    for n, piece in enumerate(pieces):
        segmenter.feed(piece)
        if partials and n % every == 0:
            segmenter.open_segment()
    segmenter.flush()
    return time.process_time() - start


def segmented_share(stream: np.ndarray, cfg: SegmenterConfig) -> float:
    segmenter = Segmenter(cfg)
    events = segmenter.feed(stream) + segmenter.flush()
    kept = sum(len(e.audio) for e in events if isinstance(e, SegmentClosed))
    return kept / len(stream)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feed-ms", type=int, default=100, help="audio per feed() call")
    parser.add_argument("--frame-ms", type=int, default=20, choices=(10, 20, 30))
    parser.add_argument("--seconds", type=float, default=120.0, help="audio per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    cfg = SegmenterConfig(frame_ms=args.frame_ms)
    stream = speech_stream(args.seconds)
    feed = args.feed_ms * SAMPLE_RATE // 1000
    audio_s = len(stream) / SAMPLE_RATE
    figures = {"segmented_share": round(segmented_share(stream, cfg), 3)}
    for label, partials in (("vad", False), ("vad_with_snapshots", True)):
        cpu_seconds(stream, cfg, feed, partials)  # warm-up
        best = min(cpu_seconds(stream, cfg, feed, partials) for _ in range(args.repeats))
        streams_per_core(figures, label, best, audio_s)
    settings = {
        "feed_ms": args.feed_ms,
        "frame_ms": args.frame_ms,
        "audio_s_per_repeat": audio_s,
        "repeats": args.repeats,
        "partial_interval_s": PARTIAL_INTERVAL_S,
        "config": vars(cfg),
    }
    print(f"written to {write_result('vad_cost', figures, settings)}")


if __name__ == "__main__":
    main()

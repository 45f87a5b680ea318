"""CPU cost of the session core and the native dialect, as real-time streams per CPU core.

The gateway's per-stream work minus the transport: for N interleaved streams of real speech in
100 ms frames of 16 kHz s16 PCM, each frame goes through the native dialect and the session
(decode, resample, VAD, partial pacing); every engine request is answered at once by the noop
engine and its result goes back through the session (stable text, captions) and the dialect's
JSON encoder. What is left of the gateway's cost in `stream_load` is websockets, the event loop
and the scheduler hand-off. Best of the repeats, per caption mode.

    python -m benchmarks.session_cost          # 100 streams x 30 s; captions off, rollup, popon
    python -m benchmarks.session_cost --streams 20 --seconds 10 --captions popon
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from benchmarks.results import streams_per_core, write_result
from benchmarks.vad_cost import speech_stream
from engine.api import Segment
from engine.noop import NoopEngine
from streaming.core.events import EngineRequest
from streaming.core.session import Session
from streaming.dialects.native import NativeDialect
from streaming.ops.config import SessionConfig, load_config

FRAME_BYTES = 3200  # 100 ms of 16 kHz s16


def stream_bytes(seconds: float) -> bytes:
    return (np.clip(speech_stream(seconds), -1, 1) * 32767).astype("<i2").tobytes()


def cpu_seconds(pcm: bytes, options: SessionConfig, streams: int, seconds: float) -> float:
    """CPU time to carry `streams` interleaved streams of `seconds` each, frame by frame."""
    engine = NoopEngine()
    span = int(seconds * 10) * FRAME_BYTES
    room = (len(pcm) - span) // FRAME_BYTES
    runs = [
        (Session(f"s{i}", options), NativeDialect(), (i * 7919 % room) * FRAME_BYTES)
        for i in range(streams)
    ]

    def carry(session: Session, dialect: NativeDialect, outputs: list) -> None:
        for item in outputs:
            if isinstance(item, EngineRequest):
                segment = Segment(np.asarray(item.audio, np.float32))
                carry(session, dialect, session.on_result(item, engine.draft([segment])[0]))
            else:
                dialect.encode(item)

    start = time.process_time()
    for offset in range(0, span, FRAME_BYTES):
        for session, dialect, first in runs:
            frame = pcm[first + offset : first + offset + FRAME_BYTES]
            for command in dialect.on_binary(frame):
                carry(session, dialect, session.feed_audio(command.data))
    return time.process_time() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per stream")
    parser.add_argument("--repeats", type=int, default=3)
    modes = ("off", "rollup", "popon")
    parser.add_argument("--captions", choices=modes, nargs="+", default=list(modes))
    args = parser.parse_args(argv)
    if args.streams < 1 or args.seconds <= 0 or args.repeats < 1:
        parser.error("--streams, --seconds and --repeats must be positive")
    pcm = stream_bytes(args.seconds + 60)
    base = load_config(None).session
    stream_seconds = args.streams * args.seconds
    figures = {}
    for mode in args.captions:
        options = dataclasses.replace(base, captions_mode=mode)
        best = min(
            cpu_seconds(pcm, options, args.streams, args.seconds) for _ in range(args.repeats)
        )
        streams_per_core(figures, f"captions_{mode}", best, stream_seconds)
    settings = {"streams": args.streams, "seconds": args.seconds, "repeats": args.repeats}
    print(f"written to {write_result('session_cost', figures, settings)}")


if __name__ == "__main__":
    main()

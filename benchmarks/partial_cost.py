"""Engine compute per partial as an open segment grows: windowed against whole-segment partials.

A session is fed continuous real speech (the LibriVox clips, a hangover long enough that the
segment stays open past 15 s) and every partial it asks for is drafted by the engine, timed,
and answered, so the committed words, and with them the windows, move as in the server. The
figure is the engine's CPU time and wall time per partial when the open segment is about 2, 8
and 15 s long, for each `partial_window_ms` given (1000, the default, and 0: the whole open
segment, side by side in one run). Target: the 15 s figure at most 1.5 times the 2 s figure.

    python -m benchmarks.partial_cost                         # the configured (CPU) model
    python -m benchmarks.partial_cost --model PATH --windows 1000 0 --lengths 2 8 15
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np

from benchmarks import results
from benchmarks.stream_load import machine_cpu_seconds
from benchmarks.vad_cost import speech_stream
from engine import selection
from engine.api import Engine, Hypothesis, Segment
from streaming.core.events import EngineRequest
from streaming.core.session import Session
from streaming.ops.config import load_config

FRAME_BYTES = 3200  # 100 ms of 16 kHz s16
TOLERANCE_MS = 500  # a partial counts for length L when its open segment is within L +- this
TARGET_RATIO = 1.5


@dataclasses.dataclass
class PartialTiming:
    segment_ms: int  # how long the open segment was
    window_ms: int  # how much of it the partial decoded
    cpu_s: float
    wall_s: float


def run_session(engine: Engine, pcm: bytes, window_ms: int, seconds: float) -> list[PartialTiming]:
    """Feed `seconds` of speech through one session, drafting every partial with the engine."""
    base = load_config(None).session
    options = dataclasses.replace(
        base, partial_window_ms=window_ms, hangover_ms=5000, max_segment_ms=60000
    )
    session = Session("bench", options)
    timings: list[PartialTiming] = []

    def answer(outputs: list) -> None:
        for item in outputs:
            if not isinstance(item, EngineRequest):
                continue
            if item.kind == "final":  # finals are not measured here
                answer(session.on_result(item, Hypothesis(text="")))
                continue
            segment = Segment(np.asarray(item.audio, np.float32), prefix=item.window.prefix)
            cpu, wall = time.process_time(), time.perf_counter()
            (hypothesis,) = engine.draft([segment])
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            decoded = len(item.audio) * 1000 // 16000
            timings.append(PartialTiming(item.window.start_ms + decoded, decoded, cpu, wall))
            answer(session.on_result(item, hypothesis))

    answer(session.start())
    for offset in range(0, int(seconds * 10) * FRAME_BYTES, FRAME_BYTES):
        answer(session.feed_audio(pcm[offset : offset + FRAME_BYTES]))
    answer(session.close())
    return timings


def at_length(timings: Sequence[PartialTiming], length_s: float) -> dict:
    near = [t for t in timings if abs(t.segment_ms - length_s * 1000) <= TOLERANCE_MS]
    if not near:
        return {"partials": 0}
    return {
        "partials": len(near),
        "cpu_ms": round(1000 * statistics.mean(t.cpu_s for t in near), 1),
        "wall_ms": round(1000 * statistics.mean(t.wall_s for t in near), 1),
        "decoded_ms": round(statistics.mean(t.window_ms for t in near)),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.partial_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", help="engine.model: auto, a family, a folder or a hub id")
    parser.add_argument("--device", help="engine.device: auto, cpu, cuda or cuda:N")
    parser.add_argument("--windows", type=int, nargs="+", default=[1000, 0],
                        help="partial_window_ms values to compare (0: the whole open segment)")
    parser.add_argument("--lengths", type=float, nargs="+", default=[2.0, 8.0, 15.0],
                        help="open-segment lengths to report, in seconds")
    args = parser.parse_args(argv)
    if any(w < 0 for w in args.windows) or any(s <= 0 for s in args.lengths):
        parser.error("--windows must be >= 0 and --lengths > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(overrides={"engine.model": args.model, "engine.device": args.device})
    print("loading model ...", file=sys.stderr, flush=True)
    engine = selection.load_engine(**cfg.engine.load_keywords())
    seconds = max(args.lengths) + 2 * TOLERANCE_MS / 1000 + 1
    pcm = (np.clip(speech_stream(seconds + 5), -1, 1) * 32767).astype("<i2").tobytes()
    engine.draft([Segment(np.zeros(16000, np.float32))])  # warm-up, not timed
    load_before, busy_before, wall_before = os.getloadavg()[0], machine_cpu_seconds(), time.time()
    figures: dict = {}
    for window_ms in args.windows:
        label = f"window_{window_ms}ms" if window_ms else "whole_segment"
        print(f"{label}: streaming {seconds:.0f} s ...", file=sys.stderr, flush=True)
        timings = run_session(engine, pcm, window_ms, seconds)
        block = {f"{length:g}s": at_length(timings, length) for length in args.lengths}
        first, last = block[f"{min(args.lengths):g}s"], block[f"{max(args.lengths):g}s"]
        if first.get("cpu_ms") and last.get("cpu_ms"):
            block["ratio_cpu"] = round(last["cpu_ms"] / first["cpu_ms"], 2)
            block["ratio_wall"] = round(last["wall_ms"] / first["wall_ms"], 2)
        figures[label] = block
        print(report(label, block, args.lengths))
    elapsed = time.time() - wall_before
    figures["machine_busy_cores"] = round((machine_cpu_seconds() - busy_before) / elapsed, 2)
    figures["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    settings = {
        "engine": dataclasses.asdict(cfg.engine),
        "family": engine.family,
        "device": engine.device,
        "windows": args.windows,
        "lengths_s": args.lengths,
        "tolerance_ms": TOLERANCE_MS,
    }
    print(f"machine busy {figures['machine_busy_cores']} cores during the run (load average "
          f"{figures['load_average'][0]} -> {figures['load_average'][1]})")
    print(f"written to {results.write_result('partial_cost', figures, settings)}")
    return 0


def report(label: str, block: dict, lengths: Sequence[float]) -> str:
    cells = []
    for length in lengths:
        cell = block[f"{length:g}s"]
        if cell["partials"]:
            cells.append(
                f"{length:g} s: {cell['cpu_ms']} ms CPU / {cell['wall_ms']} ms wall "
                f"(decodes {cell['decoded_ms']} ms, {cell['partials']} partials)"
            )
        else:
            cells.append(f"{length:g} s: no partial")
    ratio = block.get("ratio_cpu")
    verdict = ""
    if ratio is not None:
        passed = "PASS" if ratio <= TARGET_RATIO else "FAIL"
        verdict = f"  ratio {ratio} {passed} (<= {TARGET_RATIO})"
    return f"{label:16s} " + "; ".join(cells) + verdict


if __name__ == "__main__":
    sys.exit(main())

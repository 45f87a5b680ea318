"""CPU cost and WER of the whisper family: batched decoding against the per-segment path before it.

The old path is faster-whisper's `transcribe` once per segment (30 s of mel whatever the audio,
Silero VAD, word timestamps for finals), called as the engine called it; the new path is
`WhisperEngine.draft` / `.transcribe` (one encode and generate per batch, encoder input trimmed to
the audio). Both run side by side on the same model in one process. Segments are cut from the
LibriVox clips of pocketsphinx-testdata, played one after the other (each batch member starts
elsewhere). For each kind, audio length and batch size: CPU seconds (this process, all threads)
and wall milliseconds per call, best of the repeats after a warm-up call. Then the WER of finals
over the 5 clips, old vs new (benchmarks/scoring.py). Other processes' CPU time during the run is
recorded with the figures, so a disturbed run can be told apart.

    python -m benchmarks.whisper_cost
    python -m benchmarks.whisper_cost --lengths 2 --batches 1 4 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from benchmarks.manifests import librivox
from benchmarks.results import write_result
from benchmarks.scoring import corpus_wer
from benchmarks.stream_load import machine_cpu_seconds
from engine import whisper
from engine.api import TARGET_SAMPLE_RATE, EngineOptions, Segment
from streaming.core.audiofile import read_audio

KINDS = ("draft", "transcribe")


def old_path(engine: whisper.WhisperEngine, segments: Sequence[Segment], final: bool) -> list[str]:
    """The engine before batching: faster-whisper's `transcribe` once per segment, with the
    options it used (the loop filters are left out: they cost nothing measurable)."""
    texts = []
    for segment in segments:
        windows, _ = engine._model.transcribe(
            segment.audio,
            beam_size=5 if final else 1,
            best_of=1,
            temperature=0.0,
            condition_on_previous_text=False,
            compression_ratio_threshold=whisper.COMPRESSION_RATIO,
            log_prob_threshold=whisper.LOG_PROB,
            no_speech_threshold=whisper.NO_SPEECH_PROB,
            word_timestamps=final,
            without_timestamps=not final,
            vad_filter=True,
        )
        texts.append("".join(window.text for window in windows).strip())
    return texts


def new_path(engine: whisper.WhisperEngine, segments: Sequence[Segment], final: bool) -> list[str]:
    hypotheses = engine.transcribe(segments) if final else engine.draft(segments)
    return [h.text for h in hypotheses]


PATHS: dict[str, Callable[[whisper.WhisperEngine, Sequence[Segment], bool], list[str]]] = {
    "old": old_path,
    "new": new_path,
}


def speech() -> tuple[list[str], list[np.ndarray]]:
    """References and 16 kHz float32 audio of the LibriVox clips."""
    references, clips = [], []
    for utterance in librivox():
        audio, rate = read_audio(utterance.audio)
        if rate != TARGET_SAMPLE_RATE:
            raise SystemExit(f"{utterance.audio}: {rate} Hz, expected {TARGET_SAMPLE_RATE}")
        references.append(utterance.reference)
        clips.append(np.asarray(audio, np.float32))
    return references, clips


def cut(stream: np.ndarray, seconds: float, count: int) -> list[Segment]:
    """`count` segments of `seconds` from the clips played in a loop, starting 5.3 s apart."""
    size = int(seconds * TARGET_SAMPLE_RATE)
    loop = np.tile(stream, size // stream.size + 2)
    starts = [int(i * 5.3 * TARGET_SAMPLE_RATE) % stream.size for i in range(count)]
    return [Segment(loop[start : start + size]) for start in starts]


def measure(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best CPU seconds and best wall milliseconds of `repeats` calls, after one warm-up."""
    call()
    cpu, wall = [], []
    for _ in range(repeats):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        call()
        cpu.append(time.process_time() - cpu_start)
        wall.append(1000 * (time.perf_counter() - wall_start))
    return min(cpu), min(wall)


def cost_rows(
    engine: whisper.WhisperEngine,
    stream: np.ndarray,
    kinds: Sequence[str],
    lengths: Sequence[float],
    batches: Sequence[int],
    repeats: int,
) -> list[dict]:
    rows = []
    for kind in kinds:
        for seconds in lengths:
            for batch in batches:
                segments = cut(stream, seconds, batch)
                row: dict = {"kind": kind, "seconds": seconds, "batch": batch}
                for name, path in PATHS.items():
                    final = kind == "transcribe"
                    cpu_s, wall_ms = measure(partial(path, engine, segments, final), repeats)
                    row[f"{name}_cpu_s_per_call"] = round(cpu_s, 4)
                    row[f"{name}_wall_ms_per_call"] = round(wall_ms, 1)
                    row[f"{name}_cpu_ms_per_audio_s"] = round(1000 * cpu_s / (seconds * batch), 1)
                rows.append(row)
                print(table_line(row), flush=True)
    return rows


def table_line(row: dict) -> str:
    speedup = row["old_cpu_s_per_call"] / max(row["new_cpu_s_per_call"], 1e-9)
    return (
        f"{row['kind']:10s} {row['seconds']:5g} s  x{row['batch']:<3d} "
        f"CPU s/call old {row['old_cpu_s_per_call']:7.3f} new {row['new_cpu_s_per_call']:7.3f} "
        f"({speedup:4.1f}x)  wall ms old {row['old_wall_ms_per_call']:7.0f} "
        f"new {row['new_wall_ms_per_call']:7.0f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=whisper.DEFAULT_SOURCE, help="whisper model source")
    parser.add_argument("--dtype", default="auto", help="CTranslate2 compute type")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--lengths", nargs="+", type=float, default=[2.0, 8.0, 15.0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if (
        args.repeats < 1
        or min(args.batches) < 1
        or not 0 < min(args.lengths) <= max(args.lengths) <= 30
    ):
        parser.error("--repeats and --batches must be positive, --lengths in (0, 30] seconds")

    references, clips = speech()
    engine = whisper.load_engine(args.source, EngineOptions(device="cpu", dtype=args.dtype))
    machine_start, own_start = machine_cpu_seconds(), time.process_time()
    rows = cost_rows(
        engine, np.concatenate(clips), args.kinds, args.lengths, args.batches, args.repeats
    )
    finals = [Segment(audio) for audio in clips]
    wer = {
        name: round(corpus_wer(references, path(engine, finals, True)), 4)
        for name, path in PATHS.items()
    }
    other_cpu_s = machine_cpu_seconds() - machine_start - (time.process_time() - own_start)
    print(
        f"finals WER on the {len(clips)} LibriVox clips: old {wer['old']:.2%}  new {wer['new']:.2%}"
    )
    print(f"other processes used {other_cpu_s:.1f} CPU s during the run; load {os.getloadavg()}")
    figures = {
        "cost": rows,
        "finals_wer": wer,
        "other_processes_cpu_s": round(other_cpu_s, 2),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    settings = {
        "source": args.source,
        "dtype": args.dtype,
        "device": engine.device,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "repeats": args.repeats,
        "timing": "best of repeats after one warm-up; CPU is this process, all threads",
        "frames": {
            "margin": whisper.FRAME_MARGIN,
            "bucket": whisper.FRAME_BUCKET,
            "draft_floor": whisper.DRAFT_FRAMES,
            "final_floor": whisper.FINAL_FRAMES,
        },
    }
    print(f"written to {write_result('whisper_cost', figures, settings)}")


if __name__ == "__main__":
    main()

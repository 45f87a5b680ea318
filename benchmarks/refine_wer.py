"""WER of the finals against the refined texts: the primary and the refine model on the same
segments of every real recording, at 16 kHz and over a phone line (8 kHz mu-law).

Recordings (pocketsphinx-testdata), built as benchmarks.caption_wer streams them: the 5 LibriVox
clips, the 5 `cards` clips and the long continuous reading of the LibriVox clips (about 44 s),
each with quiet before and after; and the 8 kHz mu-law copy of each (benchmarks.manifests.
mulaw_8k, as benchmarks.wer makes them). Each recording is cut into segments by the session's
segmenter (streaming.core.vad with the configured `session` settings; a copy is resampled to
16 kHz first, as a session does), so both models get the audio a final and its refine request
get, with the session's `language`. Each segment is transcribed by the primary model
(`engine.model`) and by the refine model (`--refine-model`, default base); a recording's segment
texts, joined, are scored against its reference as benchmarks/scoring.py scores everything
(corpus WER per set and over all recordings). Also reported: the segments whose refined text
differs from the final's once normalised, and each model's RTFx (audio seconds over seconds in
`engine.transcribe`, after one warm-up call). Figures go to benchmarks/results/ with the load
of the machine during the run; progress goes to stderr.

    python -m benchmarks.refine_wer                          # configured primary vs base
    python -m benchmarks.refine_wer --only cards,long --refine-model base
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from benchmarks import caption_wer, manifests, results
from benchmarks.manifests import Manifest, ManifestError, Utterance
from benchmarks.scoring import corpus_wer, normalise
from benchmarks.stream_load import machine_cpu_seconds
from engine import selection
from engine.api import TARGET_SAMPLE_RATE, Engine, ModelLoadError, Segment, primary_language
from engine.audio import resample
from streaming.core.audiofile import AudioFileError, read_audio
from streaming.core.vad import SegmentClosed, Segmenter, SegmenterConfig
from streaming.ops.config import ConfigError, SessionConfig, load_config
from streaming.ops.logs import setup_logging

LINES = {"16k": "16 kHz", "mulaw8k": "8 kHz mu-law"}
MODELS = ("primary", "refine")


def segmenter_config(session: SessionConfig) -> SegmenterConfig:
    """The segmenter a session with these settings runs (as streaming.core.session builds it)."""
    return SegmenterConfig(
        frame_ms=session.vad_frame_ms,
        aggressiveness=session.vad_aggressiveness,
        speech_pad_ms=session.speech_pad_ms,
        hangover_ms=session.hangover_ms,
        min_segment_ms=session.min_segment_ms,
        max_segment_ms=session.max_segment_ms,
        energy_gate_dbfs=session.energy_gate_dbfs,
    )


def segments_of(path: Path, cfg: SegmenterConfig) -> list[np.ndarray]:
    """The 16 kHz audio of each segment the session's segmenter cuts the file into."""
    audio, rate = read_audio(path)
    audio = resample(audio, rate, TARGET_SAMPLE_RATE).astype(np.float32)
    segmenter = Segmenter(cfg)
    events = [*segmenter.feed(audio), *segmenter.flush()]
    return [e.audio for e in events if isinstance(e, SegmentClosed)]


def write_recordings(recordings: Sequence[caption_wer.Recording], folder: Path) -> Manifest:
    """Each recording as a 16 kHz 16-bit WAV in `folder` (ids with '_' for '/')."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    for recording in recordings:
        pcm = np.frombuffer(b"".join(recording.frames), "<i2")
        uid = recording.id.replace("/", "_")
        target = folder / f"{uid}.wav"
        sf.write(target, pcm, TARGET_SAMPLE_RATE, subtype="PCM_16")
        manifest.append(Utterance(uid, target, recording.reference))
    return manifest


def transcribe(
    engine: Engine, segments: Sequence[np.ndarray], max_batch: int, language: str | None, label: str
) -> tuple[list[str], float]:
    """The texts of `segments` in order (batched by similar length), and seconds in the engine."""
    order = sorted(range(len(segments)), key=lambda i: len(segments[i]))
    texts = [""] * len(segments)
    compute_s = 0.0
    with tqdm(total=len(segments), desc=label, unit="seg", file=sys.stderr) as bar:
        for start in range(0, len(order), max_batch):
            chosen = order[start : start + max_batch]
            batch = [Segment(segments[i], language=language) for i in chosen]
            began = time.perf_counter()
            hypotheses = engine.transcribe(batch)
            compute_s += time.perf_counter() - began
            if len(hypotheses) != len(chosen):
                raise RuntimeError(
                    f"engine returned {len(hypotheses)} hypotheses for {len(chosen)} segments"
                )
            for i, hypothesis in zip(chosen, hypotheses, strict=True):
                texts[i] = hypothesis.text
            bar.update(len(chosen))
    return texts, compute_s


def set_of(uid: str) -> str:
    return uid.split("_", 1)[0]


def wer_by_set(manifest: Manifest, texts: Sequence[str]) -> dict[str, float]:
    """Corpus WER of each set (librivox, cards, long) and of all recordings together."""
    sets: dict[str, list[int]] = {}
    for i, utterance in enumerate(manifest):
        sets.setdefault(set_of(utterance.id), []).append(i)
    sets["all"] = list(range(len(manifest)))
    return {
        name: round(corpus_wer([manifest[i].reference for i in idx], [texts[i] for i in idx]), 4)
        for name, idx in sets.items()
    }


def evaluate(
    engines: dict[str, Engine],
    manifest: Manifest,
    cfg: SegmenterConfig,
    max_batch: int,
    language: str | None,
    line: str,
) -> dict:
    """Both models' figures on one line (16 kHz or its mu-law copy)."""
    cut = [segments_of(u.audio, cfg) for u in manifest]
    flat = [audio for segments in cut for audio in segments]
    audio_s = sum(len(a) for a in flat) / TARGET_SAMPLE_RATE
    figures: dict = {"recordings": len(manifest), "segments": len(flat)}
    figures["segment_audio_seconds"] = round(audio_s, 2)
    texts: dict[str, list[str]] = {}
    for role, engine in engines.items():
        texts[role], compute_s = transcribe(engine, flat, max_batch, language, f"{line} {role}")
        joined, at = [], 0
        for segments in cut:
            joined.append(" ".join(t.strip() for t in texts[role][at : at + len(segments)]))
            at += len(segments)
        figures[role] = {
            "wer": wer_by_set(manifest, joined),
            "rtfx": round(audio_s / compute_s, 1) if compute_s > 0 else None,
            "processing_seconds": round(compute_s, 3),
            "texts": dict(zip([u.id for u in manifest], joined, strict=True)),
        }
    figures["refine_minus_primary"] = {
        name: round(wer - figures["primary"]["wer"][name], 4)
        for name, wer in figures["refine"]["wer"].items()
    }
    figures["segments_changed"] = sum(
        normalise(a) != normalise(b) for a, b in zip(texts["primary"], texts["refine"], strict=True)
    )
    return figures


def report(line: str, figures: dict, names: dict[str, str]) -> str:
    """One block per line: WER of each model by set, and which is lower over all."""
    sets = list(figures["primary"]["wer"])
    lines = [
        f"{LINES[line]}: {figures['recordings']} recordings, {figures['segments']} segments, "
        f"{figures['segment_audio_seconds']} s of segment audio",
        f"  {'model':24s}" + "".join(f"{name:>10s}" for name in sets) + f"{'RTFx':>8s}",
    ]
    for role in MODELS:
        wer = figures[role]["wer"]
        lines.append(
            f"  {role + ' (' + names[role] + ')':24s}"
            + "".join(f"{wer[name]:10.2%}" for name in sets)
            + f"{figures[role]['rtfx']:>8}"
        )
    diff = figures["refine_minus_primary"]["all"]
    verdict = "refine lower" if diff < 0 else "primary lower" if diff > 0 else "equal"
    lines.append(
        f"  refine - primary: {diff * 100:+.2f} WER points over all ({verdict}); "
        f"{figures['segments_changed']} of {figures['segments']} segments changed"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.refine_wer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", help="engine.model, the primary: auto, a family, a folder ...")
    parser.add_argument(
        "--refine-model", default="base", help="the refine model, as --model takes one (base)"
    )
    parser.add_argument("--device", help="engine.device: auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, help="engine.max_batch: segments per engine call")
    parser.add_argument(
        "--only", default="", help="comma-separated sets (librivox, cards, long) or recording ids"
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep the recordings here (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    args.only = [name for name in args.only.split(",") if name]
    return args


def run(args: argparse.Namespace, workdir: Path) -> Path:
    """Measure both lines, print the report and return the results file."""
    cfg = load_config(
        overrides={
            "engine.model": args.model,
            "engine.device": args.device,
            "engine.max_batch": args.batch,
            "engine.refine_model": args.refine_model,
        }
    )
    setup_logging(cfg.logging)
    if cfg.engine.refine is None:
        raise ConfigError("--refine-model: name a model, not none")
    progress("building recordings ...")
    recordings = caption_wer.load_recordings(100, args.only)
    if not recordings:
        raise ManifestError(f"--only {','.join(args.only)} selects no recording")
    wide = write_recordings(recordings, workdir / "16k")
    built = {"16k": wide, "mulaw8k": manifests.mulaw_8k(wide, workdir / "mulaw8k")}
    progress("loading models ...")
    engines = {
        "primary": selection.load_engine(**cfg.engine.load_keywords()),
        "refine": selection.load_engine(**cfg.engine.load_keywords(cfg.engine.refine)),
    }
    names = {"primary": cfg.engine.model, "refine": cfg.engine.refine}
    if names["primary"] in ("auto", "whisper") and engines["primary"].family == "whisper":
        names["primary"] = cfg.engine.whisper_model
    language = primary_language(cfg.session.language) or None
    vad = segmenter_config(cfg.session)
    first = segments_of(wide[0].audio, vad)[:1]
    for engine in engines.values():  # warm-up, not timed
        engine.transcribe([Segment(a, language=language) for a in first])
    began, busy_before = time.monotonic(), machine_cpu_seconds()
    cpu_before = time.process_time()
    figures: dict = {}
    for line, manifest in built.items():
        figures[line] = evaluate(engines, manifest, vad, cfg.engine.max_batch, language, line)
    wall_s = time.monotonic() - began
    own_s = time.process_time() - cpu_before
    other_s = max(0.0, machine_cpu_seconds() - busy_before - own_s)
    figures["load"] = {
        "wall_s": round(wall_s, 1),
        "benchmark_cpu_s": round(own_s, 1),
        "other_cpu_cores": round(other_s / wall_s, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    for line in built:
        print(report(line, figures[line], names))
    load = figures["load"]
    print(
        f"load: this benchmark {load['benchmark_cpu_s']} s CPU, other processes "
        f"{load['other_cpu_cores']:.2f} cores over {load['wall_s']:.0f} s; "
        f"load average {load['loadavg_1m']:.2f}"
    )
    settings = {
        "primary": names["primary"],
        "refine": names["refine"],
        "families": {role: engine.family for role, engine in engines.items()},
        "device": engines["primary"].device,
        "engine": dataclasses.asdict(cfg.engine),
        "language": language,
        "segmenter": dataclasses.asdict(vad),
        "recordings": [{"id": r.id, "audio_s": r.audio_s} for r in recordings],
        "lines": list(built),
        "normaliser": "Whisper EnglishTextNormalizer, empty spelling map",
    }
    return results.write_result("refine_wer", figures, settings)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0, or 2 with one line on stderr when the data or a model is unusable."""
    args = parse_args(argv)
    try:
        if args.workdir is not None:
            path = run(args, args.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="streamscribe-refine-wer-") as tmp:
                path = run(args, Path(tmp))
    except (ConfigError, ModelLoadError, ManifestError, AudioFileError) as exc:
        print(f"benchmarks.refine_wer: error: {exc}", file=sys.stderr)
        return 2
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""WER and RTFx of the configured model on real and synthetic speech, and over a phone line.

Manifests: `librivox` (recorded speech from pocketsphinx-testdata) and `espeak` (sentences
spoken by espeak-ng). `--telephony` also scores each manifest's 8 kHz mu-law copy and the
penalty against 16 kHz. WER follows benchmarks/scoring.py; RTFx is audio seconds over seconds
spent in `engine.transcribe` (file reading excluded, resampling and features included), after
one warm-up call. Figures go to benchmarks/results/; progress goes to stderr.

    python -m benchmarks.wer                                  # both manifests, configured model
    python -m benchmarks.wer --manifest librivox --telephony
    python -m benchmarks.wer --model whisper --device cpu --batch 4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from benchmarks import manifests, results
from benchmarks.manifests import Manifest, ManifestError
from benchmarks.scoring import corpus_wer, utterance_scores, worst
from engine import selection
from engine.api import Engine, ModelLoadError, Segment
from streaming.core.audiofile import AudioFileError, read_audio
from streaming.ops.config import ConfigError, load_config
from streaming.ops.logs import setup_logging

MANIFESTS = ("librivox", "espeak")
TELEPHONY_SUFFIX = "-mulaw8k"
WORST_COUNT = 5


def build_manifests(names: Sequence[str], workdir: Path, telephony: bool) -> dict[str, Manifest]:
    """Each named manifest, followed by its mu-law copy when `telephony` is set."""
    built: dict[str, Manifest] = {}
    for name in names:
        manifest = manifests.librivox() if name == "librivox" else manifests.espeak(workdir / name)
        built[name] = manifest
        if telephony:
            copy = name + TELEPHONY_SUFFIX
            built[copy] = manifests.mulaw_8k(manifest, workdir / copy)
    return built


def transcribe(
    engine: Engine, manifest: Manifest, max_batch: int, label: str
) -> tuple[list[str], float, float]:
    """Hypothesis texts in manifest order, audio seconds, and seconds spent in the engine.

    Batches hold utterances of similar length (sorted, as the scheduler batches), so padding
    does not make a batching family look slower than it is.
    """
    segments = [Segment(*read_audio(u.audio)) for u in manifest]
    seconds = [len(s.audio) / s.sample_rate for s in segments]
    order = sorted(range(len(segments)), key=seconds.__getitem__)
    texts = [""] * len(segments)
    compute_s = 0.0
    with tqdm(total=len(segments), desc=label, unit="utt", file=sys.stderr) as bar:
        for start in range(0, len(order), max_batch):
            chosen = order[start : start + max_batch]
            began = time.perf_counter()
            hypotheses = engine.transcribe([segments[i] for i in chosen])
            compute_s += time.perf_counter() - began
            if len(hypotheses) != len(chosen):
                raise RuntimeError(
                    f"engine returned {len(hypotheses)} hypotheses for {len(chosen)} segments"
                )
            for i, hypothesis in zip(chosen, hypotheses, strict=True):
                texts[i] = hypothesis.text
            bar.update(len(chosen))
    return texts, sum(seconds), compute_s


def evaluate(engine: Engine, name: str, manifest: Manifest, max_batch: int) -> dict:
    """The figures of one manifest: WER, RTFx, size and the worst utterances."""
    hypotheses, audio_s, compute_s = transcribe(engine, manifest, max_batch, name)
    ids = [u.id for u in manifest]
    references = [u.reference for u in manifest]
    return {
        "wer": round(corpus_wer(references, hypotheses), 4),
        "rtfx": round(audio_s / compute_s, 1) if compute_s > 0 else None,
        "utterances": len(manifest),
        "audio_seconds": round(audio_s, 2),
        "processing_seconds": round(compute_s, 3),
        "worst": [
            dataclasses.asdict(score)
            for score in worst(utterance_scores(ids, references, hypotheses), WORST_COUNT)
        ],
    }


def telephony_penalty(wide_wer: float, narrow_wer: float) -> dict:
    """How much worse 8 kHz mu-law is: in WER points, and relative to 16 kHz (None if 16 kHz
    made no errors, where a ratio means nothing)."""
    return {
        "absolute": round(narrow_wer - wide_wer, 4),
        "relative": round((narrow_wer - wide_wer) / wide_wer, 3) if wide_wer else None,
    }


def report(name: str, figures: dict) -> str:
    """The human-readable block printed for one manifest."""
    lines = [
        f"{name}: WER {figures['wer']:.2%}  RTFx {figures['rtfx']}  "
        f"utterances {figures['utterances']}  audio {figures['audio_seconds']} s"
    ]
    penalty = figures.get("telephony_penalty")
    if penalty is not None:
        relative = "n/a" if penalty["relative"] is None else f"{penalty['relative']:+.0%}"
        lines.append(
            f"  telephony penalty: {penalty['absolute'] * 100:+.2f} WER points ({relative})"
        )
    for score in figures["worst"]:
        errors = f"{score['errors']} error" + ("s" if score["errors"] != 1 else "")
        lines.append(f"  {score['id']}: {errors} in {score['words']} words")
        lines.append(f"    ref: {score['reference']}")
        lines.append(f"    hyp: {score['hypothesis']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.wer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--manifest", choices=[*MANIFESTS, "all"], default="all")
    parser.add_argument(
        "--telephony", action="store_true", help="also score 8 kHz mu-law copies of each manifest"
    )
    parser.add_argument("--model", help="engine.model: auto, a family, a folder or a hub id")
    parser.add_argument("--device", help="engine.device: auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, help="engine.max_batch: utterances per engine call")
    parser.add_argument(
        "--workdir", type=Path, help="keep generated audio here (default: a temporary folder)"
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace, workdir: Path) -> Path:
    """Measure every manifest, print the report, and return the results file."""
    cfg = load_config(
        overrides={
            "engine.model": args.model,
            "engine.device": args.device,
            "engine.max_batch": args.batch,
        }
    )
    setup_logging(cfg.logging)
    names = MANIFESTS if args.manifest == "all" else (args.manifest,)
    print("building manifests ...", file=sys.stderr, flush=True)
    built = build_manifests(names, workdir, args.telephony)
    print("loading model ...", file=sys.stderr, flush=True)
    engine = selection.load_engine(**cfg.engine.load_keywords())
    first = next(iter(built.values()))[0]
    engine.transcribe([Segment(*read_audio(first.audio))])  # warm-up, not timed
    figures: dict[str, dict] = {}
    for name, manifest in built.items():
        figures[name] = evaluate(engine, name, manifest, cfg.engine.max_batch)
        wide = name.removesuffix(TELEPHONY_SUFFIX)
        if wide != name:
            figures[name]["telephony_penalty"] = telephony_penalty(
                figures[wide]["wer"], figures[name]["wer"]
            )
    for name, block in figures.items():
        print(report(name, block))
    settings = {
        "manifests": list(built),
        "engine": dataclasses.asdict(cfg.engine),
        "family": engine.family,
        "device": engine.device,
        "espeak": {"voice": manifests.ESPEAK_VOICE, "wpm": manifests.ESPEAK_WORDS_PER_MINUTE},
        "normaliser": "Whisper EnglishTextNormalizer, empty spelling map",
    }
    return results.write_result("wer", figures, settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0, or 2 with one line on stderr when the data or the model is unusable."""
    args = parse_args(argv)
    try:
        if args.workdir is not None:
            path = run(args, args.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="streamscribe-wer-") as tmp:
                path = run(args, Path(tmp))
    except (ConfigError, ModelLoadError, ManifestError, AudioFileError) as exc:
        print(f"benchmarks.wer: error: {exc}", file=sys.stderr)
        return 2
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

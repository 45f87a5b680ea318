"""Caption WER: live roll-up captions against the reference, next to the finals' WER.

Captions are built from committed text and never taken back, so every error in them stays on
air: a word the model committed too early, or one dropped or doubled where the captions are
reconciled with a final. This streams every real recording there is over the native protocol at
real time (100 ms frames) with `captions_mode=rollup`, each in its own session, and scores what
a viewer read against what the finals said:

- caption text: the `caption.append` texts in order (a row break is a word boundary, the `>> `
  of a speaker change is not a word); finals text: the `transcript.final` texts in order;
- both scored against the reference as benchmarks/scoring.py scores everything; target: caption
  WER <= finals WER + 0.01 (over all recordings);
- doubled words: caption words the alignment with the reference calls insertions that repeat
  the caption word (or words) beside them; target: none;
- captions against finals: the caption text scored against the finals' text.

Recordings (pocketsphinx-testdata): the 5 LibriVox clips, the 5 `cards` clips, and one long
continuous reading of the LibriVox clips in turn (from the first again once they run out) with
PAUSE_S between them, for at least LONG_MIN_S: the segments it is cut into, at pauses and at
`max_segment_ms`, are where captions used to drop or double words. Each stream opens with LEAD_S
and closes with TAIL_S of faint noise, then `close`.

The server runs in its own process as for benchmarks.stream_load (its CPU time is recorded with
the generator's and the rest of the machine's, as the load during the run).

    python -m benchmarks.caption_wer                        # Whisper on the CPU, real time
    python -m benchmarks.caption_wer --only cards,long      # some recordings (sets or ids)
    python -m benchmarks.caption_wer --speed 2 --parallel 2
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import jiwer
import numpy as np

from benchmarks import manifests
from benchmarks.manifests import ManifestError
from benchmarks.results import write_result
from benchmarks.scoring import corpus_wer, normalise
from benchmarks.stream_load import (
    NOISE,
    RATE,
    SEED,
    Endpoints,
    StreamPlan,
    StreamRecord,
    machine_cpu_seconds,
    open_stream,
    play,
    process_cpu_seconds,
    progress,
    spawned_server,
    target,
    to_frames,
    warm_up,
)
from streaming.core.audiofile import read_audio
from streaming.core.captions import SPEAKER_MARK
from streaming.core.stability import word_key

LEAD_S = 0.5
TAIL_S = 1.5  # longer than the hangover: the last final comes by endpoint, as in a live talk
PAUSE_S = 0.3  # between the clips of the long reading: shorter than the hangover
LONG_MIN_S = 40.0  # longer than `max_segment_ms` (15 s), so a segment is cut mid-speech too
WER_MARGIN = 0.01  # target: caption WER <= finals WER + this
CLOSE_WAIT_S = 60.0  # after `close`, on top of the recording's length, for `session.closed`


@dataclass(frozen=True)
class Recording:
    id: str  # "<set>/<clip id>"
    reference: str
    frames: tuple[bytes, ...]  # s16le at RATE
    audio_s: float


def long_reading(durations_s: Sequence[float], min_s: float, pause_s: float) -> list[int]:
    """Indices of the clips read in turn, from the first again once they run out, until the
    reading (clips and the pauses between them) lasts at least `min_s`."""
    if not durations_s:
        return []
    order: list[int] = []
    total = -pause_s
    while total < min_s:
        index = len(order) % len(durations_s)
        order.append(index)
        total += pause_s + durations_s[index]
    return order


def _read(utterance: manifests.Utterance) -> np.ndarray:
    audio, rate = read_audio(utterance.audio)
    if rate != RATE:
        raise ManifestError(f"{utterance.audio}: {rate} Hz, expected {RATE}")
    return audio


def _recording(
    rid: str,
    clips: Sequence[np.ndarray],
    references: Sequence[str],
    frame_ms: int,
    rng: np.random.Generator,
) -> Recording:
    """`clips` joined by PAUSE_S of faint noise, with LEAD_S before and TAIL_S after."""

    def quiet(seconds: float) -> np.ndarray:
        return NOISE * rng.standard_normal(round(seconds * RATE)).astype(np.float32)

    parts = [quiet(LEAD_S)]
    for i, clip in enumerate(clips):
        parts += [quiet(PAUSE_S)] if i else []
        parts.append(clip)
    parts.append(quiet(TAIL_S))
    frames = to_frames(np.concatenate(parts), frame_ms, rng)
    return Recording(rid, " ".join(references), frames, len(frames) * frame_ms / 1000)


def selected(rid: str, only: Sequence[str]) -> bool:
    """Whether `--only` asks for a recording: by its id, or by its set (the part before '/')."""
    return not only or rid in only or rid.split("/")[0] in only


def load_recordings(frame_ms: int, only: Sequence[str] = ()) -> list[Recording]:
    """The recordings (module doc) that `only` selects, in a fixed order."""
    rng = np.random.default_rng(SEED)
    sets = {"librivox": manifests.librivox(), "cards": manifests.cards()}
    audio = {name: [_read(u) for u in manifest] for name, manifest in sets.items()}
    recordings = [
        _recording(f"{name}/{u.id}", [clip], [u.reference], frame_ms, rng)
        for name, manifest in sets.items()
        for u, clip in zip(manifest, audio[name], strict=True)
    ]
    clips = audio["librivox"]
    order = long_reading([len(c) / RATE for c in clips], LONG_MIN_S, PAUSE_S)
    references = [sets["librivox"][i].reference for i in order]
    recordings.append(
        _recording("long/librivox", [clips[i] for i in order], references, frame_ms, rng)
    )
    return [r for r in recordings if selected(r.id, only)]


# --- scoring -----------------------------------------------------------------------------------


def caption_text(messages: Iterable[dict]) -> str:
    """What the roll-up display showed, as one line: the appends' texts in order. An append that
    breaks the row starts a new word (its text has no leading space), and the speaker mark that
    opens a row on a change of channel is not a word."""
    parts = []
    for message in messages:
        if message["type"] != "caption.append":
            continue
        text = message["text"]
        if message["speaker_change"]:
            text = text.removeprefix(SPEAKER_MARK)
        parts.append(f" {text}" if message["row_break"] else text)
    return "".join(parts).strip()


def finals_text(messages: Iterable[dict]) -> str:
    """The finals' texts in order."""
    texts = (m["text"].strip() for m in messages if m["type"] == "transcript.final")
    return " ".join(t for t in texts if t)


def _words(text: str) -> list[str]:
    return [key for key in map(word_key, text.split()) if key]


def doubled_words(reference: str, captions: str) -> int:
    """Caption words shown twice where the reference says them once.

    The captions are aligned with the reference (jiwer); an inserted run of words counts whole
    when it repeats the same number of caption words just before or after it ("he was he was"),
    else each inserted word counts that repeats the caption word before it, or the aligned one
    after it ("of of"). Words are compared case- and punctuation-blind, but not through the
    scoring normaliser, which would merge "five five" into "55" and hide a third "five".
    """
    ref, hyp = _words(reference), _words(captions)
    if not hyp:
        return 0
    alignment = jiwer.process_words(" ".join(ref), " ".join(hyp)).alignments[0]
    count = 0
    for chunk in alignment:
        if chunk.type != "insert":
            continue
        a, b = chunk.hyp_start_idx, chunk.hyp_end_idx
        run = hyp[a:b]
        if (a >= len(run) and hyp[a - len(run) : a] == run) or hyp[b : b + len(run)] == run:
            count += len(run)
            continue
        count += sum(
            (j > 0 and hyp[j] == hyp[j - 1]) or (j == b - 1 and b < len(hyp) and hyp[j] == hyp[b])
            for j in range(a, b)
        )
    return count


def _wer(references: Sequence[str], hypotheses: Sequence[str]) -> float | None:
    """Corpus WER, rounded; None without reference words (captions against empty finals)."""
    if not any(normalise(r) for r in references):
        return None
    return round(corpus_wer(references, hypotheses), 4)


def score(recording: Recording, messages: Sequence[dict]) -> dict:
    """The figures of one recording (texts kept, to see what the errors were)."""
    captions, finals = caption_text(messages), finals_text(messages)
    caption_wer = corpus_wer([recording.reference], [captions])
    finals_wer = corpus_wer([recording.reference], [finals])
    return {
        "id": recording.id,
        "audio_s": recording.audio_s,
        "caption_wer": round(caption_wer, 4),
        "finals_wer": round(finals_wer, 4),
        "difference": round(caption_wer - finals_wer, 4),
        "doubled_words": doubled_words(recording.reference, captions),
        "captions_vs_finals_wer": _wer([finals], [captions]),
        "reference_words": len(normalise(recording.reference).split()),
        "caption_words": len(normalise(captions).split()),
        "final_words": len(normalise(finals).split()),
        "appends": sum(m["type"] == "caption.append" for m in messages),
        "finals": sum(m["type"] == "transcript.final" for m in messages),
        "captions": captions,
        "finals_text": finals,
    }


def totals(recordings: Sequence[Recording], scores: Sequence[dict]) -> dict:
    """Corpus-level figures over the scored recordings (benchmarks/scoring.py: errors summed,
    so long recordings weigh by their length)."""
    references = [r.reference for r in recordings]
    captions = [s["captions"] for s in scores]
    finals = [s["finals_text"] for s in scores]
    caption_wer = corpus_wer(references, captions)
    finals_wer = corpus_wer(references, finals)
    return {
        "recordings": len(scores),
        "caption_wer": round(caption_wer, 4),
        "finals_wer": round(finals_wer, 4),
        "difference": round(caption_wer - finals_wer, 4),
        "doubled_words": sum(s["doubled_words"] for s in scores),
        "captions_vs_finals_wer": _wer(finals, captions),
        **{
            name: sum(s[name] for s in scores)
            for name in ("reference_words", "caption_words", "final_words")
        },
    }


def judge(total: dict) -> dict:
    """The issue's two targets over all recordings."""
    return {
        "caption_wer_over_finals": target(total["difference"], WER_MARGIN, "<="),
        "doubled_words": target(total["doubled_words"], 0, "<="),
    }


# --- streaming ---------------------------------------------------------------------------------


async def caption_stream(
    server: Endpoints, recording: Recording, frame_s: float
) -> tuple[StreamRecord, dict]:
    """One session: the recording paced at one frame per `frame_s`, then `close`; every message
    with its arrival time, and the session's options. Failures are kept in the record's
    `error`."""
    record = StreamRecord()
    try:
        ws, started = await open_stream(server)
    except Exception as err:
        record.error = f"{type(err).__name__}: {err}"
        return record, {}
    options = started.get("config") or {}
    if options.get("captions_mode") != "rollup":
        await ws.close()
        record.error = f"the session did not take captions_mode=rollup: {options}"
        return record, options
    record.t0 = asyncio.get_running_loop().time()
    plan = StreamPlan(list(recording.frames), [])
    await play(ws, plan, record, frame_s, tail_s=CLOSE_WAIT_S + recording.audio_s)
    return record, options


@dataclass
class Load:
    """What else the machine did while the streams ran."""

    wall_s: float
    server_cpu_s: float
    generator_cpu_s: float
    other_cpu_cores: float
    loadavg_1m: float

    def figures(self) -> dict:
        return {k: round(v, 2) for k, v in dataclasses.asdict(self).items()}


async def run_streams(
    server: Endpoints, pid: int, recordings: Sequence[Recording], frame_s: float, parallel: int
) -> tuple[list[tuple[StreamRecord, dict]], Load]:
    """Every recording in its own session, `parallel` at a time, in order."""
    gate = asyncio.Semaphore(parallel)

    async def one(recording: Recording) -> tuple[StreamRecord, dict]:
        async with gate:
            progress(f"streaming {recording.id} ({recording.audio_s:.1f} s)")
            return await caption_stream(server, recording, frame_s)

    began, server_before = time.monotonic(), process_cpu_seconds(pid)
    generator_before, machine_before = time.process_time(), machine_cpu_seconds()
    records = await asyncio.gather(*(one(r) for r in recordings))
    wall_s = time.monotonic() - began
    server_cpu_s = process_cpu_seconds(pid) - server_before
    generator_cpu_s = time.process_time() - generator_before
    other_s = machine_cpu_seconds() - machine_before - server_cpu_s - generator_cpu_s
    other_cores = max(0.0, other_s) / wall_s
    return records, Load(wall_s, server_cpu_s, generator_cpu_s, other_cores, os.getloadavg()[0])


# --- the command -------------------------------------------------------------------------------


def report(scores: Sequence[dict], total: dict, targets: dict, load: Load) -> str:
    """The table, the totals and the verdicts."""

    def rate(value: float | None) -> str:
        return "    -" if value is None else f"{value:6.2%}"

    width = max(len(s["id"]) for s in scores)
    header = (
        f"{'recording':<{width}} {'audio':>6} {'caption':>7} {'finals':>7} {'diff':>7} "
        f"{'doubled':>7} {'words c/f/ref':>14} {'c vs f':>7}"
    )
    lines = [header, "-" * len(header)]
    for s in [*scores, {**total, "id": "total", "audio_s": sum(x["audio_s"] for x in scores)}]:
        words = f"{s['caption_words']}/{s['final_words']}/{s['reference_words']}"
        lines.append(
            f"{s['id']:<{width}} {s['audio_s']:5.1f}s {rate(s['caption_wer'])} "
            f"{rate(s['finals_wer'])} {s['difference']:+7.2%} {s['doubled_words']:7d} "
            f"{words:>14} {rate(s['captions_vs_finals_wer'])}"
        )
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}
    margin, doubled = targets["caption_wer_over_finals"], targets["doubled_words"]
    lines += [
        f"{verdict[margin['ok']]}  caption WER {total['caption_wer']:.2%} <= finals WER "
        f"{total['finals_wer']:.2%} + {WER_MARGIN:.0%}",
        f"{verdict[doubled['ok']]}  no doubled word ({total['doubled_words']})",
        f"load: server {load.server_cpu_s:.1f} s CPU, load generator {load.generator_cpu_s:.1f} s,"
        f" other processes {load.other_cpu_cores:.2f} cores over {load.wall_s:.0f} s; "
        f"load average {load.loadavg_1m:.2f}",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.caption_wer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="whisper", help="engine.model of the started server")
    parser.add_argument("--config", metavar="FILE", help="YAML settings for the started server")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="times real time (1: paced as a live talk)"
    )
    parser.add_argument("--parallel", type=int, default=1, help="streams at a time")
    parser.add_argument("--frame-ms", type=int, default=100, help="audio per WebSocket frame")
    parser.add_argument(
        "--only", default="", help="comma-separated sets (librivox, cards, long) or recording ids"
    )
    args = parser.parse_args(argv)
    if args.speed <= 0 or args.parallel < 1 or args.frame_ms < 10:
        parser.error("--speed must be > 0, --parallel >= 1 and --frame-ms >= 10")
    args.only = [name for name in args.only.split(",") if name]
    return args


async def run(args: argparse.Namespace, recordings: Sequence[Recording]) -> int:
    """Stream, score, print and record; 1 when a stream failed, else 0 (targets or not)."""
    async with spawned_server(args.model, args.config) as server:
        rollup = dataclasses.replace(
            server.server, stream=f"{server.server.stream}?captions_mode=rollup"
        )
        progress("warming up the engine with one recording")
        await warm_up(rollup, recordings[0].frames)
        frame_s = args.frame_ms / 1000 / args.speed
        streams, load = await run_streams(rollup, server.pid, recordings, frame_s, args.parallel)
    failed = {r.id: s.error for r, (s, _) in zip(recordings, streams, strict=True) if s.error}
    for rid, error in failed.items():
        print(f"{rid}: stream failed: {error}", file=sys.stderr)
    done = [(r, s) for r, (s, _) in zip(recordings, streams, strict=True) if not s.error]
    if not done:
        return 1
    scores = [score(r, [m for _, m in s.messages]) for r, s in done]
    total = totals([r for r, _ in done], scores)
    targets = judge(total)
    print(report(scores, total, targets, load), flush=True)
    figures = {
        "recordings": scores,
        "total": total,
        "targets": targets,
        "streams_failed": failed,
        "load": load.figures(),
    }
    settings = {
        "model": args.model,
        "config": args.config,
        "server_engine_family": server.family,
        "speed": args.speed,
        "parallel": args.parallel,
        "frame_ms": args.frame_ms,
        "session": next((options for _, options in streams if options), {}),
        "recordings": [{"id": r.id, "audio_s": r.audio_s} for r in recordings],
        "lead_s": LEAD_S,
        "tail_s": TAIL_S,
        "pause_s": PAUSE_S,
        "long_min_s": LONG_MIN_S,
        "normaliser": "Whisper EnglishTextNormalizer, empty spelling map",
    }
    print(f"written to {write_result('caption_wer', figures, settings)}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0; 1 when a stream failed; 2 with one line on stderr when a recording or its
    reference is missing. A missed target is printed (FAIL), not an error."""
    args = parse_args(argv)
    try:
        recordings = load_recordings(args.frame_ms, args.only)
    except ManifestError as exc:
        print(f"benchmarks.caption_wer: error: {exc}", file=sys.stderr)
        return 2
    if not recordings:
        print(f"benchmarks.caption_wer: error: --only {args.only} selects nothing", file=sys.stderr)
        return 2
    return asyncio.run(run(args, recordings))


if __name__ == "__main__":
    raise SystemExit(main())

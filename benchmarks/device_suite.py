"""The GPU device suite: bf16/fp32 parity, RTFx and memory per batch size, and the load streams.

One command that on a GPU finishes in minutes and writes one record (benchmarks/results.py):

1. parity: argmax agreement between bf16 and fp32 of the Granite NAR model's CTC draft and
   editor outputs, on tiny random weights (a `write_tiny_checkpoint` folder) and on full-size
   random weights (the real 2B shape, `full_size_config`); on CPU the tiny config only;
2. RTFx (audio seconds per compute second) of `draft` and `transcribe`, eager and compiled
   (`engine.compile`'s runner, after its warm-up, whose seconds are recorded), at batch
   1/32/128/512 with full-size random weights (GPU) or 1/4/16 with tiny weights (CPU); how
   often the compiled transcripts equal the eager ones; on a GPU, the host-device
   synchronisations of one batch, eager and compiled, counted by CUDA's sync debug mode;
3. peak GPU memory per batch size (null on CPU);
4. `benchmarks.stream_load` with granite-nar on a random full-size checkpoint (skipped on CPU,
   with the reason recorded, as it needs minutes).

    python -m benchmarks.device_suite              # GPU: full suite; no CUDA: CPU smoke
    python -m benchmarks.device_suite --cpu-smoke  # reduced size on CPU, well under a minute
    python -m benchmarks.device_suite --batches 1,32,128 --skip-load   # a shorter GPU run
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters

from benchmarks import rtfx
from benchmarks.results import write_result
from engine.api import Segment
from engine.audio import prepare_waveform
from engine.features import nar_features
from engine.granite_nar.checkpoint import save_model
from engine.granite_nar.decoding import build_slots, draft_spans
from engine.granite_nar.engine import GraniteNarEngine
from engine.granite_nar.model import GraniteSpeechNar
from engine.selection import load_engine
from tests.checkpoints.granite_nar import write_tiny_checkpoint

RATE = 16000
GPU_BATCHES = (1, 32, 128, 512)
CPU_BATCHES = (1, 4, 16)
GPU_CLIP_S = 10.0
CPU_CLIP_S = 4.0
PARITY_CLIPS = 8
LOAD_STREAMS = "16,64"
LOAD_SECONDS = 30.0


def progress(text: str) -> None:
    print(f"[device_suite] {text}", flush=True)


# --- audio ------------------------------------------------------------------------------------


def clip_audio(count: int, seconds: float, seed: int = 0) -> tuple[list[Segment], str]:
    """`count` segments of exactly `seconds`: the LibriVox test clips (pocketsphinx-testdata)
    cut or padded with faint noise, cycled; synthetic voiced tones when they are not installed."""
    n = int(seconds * RATE)
    rng = np.random.default_rng(seed)
    sources = librivox_audio()
    if not sources:
        return rtfx.synthetic_segments(count, seed, seconds, seconds), "synthetic"
    segments = []
    for i in range(count):
        audio = sources[i % len(sources)][:n]
        if len(audio) < n:
            pad = 1e-3 * rng.standard_normal(n - len(audio)).astype(np.float32)
            audio = np.concatenate([audio, pad])
        segments.append(Segment(audio.astype(np.float32)))
    return segments, "librivox"


def librivox_audio() -> list[np.ndarray]:
    from tests import streams

    if not (streams.LIBRIVOX / "transcription").exists():
        return []
    return [audio for _, audio, _ in streams.librivox_clips()]


# --- parity -----------------------------------------------------------------------------------


@torch.inference_mode()
def model_outputs(
    model: GraniteSpeechNar, segments: list[Segment], slots: list[list[int]] | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[int]]]:
    """CTC draft ids per sample, editor ids per sample and the slots the editor was fed (built
    from this model's drafts unless given, so both dtypes can edit the same slots)."""
    waves = [prepare_waveform(s.audio, s.sample_rate) for s in segments]
    features, lengths_t = nar_features(waves, device=model.device)
    lengths = lengths_t.tolist()
    encoded = model.encode(features.to(model.dtype), with_taps=True)
    drafts = model.ctc_draft(encoded, lengths)
    blank = model.cfg.blank_token_id
    if slots is None:
        slots = []
        for d in drafts:
            spans = draft_spans(d.window_ids.tolist(), d.window_probs.tolist(), blank)
            slots.append(
                build_slots([s.token_id for s in spans], blank, model.cfg.min_edit_sequence_length)
            )
    audio = model.audio_embeddings(encoded, lengths)
    outputs = model.edit(audio, [torch.tensor(s, device=model.device) for s in slots])
    return (
        [d.window_ids.cpu() for d in drafts],
        [o.slot_ids.cpu() for o in outputs],
        slots,
    )


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    same = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    total = sum(len(x) for x in a)
    return {"agreement": round(same / total, 6) if total else None, "positions": total}


def parity(model: GraniteSpeechNar, segments: list[Segment]) -> dict:
    """bf16 against fp32 on the same weights: the fp32 drafts give the editor slots of both."""
    fp32 = model.float().eval()
    ctc32, edit32, slots = model_outputs(fp32, segments, None)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ctc16, edit16, _ = model_outputs(bf16, segments, slots)
    del bf16
    return {
        "ctc_draft_argmax": agreement(ctc32, ctc16),
        "editor_argmax": agreement(edit32, edit16),
        "clips": len(segments),
    }


# --- RTFx and memory --------------------------------------------------------------------------


def rtfx_at(engine, segments: list[Segment], batch: int, on_gpu: bool, repeats: int) -> dict:
    engine.max_batch = batch
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine.draft(segments[:batch])  # warm-up at this shape
    entry = {}
    for call in ("draft", "transcribe"):
        entry[call] = rtfx.timed(engine, call, segments, repeats)
    entry["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated()) if on_gpu else None
    entry["peak_memory_gib"] = round(entry["peak_memory_bytes"] / 2**30, 3) if on_gpu else None
    return entry


def rtfx_suite(engine, batches: tuple[int, ...], seconds: float, on_gpu: bool) -> dict:
    """Eager, then compiled (the same weights through `engine.compile`'s runner), at each batch
    size; the compiled transcripts are compared with the eager ones."""
    largest = max(batches)
    segments, source = clip_audio(largest, seconds)
    out = {"audio": source, "clip_seconds": seconds, "eager": {}, "compiled": {}}
    repeats = 2 if on_gpu else 1
    for batch in batches:
        start = time.perf_counter()
        entry = rtfx_at(engine, segments[:batch], batch, on_gpu, repeats)
        out["eager"][str(batch)] = entry
        report("eager", batch, entry, start)
    compiled = GraniteNarEngine(engine.model, engine.tokenizer, compiled=True)
    progress(f"compiling ({seconds:.0f} s bucket, batch 1, 2 and {largest}) ...")
    warm_up = compiled.runner.warm_up(seconds, largest, shortest_s=seconds)
    out["compile_seconds"] = round(warm_up, 1)
    progress(f"compiled in {out['compile_seconds']} s")
    graphs = counters["stats"]["unique_graphs"]
    for batch in batches:
        start = time.perf_counter()
        entry = rtfx_at(compiled, segments[:batch], batch, on_gpu, repeats)
        engine.max_batch = batch
        entry["same_as_eager"] = same_transcripts(
            compiled.transcribe(segments[:batch]), engine.transcribe(segments[:batch])
        )
        out["compiled"][str(batch)] = entry
        report("compiled", batch, entry, start)
    out["graphs_compiled_after_warm_up"] = counters["stats"]["unique_graphs"] - graphs
    out["graphs_total"] = counters["stats"]["unique_graphs"]
    out["eager_fallbacks"] = counters["frames"]["total"] - counters["frames"]["ok"]
    out["host_syncs_per_batch"] = host_syncs(engine, compiled, segments[: min(batches[-1], 32)])
    return out


def report(mode: str, batch: int, entry: dict, start: float) -> None:
    progress(
        f"{mode:>8} batch {batch:>4}: draft RTFx {entry['draft']['rtfx']:>9}  transcribe RTFx "
        f"{entry['transcribe']['rtfx']:>9}  peak memory {entry['peak_memory_gib']} GiB  "
        f"({time.perf_counter() - start:.1f} s)"
    )


def same_transcripts(mine: list, reference: list) -> dict:
    """Share of segments whose token ids are identical, and of token positions that agree."""
    pairs = [(a.token_ids, b.token_ids) for a, b in zip(mine, reference, strict=True)]
    same = sum(a == b for a, b in pairs)
    positions = sum(max(len(a), len(b)) for a, b in pairs)
    agree = sum(x == y for a, b in pairs for x, y in zip(a, b, strict=False))
    return {
        "segments_identical": round(same / len(mine), 4) if mine else None,
        "token_agreement": round(agree / positions, 4) if positions else None,
    }


def host_syncs(eager, compiled, segments: list[Segment]) -> dict:
    """Host-device synchronisations during one `transcribe` batch, as CUDA's sync debug mode
    reports them (null on CPU, which has none to count)."""
    if not torch.cuda.is_available() or eager.model.device.type != "cuda":
        return {"skipped": "CPU run: no device synchronisation to count"}
    counts = {}
    for name, engine in (("eager", eager), ("compiled", compiled)):
        engine.max_batch = len(segments)
        engine.transcribe(segments)  # warm
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.transcribe(segments)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[name] = sum("synchroniz" in str(w.message) for w in caught)
    counts["batch"] = len(segments)
    return counts


# --- load benchmark ---------------------------------------------------------------------------


def load_benchmark(folder: Path, streams: str, seconds: float, timeout_s: float) -> dict:
    """`python -m benchmarks.stream_load --model FOLDER` in a subprocess; its own record is
    written too, and its figures are taken from the newest stream_load result."""
    from benchmarks.results import RESULTS_DIR

    before = set(RESULTS_DIR.glob("stream_load-*.json"))
    command = [
        sys.executable, "-m", "benchmarks.stream_load",
        "--model", str(folder), "--streams", streams, "--seconds", str(seconds),
    ]  # fmt: skip
    progress("running " + " ".join(command[1:]))
    start = time.perf_counter()
    try:
        done = subprocess.run(command, timeout=timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"skipped": f"stream_load ran past {timeout_s:.0f} s", "command": command[1:]}
    new = sorted(set(RESULTS_DIR.glob("stream_load-*.json")) - before)
    out = {
        "command": command[1:],
        "returncode": done.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "stderr_tail": done.stderr[-2000:],
    }
    if new:
        import json

        record = json.loads(new[-1].read_text())
        out["result_file"] = new[-1].name
        out["figures"] = record["figures"]
    return out


# --- the suite --------------------------------------------------------------------------------


def run_suite(
    cpu_smoke: bool,
    load_streams: str,
    load_seconds: float,
    skip_load: bool,
    batches: tuple[int, ...] | None = None,
) -> dict:
    on_gpu = torch.cuda.is_available() and not cpu_smoke
    device = torch.device("cuda" if on_gpu else "cpu")
    started = time.perf_counter()
    figures: dict = {"parity": {}}
    with tempfile.TemporaryDirectory(prefix="device-suite-") as tmp:
        tiny = write_tiny_checkpoint(Path(tmp) / "tiny")
        progress(f"parity on tiny random weights ({device}) ...")
        tiny_engine = load_engine(
            str(tiny), granite_nar_model=str(tiny), device=str(device), dtype="float32"
        )
        segments, _ = clip_audio(PARITY_CLIPS if on_gpu else 3, GPU_CLIP_S if on_gpu else 3.0)
        figures["parity"]["tiny"] = parity(tiny_engine.model, segments)
        progress(f"tiny: {figures['parity']['tiny']}")

        if on_gpu:
            progress("building full-size random model (fp32) ...")
            engine = rtfx.build_engine("full", device, torch.float32, 1)
            progress("calibrating draft length ...")
            rate = rtfx.calibrate_blank(engine, segments[:4])
            figures["draft_tokens_per_second"] = round(rate, 2)
            progress("parity on full-size random weights ...")
            figures["parity"]["full"] = parity(engine.model, segments)
            progress(f"full: {figures['parity']['full']}")
            engine.model.to(torch.bfloat16)
            torch.cuda.empty_cache()
            progress("RTFx, full size bf16 eager ...")
            figures["rtfx"] = rtfx_suite(engine, batches or GPU_BATCHES, GPU_CLIP_S, on_gpu)
            figures["rtfx"]["model"] = "full-size random weights, bfloat16"
        else:
            figures["parity"]["full"] = {
                "skipped": "CPU run: the tiny config only (full size needs a GPU)"
            }
            engine = load_engine(
                str(tiny), granite_nar_model=str(tiny), device="cpu", dtype="float32"
            )
            progress("RTFx, tiny weights fp32 eager on CPU ...")
            figures["rtfx"] = rtfx_suite(engine, batches or CPU_BATCHES, CPU_CLIP_S, on_gpu)
            figures["rtfx"]["model"] = "tiny random weights, float32 (CPU smoke)"

        if not on_gpu:
            figures["load"] = {"skipped": "CPU smoke: the load benchmark needs minutes and a GPU"}
        elif skip_load:
            figures["load"] = {"skipped": "--skip-load"}
        else:
            folder = Path(tmp) / "full"
            progress(f"writing full-size random checkpoint to {folder} ...")
            save_model(engine.model, folder)
            engine.tokenizer.save(str(folder / "tokenizer.json"))
            del engine
            torch.cuda.empty_cache()
            figures["load"] = load_benchmark(folder, load_streams, load_seconds, timeout_s=300)
            progress(f"load: returncode {figures['load'].get('returncode')}")
    figures["suite_seconds"] = round(time.perf_counter() - started, 1)
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.device_suite", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="reduced size on CPU (automatic without CUDA)"
    )
    parser.add_argument("--load-streams", default=LOAD_STREAMS, help="stream_load --streams")
    parser.add_argument("--load-seconds", type=float, default=LOAD_SECONDS)
    parser.add_argument("--skip-load", action="store_true", help="leave out stream_load")
    parser.add_argument(
        "--batches",
        type=batch_sizes,
        default=None,
        help="RTFx batch sizes, comma-separated (default 1,32,128,512 on a GPU, 1,4,16 on CPU)",
    )
    return parser.parse_args(argv)


def batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: positive whole numbers, comma-separated")
    return tuple(sorted(set(sizes)))


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    cpu_smoke = args.cpu_smoke or not torch.cuda.is_available()
    figures = run_suite(
        cpu_smoke, args.load_streams, args.load_seconds, args.skip_load, args.batches
    )
    default = CPU_BATCHES if cpu_smoke else GPU_BATCHES
    settings = {
        "mode": "cpu-smoke" if cpu_smoke else "gpu",
        "device": "cpu" if cpu_smoke else "cuda",
        "parity_dtypes": ["float32", "bfloat16"],
        "rtfx_batches": list(args.batches or default),
        "rtfx_dtype": "float32" if cpu_smoke else "bfloat16",
        "sizes": ["tiny"] if cpu_smoke else ["tiny", "full"],
        "full_config": None
        if cpu_smoke
        else "tests.checkpoints.granite_nar.full_size_config (granite-speech-4.1-2b-nar shape)",
        "load_streams": None if cpu_smoke else args.load_streams,
        "load_seconds": None if cpu_smoke else args.load_seconds,
    }
    path = write_result("device_suite", figures, settings)
    progress(f"written to {path}")
    return path


if __name__ == "__main__":
    main()

"""RTFx of the Granite NAR engine with random weights of the real model's shape (no download).

Segments of realistic duration (2-15 s) are sorted by length and batched, as the scheduler does;
the BPE head's blank bias is tuned first so drafts carry about as many tokens per second as
read English (the editor's cost depends on it). Prints RTFx for `draft` and `transcribe` and
the time split per stage; writes the figures to benchmarks/results/.

    python -m benchmarks.rtfx                 # full size bf16 on CUDA, reduced fp32 on CPU
    python -m benchmarks.rtfx --size full --batch 64 --segments 512
    python -m benchmarks.rtfx --compile        # the compiled runner (engine.compile)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models

from benchmarks.results import write_result
from engine.api import Segment
from engine.audio import prepare_waveform
from engine.features import nar_features
from engine.granite_nar.decoding import collapse
from engine.granite_nar.engine import GraniteNarEngine, pick_device, pick_dtype
from engine.granite_nar.model import GraniteSpeechNar
from tests.checkpoints.granite_nar import full_size_config

TARGET_TOKENS_PER_SECOND = 3.7  # LibriSpeech-like speech, spec §9


def model_config(size: str):
    cfg = full_size_config()
    if size == "reduced":  # real widths and vocabulary, fewer layers: fits a laptop CPU
        cfg = replace(
            cfg,
            encoder=replace(cfg.encoder, num_layers=4, self_conditioning_layer=2),
            text=replace(cfg.text, num_hidden_layers=4),
            encoder_layer_indices=(1, 2, 3, -1),
        )
    return cfg


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """Every id decodes to a short piece, a third of them starting a word, so decoding and word
    grouping cost what they cost with the real 100k tokenizer."""
    pieces = {("\u0120" if i % 3 == 0 else "") + f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(pieces, unk_token="w1"))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def build_engine(size: str, device: torch.device, dtype: torch.dtype, batch: int):
    cfg = model_config(size)
    with torch.device(device):
        model = GraniteSpeechNar(cfg)
    model = model.to(dtype).eval()
    tokenizer = synthetic_tokenizer(cfg.text.vocab_size)
    return GraniteNarEngine(model, tokenizer, max_batch=batch, window_s=30.0)


def synthetic_segments(count: int, seed: int, min_s: float, max_s: float) -> list[Segment]:
    rng = np.random.default_rng(seed)
    segments = []
    for seconds in rng.uniform(min_s, max_s, count):
        n = int(seconds * 16000)
        t = np.arange(n) / 16000
        voiced = (
            0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) * (np.sin(2 * np.pi * 3 * t) > 0)
        )
        segments.append(Segment((voiced + 0.02 * rng.standard_normal(n)).astype(np.float32)))
    return segments


@torch.inference_mode()
def tokens_per_second(engine: GraniteNarEngine, segments: list[Segment]) -> float:
    model = engine.model
    waves = [prepare_waveform(s.audio, s.sample_rate) for s in segments]
    features, lengths = nar_features(waves, device=model.device)
    drafts = model.ctc_draft(model.encode(features, with_taps=False), lengths.tolist())
    tokens = sum(len(collapse(d.window_ids.tolist(), engine.blank)) for d in drafts)
    return tokens / (sum(len(w) for w in waves) / 16000)


def calibrate_blank(engine: GraniteNarEngine, segments: list[Segment]) -> float:
    """Shift the blank logit until drafts hold ~3.7 tokens/s (bisection on the bias)."""
    bias = engine.model.encoder.out_bpe.bias
    blank = engine.model.cfg.bpe_blank_index
    base = bias[blank].item()
    low, high = -5.0, 40.0
    rate = 0.0
    for _ in range(12):
        mid = (low + high) / 2
        with torch.no_grad():
            bias[blank] = base + mid
        rate = tokens_per_second(engine, segments)
        if abs(rate - TARGET_TOKENS_PER_SECOND) < 0.3:
            break
        low, high = (mid, high) if rate > TARGET_TOKENS_PER_SECOND else (low, mid)
    return rate


def timed(engine: GraniteNarEngine, call: str, segments: list[Segment], repeats: int) -> dict:
    audio_s = sum(len(s.audio) for s in segments) / 16000
    engine.clock.seconds.clear()
    engine.clock.enabled = True
    getattr(engine, call)(segments)  # stage split (synchronised per stage)
    split = dict(engine.clock.seconds)
    engine.clock.enabled = False
    best = float("inf")
    for _ in range(repeats):
        if engine.model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        getattr(engine, call)(segments)
        if engine.model.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    total = sum(split.values()) or 1.0
    return {
        "rtfx": round(audio_s / best, 1),
        "seconds": round(best, 3),
        "audio_seconds": round(audio_s, 1),
        "split": {k: round(v / total, 3) for k, v in split.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        choices=["full", "reduced"],
        default=None,
        help="model shape (default: full on CUDA, reduced on CPU)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=None, help="segments per batch")
    parser.add_argument("--segments", type=int, default=None, help="segments per run")
    parser.add_argument("--min-s", type=float, default=2.0)
    parser.add_argument("--max-s", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile", action="store_true", help="the compiled runner (engine.compile), warmed up"
    )
    args = parser.parse_args()

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    on_gpu = device.type == "cuda"
    size = args.size or ("full" if on_gpu else "reduced")
    batch = args.batch or (64 if on_gpu else 4)
    count = args.segments or (512 if on_gpu else 4)
    print(f"building {size} model ({dtype}) on {device} ...", flush=True)
    engine = build_engine(size, device, dtype, batch)
    segments = synthetic_segments(count, args.seed, args.min_s, args.max_s)
    print("calibrating draft length ...", flush=True)
    rate = calibrate_blank(engine, segments[: max(4, batch)])
    print(f"draft tokens per second of audio: {rate:.2f}", flush=True)
    figures = {"draft_tokens_per_second": round(rate, 2)}
    if args.compile:
        engine = GraniteNarEngine(engine.model, engine.tokenizer, max_batch=batch, compiled=True)
        print("compiling ...", flush=True)
        longest = max(len(s.audio) for s in segments) / 16000
        figures["compile_seconds"] = round(engine.runner.warm_up(longest, batch), 1)
    engine.transcribe(segments[:batch])  # warm-up
    for call in ("draft", "transcribe"):
        figures[call] = timed(engine, call, segments, args.repeats or (3 if on_gpu else 1))
        print(
            f"{call:>10}: RTFx {figures[call]['rtfx']:>8}  split {figures[call]['split']}",
            flush=True,
        )
    settings = {
        "size": size,
        "device": str(device),
        "dtype": str(dtype),
        "batch": batch,
        "segments": count,
        "durations_s": [args.min_s, args.max_s],
        "runner": engine.runner.mode,
    }
    path = write_result("rtfx", figures, settings)
    print(json.dumps(figures))
    print(f"written to {path}")


if __name__ == "__main__":
    main()

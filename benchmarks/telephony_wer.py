"""WER of the same real speech over a phone line: native 16 kHz PCM vs Twilio 8 kHz mu-law.

The LibriVox clips of pocketsphinx-testdata, joined by quiet into one call, are transcribed
three ways with the same engine:

- `native_16k`: streamed as 16 kHz PCM over the native protocol (/v1/stream);
- `twilio_mulaw_8k`: resampled to 8 kHz, mu-law encoded and streamed as a Twilio Media Stream
  (/v1/telephony/twilio, the inbound track), transcripts read from the call's subscription;
- `offline_mulaw_8k`: the same mu-law bytes decoded and passed to `engine.transcribe` clip by
  clip, with no streaming at all.

Each is scored as one utterance (all finals against all references, benchmarks/scoring.py), so
the figures do not depend on where the segmenter cut. The Twilio path should cost nothing beyond
the phone line itself: `bound_ok` says whether its WER is within +10 % (relative) of the offline
8 kHz figure. Streams are sent as fast as the server reads them, without partials.

    python -m benchmarks.telephony_wer                    # Whisper tiny.en on the CPU
    python -m benchmarks.telephony_wer --whisper-model base
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence

import numpy as np
from websockets.asyncio.client import connect

from benchmarks.manifests import ManifestError, librivox
from benchmarks.results import write_result
from benchmarks.scoring import corpus_wer
from clients.telephony import twilio_sim
from engine.api import Engine, Segment
from streaming.core.audio import decode_mulaw
from streaming.core.audiofile import read_audio
from streaming.ops.config import load_config
from streaming.server import Gateway

RATE = 16000
GAP_S = 1.5  # quiet between clips, longer than the segmenter's hangover
NOISE = 1e-3  # the quiet is faint noise, like a real line
FRAME_MS = 100
BOUND = 0.10  # the Twilio path's WER may exceed the offline 8 kHz one by this much (relative)


def load_clips() -> tuple[list[np.ndarray], list[str]]:
    """The LibriVox clips (16 kHz float32) and their references."""
    clips, references = [], []
    for utterance in librivox():
        audio, rate = read_audio(utterance.audio)
        if rate != RATE:
            raise ManifestError(f"{utterance.audio}: {rate} Hz, expected {RATE}")
        clips.append(audio)
        references.append(utterance.reference)
    return clips, references


def call_audio(clips: Sequence[np.ndarray], seed: int = 0) -> np.ndarray:
    """The clips joined and surrounded by GAP_S of faint noise."""
    rng = np.random.default_rng(seed)
    parts = []
    for clip in clips:
        parts += [NOISE * rng.standard_normal(int(GAP_S * RATE)).astype(np.float32), clip]
    parts.append(NOISE * rng.standard_normal(int(GAP_S * RATE)).astype(np.float32))
    return np.concatenate(parts)


@contextlib.asynccontextmanager
async def serving(engine: Engine) -> AsyncIterator[Gateway]:
    """A gateway with `engine` on a free loopback port (other settings from the environment and
    $STREAMSCRIBE_CONFIG, as for the server), ready to take streams."""
    config = load_config(overrides={"server.host": "127.0.0.1", "server.port": 0})
    gateway = Gateway(config, lambda: engine)
    await gateway.start()
    while not gateway.ready:
        if gateway.engine_error:
            raise RuntimeError(gateway.engine_error)
        await asyncio.sleep(0.02)
    try:
        yield gateway
    finally:
        await gateway.drain()


async def native_finals(port: int, audio: np.ndarray) -> list[str]:
    """Final texts of `audio` streamed as 16 kHz PCM over /v1/stream."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = RATE * 2 * FRAME_MS // 1000
    url = f"ws://127.0.0.1:{port}/v1/stream?interim_results=false"
    finals = []
    async with connect(url) as ws:
        await ws.recv()
        for offset in range(0, len(pcm), step):
            await ws.send(pcm[offset : offset + step])
        await ws.send(json.dumps({"type": "close"}))
        async for raw in ws:
            message = json.loads(raw)
            if message["type"] == "transcript.final":
                finals.append(message["text"])
    return finals


async def twilio_finals(port: int, mulaw: bytes, call_sid: str) -> list[dict]:
    """The call's finals (native events, labelled) of `mulaw` sent as a Twilio stream."""
    events_url = f"ws://127.0.0.1:{port}/v1/calls/{call_sid}/events"
    stream_url = f"ws://127.0.0.1:{port}/v1/telephony/twilio"
    parameters = {"interim_results": "false"}
    async with connect(events_url) as subscriber:
        stream = list(twilio_sim.messages({"inbound": mulaw}, call_sid, parameters))
        await twilio_sim.replay(stream_url, stream)
        finals = []
        async for raw in subscriber:
            message = json.loads(raw)
            if message["type"] == "transcript.final":
                finals.append(message)
    return finals


def offline_texts(engine: Engine, mulaw_clips: Sequence[bytes]) -> list[str]:
    """Each clip's 8 kHz mu-law bytes decoded and transcribed whole, one by one."""
    return [
        engine.transcribe([Segment(decode_mulaw(data), sample_rate=8000)])[0].text
        for data in mulaw_clips
    ]


async def measure(
    engine: Engine, port: int, clips: Sequence[np.ndarray], references: Sequence[str]
) -> dict:
    """The three WERs (see the module docstring) and whether the Twilio path keeps the bound;
    the streams go to the gateway on loopback `port`, which runs `engine`."""
    reference = " ".join(references)
    audio = call_audio(clips)
    native = await native_finals(port, audio)
    call_sid = twilio_sim.new_call_sid()
    finals = await twilio_finals(port, twilio_sim.to_mulaw(audio, RATE), call_sid)
    offline = offline_texts(engine, [twilio_sim.to_mulaw(clip, RATE) for clip in clips])
    figures = {
        name: {"wer": round(corpus_wer([reference], [" ".join(texts)]), 4), "texts": texts}
        for name, texts in (
            ("native_16k", native),
            ("twilio_mulaw_8k", [f["text"] for f in finals]),
            ("offline_mulaw_8k", offline),
        )
    }
    twilio, narrow = figures["twilio_mulaw_8k"]["wer"], figures["offline_mulaw_8k"]["wer"]
    figures["twilio_channels"] = sorted({f["channel"] for f in finals})
    figures["bound_relative"] = BOUND
    figures["bound_ok"] = twilio <= narrow * (1 + BOUND) + 1e-9
    return figures


def report(figures: dict) -> str:
    lines = [
        f"{name:18s} WER {figures[name]['wer']:.2%}"
        for name in ("native_16k", "twilio_mulaw_8k", "offline_mulaw_8k")
    ]
    verdict = "within" if figures["bound_ok"] else "OUTSIDE"
    lines.append(f"Twilio path {verdict} +{BOUND:.0%} (relative) of offline 8 kHz mu-law")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.telephony_wer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--whisper-model", default="tiny.en", help="CPU model (engine.whisper)")
    args = parser.parse_args(argv)
    try:
        clips, references = load_clips()
    except ManifestError as exc:
        print(f"benchmarks.telephony_wer: error: {exc}", file=sys.stderr)
        return 2
    from engine.api import EngineOptions
    from engine.whisper import load_engine

    engine = load_engine(args.whisper_model, EngineOptions(device="cpu"))

    async def run() -> dict:
        async with serving(engine) as gateway:
            return await measure(engine, gateway.port, clips, references)

    figures = asyncio.run(run())
    print(report(figures))
    settings = {
        "engine": {"family": engine.family, "whisper_model": args.whisper_model},
        "clips": len(clips),
        "gap_s": GAP_S,
        "interim_results": False,
        "normaliser": "Whisper EnglishTextNormalizer, empty spelling map",
    }
    print(f"written to {write_result('telephony_wer', figures, settings)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Streaming real speech through the gateway with real engines: the CPU model (accuracy) and the
tiny Granite checkpoint (the NAR code path end to end)."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from benchmarks.scoring import corpus_wer
from tests.gateway_harness import collect, gateway_config, running
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le


async def stream_and_collect(engine, audio, speed: float = 0.0) -> list[dict]:
    """Stream 100 ms frames, paced at `speed` times real time (0: as fast as possible)."""
    async with running(gateway_config(), engine, timeout_s=120) as gw:
        async with connect(f"ws://127.0.0.1:{gw.port}/v1/stream") as ws:
            await ws.recv()
            for chunk in chunks(to_s16le(audio), RATE * 2 // 10):
                await ws.send(chunk)
                if speed:
                    await asyncio.sleep(0.1 / speed)
            await ws.send(json.dumps({"type": "close"}))
            return await collect(ws, timeout_s=300)


def check_partials_precede_finals(messages: list[dict]) -> None:
    finals = {m["segment_id"]: i for i, m in enumerate(messages) if m["type"] == "transcript.final"}
    for i, m in enumerate(messages):
        if m["type"] == "transcript.partial":
            assert i < finals[m["segment_id"]]
    for seg in finals:
        stable = [
            m["stable_text"]
            for m in messages
            if m["type"] == "transcript.partial" and m["segment_id"] == seg
        ]
        assert all(b.startswith(a) for a, b in zip(stable, stable[1:], strict=False))


def test_streamed_librivox_with_the_cpu_model():
    pytest.importorskip("faster_whisper", reason="pip install -e '.[cpu]'")
    from engine.whisper import load_engine

    clips = librivox_clips()
    audio = joined([a for _, a, _ in clips], silence_s=1.5)
    messages = asyncio.run(stream_and_collect(load_engine("tiny.en"), audio, speed=2.0))
    finals = [m for m in messages if m["type"] == "transcript.final"]
    assert len(finals) == len(clips), [f["text"] for f in finals]
    wer = corpus_wer([ref for _, _, ref in clips], [f["text"] for f in finals])
    assert wer <= 0.15, (wer, [f["text"] for f in finals])
    assert messages[-1]["type"] == "session.closed"
    assert any(
        m["type"] == "transcript.partial" and m["stable_text"] + m["volatile_text"]
        for m in messages
    )
    check_partials_precede_finals(messages)


def test_streamed_speech_with_the_tiny_granite_checkpoint(tiny_engine):
    clips = librivox_clips()[:3]
    messages = asyncio.run(stream_and_collect(tiny_engine, joined([a for _, a, _ in clips])))
    finals = [m for m in messages if m["type"] == "transcript.final"]
    assert len(finals) == 3
    for final in finals:
        for word in final["words"]:
            assert final["start_ms"] <= word["start_ms"] <= word["end_ms"] <= final["end_ms"] + 80
    check_partials_precede_finals(messages)
    assert messages[-1]["type"] == "session.closed" and messages[-1]["segments"] == 3

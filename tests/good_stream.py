"""The well-behaved stream that runs while a server is attacked: a native stream of a real
speech clip, paced at a few times real time, whose final text must not change under load."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import connect

from tests.streams import RATE, joined, librivox_clips, to_s16le

FRAME_BYTES = RATE * 2 // 10  # 100 ms of 16 kHz s16le


def speech_clip(index: int = 0) -> bytes:
    """LibriVox clip `index` (16 kHz s16le), with half a second of quiet line around it."""
    _, audio, _ = librivox_clips()[index]
    return to_s16le(joined([audio], silence_s=0.5))


async def transcribe(port: int, pcm: bytes, speed: float = 3.0, timeout_s: float = 60.0) -> str:
    """Stream `pcm` to /v1/stream at `speed` x real time, ask to close, and return the finals'
    text joined; raises if the session does not end with `session.closed` and close 1000."""
    finals: list[str] = []
    async with asyncio.timeout(timeout_s):
        async with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
            started = json.loads(await ws.recv())
            assert started["type"] == "session.started", started
            reader = asyncio.create_task(_finals(ws, finals))
            for at in range(0, len(pcm), FRAME_BYTES):
                await ws.send(pcm[at : at + FRAME_BYTES])
                await asyncio.sleep(0.1 / speed)
            await ws.send(json.dumps({"type": "close"}))
            last = await reader
            await ws.wait_closed()
            code = ws.close_code
    if last != "session.closed" or code != 1000:
        raise AssertionError(f"good stream ended with {last!r}, close {code}")
    return " ".join(finals)


async def _finals(ws, finals: list[str]) -> str | None:
    """Collect final texts; the type of the last message."""
    kind = None
    async for raw in ws:
        message = json.loads(raw)
        kind = message["type"]
        if kind == "transcript.final":
            finals.append(message["text"])
        elif kind == "error":
            raise AssertionError(f"good stream got an error: {message}")
        elif kind == "session.closed":
            break
    return kind


async def keep_streaming(
    port: int, pcm: bytes, stop: asyncio.Event, speed: float = 3.0
) -> list[str]:
    """The clip again and again until `stop` is set (at least once); each run's text."""
    texts = [await transcribe(port, pcm, speed)]
    while not stop.is_set():
        texts.append(await transcribe(port, pcm, speed))
    return texts

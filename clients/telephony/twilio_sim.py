"""Replay speech as a Twilio Media Stream, to try the server without a phone line (and in tests).

    python -m clients.telephony.twilio_sim caller.wav [agent.wav] --follow
    python -m clients.telephony.twilio_sim call.wav --url ws://host:8765/v1/telephony/twilio \\
        --realtime --param hangover_ms=600

The first file is the inbound track (the caller), the second, if given, the outbound one. Each
is resampled to 8 kHz and mu-law encoded, then sent as Twilio sends a call: `connected`, `start`
(with the `customParameters` given by --param), 20 ms `media` messages with per-track chunk
numbers and timestamps, the tracks alternating, then `stop`. A track shorter than the other
simply ends early, as a silent party's track may. `--follow` subscribes to the call's events
(`/v1/calls/{callSid}/events`) first and prints each final as it arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake

from engine.audio import resample
from streaming.core.audio import encode_mulaw
from streaming.core.audiofile import AudioFileError, read_audio

RATE = 8000
CHUNK = RATE // 50  # 20 ms, as Twilio sends
DEFAULT_URL = "ws://127.0.0.1:8765/v1/telephony/twilio"
MEDIA_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1}


def new_call_sid() -> str:
    return "CA" + uuid.uuid4().hex


def to_mulaw(audio: np.ndarray, sample_rate: int) -> bytes:
    """Float audio at any rate as 8 kHz mu-law, as a phone line carries it."""
    return encode_mulaw(np.clip(resample(audio, sample_rate, RATE), -1.0, 1.0))


def messages(
    tracks: Mapping[str, bytes],
    call_sid: str,
    parameters: Mapping[str, str] | None = None,
    dtmf: str = "",
) -> Iterator[str]:
    """A whole stream's JSON messages; `tracks` maps inbound/outbound to mu-law bytes.

    DTMF digits, if any, are sent (on the inbound track) after the first second of audio.
    """
    stream_sid = "MZ" + uuid.uuid4().hex
    account_sid = "AC" + uuid.uuid4().hex
    sequence = iter(range(1, 1 << 62))

    def message(event: str, **body) -> str:
        return json.dumps(
            {"event": event, "sequenceNumber": str(next(sequence)), **body, "streamSid": stream_sid}
        )

    yield json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    start = {
        "accountSid": account_sid,
        "streamSid": stream_sid,
        "callSid": call_sid,
        "tracks": list(tracks),
        "customParameters": dict(parameters or {}),
        "mediaFormat": MEDIA_FORMAT,
    }
    yield message("start", start=start)
    longest = max(len(data) for data in tracks.values())
    for index, offset in enumerate(range(0, longest, CHUNK)):
        for track, data in tracks.items():
            if offset < len(data):
                media = {
                    "track": track,
                    "chunk": str(index + 1),
                    "timestamp": str(offset * 1000 // RATE),
                    "payload": base64.b64encode(data[offset : offset + CHUNK]).decode(),
                }
                yield message("media", media=media)
        if index == 50:
            for digit in dtmf:
                yield message("dtmf", dtmf={"track": "inbound_track", "digit": digit})
    yield message("stop", stop={"accountSid": account_sid, "callSid": call_sid})


async def replay(url: str, stream: Sequence[str], realtime: bool = False) -> None:
    """Send the messages of `messages()` to the server; paced at real time if asked."""
    async with connect(url) as ws:
        for text in stream:
            await ws.send(text)
            if realtime and '"event": "media"' in text:
                await asyncio.sleep(CHUNK / RATE / 2)  # two tracks share each 20 ms
        await ws.close()


def events_url(stream_url: str, call_sid: str) -> str:
    """The subscription URL of a call on the server that `stream_url` points at."""
    parts = urlsplit(stream_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/v1/calls/{call_sid}/events", "", ""))


async def follow(url: str, ready: asyncio.Event) -> None:
    """Print the call's finals (channel: text) until the call ends."""
    async with connect(url) as ws:
        ready.set()
        async for raw in ws:
            event = json.loads(raw)
            if event["type"] == "transcript.final":
                print(f"{event['channel']}: {event['text']}", flush=True)
            elif event["type"] == "error":
                print(f"error {event['code']}: {event['message']}", file=sys.stderr, flush=True)


async def main_async(args: argparse.Namespace) -> None:
    tracks = {}
    for track, path in zip(("inbound", "outbound"), args.files, strict=False):
        audio, rate = read_audio(path)
        tracks[track] = to_mulaw(audio, rate)
    parameters = dict(p.split("=", 1) for p in args.param)
    stream = list(messages(tracks, args.call_sid, parameters, args.dtmf))
    if not args.follow:
        await replay(args.url, stream, args.realtime)
        return
    ready = asyncio.Event()
    following = asyncio.create_task(follow(events_url(args.url, args.call_sid), ready))
    await ready.wait()
    await replay(args.url, stream, args.realtime)
    await following


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clients.telephony.twilio_sim", description=__doc__.splitlines()[0]
    )
    parser.add_argument("files", nargs="+", help="inbound track, then optionally outbound")
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--call-sid", default=new_call_sid())
    parser.add_argument("--param", action="append", default=[], help="customParameter name=value")
    parser.add_argument("--dtmf", default="", help="digits to press after one second")
    parser.add_argument("--realtime", action="store_true", help="pace the audio at real time")
    parser.add_argument("--follow", action="store_true", help="print the call's finals")
    args = parser.parse_args(argv)
    if len(args.files) > 2:
        parser.error("at most two files: the inbound and the outbound track")
    if any("=" not in p for p in args.param):
        parser.error("--param takes name=value")
    try:
        asyncio.run(main_async(args))
    except (AudioFileError, OSError, InvalidHandshake) as err:
        print(f"twilio_sim: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Replay speech as an Asterisk AudioSocket call, to try the server without Asterisk.

    python -m clients.telephony.audiosocket_sim call.wav --port 9092 [--uuid UUID] [--realtime]

Connects over TCP as Asterisk's `AudioSocket(uuid,host:port)` does and sends the call's UUID
packet, 20 ms packets of signed linear 16-bit 8 kHz audio, then a hang-up packet. Follow the
call's transcripts at `ws://HOST:PORT/v1/calls/{uuid}/events`.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import uuid
from collections.abc import Sequence

import numpy as np

from engine.audio import resample
from streaming.core.audiofile import AudioFileError, read_audio

RATE = 8000
CHUNK_BYTES = RATE // 50 * 2  # 20 ms of 16-bit samples
HANGUP, UUID, SLIN = 0x00, 0x01, 0x10


def packet(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BH", kind, len(payload)) + payload


def to_slin(audio: np.ndarray, sample_rate: int) -> bytes:
    """Float audio at any rate as 8 kHz signed 16-bit little-endian samples."""
    narrow = np.clip(resample(audio, sample_rate, RATE), -1.0, 1.0)
    return (narrow * 32767).astype("<i2").tobytes()


def call_packets(call_id: uuid.UUID, slin: bytes, hangup: bool = True) -> list[bytes]:
    """The packets of one call: UUID, audio in 20 ms packets, and a hang-up if asked."""
    audio = [packet(SLIN, slin[i : i + CHUNK_BYTES]) for i in range(0, len(slin), CHUNK_BYTES)]
    return [packet(UUID, call_id.bytes), *audio, *([packet(HANGUP)] if hangup else [])]


async def replay(host: str, port: int, packets: Sequence[bytes], realtime: bool = False) -> bytes:
    """Send the packets and close the sending side (a hang-up without its packet, if none was
    sent); return whatever the server sent back before it closed."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for data in packets:
            writer.write(data)
            await writer.drain()
            if realtime and data[0] == SLIN:
                await asyncio.sleep(0.02)
        writer.write_eof()
        return await reader.read()
    finally:
        writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clients.telephony.audiosocket_sim", description=__doc__.splitlines()[0]
    )
    parser.add_argument("file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="server.audiosocket_port")
    parser.add_argument("--uuid", type=uuid.UUID, default=uuid.uuid4())
    parser.add_argument("--realtime", action="store_true", help="pace the audio at real time")
    args = parser.parse_args(argv)
    try:
        audio, rate = read_audio(args.file)
        print(f"call {args.uuid}")
        packets = call_packets(args.uuid, to_slin(audio, rate))
        answer = asyncio.run(replay(args.host, args.port, packets, args.realtime))
    except (AudioFileError, OSError) as err:
        print(f"audiosocket_sim: error: {err}", file=sys.stderr)
        return 1
    if answer:
        print(f"the server answered {answer!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

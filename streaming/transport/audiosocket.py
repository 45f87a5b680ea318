"""Asterisk AudioSocket: calls over plain TCP on `server.audiosocket_port` (0 = off).

Asterisk's `AudioSocket(uuid,host:port)` application connects and sends packets of a 3-byte
header (type, then the payload length as a big-endian 16-bit number) and the payload: 0x01 the
call's UUID (16 bytes), 0x10 signed linear 16-bit 8 kHz mono audio, 0x03 a DTMF digit, 0x00
hang-up, 0xff an error (payload: Asterisk's error code). Closing the socket is also a hang-up.

Each connection drives the same Connection and session core as the WebSocket dialects, through
`AudioSocketStream`, which offers the few methods of a websockets connection the Connection uses.
Nothing goes back to Asterisk but an error packet (0xff, payload: the error code as ASCII) before
a fatal close, since Asterisk ends the call's audio on any packet other than audio or hang-up.
Transcripts go to the call's subscribers and webhook under its UUID (streaming/transport/calls.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from websockets.exceptions import ConnectionClosed

from streaming.core.close_codes import CLOSE_BAD_CONFIG, CLOSE_BAD_SEQUENCE
from streaming.core.events import ErrorEvent, Event
from streaming.dialects.base import (
    Audio,
    Close,
    Command,
    Configure,
    Dialect,
    KeepAlive,
    Opening,
    Reject,
)

if TYPE_CHECKING:
    from streaming.server import Gateway

log = logging.getLogger("streaming.transport.audiosocket")

HANGUP, UUID, DTMF, SLIN, ERROR = 0x00, 0x01, 0x03, 0x10, 0xFF
# Newer Asterisk versions send other sample rates as further slin types; only 8 kHz is read here.
OTHER_SLIN = range(0x11, 0x19)
HEADER = struct.Struct(">BH")
CALLER_HUNG_UP = 0x01  # bit of Asterisk's error codes
READ_BYTES = 65536
CLOSE_WAIT_S = 2.0  # how long a closing socket waits for the peer to close its side


def packet(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


class AudioSocketDialect(Dialect):
    """The AudioSocket packet stream as session commands (sans-I/O, split packets allowed)."""

    name = "audiosocket"
    binary_audio = False  # packets carry a header: not plain audio (and not a WebSocket)

    def __init__(self) -> None:
        self.call_id: str | None = None  # the UUID, once its packet arrives
        self.channel_labels = ("inbound",)
        self.buffer = bytearray()

    def opening(self, query: Mapping[str, str]) -> Opening:
        return Opening({"encoding": "pcm_s16le", "sample_rate": 8000, "channels": 1})

    def on_text(self, text: str) -> list[Command]:
        raise TypeError("AudioSocket is a byte stream")

    def on_binary(self, data: bytes) -> list[Command]:
        self.buffer += data
        commands: list[Command] = []
        while len(self.buffer) >= HEADER.size:
            kind, length = HEADER.unpack_from(self.buffer)
            if len(self.buffer) < HEADER.size + length:
                break
            payload = bytes(self.buffer[HEADER.size : HEADER.size + length])
            del self.buffer[: HEADER.size + length]
            command = self._packet(kind, payload)
            commands.append(command)
            if isinstance(command, Close) or getattr(command, "close_code", None):
                break
        return commands

    def on_hangup(self) -> list[Command]:
        return [Close()]

    def _packet(self, kind: int, payload: bytes) -> Command:
        if kind == SLIN:
            if self.call_id is None:
                return Reject(
                    "invalid_sequence", "audio before the call's UUID", CLOSE_BAD_SEQUENCE
                )
            return Audio(payload)
        if kind == UUID:
            if len(payload) != 16:
                return Reject(
                    "bad_uuid",
                    f"a UUID packet carries 16 bytes, not {len(payload)}",
                    CLOSE_BAD_CONFIG,
                )
            if self.call_id is not None:
                return Reject("invalid_sequence", "a second UUID is ignored")
            self.call_id = str(uuid.UUID(bytes=payload))
            return Configure({})  # restart the session now that the call has a name
        if kind == HANGUP:
            return Close()
        if kind == DTMF:
            log.debug("audiosocket dtmf", extra={"call_id": self.call_id, "digit": payload})
            return KeepAlive()
        if kind == ERROR:
            code = payload[0] if payload else 0
            if code & CALLER_HUNG_UP:
                return Close()
            return Reject("peer_error", f"Asterisk reported error code 0x{code:02x}")
        if kind in OTHER_SLIN:
            return Reject(
                "unsupported_encoding",
                f"audio packet type 0x{kind:02x}; only 0x10 (slin 16-bit 8 kHz) is supported",
                CLOSE_BAD_CONFIG,
            )
        return Reject("unknown_type", f"unknown packet type 0x{kind:02x} ignored")

    def encode(self, event: Event) -> list[str | bytes]:
        if not isinstance(event, ErrorEvent):
            return []
        log.warning(
            "audiosocket call error",
            extra={"call_id": self.call_id, "code": event.code, "error": event.message},
        )
        return [packet(ERROR, event.code.encode("ascii", "replace"))] if event.fatal else []


class AudioSocketStream:
    """Just enough of a websockets connection for a Connection to drive a TCP AudioSocket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.closed = asyncio.Event()
        self.receiving = False  # a recv() is waiting (a cancelled one ends this too)

    async def recv(self) -> bytes:
        """The next bytes as they arrive (any packet boundaries); ConnectionClosed at the end."""
        self.receiving = True
        try:
            data = await self.reader.read(READ_BYTES)
        except ConnectionError:
            data = b""
        finally:
            self.receiving = False
        if not data:
            self.closed.set()
            raise ConnectionClosed(None, None)
        return data

    async def send(self, frame: str | bytes) -> None:
        if self.writer.is_closing():
            raise ConnectionClosed(None, None)
        self.writer.write(frame if isinstance(frame, bytes) else frame.encode())
        try:
            await self.writer.drain()
        except ConnectionError:
            raise ConnectionClosed(None, None) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close gracefully: send our end of stream, read (and drop) what the peer still sends
        until it closes too, as a closing handshake would, so that bytes left unread do not turn
        the close into a reset that loses an error packet. A WebSocket close's code and reason
        have no place here."""
        if not self.writer.is_closing():
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                self.writer.write_eof()
                if not self.receiving:
                    await asyncio.wait_for(self._discard_until_eof(), CLOSE_WAIT_S)
            self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
        self.closed.set()

    async def _discard_until_eof(self) -> None:
        while await self.reader.read(READ_BYTES):
            pass

    async def wait_closed(self) -> None:
        await self.closed.wait()


async def serve(gateway: Gateway, host: str, port: int) -> asyncio.Server:
    """Listen for AudioSocket calls; each is one stream of `gateway`."""
    server = await asyncio.start_server(functools.partial(_handle, gateway), host, port)
    log.warning("audiosocket listening", extra={"host": host, "port": port})
    return server


async def _handle(
    gateway: Gateway, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    stream = AudioSocketStream(reader, writer)
    reason = gateway.refusal()
    if reason is not None:
        gateway.metrics.rejections.labels(reason).inc()
        writer.write(packet(ERROR, reason.encode()))
        await stream.close()
        return
    await gateway.run_connection(stream, AudioSocketDialect(), {})

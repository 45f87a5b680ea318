"""A byte-level WebSocket and HTTP client for hostile tests: it sends exactly the bytes it is
given (bad handshakes, invalid UTF-8 text, reserved opcodes, lying lengths) and reports exactly
what came back (status, close frame, messages, silence), which a conforming client library
cannot do because it refuses to send most of these."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import struct
from dataclasses import dataclass, field

TEXT, BINARY, CLOSE, PING, PONG, CONT = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x00\x00\x00\x00",
    declared: int | None = None,
) -> bytes:
    """One client frame. `mask` None sends it unmasked (a protocol error from a client);
    `declared` lies about the payload length."""
    length = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)])
    masked = 0x80 if mask is not None else 0
    if length < 126:
        head += bytes([masked | length])
    elif length < 1 << 16:
        head += bytes([masked | 126]) + struct.pack(">H", length)
    else:
        head += bytes([masked | 127]) + struct.pack(">Q", length)
    if mask is None:
        return head + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if any(mask) else payload
    return head + mask + body


def close_frame(code: int = 1000, reason: bytes = b"") -> bytes:
    return frame(CLOSE, struct.pack(">H", code) + reason)


def upgrade_request(path: str, host: str = "127.0.0.1", extra: str = "") -> bytes:
    """A valid WebSocket opening handshake for `path` (no extensions, so server frames come
    uncompressed)."""
    key = base64.b64encode(random.randbytes(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


@dataclass
class Reply:
    """What the server did with one connection."""

    status: int | None = None  # HTTP status of the response, if any came
    body: bytes = b""
    messages: list[bytes | str] = field(default_factory=list)  # data frames after a 101
    close_code: int | None = None  # the server's close frame, if one came
    close_reason: str = ""
    eof: bool = False  # the server ended the TCP connection
    reset: bool = False  # ... by a reset
    timed_out: bool = False  # nothing decisive within the bound
    sent_close: bool = False  # we sent a close frame before the server sent its own


class Reader:
    """Server frames off a stream (unmasked, possibly fragmented)."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.stream = stream
        self.fragments: list[bytes] = []
        self.text = False

    async def next(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next complete message or control frame."""
        while True:
            b0, b1 = await self.stream.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack(">H", await self.stream.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack(">Q", await self.stream.readexactly(8))
            mask = await self.stream.readexactly(4) if b1 & 0x80 else None
            payload = await self.stream.readexactly(length)
            if mask is not None:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode, fin = b0 & 0xF, bool(b0 & 0x80)
            if opcode >= 0x8:
                return opcode, payload
            if opcode != CONT:
                self.text, self.fragments = opcode == TEXT, []
            self.fragments.append(payload)
            if fin:
                return (TEXT if self.text else BINARY), b"".join(self.fragments)


async def read_head(stream: asyncio.StreamReader) -> tuple[int | None, dict[str, str], bytes]:
    """An HTTP response's status and headers (None status: the connection ended first), and
    any bytes read past the head."""
    try:
        head = await stream.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        head = err.partial
        if b"\r\n\r\n" not in head:
            return None, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        return None, {}, b""
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return status, headers, b""


async def read_body(stream: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """The response body: by Content-Length, else until the connection ends."""
    if "content-length" in headers:
        with contextlib.suppress(asyncio.IncompleteReadError, ValueError):
            return await stream.readexactly(int(headers["content-length"]))
        return b""
    return await stream.read()


async def open_tcp(port: int, timeout_s: float = 5.0):
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout_s)


def abort(writer: asyncio.StreamWriter) -> None:
    """Drop the connection at once (a reset, not a polite FIN)."""
    transport = writer.transport
    if transport is not None and not transport.is_closing():
        transport.abort()

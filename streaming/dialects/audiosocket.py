"""Asterisk AudioSocket as a dialect: the packet stream as session commands (sans-I/O).

Packets are a 3-byte header (type, then the payload length as a big-endian 16-bit number) and
the payload: 0x01 the call's UUID (16 bytes), 0x10 signed linear 16-bit 8 kHz mono audio, 0x03
a DTMF digit, 0x00 hang-up, 0xff an error (payload: Asterisk's error code). Nothing goes back
to Asterisk but an error packet (0xff, payload: the error code as ASCII) before a fatal close,
since Asterisk ends the call's audio on any packet other than audio or hang-up. The TCP side is
streaming/transport/audiosocket.py.
"""

from __future__ import annotations

import logging
import struct
import uuid
from collections.abc import Mapping

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

log = logging.getLogger("streaming.dialects.audiosocket")

HANGUP, UUID, DTMF, SLIN, ERROR = 0x00, 0x01, 0x03, 0x10, 0xFF
# Newer Asterisk versions send other sample rates as further slin types; only 8 kHz is read here.
OTHER_SLIN = range(0x11, 0x19)
HEADER = struct.Struct(">BH")
CALLER_HUNG_UP = 0x01  # bit of Asterisk's error codes


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

"""Asterisk AudioSocket: calls over plain TCP on `server.audiosocket_port` (0 = off).

Asterisk's `AudioSocket(uuid,host:port)` application connects and sends packets (their format
and meaning: streaming/dialects/audiosocket.py); closing the socket is also a hang-up. Each
connection drives the same Connection adapter and StreamProtocol as the WebSocket dialects,
through `AudioSocketStream`, which offers the connection interface (`websocket.Link`) on a TCP
stream. Transcripts go to the call's subscribers and webhook under its UUID
(streaming/transport/calls.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import TYPE_CHECKING

from websockets.exceptions import ConnectionClosed

from streaming.dialects.audiosocket import ERROR, AudioSocketDialect, packet

if TYPE_CHECKING:
    from streaming.server import Gateway

log = logging.getLogger("streaming.transport.audiosocket")

READ_BYTES = 65536
CLOSE_WAIT_S = 2.0  # how long a closing socket waits for the peer to close its side


class AudioSocketStream:
    """Just enough of a websockets connection for a Connection to drive a TCP AudioSocket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.closed = asyncio.Event()
        self.reading: asyncio.Future | None = None  # a read of the socket under way
        self.woken: asyncio.Future | None = None  # set by `wake()`

    async def recv(self) -> bytes | None:
        """The next bytes as they arrive (any packet boundaries), or None once `wake()` was
        called (the read goes on for the next recv(): nothing is lost); ConnectionClosed at
        the end."""
        if self.reading is None:
            self.reading = asyncio.ensure_future(self.reader.read(READ_BYTES))
        woken = self.woken = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait((self.reading, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.woken = None
        if not self.reading.done():
            return None
        data = self._take_read()
        if not data:
            self.closed.set()
            raise ConnectionClosed(None, None)
        return data

    def wake(self) -> None:
        if self.woken is not None and not self.woken.done():
            self.woken.set_result(None)

    def _take_read(self) -> bytes:
        reading, self.reading = self.reading, None
        try:
            return reading.result()
        except ConnectionError:
            return b""

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
                if self.woken is None:  # no recv() is reading the socket now
                    await asyncio.wait_for(self._discard_until_eof(), CLOSE_WAIT_S)
            self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
        self.closed.set()

    async def _discard_until_eof(self) -> None:
        if self.reading is not None:
            await asyncio.wait((self.reading,))
            if not self._take_read():
                return
        while await self.reader.read(READ_BYTES):
            pass

    async def wait_closed(self) -> None:
        await self.closed.wait()


async def serve(
    gateway: Gateway, host: str, port: int, reuse_port: bool = False
) -> asyncio.Server:
    """Listen for AudioSocket calls; each is one stream of `gateway` (`reuse_port`: other
    worker processes listen on the port too)."""
    server = await asyncio.start_server(
        functools.partial(_handle, gateway), host, port, reuse_port=reuse_port or None
    )
    log.info("audiosocket listening", extra={"host": host, "port": port})
    return server


async def _handle(
    gateway: Gateway, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    stream = AudioSocketStream(reader, writer)
    reason = gateway.refusal(admit=True)
    if reason is not None:
        gateway.metrics.rejections.labels(reason).inc()
        writer.write(packet(ERROR, reason.encode()))
        await stream.close()
        return
    try:
        await gateway.run_connection(stream, AudioSocketDialect(), {})
    finally:
        if not stream.writer.is_closing():  # the peer's end of stream: end our side too
            await stream.close()

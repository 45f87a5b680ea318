"""A WebSocket server on websockets' public sans-I/O `ServerProtocol` under an `asyncio.Protocol`.

Why not websockets' own asyncio server: at hundreds of streams, its per-message queue and the
task wake-up behind every `recv()` were the largest cost left in the gateway, and skipping them
meant overriding its private internals. Here bytes from the socket go straight into the
sans-I/O protocol, and a single-frame binary message can be handed to `take_frame` inside the
data callback, before any queue; everything else is queued for `recv()`, with `pause_reading()`
as backpressure when a reader falls behind.

The connection object offers the part of websockets' connection API the gateway uses: `request`,
`recv()`, `send()`, `close()`, `wait_closed()`, `close_code`, `transport` and async iteration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl as ssl_module
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN, State
from websockets.server import ServerProtocol

log = logging.getLogger("streaming.transport.wsserver")

CLOSE_TIMEOUT_S = 10.0  # how long a closing handshake may take before the TCP link is cut
OPEN_TIMEOUT_S = 10.0  # how long a client may take to send its request before it is cut
QUEUE_HIGH, QUEUE_LOW = 16, 4  # messages waiting for recv(): pause reading above, resume below

Handler = Callable[["WebSocket"], Awaitable[None]]
ProcessRequest = Callable[["WebSocket", Request], Response | None]
SelectSubprotocol = Callable[["WebSocket", Sequence[str]], str | None]


@dataclass(frozen=True)
class Forward:
    """What `process_request` returns to hand a connection to another process of the server
    (its unix socket at `path`): the request's bytes and all that follows are relayed both
    ways, so that process serves it (a resume of a stream another worker holds)."""

    path: str


class WebSocket(asyncio.Protocol):
    """One connection: the handshake, then messages both ways until either side closes."""

    take_frame: Callable[[bytes], bool] | None = None
    """While set, each single-frame binary message is offered to it as it is parsed, if no
    message waits for `recv()` ahead of it; it returns False to leave the frame to `recv()`."""

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.protocol = ServerProtocol(
            # websockets binds this to its protocol object: a plain function, not our method
            select_subprotocol=lambda protocol, offered: self._select_subprotocol(offered),
            max_size=server.max_size,
            extensions=enable_server_permessage_deflate(None),
        )
        self.request: Request | None = None
        self.head: bytearray | None = bytearray()  # the bytes before the request was handled
        self.relay: asyncio.StreamWriter | bytearray | None = None  # set once forwarded
        self.key_id: str | None = None  # the credential's key, once the gateway let it in
        self.transport: asyncio.Transport | None = None
        self.messages: deque[str | bytes] = deque()
        self.fragments: list[bytes] = []
        self.fragmented_text = False
        self.waiter: asyncio.Future | None = None  # a recv() waiting for a message
        self.woken = False  # `wake()` was called: recv() returns None instead of waiting
        self.reading_paused = False
        self.drain_waiter: asyncio.Future | None = None  # a send() waiting for the socket
        self.lost = self.loop.create_future()  # the TCP connection is gone
        self.pong_waiter: asyncio.Future | None = None
        self.cut_timer: asyncio.TimerHandle | None = None  # set once a close is under way
        self.open_timer: asyncio.TimerHandle | None = None  # until the request has come
        self.handler: asyncio.Task | None = None  # the server's handler, once accepted
        self.keepalive: asyncio.Task | None = None

    # --- websockets-like API ----------------------------------------------------------------

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_code

    @property
    def close_reason(self) -> str | None:
        return self.protocol.close_reason

    async def recv(self) -> str | bytes | None:
        """The next message, or None once `wake()` was called; raises `ConnectionClosed` once
        the peer closed and all messages were read. A cancelled recv() loses no message."""
        while not self.messages:
            if self.woken:
                self.woken = False
                return None
            if self.protocol.close_rcvd is not None or self.lost.done():
                raise self._closed()
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        message = self.messages.popleft()
        if len(self.messages) <= QUEUE_LOW:
            self._resume_reading()
        return message

    def _closed(self) -> ConnectionClosed:
        """Why no more messages go either way. websockets' `close_exc` exists only once the
        link is gone; while closing, the exception is built from the close frames so far."""
        if self.protocol.state is State.CLOSED:
            return self.protocol.close_exc
        protocol = self.protocol
        return ConnectionClosed(
            protocol.close_rcvd, protocol.close_sent, protocol.close_rcvd_then_sent
        )

    def wake(self) -> None:
        """Make the waiting (or the next waiting) recv() return None: the reader has other work
        (actions left by `take_frame`, a watchdog decision), and no message is lost."""
        self.woken = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str | bytes]:
        try:
            while True:
                message = await self.recv()
                if message is not None:
                    yield message
        except ConnectionClosed:
            return

    async def send(self, message: str | bytes) -> None:
        """Send one message; waits while the socket's buffer is full (a slow reader)."""
        if self.protocol.state is not OPEN:
            raise self._closed()
        if isinstance(message, str):
            self.protocol.send_text(message.encode())
        else:
            self.protocol.send_binary(message)
        self._flush()
        while self.drain_waiter is not None and not self.lost.done():
            await asyncio.shield(self.drain_waiter)
        if self.lost.done() and self.protocol.state is not OPEN:
            raise self._closed()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake and wait for the link to go (cut after a timeout)."""
        if self.protocol.state is OPEN:
            self.protocol.send_close(code, reason)
            self._flush()
        self._resume_reading()  # the peer's close frame may sit behind unread messages
        await self._until_lost(CLOSE_TIMEOUT_S)

    async def wait_closed(self) -> None:
        await asyncio.shield(self.lost)

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        # A client that never finishes its request would hold the socket for good.
        self.open_timer = self.loop.call_later(OPEN_TIMEOUT_S, self._open_timed_out)

    async def _forward(self, path: str) -> None:
        """Relay this connection to the process listening on `path`, both ways, until
        either side closes."""
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError:
            self.transport.abort()
            return
        writer.write(bytes(self.relay))  # the request, and whatever came after it
        self.relay = writer
        try:
            while data := await reader.read(65536):
                self.transport.write(data)
        except OSError:
            pass
        finally:
            writer.close()
            self.transport.close()

    def _open_timed_out(self) -> None:
        if self.request is None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:  # forwarded to another process: relayed as they come
            if isinstance(relay, bytearray):
                relay.extend(data)  # still connecting to it
            else:
                relay.write(data)
            return
        if self.head is not None:
            self.head.extend(data)
        self.protocol.receive_data(data)
        self._process()

    def eof_received(self) -> None:
        self.protocol.receive_eof()
        self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if isinstance(self.relay, asyncio.StreamWriter):
            self.relay.close()
        if self.protocol.state is not State.CLOSED:
            self.protocol.receive_eof()  # the protocol learns the link is gone (close code 1006)
            self.protocol.events_received()
        if not self.lost.done():
            self.lost.set_result(None)
        for waiter in (self.waiter, self.drain_waiter, self.pong_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self.drain_waiter = None
        if self.cut_timer is not None:
            self.cut_timer.cancel()
        if self.open_timer is not None:
            self.open_timer.cancel()
        if self.keepalive is not None:
            self.keepalive.cancel()

    def pause_writing(self) -> None:
        if self.drain_waiter is None:
            self.drain_waiter = self.loop.create_future()

    def resume_writing(self) -> None:
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- internals --------------------------------------------------------------------------

    def _process(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._frame(event)
            else:
                self._handshake(event)
            if self.relay is not None:
                return  # the other process parses what follows
        self._flush()

    def _handshake(self, request: Request) -> None:
        if self.request is not None:
            return  # a request pipelined after the first: one response per connection
        self.request = request
        self.open_timer.cancel()
        try:
            response = self.server.process_request(self, request)
        except Exception:
            log.exception("process_request failed")
            response = self.protocol.reject(500, "internal error\n")
        head, self.head = self.head, None
        if isinstance(response, Forward):
            self.relay = head
            self.loop.create_task(self._forward(response.path))
            return
        if response is None:
            response = self.protocol.accept(request)
        if self.protocol.eof_sent:
            # Bytes after the request that are no frame (a pipelined second request): the
            # protocol has given up on the connection. A plain answer still goes out, once.
            if response.status_code != 101:
                self.transport.write(response.serialize())
            self.transport.close()
            return
        self.protocol.send_response(response)
        if self.protocol.state is OPEN:
            self.handler = self.loop.create_task(self._handle())
            if self.server.ping_interval:
                self.keepalive = self.loop.create_task(self._keepalive())

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.BINARY and frame.fin and not self.messages and not self.fragments:
            take = self.take_frame
            if take is not None and take(bytes(frame.data)):
                return
        if opcode in (Opcode.TEXT, Opcode.BINARY):
            self.fragmented_text = opcode is Opcode.TEXT
            self.fragments = [frame.data]
        elif opcode is Opcode.CONT:
            self.fragments.append(frame.data)
        else:
            if opcode is Opcode.PONG and self.pong_waiter is not None:
                self.pong_waiter.set_result(None)
                self.pong_waiter = None
            return  # pings are answered and close frames handled by the protocol itself
        if frame.fin:
            data = b"".join(self.fragments)
            self.fragments = []
            if not self.fragmented_text:
                self._queue(data)
                return
            try:
                self._queue(data.decode())
            except UnicodeDecodeError:  # RFC 6455: a text message is UTF-8, else close 1007
                self.protocol.fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")

    def _queue(self, message: str | bytes) -> None:
        self.messages.append(message)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if len(self.messages) >= QUEUE_HIGH and not self.reading_paused:
            if self.protocol.state is OPEN:  # once closing, read on to the peer's close frame
                self.reading_paused = True
                self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.lost.done():
            self.reading_paused = False
            self.transport.resume_reading()

    def _flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()
            else:  # TLS has no half-close: close (after what is buffered), with close_notify
                self.transport.close()
                break
        if self.cut_timer is None and self.protocol.close_expected():
            self.cut_timer = self.loop.call_later(CLOSE_TIMEOUT_S, self._cut)
        if self.waiter is not None and not self.waiter.done() and (
            self.protocol.close_rcvd is not None or self.protocol.state is State.CLOSED
        ):
            self.waiter.set_result(None)  # the reader learns that no more messages come

    def _cut(self) -> None:
        if not self.lost.done() and self.transport is not None:
            self.transport.abort()

    async def _until_lost(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), timeout_s)
        except TimeoutError:
            self._cut()
            await asyncio.shield(self.lost)

    async def _handle(self) -> None:
        """Run the server's handler; when it returns, close normally (1011 if it failed)."""
        try:
            await self.server.handler(self)
        except Exception:
            log.exception("connection handler failed")
            await self.close(1011, "internal error")
            return
        await self.close()

    async def _keepalive(self) -> None:
        """Ping every `ping_interval`; a peer that does not answer within `ping_timeout` is
        gone (a half-open TCP connection would otherwise hold its stream for ever)."""
        server = self.server
        while self.protocol.state is OPEN:
            await asyncio.sleep(server.ping_interval)
            if self.protocol.state is not OPEN:
                return
            self.pong_waiter = self.loop.create_future()
            self.protocol.send_ping(os.urandom(4))
            self._flush()
            try:
                await asyncio.wait_for(asyncio.shield(self.pong_waiter), server.ping_timeout)
            except TimeoutError:
                self.protocol.fail(1011, "keepalive ping timeout")
                self._flush()
                self._cut()
                return

    def _select_subprotocol(self, offered: Sequence[str]) -> str | None:
        select = self.server.select_subprotocol
        return select(self, offered) if select is not None else None


class WebSocketServer:
    """Listens on a TCP port and runs `handler(connection)` for each accepted WebSocket;
    `process_request(connection, request)` may answer a request with a plain HTTP response."""

    def __init__(
        self,
        handler: Handler,
        *,
        process_request: ProcessRequest,
        select_subprotocol: SelectSubprotocol | None = None,
        max_size: int | None = 1 << 20,
        ping_interval: float | None = 20.0,
        ping_timeout: float = 20.0,
    ) -> None:
        self.handler = handler
        self.process_request = process_request
        self.select_subprotocol = select_subprotocol
        self.max_size = max_size
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connections: set[WebSocket] = set()
        self.server: asyncio.Server | None = None
        self.handoffs: asyncio.Server | None = None  # connections forwarded by other workers

    async def start(
        self,
        host: str,
        port: int,
        ssl: ssl_module.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> WebSocketServer:
        """Listen; with `ssl`, every connection is TLS (wss://, https://); `reuse_port`: other
        processes listen on the same port (SO_REUSEPORT; the kernel spreads connections)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: WebSocket(self), host, port, ssl=ssl, reuse_port=reuse_port or None
        )
        return self

    async def serve_unix(self, path: str) -> None:
        """Also serve connections that another process of the server forwards (`Forward`)."""
        loop = asyncio.get_running_loop()
        self.handoffs = await loop.create_unix_server(lambda: WebSocket(self), path)

    @property
    def sockets(self) -> tuple:
        return tuple(self.server.sockets) if self.server is not None else ()

    def close(self) -> None:
        """Stop accepting; open connections get a 1001 close."""
        self.server.close()
        if self.handoffs is not None:
            self.handoffs.close()
        for connection in list(self.connections):
            if connection.protocol.state is OPEN:
                connection.protocol.send_close(1001, "server shutting down")
                connection._flush()

    def abort(self) -> None:
        """Cut every open connection now (a drain past its deadline)."""
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()

    async def wait_closed(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Wait up to `timeout_s` for open connections to close and their handlers to end."""
        await self.server.wait_closed()
        pending = [c.lost for c in list(self.connections)]
        pending += [c.handler for c in list(self.connections) if c.handler is not None]
        if pending and timeout_s > 0:
            await asyncio.wait(pending, timeout=timeout_s)

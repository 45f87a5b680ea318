"""An asyncio client for the native streaming protocol (`/v1/stream`, product.md).

One background task reads every server message into a queue as soon as it arrives, so sending
audio, `close()` and iterating `events()` can run concurrently without losing or reordering
anything. Failures become three exceptions an application can act on: the session could not be
opened (`ConnectionFailed`, with `ServerUnavailable` for a 503 that says when to retry), the
server ended the session because of an error (`SessionError`), or the connection dropped
(`ConnectionLost`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import json
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Generator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"
STREAM_PATH = "/v1/stream"
# Close codes that mean the server ended the session over something that went wrong.
ERROR_CLOSES = {1008: "policy_violation", 1009: "message_too_big", 1011: "internal_error"}
# ...and those that end it without a fault of the session's own.
LOST_CLOSES = {
    1001: "the server is going away",
    1006: "the connection dropped",
    1013: "the server is overloaded or draining; reconnect",
}
_END = object()  # queued after the last message
# Session resume: after a dropped connection (no close frame), reconnect this many times, waiting
# these seconds before each try (the last one repeats), within the server's resume window.
RECONNECT_TRIES = 5
RECONNECT_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 4.0)
RESEND_BUFFER_S = 60.0  # audio kept for resending: what the server may not have received
# The wire protocol's audio formats, spelled out here so that importing the client loads none of
# the server (nor scipy): bytes per sample of each encoding, and the sample rates sent as they
# are; a file at any other rate is resampled to the rate the models take.
BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}
SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
MODEL_SAMPLE_RATE = 16000
CLIENT_CLOSE = "client"  # session.closed reason when the client's `close` ended the session


class ClientError(Exception):
    """Base of everything this client raises about the server or the connection."""


class ConnectionFailed(ClientError):
    """No session could be opened: network failure, timeout, or a refused handshake.

    `status` is the HTTP status of a refused handshake (None for network failures),
    `retry_after` the server's Retry-After in seconds when it sent one.
    """

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class ServerUnavailable(ConnectionFailed):
    """HTTP 503: the server is at capacity, loading or draining; retry after `retry_after`."""


class SessionError(ClientError):
    """The server ended the session because of an error (`code`, `message` from its `error`)."""

    def __init__(self, code: str, message: str, close_code: int | None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.close_code = close_code


class ConnectionLost(ClientError):
    """The connection ended before `session.closed` (network drop, or 1013/1001 from the
    server: reconnect elsewhere)."""

    def __init__(self, message: str, close_code: int | None) -> None:
        super().__init__(message)
        self.close_code = close_code


class SessionEndedEarly(ClientError):
    """The server closed the session before all the audio was sent (shutdown, maximum
    duration, idle timeout): the transcript received is complete up to `audio_ms` only."""

    def __init__(self, reason: str, close_code: int | None, audio_ms: int | None) -> None:
        code = f", close code {close_code}" if close_code is not None else ""
        heard = f" after {audio_ms / 1000:.1f} s of audio" if audio_ms is not None else ""
        super().__init__(f"the server ended the session early{heard}: {reason}{code}")
        self.reason = reason
        self.close_code = close_code
        self.audio_ms = audio_ms


class StreamscribeClient:
    """One streaming session. Open with `StreamscribeClient.connect(...)`, either awaited or as
    an async context manager; leaving the context normally flushes and waits for
    `session.closed`, leaving it by an exception drops the connection."""

    def __init__(
        self,
        ws: ClientConnection,
        *,
        url: str = "",
        headers: Mapping[str, str] | None = None,
        reconnect: int = RECONNECT_TRIES,
        open_timeout: float = 10.0,
    ) -> None:
        self._ws = ws
        self._url = url
        self._headers = headers
        self._open_timeout = open_timeout
        self.reconnect = reconnect  # tries after a drop (0: a drop ends the session)
        self.resume_token: str | None = None
        self.last_seq = 0  # the highest `seq` received: a resume asks for what follows
        self.resumes = 0  # how many times the session was resumed
        # Audio sent, kept for resending after a drop: (stream offset, bytes), oldest first,
        # at most RESEND_BUFFER_S of it; `_audio_sent` is the stream's byte count.
        self._sent: collections.deque[tuple[int, bytes]] = collections.deque()
        self._sent_bytes = 0
        self._audio_sent = 0
        self._send_lock = asyncio.Lock()
        self._link_up = asyncio.Event()  # cleared while a dropped connection is being resumed
        self._link_up.set()
        self._resender: asyncio.Task | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._started = asyncio.Event()
        self._ended = asyncio.Event()  # session.closed received, or the connection is gone
        self._closed_message: dict | None = None
        self._failure: ClientError | None = None
        self._closing = False
        self._hanging_up = False
        self._drained = False
        self.session_id: str | None = None
        self.config: dict[str, Any] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    def connect(
        cls,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        encoding: str = "pcm_s16le",
        sample_rate: int = 16000,
        channels: int = 1,
        open_timeout: float = 10.0,
        reconnect: int = RECONNECT_TRIES,
        **options: Any,
    ) -> _Connecting:
        """Open a session; returns once `session.started` has arrived.

        `options` are session options for the query string (booleans as true/false, lists
        comma-separated, None left out). A URL without a path gets `/v1/stream`. When the
        connection drops (no close from the server), the client reconnects up to `reconnect`
        times and resumes the session (the server's `server.resume_window_s`): the messages it
        missed arrive in order, then `session.resumed`, and the audio the server did not get is
        sent again, so `events()` goes on as if nothing happened.
        """
        query = {"encoding": encoding, "sample_rate": sample_rate, "channels": channels}
        url = session_url(url, {**query, **options})
        return _Connecting(cls._open(url, api_key, open_timeout, reconnect))

    @classmethod
    async def _open(
        cls, url: str, api_key: str | None, timeout: float, reconnect: int = RECONNECT_TRIES
    ) -> StreamscribeClient:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        ws = await _dial(url, headers, timeout)
        client = cls(ws, url=url, headers=headers, reconnect=reconnect, open_timeout=timeout)
        started = asyncio.create_task(client._started.wait())
        ended = asyncio.create_task(client._ended.wait())
        try:
            await asyncio.wait(
                {started, ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            started.cancel()
            ended.cancel()
        if not client._started.is_set():
            await client._hang_up()
            raise client._failure or ConnectionFailed(
                f"{_origin(url)} sent no session.started within {timeout:g} s"
            )
        return client

    async def __aenter__(self) -> StreamscribeClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and not self._reader.done():
            await self.close()
        else:
            await self._hang_up()

    @property
    def closed_message(self) -> dict | None:
        """The `session.closed` message once received (its `reason` says who ended it)."""
        return self._closed_message

    @property
    def close_code(self) -> int | None:
        """The WebSocket close code, once the connection has closed."""
        return self._ws.close_code

    @property
    def bytes_per_second(self) -> int:
        """Audio bytes in one second of the session's wire format (for real-time pacing)."""
        config = self.config
        return BYTES_PER_SAMPLE[config["encoding"]] * config["sample_rate"] * config["channels"]

    async def send_audio(self, data: bytes) -> None:
        """Send one binary audio frame (20-200 ms is the recommended size). While a dropped
        connection is being resumed, the frame is kept and sent once the session is back."""
        data = bytes(data)
        if self._closing:
            raise ClientError("the session is closing; nothing more can be sent")
        async with self._send_lock:
            self._keep(data)
            if not self._link_up.is_set():
                return  # sent again from the buffer after `session.resumed`
            try:
                await self._ws.send(data)
            except ConnectionClosed:
                if not self._may_resume():
                    await self._reader
                    lost = ConnectionLost("connection closed", self._ws.close_code)
                    raise self._failure or lost from None

    async def finalize(self) -> None:
        """Close open segments now and keep the session (push-to-talk, end of a turn)."""
        await self._send_json({"type": "finalize"})

    async def keepalive(self) -> None:
        """Tell the server a quiet client is still there (it closes idle sessions)."""
        await self._send_json({"type": "keepalive"})

    async def update(self, **options: Any) -> None:
        """Change options that may change mid-stream; a refusal arrives as an `error` event."""
        await self._send_json({"type": "session.update", **options})

    async def events(self) -> AsyncIterator[dict]:
        """Every server message, `session.started` first, until the connection ends; then
        raises `SessionError`/`ConnectionLost` if the session did not end normally.

        Meant for one consumer: messages are handed out once.
        """
        while not self._drained:
            message = await self._queue.get()
            if message is _END:
                self._drained = True
                break
            yield message
        if self._failure is not None:
            raise self._failure

    async def close(self) -> dict:
        """Flush: send `close`, wait for `session.closed` and return it, close the socket.

        Messages that arrive meanwhile still reach `events()`.
        """
        if not self._closing and not self._ended.is_set():
            self._closing = True
            await self._until_linked()
            if self._resender is not None:
                await asyncio.gather(self._resender, return_exceptions=True)
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(json.dumps({"type": "close"}))
        await self._ended.wait()
        await self._ws.close()
        await self._reader
        if self._closed_message is None:
            raise self._failure or ConnectionLost("connection closed before session.closed", None)
        return self._closed_message

    # --- internals ------------------------------------------------------------------------

    async def _send_json(self, message: dict) -> None:
        await self._send(json.dumps(message))

    async def _send(self, frame: str | bytes) -> None:
        if self._closing:
            raise ClientError("the session is closing; nothing more can be sent")
        await self._until_linked()
        try:
            await self._ws.send(frame)
        except ConnectionClosed:
            await self._reader
            lost = ConnectionLost("connection closed", self._ws.close_code)
            raise self._failure or lost from None

    async def _hang_up(self) -> None:
        """Drop the connection without flushing."""
        self._hanging_up = True
        await self._ws.close()
        await self._reader

    async def _read(self) -> None:
        last_error: dict | None = None
        while True:
            try:
                async for raw in self._ws:
                    if isinstance(raw, bytes):
                        continue  # the native protocol's server messages are all JSON text
                    message = json.loads(raw)
                    kind = message.get("type")
                    seq = message.get("seq")
                    if isinstance(seq, int):
                        if seq <= self.last_seq:
                            continue  # already handed out (a resume sends nothing older)
                        self.last_seq = seq
                    if kind == "session.started":
                        self.session_id = message.get("session_id")
                        self.config = message.get("config", {})
                        self.resume_token = message.get("resume_token")
                        self._started.set()
                    elif kind == "session.resumed":
                        self.resumes += 1
                        self._resender = asyncio.create_task(self._resend(message))
                    elif kind == "error":
                        last_error = message
                    self._queue.put_nowait(message)
                    if kind == "session.closed":
                        self._closed_message = message
                        self._ended.set()
            except ConnectionClosed:
                pass  # why it closed is judged below, from the close code
            except (json.JSONDecodeError, AttributeError) as err:
                self._failure = ClientError(
                    f"server sent a message that is not a JSON object: {err}"
                )
                await self._ws.close()
                break
            if self._closed_message is not None or not self._may_resume():
                break
            if not await self._redial():
                break
        if self._closed_message is None and self._failure is None:
            self._failure = self._judge_close(last_error)
        self._link_up.set()  # whoever waits for the link learns that it is over
        self._queue.put_nowait(_END)
        self._ended.set()

    def _may_resume(self) -> bool:
        """The link dropped with no close from the server (not ours, not a refusal), and the
        server gave a resume token."""
        return (
            self.reconnect > 0
            and self.resume_token is not None
            and not self._hanging_up
            and self._closed_message is None
            and self._ws.close_code in (None, 1006)
        )

    async def _redial(self) -> bool:
        """Reconnect with `?resume=TOKEN&last_seq=N`, with backoff; False once every try
        failed (the session is then lost)."""
        self._link_up.clear()
        url = resume_url(self._url, self.resume_token, self.last_seq)
        for attempt in range(self.reconnect):
            await asyncio.sleep(RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)])
            if self._hanging_up:
                return False
            try:
                ws = await _dial(url, self._headers, self._open_timeout)
            except ConnectionFailed:
                continue
            self._ws = ws
            if self._hanging_up:  # dropped by us meanwhile
                await ws.close()
                return False
            return True
        return False

    async def _resend(self, resumed: dict) -> None:
        """After `session.resumed`: send again the audio the server did not get (from its
        `audio_bytes` on), then let new frames through."""
        start = int(resumed.get("audio_bytes", self._audio_sent))
        async with self._send_lock:
            try:
                for offset, chunk in list(self._sent):
                    if offset + len(chunk) > start:
                        await self._ws.send(chunk[max(0, start - offset) :])
            except ConnectionClosed:
                return  # dropped again: the reader resumes once more
            self._link_up.set()

    def _keep(self, chunk: bytes) -> None:
        """Remember a sent frame for resending (the last RESEND_BUFFER_S of audio)."""
        self._sent.append((self._audio_sent, chunk))
        self._audio_sent += len(chunk)
        self._sent_bytes += len(chunk)
        limit = RESEND_BUFFER_S * self.bytes_per_second if self.config else 0
        while self._sent and self._sent_bytes - len(self._sent[0][1]) >= limit:
            self._sent_bytes -= len(self._sent.popleft()[1])

    async def _until_linked(self) -> None:
        """Wait while a dropped connection is being resumed."""
        await self._link_up.wait()

    def _judge_close(self, last_error: dict | None) -> ClientError | None:
        """Why the connection ended without `session.closed`; None when we hung up."""
        code, reason = self._ws.close_code, self._ws.close_reason or ""
        if code is not None and (4000 <= code < 5000 or code in ERROR_CLOSES):
            if last_error is not None:
                error_code = last_error.get("code", "error")
                return SessionError(error_code, last_error.get("message", ""), code)
            return SessionError(ERROR_CLOSES.get(code, "protocol_error"), reason, code)
        if self._hanging_up:
            return None
        why = LOST_CLOSES.get(code, "the server closed it")
        detail = f"close code {code}" + (f", {reason}" if reason else "")
        return ConnectionLost(f"session lost before session.closed: {why} ({detail})", code)


class _Connecting:
    """What `connect()` returns: await it for a client, or use it as `async with`."""

    def __init__(self, opening: Awaitable[StreamscribeClient]) -> None:
        self._opening = opening
        self._client: StreamscribeClient | None = None

    def __await__(self) -> Generator[Any, None, StreamscribeClient]:
        return self._opening.__await__()

    async def __aenter__(self) -> StreamscribeClient:
        self._client = await self._opening
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.__aexit__(exc_type, exc, tb)


async def _dial(url: str, headers: Mapping[str, str] | None, timeout: float) -> ClientConnection:
    try:
        return await ws_connect(
            url,
            additional_headers=headers,
            open_timeout=timeout,
            compression=None,  # PCM hardly compresses; deflate would only cost CPU
        )
    except InvalidStatus as err:
        raise _refused(url, err) from None
    except InvalidURI as err:
        raise ConnectionFailed(f"invalid URL {url!r}: {err}") from None
    except TimeoutError:
        raise ConnectionFailed(f"cannot connect to {_origin(url)}: timed out") from None
    except (OSError, InvalidHandshake) as err:
        errno = getattr(err, "errno", None)
        reason = os.strerror(errno) if errno else str(err) or type(err).__name__
        raise ConnectionFailed(f"cannot connect to {_origin(url)}: {reason}") from None


def resume_url(url: str, token: str, last_seq: int) -> str:
    """The session's URL to resume it: `/v1/stream?resume=TOKEN&last_seq=N` (the session's
    options are the server's already; only credentials in the query are kept)."""
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query) if k in ("api_key", "token")]
    query = urlencode([*kept, ("resume", token), ("last_seq", str(last_seq))])
    return urlunsplit(parts._replace(query=query))


def session_url(url: str, options: Mapping[str, Any]) -> str:
    """`url` with `options` added to its query string in the protocol's spelling."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [(key, _query_value(value)) for key, value in options.items() if value is not None]
    path = parts.path if parts.path not in ("", "/") else STREAM_PATH
    return urlunsplit(parts._replace(path=path, query=urlencode(query)))


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _refused(url: str, err: InvalidStatus) -> ConnectionFailed:
    response = err.response
    status = response.status_code
    retry_after = _retry_after(response.headers.get("Retry-After"))
    body = (response.body or b"").decode("utf-8", "replace").strip()
    message = f"{_origin(url)} refused the connection: HTTP {status}"
    if body:
        message += f" ({body.splitlines()[0]})"
    if retry_after is not None:
        message += f"; retry after {retry_after:g} s"
    cls = ServerUnavailable if status == 503 else ConnectionFailed
    return cls(message, status, retry_after)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delay-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --- streaming whole sources ----------------------------------------------------------------


def read_pcm(path: str | os.PathLike) -> tuple[bytes, int, int]:
    """Read an audio file (any format `streaming.core.audiofile` reads) as (16-bit
    little-endian PCM, sample rate, channels) for the wire.

    The file's own rate is kept when the server accepts it (no resampling on either side),
    else the audio is resampled to 16 kHz; one or two channels are kept, more are mixed to mono.
    """
    # Imported on use: reading any format (FFmpeg too) and resampling are the server's own code,
    # which loads scipy (~1 s); importing the client must stay light.
    from engine.audio import resample
    from streaming.core.audiofile import read_channels

    data, rate = read_channels(path)
    if data.shape[1] > 2:
        data = data.mean(axis=1, keepdims=True)
    if rate not in SAMPLE_RATES:
        data = np.stack(
            [resample(data[:, c], rate, MODEL_SAMPLE_RATE) for c in range(data.shape[1])], axis=1
        )
        rate = MODEL_SAMPLE_RATE
    pcm = np.round(np.clip(data, -1.0, 1.0) * 32767).astype("<i2")
    return pcm.tobytes(), int(rate), data.shape[1]


async def stream_file(
    url: str,
    path: str | os.PathLike,
    *,
    realtime: bool = False,
    frame_ms: int = 100,
    stop: asyncio.Event | None = None,
    **options: Any,
) -> AsyncIterator[dict]:
    """Stream an audio file (see `read_pcm`) in frames of `frame_ms`, then close; yields every
    server message. `realtime` paces the frames like a live source; setting `stop` ends the
    audio early (what was sent is still flushed)."""
    pcm, rate, channels = await asyncio.to_thread(read_pcm, path)  # long files take a while
    size = max(1, rate * frame_ms // 1000) * channels * 2

    async def frames() -> AsyncIterator[bytes]:
        for start in range(0, len(pcm), size):
            yield pcm[start : start + size]

    async for event in stream_pcm(
        url, frames(), realtime=realtime, stop=stop, sample_rate=rate, channels=channels, **options
    ):
        yield event


async def stream_pcm(
    url: str,
    chunks: AsyncIterable[bytes],
    *,
    realtime: bool = False,
    stop: asyncio.Event | None = None,
    **options: Any,
) -> AsyncIterator[dict]:
    """Stream raw audio chunks (format given by `encoding`, `sample_rate`, `channels` in
    `options`, as for `connect`), then close; yields every server message.

    An exception from `chunks` drops the connection and is re-raised after the events; a
    session the server ends before we close it raises `SessionEndedEarly` after them.
    """
    async with StreamscribeClient.connect(url, **options) as client:
        feeder = asyncio.create_task(_feed(client, chunks, realtime, stop))
        try:
            async for event in client.events():
                yield event
            await feeder
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
    closed = client.closed_message
    if closed is not None and closed.get("reason", CLIENT_CLOSE) != CLIENT_CLOSE:
        raise SessionEndedEarly(closed["reason"], client.close_code, closed.get("audio_ms"))


async def _feed(
    client: StreamscribeClient,
    chunks: AsyncIterable[bytes],
    realtime: bool,
    stop: asyncio.Event | None,
) -> None:
    """Send the chunks until they end or `stop` is set, then close (flush)."""
    sending = asyncio.create_task(_send_chunks(client, chunks, realtime))
    waiters = {sending}
    if stop is not None:
        waiters.add(asyncio.create_task(stop.wait()))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.wait(waiters)
    error = None if sending.cancelled() else sending.exception()
    if isinstance(error, ClientError):
        return  # the connection ended; events() raises the reason
    if error is not None:
        await client._hang_up()
        raise error
    with contextlib.suppress(ClientError):  # likewise reported by events()
        await client.close()


async def _send_chunks(
    client: StreamscribeClient, chunks: AsyncIterable[bytes], realtime: bool
) -> None:
    loop = asyncio.get_running_loop()
    rate = client.bytes_per_second if realtime else 0
    started, sent = loop.time(), 0
    async for chunk in chunks:
        if not chunk:
            continue
        sent += len(chunk)
        if realtime:  # a live source has a frame only once its last sample has been spoken
            await asyncio.sleep(max(0.0, started + sent / rate - loop.time()))
        await client.send_audio(chunk)

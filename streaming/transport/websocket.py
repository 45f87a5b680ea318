"""One WebSocket connection: the asyncio adapter around a stream's `StreamProtocol`.

It reads frames and feeds them to the protocol, and carries out what the protocol answers:
frames to send (through one ordered outbox), engine requests for the scheduler, events for a
call's subscribers, pausing reading, closing. Results come back from the scheduler's thread
through `call_soon_threadsafe`. Audio frames that arrive one by one skip the reader task:
`wsserver.WebSocket.take_frame` feeds them to the protocol as they are parsed (the gateway's
largest per-frame saving at hundreds of streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
from websockets.exceptions import ConnectionClosed

from engine.api import Segment, engine_languages, engine_translations
from engine.scheduler import Outcome, Request, Scheduler
from streaming.core.captions import CaptionStore
from streaming.core.close_codes import CLOSE_TRY_AGAIN
from streaming.core.events import EngineRequest
from streaming.core.protocol import NOTHING, Actions, StreamProtocol
from streaming.core.session import Session
from streaming.dialects.base import Dialect
from streaming.ops.config import Config
from streaming.ops.metrics import Metrics
from streaming.ops.observer import MetricsObserver
from streaming.transport.calls import CallHub
from streaming.transport.wsserver import WebSocket

log = logging.getLogger("streaming.transport.websocket")

DRAIN_READ_S = 0.5  # on shutdown, frames already sent are still read for this long
EXPIRE_FLUSH_S = 10.0  # a detached stream past its window waits this long for its last finals
TAKEOVER_S = 2.0  # a resume cuts a half-open old link and waits this long for it to detach
WATCHDOG_S = 0.25  # how often connections check their idle, duration, drain and send clocks
YIELD_EVERY = 4  # frames read in a row before the reader lets other tasks run


class ResumeRefused(Exception):
    """A client asked to resume a stream that cannot be resumed (the reason is the message)."""


class Link(Protocol):
    """What the adapter needs of a connection: a WebSocket (`wsserver.WebSocket`) or an
    AudioSocket call (`audiosocket.AudioSocketStream`)."""

    transport: asyncio.BaseTransport

    async def recv(self) -> str | bytes | None:
        """The next message, or None once `wake()` was called."""

    def wake(self) -> None: ...

    async def send(self, message: str | bytes) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...

    async def wait_closed(self) -> None: ...


class Connection:
    def __init__(
        self,
        ws: Link,
        dialect: Dialect,
        query: Mapping[str, str],
        config: Config,
        scheduler: Scheduler,
        metrics: Metrics,
        calls: CallHub | None = None,
        captions: CaptionStore | None = None,
        quota: Callable[[int], str | None] | None = None,
        resume_prefix: str = "",
    ) -> None:
        """`quota`: the stream's audio allowance (StreamProtocol's `quota`), None: unlimited;
        `resume_prefix`: the start of its resume token (StreamProtocol's)."""
        self.ws = ws
        self.config = config
        self.scheduler = scheduler
        self.metrics = metrics
        self.calls = calls
        self.id = uuid.uuid4().hex
        self.key_id = getattr(ws, "key_id", None)  # whose stream it is: a resume must match
        self.loop = asyncio.get_running_loop()
        self.protocol = StreamProtocol(
            self.id,
            dialect,
            query,
            config,
            engine_languages(scheduler.engine),  # what a session may ask for
            self.loop.time(),
            backlog=scheduler.backlog,
            observer=MetricsObserver(metrics, self.id, captions),
            refine_model=scheduler.refine_engine is not None,
            translations=(
                frozenset()
                if scheduler.refine_engine is None
                else engine_translations(scheduler.refine_engine)
            ),
            quota=quota,
            resume_prefix=resume_prefix,
        )
        self.results: asyncio.Queue[tuple[EngineRequest, Outcome]] = asyncio.Queue()
        self.progress = asyncio.Event()
        self.finished = asyncio.Event()
        self.closed = asyncio.Event()  # the protocol's close decision is carried out
        # Frames to send, in order, and close decisions ((code, reason) after their frames):
        # whoever holds `sending` sends them all, so the wire order is the protocol's.
        self.outbox: deque[str | bytes | tuple[int, str]] = deque()
        self.sending = asyncio.Lock()
        self.send_started: float | None = None  # the watchdog times a send that blocks
        self.reader: asyncio.Task | None = None  # set while it waits for the next frame
        self.interrupted = False  # the fast path or the watchdog stopped that wait
        self.watched = False  # `watch` looks at this connection (its session is running)
        self.fast_burst = 0  # frames taken on the fast path since the loop last turned
        self.gone: asyncio.Future | None = None  # done once the link is lost (while running)
        self.results_task: asyncio.Task | None = None  # delivers the scheduler's results
        # Session resume: the link went and the stream waits (`lingering`) for a client to
        # take it over; `link_lost` is set while detached; `on_end` is told once it is over.
        self.evicted = False  # ended early to make way for a new stream at the session cap
        self.link_lost = asyncio.Event()
        self.lingering: asyncio.Task | None = None
        self.on_end: Callable[[Connection], None] | None = None

    @property
    def session(self) -> Session | None:
        return self.protocol.session

    @property
    def detached(self) -> bool:
        """The stream has no link now and waits for a client to resume it."""
        return self.protocol.detached_at is not None

    @property
    def resumable(self) -> bool:
        """A client may take the detached stream over (not ended, nor made way for another)."""
        return self.detached and not self.evicted and self.protocol.reading

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Drive the stream over its first link; returns when that link ends. `detached` is
        then true when the stream lives on for a client to resume it (`resume`)."""
        protocol = self.protocol
        try:
            opened = protocol.open()
            if not protocol.reading:  # the query was refused
                with contextlib.suppress(ConnectionClosed):
                    await self._perform(opened)
                return
        finally:
            if not protocol.reading:
                self._finish()
        self.results_task = asyncio.create_task(self._deliver_results())
        await self._serve(opened)

    async def resume(self, ws: Link, last_seq: int) -> None:
        """A reconnecting client takes the stream over (server.resume_window_s): the messages
        it missed after `last_seq` go first, then `session.resumed`, then the stream goes on
        over `ws`. Raises `ResumeRefused` when it cannot."""
        if not self.detached and not self.finished.is_set():
            # The old link may be half-open (the network dropped it, no close came): cut it,
            # so that the stream detaches, and take over.
            self.ws.transport.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.link_lost.wait(), TAKEOVER_S)
        if not self.resumable:
            raise ResumeRefused("the session has ended")
        async with self.sending:  # a send still under way on the old link ends first
            if not self.resumable:  # it may have ended while the send went on
                raise ResumeRefused("the session has ended")
            try:
                missed, resumed = self.protocol.resume(last_seq, self.loop.time())
            except ValueError as err:
                raise ResumeRefused(str(err)) from None
            if self.lingering is not None:
                self.lingering.cancel()
            self.ws = ws  # `protocol.resume` has attached the stream again
            self.link_lost.clear()
            self.outbox.clear()  # all of it is in the replay buffer: `missed` has what counts
            self.outbox.extend(missed)
            self._queue(resumed)
        self.metrics.resumes.labels("resumed").inc()
        log.info("session resumed", extra={"session": self.id})
        await self._serve(NOTHING)

    async def _serve(self, first: Actions) -> None:
        """Serve the current link; when it drops without a close and the stream can be
        resumed, detach (the stream lives on), else end the stream."""
        detach = False
        try:
            await self._serve_link(first)
        except ConnectionClosed as closed:  # abrupt disconnect, or cut off for not reading
            detach = self._may_detach(closed)
        finally:
            if detach:
                self._detach()
            else:
                self._finish()

    async def _serve_link(self, first: Actions) -> None:
        protocol = self.protocol
        # A reader held back waits for results; once the link is gone none may come (the
        # task delivering them stops at the first failed send), so its loss wakes it too.
        self.gone = asyncio.ensure_future(self.ws.wait_closed())
        self.gone.add_done_callback(lambda _: self.progress.set())
        self.watched = True
        fast = isinstance(self.ws, WebSocket) and protocol.dialect.binary_audio
        try:
            await self._perform(first)
            if fast:
                self.ws.take_frame = self._take_frame
            await self._read()
            if not protocol.reading:
                await self._until_closed()
        finally:
            if fast:
                self.ws.take_frame = None
            self.gone.cancel()
            self.watched = False

    def _may_detach(self, closed: ConnectionClosed) -> bool:
        """A resumable stream outlives a link that went without a close frame from the
        client (network loss, a cut); a client that closed, or a server draining, ends it."""
        return (
            closed.rcvd is None
            and self.protocol.resumable
            and self.protocol.reading
            and self.protocol.drain_at is None
        )

    def _detach(self) -> None:
        self.protocol.detach(self.loop.time())
        self.outbox.clear()  # kept in the replay buffer
        self.link_lost.set()
        self.lingering = asyncio.create_task(
            self._linger(self.config.server.resume_window_s)
        )
        self.metrics.resumes.labels("detached").inc()
        log.info("client gone; session kept for resume", extra={"session": self.id})

    async def _linger(self, window_s: float) -> None:
        """Wait for a client to resume; past the window, end the stream."""
        await asyncio.sleep(window_s)
        self.lingering = None
        self.metrics.resumes.labels("expired").inc()
        await self._end_detached(EXPIRE_FLUSH_S)

    def evict(self) -> None:
        """At the session cap a new stream needs the slot: end this detached one now."""
        if self.lingering is None:
            return
        self.evicted = True
        self.lingering.cancel()
        self.lingering = asyncio.create_task(self._end_detached(EXPIRE_FLUSH_S))
        self.metrics.resumes.labels("evicted").inc()

    async def _end_detached(self, flush_s: float) -> None:
        """Flush the detached stream's session (its finals still reach the call's
        subscribers, captions and metrics), wait for them a bounded time, then end it."""
        await self._perform(self.protocol.expire())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), flush_s)
        self._finish()

    def _finish(self) -> None:
        """The stream is over: stop delivering results, drop its pending partials, tell the
        call and the server (once)."""
        if self.finished.is_set():
            return
        if self.results_task is not None:
            self.results_task.cancel()
        for key in self.protocol.abandon():  # pending partials never need computing now
            self.scheduler.cancel(key)
        if self.calls is not None:
            self.calls.end(self.protocol.call_id, self.id)
        self.finished.set()
        if self.on_end is not None:
            self.on_end(self)

    async def drain(self, grace_s: float) -> None:
        """Server shutdown: read what the client already sent, flush, deliver the last finals,
        then close with 1001 (or 1013 if the grace period runs out first). A detached stream
        is flushed for its subscribers and ended."""
        if self.detached:
            if self.lingering is not None:
                self.lingering.cancel()
                self.lingering = None
            await self._end_detached(grace_s)
            return
        self.protocol.drain(self.loop.time() + min(DRAIN_READ_S, grace_s))
        try:
            await asyncio.wait_for(self.finished.wait(), grace_s)
        except TimeoutError:
            await self.ws.close(CLOSE_TRY_AGAIN, "server shutting down")

    # --- reading ----------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            await self._read_frames()
        except ConnectionClosed:
            if not self._carries_call():
                raise
            await self._perform(self.protocol.hangup())  # flush the call for its subscribers

    async def _read_frames(self) -> None:
        protocol = self.protocol
        task = asyncio.current_task()
        unyielded = 0
        while protocol.reading:
            self.reader = task
            try:
                message = await self.ws.recv()
            finally:
                self.reader = None
            if message is None:  # woken: the fast path or the watchdog left actions to carry out
                self.interrupted = False
                if self.outbox:
                    await self._flush()
                await self._hold_back()
                continue
            now = self.loop.time()
            if isinstance(message, bytes):
                actions = protocol.receive_binary(message, now)
            else:
                actions = protocol.receive_text(message, now)
            if actions is not NOTHING:
                await self._perform(actions)
                if actions.pause:
                    await self._hold_back()
            unyielded += 1
            if unyielded == YIELD_EVERY:
                # recv() returns without waiting when frames are buffered (a client sending
                # faster than real time): let results and other streams in now and then.
                unyielded = 0
                await asyncio.sleep(0)

    def _take_frame(self, data: bytes) -> bool:
        """The fast path (`WebSocket.take_frame`): feed an audio frame to the protocol as it
        arrives, while the reader waits for the next frame and nothing must go first. Engine
        requests go to the scheduler at once; frames to send (rare: speech start and stop,
        status), and backpressure, wake the reader, which sends them in order before reading
        on."""
        protocol = self.protocol
        if (
            not data  # an empty frame may be a command (Deepgram's CloseStream)
            or self.fast_burst >= YIELD_EVERY  # a burst: the rest via recv(), which yields
            or self.reader is None
            or self.interrupted
            or not protocol.reading
            or protocol.paused
        ):
            return False
        if not self.fast_burst:
            self.loop.call_soon(self._end_burst)
        self.fast_burst += 1
        try:
            actions = protocol.receive_binary(data, self.loop.time())
            if actions is NOTHING:
                return True
            self._queue(actions)
        except Exception:  # as a failing reader would: log it, free the connection
            log.exception("connection failed", extra={"session": self.id})
            self.ws.transport.abort()
            return True
        if self.outbox or actions.pause:
            self._interrupt()
        return True

    def _end_burst(self) -> None:
        self.fast_burst = 0

    def _interrupt(self) -> None:
        self.interrupted = True
        self.ws.wake()  # the waiting recv() returns None; no frame is lost

    async def _hold_back(self) -> None:
        """Backpressure: stop reading while the stream's finals pile up at the engine; raises
        ConnectionClosed when the link goes meanwhile, so that its slot is freed at once."""
        while self.protocol.paused:
            if self.gone is not None and self.gone.done():
                raise ConnectionClosed(None, None)
            self.progress.clear()
            await self.progress.wait()

    def watch(self) -> None:
        """Called every WATCHDOG_S by the server (one timer for all streams, not a timeout or a
        task per frame): cut a client that stopped reading, and end a stream waiting for frames
        on idle timeout, maximum duration or drain."""
        if not self.watched:
            return
        now = self.loop.time()
        started = self.send_started
        if started is not None and now - started > self.config.server.idle_timeout_s:
            self.watched = False
            self._drop_slow_client()
            return
        if self.reader is None or self.interrupted:
            return
        actions = self.protocol.tick(now)
        if actions is not NOTHING:  # frames to send (`status`, the end of the stream)
            self._queue(actions)
            if self.outbox:
                self._interrupt()  # the reader sends them in order

    # --- carrying out -----------------------------------------------------------------------

    def _queue(self, actions: Actions) -> None:
        """Submit and publish now; frames and the close decision join the outbox."""
        for request in actions.submit:
            self._submit(request)
        if actions.publish and self.calls is not None:
            call_id, labels = self.protocol.call_id, self.protocol.channel_labels
            for event in actions.publish:
                self.calls.publish(call_id, self.id, labels, event)
        if actions.send:
            self.outbox.extend(actions.send)
        if actions.close is not None:
            self.outbox.append(actions.close)

    async def _perform(self, actions: Actions) -> None:
        self._queue(actions)
        if self.outbox:
            await self._flush()

    async def _flush(self) -> None:
        """Send the outbox in order; a close decision closes the connection after its frames.
        A caller that finds another sending waits for it, as it would for its own send."""
        async with self.sending:
            outbox = self.outbox
            while outbox:
                item = outbox.popleft()
                if isinstance(item, tuple):
                    if not self.detached:
                        await self.ws.close(*item)
                    self.closed.set()
                    continue
                if self.detached:
                    continue  # kept in the replay buffer for a client that resumes
                self.send_started = self.loop.time()
                try:
                    await self.ws.send(item)
                except ConnectionClosed:
                    if not self._carries_call():
                        raise
                finally:
                    self.send_started = None

    def _carries_call(self) -> bool:
        """After a hang-up, the call's subscribers still want the stream's last finals."""
        return self.calls is not None and bool(self.protocol.call_id)

    def _submit(self, item: EngineRequest) -> None:
        def done(outcome: Outcome) -> None:  # on the scheduler's thread
            self.loop.call_soon_threadsafe(self.results.put_nowait, (item, outcome))

        self.scheduler.submit(
            Request(
                item.kind,
                (self.id, item.channel, item.segment_id),
                Segment(
                    np.asarray(item.audio, dtype=np.float32),
                    hotwords=item.hotwords,
                    prefix=item.window.prefix,
                    language=item.language,
                    translate_to=item.translate_to,
                ),
                done,
                first_text=item.first_text,
                deadline=(
                    None
                    if item.deadline_ms is None
                    else self.loop.time() + item.deadline_ms / 1000  # loop time is monotonic
                ),
            )
        )

    async def _deliver_results(self) -> None:
        while True:
            item, outcome = await self.results.get()
            try:
                await self._perform(self.protocol.on_result(item, outcome, self.loop.time()))
            except ConnectionClosed:
                if not self.protocol.resumable:
                    return
                # the link went: what it missed is in the replay buffer for a resume
            finally:
                self.progress.set()

    async def _until_closed(self) -> None:
        """Wait for the close decision to be carried out, or for the client to go away first."""
        if self._carries_call():  # after a hang-up, the call's subscribers still want the finals
            await self.closed.wait()
            return
        closed = asyncio.create_task(self.closed.wait())
        gone = asyncio.create_task(self.ws.wait_closed())
        await asyncio.wait((closed, gone), return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        gone.cancel()

    def _drop_slow_client(self) -> None:
        """Nothing more can be sent, not even a close frame: cut the TCP connection so that
        its buffers and the session are freed."""
        log.warning("client stopped reading; connection dropped", extra={"session": self.id})
        self.metrics.errors.labels("slow_client").inc()
        self.ws.transport.abort()

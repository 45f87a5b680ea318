"""One WebSocket connection driven through its dialect and session core.

The asyncio edge: reads frames, turns them into session calls through the dialect, sends the
session's events back through the dialect, and hands engine requests to the scheduler. Results
come back from the scheduler's thread through `call_soon_threadsafe`. Audio frames that arrive
one by one skip the reader task: `StreamConnection` feeds them to the session as they are parsed
(the gateway's largest per-frame saving at hundreds of streams).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from engine.api import Segment, engine_languages
from engine.scheduler import Outcome, Request, Scheduler
from streaming.core.captions import CaptionStore
from streaming.core.events import (
    CaptionAppend,
    CaptionCue,
    EngineRequest,
    ErrorEvent,
    FinalTranscript,
    PartialTranscript,
    SessionClosed,
    SessionStarted,
)
from streaming.core.session import Output, Session
from streaming.core.stability import StabilityConfig
from streaming.dialects.base import (
    Audio,
    Close,
    Command,
    Configure,
    Dialect,
    Finalize,
    KeepAlive,
    Reject,
    Reply,
    Update,
)
from streaming.ops.config import Config, ConfigError, session_options
from streaming.ops.metrics import Metrics
from streaming.transport.calls import CallHub

log = logging.getLogger("streaming.transport.websocket")

CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_AGAIN = 1000, 1001, 1008, 1013
CLOSE_BAD_CONFIG, CLOSE_BAD_SEQUENCE = 4001, 4002
STATUS_EVERY_S = 1.0
DRAIN_READ_S = 0.5  # on shutdown, frames already sent are still read for this long
WATCHDOG_S = 0.25  # how often connections check their idle, duration, drain and send clocks
YIELD_EVERY = 4  # frames read in a row before the reader lets other tasks run


class StreamConnection(ServerConnection):
    """websockets' server connection with a fast path for audio frames.

    While `take_frame` is set, each single-frame binary message is offered to it as soon as it
    is parsed, inside the protocol's data callback, provided nothing is queued ahead of it for
    `recv()`. At hundreds of streams, the queue and the task wake-up that `recv()` costs per
    frame are the largest part of the gateway's work left. `take_frame` returns False to leave
    the frame to `recv()`.
    """

    take_frame: Callable[[bytes], bool] | None = None

    def process_event(self, event) -> None:
        take = self.take_frame
        if (
            take is not None
            and isinstance(event, Frame)
            and event.opcode is Opcode.BINARY
            and event.fin
            and not len(self.recv_messages.frames)
            and take(bytes(event.data))
        ):
            return
        super().process_event(event)


class Connection:
    def __init__(
        self,
        ws: ServerConnection,
        dialect: Dialect,
        query: Mapping[str, str],
        config: Config,
        scheduler: Scheduler,
        metrics: Metrics,
        calls: CallHub | None = None,
        captions: CaptionStore | None = None,
    ) -> None:
        self.ws = ws
        self.dialect = dialect
        self.query = query
        self.config = config
        self.scheduler = scheduler
        self.languages = engine_languages(scheduler.engine)  # what a session may ask for
        self.metrics = metrics
        self.calls = calls
        self.captions = captions  # pop-on cues kept for GET .../captions.vtt|srt
        self.id = uuid.uuid4().hex
        self.session: Session | None = None
        self.results: asyncio.Queue[tuple[EngineRequest, Outcome]] = asyncio.Queue()
        self.progress = asyncio.Event()
        self.finished = asyncio.Event()
        self.closed_sent = asyncio.Event()  # `session.closed` (the last event) is on the wire
        self.audio_seen = False
        self.drain_at: float | None = None
        self.loop = asyncio.get_running_loop()
        self.last_message = self.loop.time()
        self.ends = self.last_message + config.server.max_session_s
        self.sends: dict[object, float] = {}  # sends in progress -> when each started
        self.reader: asyncio.Task | None = None  # set while it waits for the next frame
        self.interrupted: str | None = None  # why the watchdog stopped that wait
        self.watched = False  # `watch` looks at this connection (its session is running)
        self.last_status = 0.0
        self.unsent: list[Output] = []  # events of frames taken on the fast path, to send
        self.fast_burst = 0  # frames taken on the fast path since the loop last turned
        self.counted_audio_ms = 0  # audio already added to the audio-seconds counter
        self.first_partial_sent: set[tuple[int, int]] = set()

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except ConnectionClosed:
            pass  # abrupt disconnect, or a client cut off for not reading
        finally:
            self._abandon()
            if self.calls is not None:
                self.calls.end(getattr(self.dialect, "call_id", None), self.id)
            self.finished.set()

    async def _run(self) -> None:
        opening = self.dialect.opening(self.query)
        if opening.error is not None:
            await self._fail("invalid_config", opening.error, CLOSE_BAD_CONFIG)
            return
        try:
            options = session_options(
                self.config.session, opening.options, "query string", self.languages
            )
            self.session = Session(self.id, options)
        except (ConfigError, ValueError) as err:
            await self._fail("invalid_config", str(err), CLOSE_BAD_CONFIG)
            return
        self.session.hotwords = opening.hotwords
        results = asyncio.create_task(self._deliver_results())
        self.watched = True
        fast = isinstance(self.ws, StreamConnection) and self.dialect.binary_audio
        try:
            await self._emit(self.session.start())
            if fast:
                self.ws.take_frame = self._take_frame
            await self._read()
            self._count_audio()
            if self.session.state != "open":
                await self._until_closed_sent()
                await self.ws.close(CLOSE_NORMAL if self.drain_at is None else CLOSE_GOING_AWAY)
        finally:
            if fast:
                self.ws.take_frame = None
            results.cancel()
            self.watched = False

    async def drain(self, grace_s: float) -> None:
        """Server shutdown: read what the client already sent, flush, deliver the last finals,
        then close with 1001 (or 1013 if the grace period runs out first)."""
        self.drain_at = self.loop.time() + min(DRAIN_READ_S, grace_s)
        try:
            await asyncio.wait_for(self.finished.wait(), grace_s)
        except TimeoutError:
            await self.ws.close(CLOSE_TRY_AGAIN, "server shutting down")

    # --- reading ----------------------------------------------------------------------------

    async def _read(self) -> None:
        session = self.session
        task = asyncio.current_task()
        unyielded = 0
        while session.state == "open":
            self.reader = task
            try:
                message = await self.ws.recv()
            except ConnectionClosed:
                if not self._carries_call():
                    raise
                for command in self.dialect.on_hangup():  # flush the call for its subscribers
                    await self._apply(command)
                return
            except asyncio.CancelledError:
                if self.interrupted is None:
                    raise
                _uncancel(task)
                if self.interrupted != "fast_path":
                    await self._interrupted(self.interrupted)
                    return
                self.interrupted = None  # the fast path has events to send, or must wait
                message = None
            finally:
                self.reader = None
            if message is None:
                await self._emit(self._take_unsent())
                await self._hold_back(session)
                continue
            self.last_message = self.loop.time()
            commands = (
                self.dialect.on_binary(message)
                if isinstance(message, bytes)
                else self.dialect.on_text(message)
            )
            for command in commands:
                if not await self._apply(command):
                    return
                session = self.session
            await self._hold_back(session)
            unyielded += 1
            if unyielded == YIELD_EVERY:
                # recv() returns without waiting when frames are buffered (a client sending
                # faster than real time): let results and other streams in now and then.
                unyielded = 0
                await asyncio.sleep(0)

    def _take_frame(self, data: bytes) -> bool:
        """The fast path (StreamConnection): feed an audio frame to the session as it arrives,
        while the reader waits for the next frame and nothing must go first. Engine requests
        go to the scheduler at once; events to send (rare: speech start and stop, status), and
        backpressure, wake the reader, which sends them in order before reading on."""
        session = self.session
        if (
            not data  # an empty frame may be a command (Deepgram's CloseStream)
            or self.fast_burst >= YIELD_EVERY  # a burst: the rest via recv(), which yields
            or self.reader is None
            or self.interrupted is not None
            or session.state != "open"
            or session.pending_finals >= self.config.server.max_pending_finals
        ):
            return False
        if not self.fast_burst:
            self.loop.call_soon(self._end_burst)
        self.fast_burst += 1
        try:
            self.last_message = self.loop.time()
            for command in self.dialect.on_binary(data):
                self.unsent += self._feed_audio(command.data)
        except Exception:  # as a failing reader would: log it, free the connection
            log.exception("connection failed", extra={"session": self.id})
            self.ws.transport.abort()
            return True
        full = session.pending_finals >= self.config.server.max_pending_finals
        if self.unsent or full:
            self.interrupted = "fast_path"
            self.reader.cancel()  # websockets: a cancelled recv() loses no data
        return True

    def _end_burst(self) -> None:
        self.fast_burst = 0

    def _take_unsent(self) -> list[Output]:
        unsent, self.unsent = self.unsent, []
        return unsent

    async def _hold_back(self, session: Session) -> None:
        """Backpressure: stop reading while the stream's finals pile up at the engine."""
        while session.pending_finals >= self.config.server.max_pending_finals:
            self.progress.clear()
            await self.progress.wait()

    def watch(self) -> None:
        """Called every WATCHDOG_S by the server (one timer for all streams, not a timeout or a
        task per frame): cut a client that stopped reading, and stop waiting for frames on
        idle timeout, maximum duration or drain."""
        if not self.watched:
            return
        now = self.loop.time()
        server = self.config.server
        if self.sends and now - min(self.sends.values()) > server.idle_timeout_s:
            self.watched = False
            self._drop_slow_client()
            return
        if self.drain_at is not None and now >= self.drain_at:
            reason = "shutdown"
        elif now >= self.ends:
            reason = "max_duration"
        elif now - self.last_message >= server.idle_timeout_s:
            reason = "idle_timeout"
        else:
            reason = None
        if reason is not None and self.reader is not None and self.interrupted is None:
            self.interrupted = reason
            self.reader.cancel()  # websockets: a cancelled recv() loses no data

    async def _interrupted(self, reason: str) -> None:
        session, server = self.session, self.config.server
        if reason == "idle_timeout":
            await self._emit([ErrorEvent(reason, f"no message for {server.idle_timeout_s:g} s")])
        elif reason == "max_duration":
            text = f"stream longer than {server.max_session_s:g} s"
            await self._emit([ErrorEvent(reason, text)])
        await self._emit(session.close(reason))

    async def _apply(self, command: Command) -> bool:
        """Carry out one command; False when the connection must stop reading."""
        session = self.session
        if isinstance(command, Audio):
            events = self._feed_audio(command.data)
            if events:
                await self._emit(events)
        elif isinstance(command, Configure):
            if self.audio_seen:
                await self._fail(
                    "invalid_sequence",
                    "session.start after audio; use session.update",
                    CLOSE_BAD_SEQUENCE,
                )
                return False
            try:
                options = session_options(
                    session.options, command.options, "session.start", self.languages
                )
                self.session = Session(self.id, options)
            except (ConfigError, ValueError) as err:  # ValueError: options that clash
                await self._fail("invalid_config", str(err), CLOSE_BAD_CONFIG)
                return False
            self.session.hotwords = command.hotwords or session.hotwords
            await self._emit(self.session.start())
        elif isinstance(command, Update):
            try:
                options = session_options(
                    session.options, command.options, "session.update", self.languages
                )
            except ConfigError as err:
                await self._emit([ErrorEvent("invalid_config", str(err))])
                return True
            session.options = options
            session.stability = StabilityConfig(options.stable_agreement, options.stable_settle_ms)
            if command.hotwords is not None:
                session.hotwords = command.hotwords
            if command.reply is not None:
                await self._emit([command.reply])
        elif isinstance(command, Finalize):
            await self._emit(session.finalize())
        elif isinstance(command, Close):
            await self._emit(session.close("client"))
            return False
        elif isinstance(command, Reject):
            if command.close_code is not None:
                await self._fail(command.code, command.message, command.close_code)
                return False
            await self._emit([ErrorEvent(command.code, command.message)])
        elif isinstance(command, Reply):
            await self._emit([command.message])
        elif not isinstance(command, KeepAlive):
            raise TypeError(f"unknown command {command!r}")
        return True

    async def _fail(self, code: str, message: str, close_code: int) -> None:
        self.metrics.errors.labels(code).inc()
        error = ErrorEvent(code, message, fatal=True)
        self._publish(error)
        for frame in self.dialect.encode(error):
            await self.ws.send(frame)
        await self.ws.close(close_code, code)

    # --- writing ----------------------------------------------------------------------------

    async def _emit(self, outputs: list[Output]) -> None:
        for item in outputs:
            if isinstance(item, EngineRequest):
                self._submit(item)
                continue
            self._observe(item)
            self._publish(item)
            for frame in self.dialect.encode(item):
                token = object()
                self.sends[token] = self.loop.time()  # the watchdog times sends that block
                try:
                    await self.ws.send(frame)
                except ConnectionClosed:
                    if not self._carries_call():
                        raise
                finally:
                    del self.sends[token]
            if isinstance(item, SessionClosed):
                self.closed_sent.set()

    def _publish(self, event) -> None:
        """Telephony dialects name their call (`call_id`, `channel_labels`) once it starts; from
        then on every event also goes to the call's subscribers and webhook."""
        if self._carries_call():
            self.calls.publish(self.dialect.call_id, self.id, self.dialect.channel_labels, event)

    def _carries_call(self) -> bool:
        return self.calls is not None and bool(getattr(self.dialect, "call_id", None))

    def _observe(self, event) -> None:
        metrics = self.metrics
        if isinstance(event, FinalTranscript):
            metrics.finals.inc()
            for stage in ("endpoint_ms", "queue_ms", "compute_ms"):
                metrics.final_latency.labels(stage[:-3]).observe(
                    getattr(event.latency, stage) / 1000
                )
        elif isinstance(event, PartialTranscript):
            metrics.partials.inc()
            key = (event.channel, event.segment_id)
            if key not in self.first_partial_sent and (event.stable_text or event.volatile_text):
                self.first_partial_sent.add(key)
                lag = max(0, self.session.audio_ms - event.start_ms) / 1000
                metrics.first_partial_latency.observe(lag)
        elif isinstance(event, ErrorEvent):
            metrics.errors.labels(event.code).inc()
        elif isinstance(event, CaptionAppend):
            delay = max(0, self.session.audio_ms - event.end_ms) / 1000
            metrics.caption_delay.labels("append").observe(delay)
        elif isinstance(event, CaptionCue):
            delay = max(0, self.session.audio_ms - event.speech_end_ms) / 1000
            metrics.caption_delay.labels("cue").observe(delay)
            if self.captions is not None:
                self.captions.add(self.id, event)
        elif isinstance(event, SessionStarted) and self.captions is not None:
            if event.options.get("captions_mode") == "popon":
                self.captions.open(self.id, event.options["timecode_origin_ms"])

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
                ),
                done,
                first_text=item.first_text,
            )
        )

    async def _deliver_results(self) -> None:
        while True:
            item, outcome = await self.results.get()
            outputs = self.session.on_result(
                item,
                outcome.hypothesis,
                error=outcome.reason,
                queue_ms=outcome.queue_ms,
                compute_ms=outcome.compute_ms,
            )
            try:
                # events of frames taken on the fast path came first: they go first
                await self._emit(self._take_unsent() + outputs)
            except ConnectionClosed:
                return
            finally:
                self.progress.set()

    async def _until_closed_sent(self) -> None:
        """Wait for the last event to be sent, or for the client to go away first."""
        if self._carries_call():  # after a hang-up, the call's subscribers still want the finals
            await self.closed_sent.wait()
            return
        sent = asyncio.create_task(self.closed_sent.wait())
        gone = asyncio.create_task(self.ws.wait_closed())
        await asyncio.wait((sent, gone), return_when=asyncio.FIRST_COMPLETED)
        sent.cancel()
        gone.cancel()

    def _feed_audio(self, data: bytes) -> list[Output]:
        """Audio into the session. Its engine requests go to the scheduler now; returned are
        the events to send, the dialect's messages now due, and a `status` when the engine is
        behind (checked once a second, when the audio counter also moves)."""
        self.audio_seen = True
        events = []
        for item in self.session.feed_audio(data):
            if isinstance(item, EngineRequest):
                self._submit(item)
            else:
                events.append(item)
        events += [reply.message for reply in self.dialect.due()]
        now = self.loop.time()
        if now - self.last_status >= STATUS_EVERY_S:
            self.last_status = now
            self._count_audio()
            lag_ms, queued_ms = self.scheduler.backlog()
            if lag_ms >= self.config.server.status_lag_ms:
                events += self.session.status(lag_ms, queued_ms)
        return events

    def _drop_slow_client(self) -> None:
        """Nothing more can be sent, not even a close frame: cut the TCP connection so that
        its buffers and the session are freed."""
        log.warning("client stopped reading; connection dropped", extra={"session": self.id})
        self.metrics.errors.labels("slow_client").inc()
        self.ws.transport.abort()

    def _count_audio(self) -> None:
        """The audio-seconds counter moves in steps (once a second and at the end), not per
        frame: a counter increment takes a lock."""
        audio_ms = self.session.audio_ms
        self.metrics.audio_seconds.inc((audio_ms - self.counted_audio_ms) / 1000)
        self.counted_audio_ms = audio_ms

    def _abandon(self) -> None:
        """Free what the connection holds: pending partials never need computing now."""
        if self.session is None:
            return
        self._count_audio()
        for channel in self.session.channels:
            for segment_id in list(channel.trackers) + list(channel.partial_rev):
                self.scheduler.cancel((self.id, channel.index, segment_id))


def _uncancel(task: asyncio.Task) -> None:
    """Forget a cancellation we handled ourselves (Python >= 3.11 counts them)."""
    if hasattr(task, "uncancel"):
        task.uncancel()

"""The sans-I/O stream protocol: one live stream's rules, with no socket, task or clock.

A transport (a WebSocket, an AudioSocket call) feeds it what the client sent and what the
engine answered, and the time; each call returns `Actions`: frames to send (already encoded by
the dialect, so their order is the wire order), engine requests to submit, events for the
telephony call's subscribers, and the close decision. It owns the session core, the command
rules, the stream's limits (backpressure, idle timeout, maximum duration, drain) and its
`status` messages, so each rule is testable without a socket, in the style of websockets'
sans-I/O protocol objects.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from streaming.core.close_codes import (
    CLOSE_BAD_CONFIG,
    CLOSE_BAD_SEQUENCE,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
)
from streaming.core.events import (
    EngineRequest,
    ErrorEvent,
    Event,
    SessionClosed,
    SessionResumed,
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
from streaming.ops.config import Config, ConfigError, SessionConfig, session_options

if TYPE_CHECKING:
    from engine.scheduler import Outcome

STATUS_EVERY_S = 1.0  # how often the engine's backlog is looked at (and audio counted)


@dataclass(frozen=True, slots=True)
class Actions:
    """What the transport must do now, in this order: submit, publish, send, then close."""

    send: Sequence[str | bytes] = ()  # frames, in wire order
    submit: Sequence[EngineRequest] = ()  # for the scheduler; results come back to `on_result`
    publish: Sequence[Event] = ()  # for the subscribers of the call (`StreamProtocol.call_id`)
    close: tuple[int, str] | None = None  # close code and reason, once `send` is out
    pause: bool = False  # stop reading until a result lets the stream's finals drain


NOTHING = Actions()  # shared: most audio frames call for no action
PAUSED = Actions(pause=True)


class Observer(Protocol):
    """Where the stream's measurements go (metrics, caption store); see ops/observer.py."""

    def event(self, event: Event, audio_ms: int) -> None:
        """An event leaves for the client, `audio_ms` into the stream."""

    def audio(self, audio_ms: int) -> None:
        """The stream has received this much audio so far (called now and then, not per frame)."""


class Unobserved:
    """An observer that keeps nothing."""

    def event(self, event: Event, audio_ms: int) -> None:
        pass

    def audio(self, audio_ms: int) -> None:
        pass


def no_backlog() -> tuple[float, float]:
    return 0.0, 0.0


def refine_key(request: EngineRequest) -> tuple[int, int, str | None]:
    """Which refine-model work `request` is: a segment's refine, or its translation."""
    return request.channel, request.segment_id, request.translate_to


class StreamProtocol:
    """One stream, from the handshake's query to its close decision."""

    def __init__(
        self,
        session_id: str,
        dialect: Dialect,
        query: Mapping[str, str],
        config: Config,
        languages: Collection[str] | None,
        now: float,
        *,
        backlog: Callable[[], tuple[float, float]] = no_backlog,
        observer: Observer | None = None,
        refine_model: bool = False,
        translations: frozenset[str] = frozenset(),
        quota: Callable[[int], str | None] | None = None,
        resume_prefix: str = "",
    ) -> None:
        """`languages`: what the engine transcribes (None: any); `backlog`: the scheduler's
        (lag ms, queued audio ms), looked at once a second for `status`; `refine_model`: a
        refine model is loaded (finals may be refined); `translations`: what it translates
        into (a session's `translate_to`); `quota`: told the stream's audio so far once a
        second (and at the end), it answers why the stream must stop (its key's audio
        allowance is spent: `error` then close 1008), or None; `resume_prefix` starts the
        resume token (it names the worker process that holds the stream)."""
        self.id = session_id
        self.dialect = dialect
        self.query = query
        self.config = config
        self.languages = languages
        self.backlog = backlog
        self.observer = observer if observer is not None else Unobserved()
        self.quota = quota
        self.max_pending = config.server.max_pending_finals
        self.session: Session | None = None
        self.audio_seen = False
        self.failed = False  # a fatal error was sent: the stream ends without `session.closed`
        self.last_message = now
        self.ends = now + config.server.max_session_s
        self.drain_at: float | None = None
        self.last_status = float("-inf")
        self.refine_model = refine_model
        self.translations = translations if refine_model else None  # None: none can be asked
        # refine requests in flight by (channel, segment, translation target): when each stops
        # being worth waiting for; past it the session is told, so a held final never waits on
        # a busy engine (a segment's refine and translation are timed apart)
        self.refine_due: dict[tuple[int, int, str | None], tuple[float, EngineRequest]] = {}
        self.now = now
        # Session resume: a resumable stream keeps its last messages (with their seq) for a
        # client that reconnects, and counts the audio bytes it took, so that the client
        # resends exactly what was lost; `detached_at` is when its client went away.
        server = config.server
        self.resumable = dialect.resumable and server.resume_window_s > 0
        self.replay: deque[tuple[int, str | bytes]] = deque(maxlen=server.resume_buffer_events)
        self.audio_bytes = 0
        self.detached_at: float | None = None
        if self.resumable:
            dialect.resume_token = resume_prefix + secrets.token_urlsafe(24)
        self._send: list[str | bytes] = []
        self._submit: list[EngineRequest] = []
        self._publish: list[Event] = []
        self._close: tuple[int, str] | None = None

    # --- state ------------------------------------------------------------------------------

    @property
    def reading(self) -> bool:
        """The stream takes client messages (its session runs and no close is decided)."""
        session = self.session
        return session is not None and session.state == "open" and not self.failed

    @property
    def paused(self) -> bool:
        """Backpressure: the stream's finals pile up at the engine, so stop reading."""
        session = self.session
        return session is not None and session.pending_finals >= self.max_pending

    @property
    def call_id(self) -> str | None:
        return self.dialect.call_id

    @property
    def channel_labels(self) -> tuple[str, ...]:
        return self.dialect.channel_labels

    # --- input ------------------------------------------------------------------------------

    def open(self) -> Actions:
        """The handshake's query starts the session, or is refused with 4001."""
        opening = self.dialect.opening(self.query)
        if opening.error is not None:
            self._fail("invalid_config", opening.error, CLOSE_BAD_CONFIG)
            return self._take()
        try:
            options = session_options(
                self.config.session,
                opening.options,
                "query string",
                self.languages,
                self.translations,
            )
            self.session = self._new_session(options)
        except (ConfigError, ValueError) as err:
            self._fail("invalid_config", str(err), CLOSE_BAD_CONFIG)
            return self._take()
        self.session.hotwords = opening.hotwords
        self._out(self.session.start())
        return self._take()

    def _new_session(self, options: SessionConfig) -> Session:
        return Session(
            self.id,
            options,
            refine_model=self.refine_model,
            refined_messages=self.dialect.refined_messages,
        )

    def receive_text(self, text: str, now: float) -> Actions:
        self.last_message = self.now = now
        self._apply(self.dialect.on_text(text), now)
        return self._take()

    def receive_binary(self, data: bytes, now: float) -> Actions:
        self.last_message = self.now = now
        self._apply(self.dialect.on_binary(data), now)
        if self.refine_due:
            self._expire_refines(now)
        return self._take()

    def on_result(
        self, request: EngineRequest, outcome: Outcome, now: float | None = None
    ) -> Actions:
        """The scheduler's answer to one of this stream's requests (`now`: when it arrived)."""
        if now is not None:
            self.now = now
        if self.session is None or self.failed:
            return NOTHING
        if request.kind == "refine":
            self.refine_due.pop(refine_key(request), None)
        self._out(
            self.session.on_result(
                request,
                outcome.hypothesis,
                error=outcome.reason,
                queue_ms=outcome.queue_ms,
                compute_ms=outcome.compute_ms,
            )
        )
        return self._take()

    def detach(self, now: float) -> None:
        """The client went away without closing: the stream lives on (its audio is still
        transcribed, its messages kept) until `resume` or `expire`."""
        self.detached_at = now

    def resume(self, last_seq: int, now: float) -> tuple[list[str | bytes], Actions]:
        """A client takes the stream over, having received every message up to `last_seq`:
        the kept messages after it, to send first, then `session.resumed` (new seq)."""
        if not 0 <= last_seq <= self.dialect.seq:
            raise ValueError(f"last_seq must be 0 to {self.dialect.seq}, got {last_seq}")
        missed = [frame for seq, frame in self.replay if seq > last_seq]
        first_kept = self.replay[0][0] if self.replay else self.dialect.seq + 1
        detached = self.detached_at if self.detached_at is not None else now
        self.detached_at = None
        self.last_message = self.now = now  # the idle clock restarts with the new client
        session = self.session
        self._event(
            SessionResumed(
                gap_ms=round((now - detached) * 1000),
                audio_bytes=self.audio_bytes,
                audio_ms=session.audio_ms,
                replayed=len(missed),
                dropped=max(0, first_kept - last_seq - 1),
            )
        )
        return missed, self._take()

    def expire(self) -> Actions:
        """No client came back within the resume window: flush the session (its finals go to
        the call's subscribers, the caption store and the metrics) and close it."""
        if self.reading:
            self._out(self.session.close("resume_expired"))
        return self._take()

    def hangup(self) -> Actions:
        """The connection dropped while the stream carries a call: the dialect's hang-up
        commands flush it, so the call's subscribers still get the last finals."""
        self._apply(self.dialect.on_hangup(), self.last_message)
        return self._take()

    # --- clocks -----------------------------------------------------------------------------

    def drain(self, deadline: float) -> None:
        """Server shutdown: frames already sent are read until `deadline`; then the session is
        flushed and, its last finals delivered, closed with 1001."""
        self.drain_at = deadline

    def tick(self, now: float) -> Actions:
        """Called while the transport waits for the client: ends a stream that reached its
        drain deadline, its maximum duration or its idle timeout; tells the session of refine
        work past its deadline; and sends `status` while the engine is behind, as a client
        that stopped sending must still learn of a growing lag."""
        self.now = now
        if self.refine_due:
            self._expire_refines(now)
        if not self.reading:
            return self._take()
        server = self.config.server
        if self.drain_at is not None and now >= self.drain_at:
            self._out(self.session.close("shutdown"))
        elif now >= self.ends:
            text = f"stream longer than {server.max_session_s:g} s"
            self._event(ErrorEvent("max_duration", text))
            self._out(self.session.close("max_duration"))
        elif now - self.last_message >= server.idle_timeout_s:
            text = f"no message for {server.idle_timeout_s:g} s"
            self._event(ErrorEvent("idle_timeout", text))
            self._out(self.session.close("idle_timeout"))
        else:
            self._status(now)
        return self._take()

    def abandon(self) -> list[tuple[str, int, int]]:
        """The stream is over: the scheduler keys of partial work nobody needs now."""
        if self.session is None:
            return []
        self.observer.audio(self.session.audio_ms)
        if self.quota is not None:
            self.quota(self.session.audio_ms)
        return [
            (self.id, channel.index, segment_id)
            for channel in self.session.channels
            for segment_id in (*channel.trackers, *channel.partial_rev)
        ]

    # --- commands ---------------------------------------------------------------------------

    def _apply(self, commands: list[Command], now: float) -> None:
        for command in commands:
            if not self.reading:
                return  # what follows a close or a fatal error is not read
            if isinstance(command, Audio):
                self._audio(command.data, now)
            elif isinstance(command, Configure):
                self._configure(command)
            elif isinstance(command, Update):
                self._update(command)
            elif isinstance(command, Finalize):
                self._out(self.session.finalize())
            elif isinstance(command, Close):
                self._out(self.session.close("client"))
            elif isinstance(command, Reject):
                if command.close_code is not None:
                    self._fail(command.code, command.message, command.close_code)
                else:
                    self._event(ErrorEvent(command.code, command.message))
            elif isinstance(command, Reply):
                self._event(command.message)
            elif not isinstance(command, KeepAlive):
                raise TypeError(f"unknown command {command!r}")

    def _audio(self, data: bytes, now: float) -> None:
        """Audio into the session, then the dialect's messages now due, and a `status` when the
        engine is behind."""
        self.audio_seen = True
        self.audio_bytes += len(data)
        session = self.session
        outputs = session.feed_audio(data)
        if outputs:
            self._out(outputs)
        due = self.dialect.due()
        if due:
            for reply in due:
                self._event(reply.message)
        self._status(now)

    def _status(self, now: float) -> None:
        """Once a second, from audio or the clock alike: count the audio, and send `status`
        when the engine is `server.status_lag_ms` behind."""
        if now - self.last_status < STATUS_EVERY_S:
            return
        self.last_status = now
        session = self.session
        self.observer.audio(session.audio_ms)
        if self.quota is not None:
            over = self.quota(session.audio_ms)
            if over is not None:
                self._fail("quota_exceeded", over, CLOSE_POLICY)
                return
        lag_ms, queued_ms = self.backlog()
        if lag_ms >= self.config.server.status_lag_ms:
            self._out(session.status(lag_ms, queued_ms))

    def _configure(self, command: Configure) -> None:
        """`session.start` (or its kin): a new session core with these options, before audio."""
        if self.audio_seen:
            self._fail(
                "invalid_sequence",
                "session.start after audio; use session.update",
                CLOSE_BAD_SEQUENCE,
            )
            return
        previous = self.session
        try:
            options = session_options(
                previous.options,
                command.options,
                "session.start",
                self.languages,
                self.translations,
            )
            self.session = self._new_session(options)
        except (ConfigError, ValueError) as err:  # ValueError: options that clash
            self._fail("invalid_config", str(err), CLOSE_BAD_CONFIG)
            return
        self.session.hotwords = command.hotwords or previous.hotwords
        self._out(self.session.start())

    def _update(self, command: Update) -> None:
        """What may change mid-stream; options the session refuses get an error, not a close."""
        session = self.session
        try:
            options = session_options(
                session.options,
                command.options,
                "session.update",
                self.languages,
                self.translations,
            )
        except ConfigError as err:
            self._event(ErrorEvent("invalid_config", str(err)))
            return
        session.options = options
        session.stability = StabilityConfig(options.stable_agreement, options.stable_settle_ms)
        if command.hotwords is not None:
            session.hotwords = command.hotwords
        if command.reply is not None:
            self._event(command.reply)

    def _expire_refines(self, now: float) -> None:
        """Refine work past its deadline counts as skipped: a held final goes out unrefined,
        `transcript.refined` (or `transcript.translated`) says skipped; the scheduler's late
        answer is then ignored."""
        late = [key for key, (due, _) in self.refine_due.items() if due <= now]
        for key in late:
            _, request = self.refine_due.pop(key)
            self._out(self.session.on_result(request, None, error="deadline"))

    def _fail(self, code: str, message: str, close_code: int) -> None:
        """A fatal error: sent, then the connection closes with `close_code`."""
        self.failed = True
        self._event(ErrorEvent(code, message, fatal=True))
        self._close = (close_code, code)

    # --- output -----------------------------------------------------------------------------

    def _out(self, outputs: list[Output]) -> None:
        for item in outputs:
            if isinstance(item, EngineRequest):
                self._submit.append(item)
                if item.deadline_ms is not None:
                    due = self.now + item.deadline_ms / 1000
                    self.refine_due[refine_key(item)] = (due, item)
            else:
                self._event(item)

    def _event(self, event: Event) -> None:
        """One event for the client: measured, published to the call, encoded in order. After
        `session.closed` (the last event) the connection closes: 1001 when draining."""
        session = self.session
        self.observer.event(event, session.audio_ms if session is not None else 0)
        if self.dialect.call_id:
            self._publish.append(event)
        frames = self.dialect.encode(event)
        if frames:
            self._send += frames
            if self.resumable:
                self.replay.append((self.dialect.seq, frames[-1]))
        if isinstance(event, SessionClosed):
            self._close = (CLOSE_NORMAL if self.drain_at is None else CLOSE_GOING_AWAY, "")

    def _take(self) -> Actions:
        """The actions gathered since the last call (no allocation when there are none)."""
        send, submit, publish, close = self._send, self._submit, self._publish, self._close
        if not (send or submit or publish or close):
            return PAUSED if self.paused else NOTHING
        actions = Actions(send or (), submit or (), publish or (), close, self.paused)
        if send:
            self._send = []
        if submit:
            self._submit = []
        if publish:
            self._publish = []
        self._close = None
        return actions

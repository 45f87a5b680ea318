"""The gateway process: one port for every WebSocket dialect and the plain GET endpoints.

Routes by path. `process_request` answers /healthz, /readyz and /metrics, refuses handshakes at
the session cap (HTTP 503 + Retry-After) or while draining, and checks API keys. The engine loads
in a thread after the port opens, so /healthz answers at once and /readyz turns true when the
model is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import importlib.resources
import json
import logging
import re
import signal
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from engine.api import Engine, ModelLoadError, engine_languages, engine_translations
from engine.remote import RemoteScheduler, SchedulerPool
from engine.scheduler import Scheduler
from streaming.core.captions import to_srt, to_vtt
from streaming.core.close_codes import CLOSE_INTERNAL, CLOSE_RESUME_FAILED
from streaming.core.events import ErrorEvent
from streaming.dialects.audiofork import AudioForkDialect
from streaming.dialects.base import Dialect
from streaming.dialects.deepgram import DeepgramDialect
from streaming.dialects.native import NativeDialect
from streaming.dialects.openai_realtime import OpenAIRealtimeDialect
from streaming.dialects.twilio import TwilioDialect
from streaming.ops import access, admission, auth, limits, tls, tokens
from streaming.ops.config import Config, ConfigError, check_language, check_translation
from streaming.ops.metrics import Metrics
from streaming.transport import audiosocket
from streaming.transport.bus import build_bus
from streaming.transport.calls import CallHub, call_events_id
from streaming.transport.caption_share import caption_store
from streaming.transport.eventloop import loop_name
from streaming.transport.registry import StreamRegistry
from streaming.transport.rest import RestServer
from streaming.transport.websocket import WATCHDOG_S, Connection, ResumeRefused
from streaming.transport.wsserver import Forward, WebSocket, WebSocketServer

log = logging.getLogger("streaming.server")

ROUTES: dict[str, Callable[[], Dialect]] = {
    "/v1/stream": NativeDialect,
    "/v1/realtime": OpenAIRealtimeDialect,
    "/v1/listen": DeepgramDialect,
    "/v1/telephony/twilio": TwilioDialect,
    "/v1/telephony/audiofork": AudioForkDialect,
}
RESUME_PATH = "/v1/stream"  # the dialect whose streams can be resumed (server.resume_window_s)
# A session's pop-on captions so far, running or finished: ?channel=N keeps one channel's cues.
CLIENT_CONFIG_PATH = "/v1/client-config"  # open: {"rest_port", "auth"} for the browser page
CAPTIONS_PATH = re.compile(r"/v1/sessions/([0-9A-Za-z_-]+)/captions\.(vtt|srt)")
CAPTION_FILES = {
    "vtt": (to_vtt, "text/vtt; charset=utf-8"),
    "srt": (to_srt, "application/x-subrip; charset=utf-8"),
}
# The browser page: `/` is index.html, `/web/<name>` the files beside it (no subfolders).
DRAIN_CUT_S = 0.25  # after the drain's deadline, how long cut connections get to end their tasks
WEB_ROOT = importlib.resources.files("clients") / "web"
# A plain, short file name of the page's folder: a long one made is_file() raise (500), and a
# path or a dot file is never served.
WEB_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
WEB_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


@dataclass(frozen=True)
class Worker:
    """This gateway's place among the server's worker processes (server.workers)."""

    index: int
    sessions: admission.SharedCount
    engine_sockets: tuple[str, ...]  # each engine process's unix socket (engine/remote.py)
    # Each worker's unix socket for connections another worker forwards to it (a resume of a
    # stream it holds: resume tokens start with "w<index>.").
    handoff_sockets: tuple[str, ...] = ()
    # Every worker's use of each API key (streams, audio ms, day), for server.key_limits:
    # shared-memory arrays, see streaming/ops/limits.py SharedUse; None without keys.
    key_use: tuple | None = None

    @property
    def resume_prefix(self) -> str:
        return f"w{self.index}."

    def holder(self, resume_token: str) -> str | None:
        """The handoff socket of the worker a resume token names, when it is another's."""
        index, dot, _ = resume_token.partition(".")
        if not dot or not index[1:].isdigit() or not index.startswith("w"):
            return None
        number = int(index[1:])
        if number == self.index or number >= len(self.handoff_sockets):
            return None
        return self.handoff_sockets[number]


class Gateway:
    """Shared state of one server: config, engine and scheduler, metrics, live connections.

    `load_refine_engine`, when given, loads the refine (accuracy pass) model after the primary
    one; the scheduler runs it at the lowest priority."""

    def __init__(
        self,
        config: Config,
        load_engine: Callable[[], Engine],
        load_refine_engine: Callable[[], Engine] | None = None,
        tls_context: ssl.SSLContext | None = None,
        worker: Worker | None = None,
    ) -> None:
        self.config = config
        # One of several gateway processes (server.workers): the engine is another process's,
        # the ports are shared, and sessions are counted across workers.
        self.worker = worker
        # TLS of the WebSocket/HTTP and REST ports (server.tls_cert/tls_key); built by `start`
        # when not given. AudioSocket stays plain TCP: Asterisk speaks no TLS there.
        self.tls = tls_context
        self.load_engine = load_engine
        self.load_refine_engine = load_refine_engine
        self.scheduler: Scheduler | RemoteScheduler | SchedulerPool | None = None
        self.metrics = Metrics()
        self.connections: StreamRegistry[Connection] = StreamRegistry()  # live streams
        self.draining = False
        self.keys = auth.parse_keys(config.server.api_keys)
        self.guard = auth.Guard(self.keys)  # both ports: the same keys and bad-key throttle
        try:  # the proxies whose X-Forwarded-For names the client
            self.trusted_proxies = auth.parse_networks(config.server.trusted_proxies)
        except ValueError as err:
            raise ConfigError(f"server.trusted_proxies: {err}") from None
        # Keys or the tokens they mint (TokenSecretError, a ConfigError, stops start-up), and
        # the keys' stream and audio limits (server.key_limits; none while keys are off).
        secret = tokens.load_secret(config.server.token_secret, config.server.token_secret_file)
        self.access = access.Access(self.guard, tokens.Signer(secret))
        shared_use = None
        if worker is not None and worker.key_use is not None:
            key_ids = [self.access.signer.key_id(key) for key in sorted(self.keys)]
            shared_use = limits.SharedUse(*worker.key_use, worker.index, key_ids)
        self.limits = limits.Limits.build(
            config.server.key_limits, self.keys, self.access.signer.key_id, shared_use
        )
        self.server: WebSocketServer | None = None
        self.watchdog: asyncio.TimerHandle | None = None
        self.engine_error: str | None = None
        self.loading: asyncio.Future | None = None
        self.rest: RestServer | None = None  # POST /v1/audio/transcriptions on server.http_port
        # Call events and caption cues for the other instances (server.redis_url; empty: none).
        self.bus = build_bus(config.server.redis_url)
        self.calls = CallHub(
            config.server.call_subscriber_hold_s,
            config.server.webhook_url,
            config.server.webhook_retries,
            self.bus,
        )
        self.audiosocket: asyncio.Server | None = None
        self.captions = caption_store(
            self.bus, config.server.caption_sessions, config.server.caption_cues
        )

    @property
    def ready(self) -> bool:
        return self.engine_up and not self.draining

    @property
    def engine_up(self) -> bool:
        """The engine takes requests (a worker's engine process may be restarting)."""
        scheduler = self.scheduler
        return scheduler is not None and getattr(scheduler, "available", True)

    def refusal(self, admit: bool = False) -> admission.Refusal | None:
        """Why a new stream cannot start now (None: it can), for handshakes, /readyz and
        AudioSocket calls alike. At the cap, a stream kept only for a resume makes way for a
        client that is here: with `admit` (a stream is starting), the one whose client has been
        gone longest is ended."""
        reason = admission.refusal(
            loaded=self.engine_up,
            draining=self.draining,
            active=self._count_sessions(),
            limit=self.config.server.max_sessions,
        )
        if reason == "capacity":
            waiting = [c for c in self.connections if c.detached and not c.evicted]
            if waiting:
                if admit:
                    min(waiting, key=lambda c: c.protocol.detached_at).evict()
                return None
        return reason

    def _count_sessions(self) -> int:
        """Streams and call subscribers open (subscribers hold sockets too): this process's,
        published for the other workers, or the whole server's with several workers."""
        active = len(self.connections) + self.calls.subscribed
        return active if self.worker is None else self.worker.sessions.total(active)

    async def start(self) -> WebSocketServer:
        server = self.config.server
        shared = self.worker is not None  # other worker processes listen on the same ports
        if self.tls is None and server.tls_cert:  # TlsError before any port opens
            self.tls = tls.server_context(server.tls_cert, server.tls_key)
        self.server = await WebSocketServer(
            self.handle,
            process_request=self.process_request,
            select_subprotocol=_select_subprotocol,
            max_size=server.max_frame_bytes,
            ping_interval=20,
            ping_timeout=20,
        ).start(server.host, server.port, ssl=self.tls, reuse_port=shared)
        if server.audiosocket_port:
            self.audiosocket = await audiosocket.serve(
                self, server.audiosocket_host, server.audiosocket_port, reuse_port=shared
            )
        if server.http_port >= 0:
            self.rest = RestServer(self)
            await self.rest.start(
                server.host, server.http_port, ssl_context=self.tls, reuse_port=shared
            )
        if self.worker is not None:
            if self.worker.handoff_sockets:
                await self.server.serve_unix(self.worker.handoff_sockets[self.worker.index])
            self.loading = asyncio.ensure_future(self._connect_engine(self.worker.engine_sockets))
        else:
            self.loading = asyncio.get_running_loop().run_in_executor(None, self._load)
        await self.bus.start()  # connects in the background: Redis being away delays nothing
        self._watch()
        return self.server

    def reload_tls(self) -> bool:
        """SIGHUP: load server.tls_cert/tls_key again into the live context. New connections get
        the new pair, open ones keep theirs; a bad pair logs a warning and the old one stays."""
        if self.tls is None:
            return False
        return tls.reload(self.tls, self.config.server.tls_cert, self.config.server.tls_key)

    def _watch(self) -> None:
        """Every WATCHDOG_S, each connection checks its clocks: one timer for the server, as
        a timer per stream was a visible cost at hundreds of streams."""
        for connection in list(self.connections):
            connection.watch()
        self.watchdog = asyncio.get_running_loop().call_later(WATCHDOG_S, self._watch)

    def _load(self) -> None:
        try:
            scheduler = build_scheduler(self.config, self.load_engine, self.load_refine_engine)
        except Exception as err:  # reported by /readyz; `run` stops the process with the reason
            self.engine_error = str(err)
            log.info("engine failed to load", extra={"error": self.engine_error})
            return
        self.metrics.watch(scheduler)
        self.scheduler = scheduler

    async def _connect_engine(self, paths: tuple[str, ...]) -> None:
        """A worker's engine is the engine processes' (one per device): wait until each
        answers (they may still be loading the model; a failure to load stops the whole
        server, see streaming/supervisor.py)."""
        members = [RemoteScheduler(path) for path in paths]
        await asyncio.gather(*(member.start(timeout_s=None) for member in members))
        remote = members[0] if len(members) == 1 else SchedulerPool(members)
        self.metrics.watch(remote)
        self.scheduler = remote

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    # --- HTTP ----------------------------------------------------------------------------------

    def process_request(
        self, connection: WebSocket, request: Request
    ) -> Response | Forward | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return _text(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.refusal() is None:
                return _text(http.HTTPStatus.OK, "ready\n")
            why = self.engine_error or ("draining" if self.draining else "not ready")
            return _text(http.HTTPStatus.SERVICE_UNAVAILABLE, f"{why}\n")
        if path == CLIENT_CONFIG_PATH:  # open: where the browser page gets a token
            rest_port = self.rest.port if self.rest is not None else None
            body = json.dumps({"rest_port": rest_port, "auth": self.access.enabled})
            response = _text(http.HTTPStatus.OK, body + "\n", "application/json")
            response.headers["Access-Control-Allow-Origin"] = "*"
            return response
        if path == "/metrics":
            denied = self._denied(connection, request, tokens.METRICS)
            if denied is not None:
                return denied
            return _text(
                http.HTTPStatus.OK,
                self.metrics.render().decode(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        captions = CAPTIONS_PATH.fullmatch(path)
        if captions is not None:
            denied = self._denied(connection, request, tokens.CAPTIONS)
            return denied or self._captions_file(*captions.groups(), request)
        if path == "/" or path.startswith("/web/"):
            return _web_file("index.html" if path == "/" else path[len("/web/") :])
        if path not in ROUTES and call_events_id(path) is None:
            return _text(http.HTTPStatus.NOT_FOUND, f"no such endpoint: {path}\n")
        resume_token = _resume_token(path, request)
        elsewhere = self._resume_elsewhere(resume_token)
        if elsewhere is not None:
            return elsewhere
        scope = tokens.STREAM if path in ROUTES else tokens.CALLS
        denied = self._denied(connection, request, scope)
        if denied is not None:
            return denied
        resuming = resume_token is not None  # the stream it takes over holds its slot already
        reason = self.refusal(admit=not resuming)
        if reason == "capacity" and resuming:
            reason = None
        if reason is not None:
            self.metrics.rejections.labels(reason).inc()
            response = _text(http.HTTPStatus.SERVICE_UNAVAILABLE, f"unavailable: {reason}\n")
            response.headers["Retry-After"] = str(admission.RETRY_AFTER_S)
            return response
        return None

    def _resume_elsewhere(self, token: str | None) -> Forward | None:
        """With several workers, a resume reaches whichever worker the kernel picks: one for
        a stream another worker holds goes to that worker (its credentials are checked
        there)."""
        if self.worker is None or token is None:
            return None
        if self.connections.by_resume_token(token) is not None:
            return None
        holder = self.worker.holder(token)
        return Forward(holder) if holder is not None else None

    def _denied(
        self, connection: WebSocket, request: Request, scope: str = tokens.STREAM
    ) -> Response | None:
        """401 for a missing or wrong API key or token (when keys are set; the body says why),
        429 + Retry-After once the client's address sent too many bad ones, or, for a stream,
        when its key has all its streams open or its day's audio spent; None lets the request
        in (a stream then holds one of its key's slots until its connection ends)."""
        offered = access.offered(
            request.headers.get("Authorization", ""),
            _offered_subprotocols(request.headers),
            urlsplit(request.path).query,
        )
        peer = connection.transport.get_extra_info("peername") if connection.transport else None
        client = auth.client_address(
            str(peer[0]) if peer else "",
            request.headers.get("X-Forwarded-For", ""),
            self.trusted_proxies,
        )
        now = asyncio.get_running_loop().time()
        verdict = self.access.check(offered, client, now, time.time(), scope)
        if isinstance(verdict, access.Denial):
            self.metrics.rejections.labels("auth").inc()
            if verdict.retry_after is None:
                return _text(http.HTTPStatus.UNAUTHORIZED, f"{verdict.reason}\n")
            return _too_many(verdict.reason, verdict.retry_after)
        connection.key_id = verdict.key_id  # a resume must come with the same key
        if scope != tokens.STREAM or verdict.key_id is None:
            return None
        refusal = self.limits.hold(connection, verdict.key_id, verdict.max_streams)
        if refusal is not None:
            self.metrics.rejections.labels("key_limit").inc()
            return _too_many(refusal.reason, refusal.retry_after)
        connection.lost.add_done_callback(lambda _: self.limits.release(connection))
        return None

    def _captions_file(self, session_id: str, kind: str, request: Request) -> Response:
        """The session's cues in programme time (audio time + its timecode_origin_ms)."""
        channel = dict(parse_qsl(urlsplit(request.path).query)).get("channel")
        if channel is not None and channel not in ("0", "1"):
            return _text(http.HTTPStatus.BAD_REQUEST, f"channel must be 0 or 1, got {channel!r}\n")
        try:
            cues, origin = self.captions.cues(session_id, None if channel is None else int(channel))
        except KeyError:
            return _text(
                http.HTTPStatus.NOT_FOUND,
                f"no captions kept for session {session_id}: only sessions with captions_mode "
                f"popon are kept, the last {self.config.server.caption_sessions} of them\n",
            )
        write, content_type = CAPTION_FILES[kind]
        return _text(http.HTTPStatus.OK, write(cues, origin), content_type)

    # --- WebSocket ---------------------------------------------------------------------------

    async def handle(self, ws: WebSocket) -> None:
        parts = urlsplit(ws.request.path)
        call_id = call_events_id(parts.path)
        if call_id is not None:
            await self.calls.serve(ws, call_id)
            return
        query = _query(parts.query)
        if parts.path == RESUME_PATH and "resume" in query:
            await self._resume(ws, query)
            return
        dialect = ROUTES[parts.path]()
        await self.run_connection(ws, dialect, query)

    async def _resume(self, ws: WebSocket, query: dict[str, str]) -> None:
        """`/v1/stream?resume=TOKEN&last_seq=N`: take over a stream whose client went away
        within server.resume_window_s; an unknown token, an ended stream or a bad last_seq
        gets `error` resume_failed and close 4005."""
        connection = self.connections.by_resume_token(query["resume"])
        last_seq = query.get("last_seq", "0")
        try:
            if connection is None:
                raise ResumeRefused(
                    "no session to resume with this token: unknown, or ended (a session is "
                    f"kept {self.config.server.resume_window_s:g} s after its client goes)"
                )
            if ws.key_id != connection.key_id:
                raise ResumeRefused("the session was opened with another API key")
            if not last_seq.isdigit():
                raise ResumeRefused(f"last_seq must be a whole number, got {last_seq!r}")
            await connection.resume(ws, int(last_seq))
        except ResumeRefused as err:
            self.metrics.rejections.labels("resume").inc()
            refusal = ErrorEvent("resume_failed", str(err), fatal=True)
            with contextlib.suppress(ConnectionClosed):
                for frame in NativeDialect().encode(refusal):
                    await ws.send(frame)
                await ws.close(CLOSE_RESUME_FAILED, "resume_failed")

    async def run_connection(
        self,
        ws: WebSocket | audiosocket.AudioSocketStream,
        dialect: Dialect,
        query: dict[str, str],
    ) -> None:
        """Drive one stream: a WebSocket, or an AudioSocket call through its adapter."""
        connection = Connection(
            ws,
            dialect,
            query,
            self.config,
            self.scheduler,
            self.metrics,
            self.calls,
            captions=self.captions,
            quota=self.limits.meter(ws),  # its key's audio allowance (None: unlimited)
            resume_prefix="" if self.worker is None else self.worker.resume_prefix,
        )
        connection.on_end = self._ended  # after its last link, or its resume window
        self.connections.register(connection)
        self._count_sessions()
        self.metrics.sessions.labels(dialect.name).inc()
        self.metrics.sessions_active.inc()
        try:
            await connection.run()
        except Exception:
            log.exception("connection failed", extra={"session": connection.id})
            await ws.close(CLOSE_INTERNAL, "internal error")

    def _ended(self, connection: Connection) -> None:
        self.connections.unregister(connection)
        self._count_sessions()
        self.metrics.sessions_active.dec()

    async def drain(self) -> None:
        """Refuse new streams, flush every open one, deliver its finals, then stop, all within
        `server.drain_grace_s`: a client that never reads its close frame (or keeps streaming)
        must not hold the exit past it, so what is still open at the deadline is cut."""
        self.draining = True
        loop = asyncio.get_running_loop()
        grace = self.config.server.drain_grace_s
        deadline = loop.time() + grace
        if self.audiosocket is not None:
            self.audiosocket.close()
        rest = [self.rest.stop()] if self.rest is not None else []

        async def settle() -> None:
            await asyncio.gather(*(c.drain(grace) for c in list(self.connections)), *rest)
            await self.calls.aclose(max(0.0, deadline - loop.time()))

        settling = asyncio.ensure_future(settle())
        await asyncio.wait((settling,), timeout=grace)
        self.server.close()
        await self.server.wait_closed(max(0.0, deadline - loop.time()))
        if not settling.done() or self.server.connections:  # the deadline: cut what is open
            for connection in list(self.connections):
                connection.ws.transport.abort()
            self.server.abort()
            await asyncio.wait((settling,), timeout=DRAIN_CUT_S)
            settling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await settling
        await self.bus.aclose(max(0.0, deadline - loop.time()))  # the calls' ends, queued cues
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.scheduler is not None:
            self.scheduler.stop(timeout=max(0.0, deadline - loop.time()))
        elif self.loading is not None:
            self.loading.cancel()


def build_scheduler(
    config: Config,
    load_engine: Callable[[], Engine],
    load_refine_engine: Callable[[], Engine] | None = None,
) -> Scheduler:
    """Load the model (and the refine model), check that they serve the configured defaults,
    and start their scheduler; raises ModelLoadError with the reason in one line. Run by the
    gateway, or by the engine process of a server with several workers."""
    refine: Engine | None = None
    try:
        engine = _load_checked(config, load_engine)
        if load_refine_engine is not None:
            try:
                refine = _load_checked(config, load_refine_engine)
            except Exception as err:  # named, as a start-up failure must say which model
                raise ModelLoadError(
                    f"cannot load refine model {config.engine.refine_model!r}: "
                    f"{_load_failure(err)}"
                ) from err
        check_translation(
            config.session.translate_to,
            None if refine is None else engine_translations(refine),
            "session.translate_to",
        )
    except Exception as err:
        raise ModelLoadError(_load_failure(err)) from err
    scheduler = Scheduler(
        engine, config.scheduler, max_batch=config.engine.max_batch, refine_engine=refine
    )
    scheduler.start()
    log.info(
        "engine ready",
        extra={
            "family": engine.family,
            "device": engine.device,
            "refine_family": refine.family if refine is not None else None,
        },
    )
    return scheduler


def _load_checked(config: Config, load: Callable[[], Engine]) -> Engine:
    """Load a model that must transcribe the default language: every stream starts from it, so
    a model without it would serve none."""
    engine = load()
    check_language(config.session.language, engine_languages(engine), "session.language")
    return engine


def _load_failure(err: Exception) -> str:
    """A load failure in one line: a ModelLoadError says it all, anything else gets its type."""
    return str(err) if isinstance(err, ModelLoadError) else f"{type(err).__name__}: {err}"


def _query(text: str) -> dict[str, str]:
    """Query parameters; a repeated one (`keyterm=a&keyterm=b`) becomes a comma-joined list."""
    values: dict[str, list[str]] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        values.setdefault(key, []).append(value)
    return {key: ",".join(items) for key, items in values.items()}


def _too_many(reason: str, retry_after: int) -> Response:
    response = _text(http.HTTPStatus.TOO_MANY_REQUESTS, f"{reason}\n")
    response.headers["Retry-After"] = str(retry_after)
    return response


def _text(status: http.HTTPStatus, body: str, content_type: str = "text/plain; charset=utf-8"):
    headers = Headers([("Content-Type", content_type), ("Connection", "close")])
    return Response(status.value, status.phrase, headers, body.encode())


def _web_file(name: str) -> Response:
    """A file of the page's folder by plain name, so no path can leave the folder."""
    kind = WEB_TYPES.get(name[name.rfind(".") :]) if "." in name else None
    file = WEB_ROOT / name
    if kind is None or not WEB_NAME.fullmatch(name) or not file.is_file():
        return _text(http.HTTPStatus.NOT_FOUND, f"no such file: {name}\n")
    headers = Headers(
        [("Content-Type", kind), ("Cache-Control", "no-cache"), ("Connection", "close")]
    )
    return Response(http.HTTPStatus.OK.value, http.HTTPStatus.OK.phrase, headers, file.read_bytes())


def _resume_token(path: str, request: Request) -> str | None:
    """The `resume` token of a request to resume a stream, else None."""
    if path != RESUME_PATH:
        return None
    return dict(parse_qsl(urlsplit(request.path).query)).get("resume")


def _offered_subprotocols(headers: Headers) -> list[str]:
    values = headers.get_all("Sec-WebSocket-Protocol")
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _select_subprotocol(connection: WebSocket, offered: Sequence[str]) -> str | None:
    """Answer `token.TOKEN` to a browser that sent a token that way, or `token` (or `bearer`)
    to one that sent its key as subprotocols (a browser drops a connection whose server picks
    none of those it offered); other clients continue without a subprotocol."""
    return access.token_subprotocol(offered) or next(
        (name for name in offered if name.lower() in auth.AUTH_SUBPROTOCOLS), None
    )


async def run(
    config: Config,
    load_engine: Callable[[], Engine],
    on_ready: Callable[[Gateway], None] | None = None,
    load_refine_engine: Callable[[], Engine] | None = None,
    tls_context: ssl.SSLContext | None = None,
    worker: Worker | None = None,
) -> str | None:
    """Serve until SIGTERM/SIGINT, then drain; with TLS on, SIGHUP reloads the certificate.
    Returns the reason when the engine (or the refine engine, when `load_refine_engine` is given)
    could not be loaded (the process should exit with an error), else None. `on_ready` is called
    once the models are loaded (the port answers /healthz before that)."""
    gateway = Gateway(config, load_engine, load_refine_engine, tls_context, worker)
    await gateway.start()
    http_port = gateway.rest.port if gateway.rest is not None else None
    loop = asyncio.get_running_loop()
    log.info(
        "listening",
        extra={
            "host": config.server.host,
            "port": gateway.port,
            "http_port": http_port,
            "tls": gateway.tls is not None,
            "event_loop": loop_name(loop),
        },
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if gateway.tls is not None:
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_tls)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((stopping, gateway.loading), return_when=asyncio.FIRST_COMPLETED)
    if gateway.engine_error is None:
        if gateway.scheduler is not None and on_ready is not None:
            on_ready(gateway)
        await stopping
    stopping.cancel()
    log.info("draining", extra={"sessions": len(gateway.connections)})
    await gateway.drain()
    return gateway.engine_error

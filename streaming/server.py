"""The gateway process: one port for every WebSocket dialect and the plain GET endpoints.

Routes by path. `process_request` answers /healthz, /readyz and /metrics, refuses handshakes at
the session cap (HTTP 503 + Retry-After) or while draining, and checks API keys. The engine loads
in a thread after the port opens, so /healthz answers at once and /readyz turns true when the
model is ready.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import logging
import signal
from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from engine.api import Engine
from engine.scheduler import Scheduler, SchedulerConfig
from streaming.config import Config
from streaming.dialects.base import Dialect
from streaming.dialects.native import NativeDialect
from streaming.gateway import Connection
from streaming.metrics import Metrics

log = logging.getLogger("streaming.server")

ROUTES: dict[str, Callable[[], Dialect]] = {
    "/v1/stream": NativeDialect,
}
RETRY_AFTER_S = 5


class Gateway:
    """Shared state of one server: config, engine and scheduler, metrics, live connections."""

    def __init__(self, config: Config, load_engine: Callable[[], Engine]) -> None:
        self.config = config
        self.load_engine = load_engine
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics()
        self.connections: set[Connection] = set()
        self.draining = False
        self.keys = {k.strip() for k in config.server.api_keys.split(",") if k.strip()}
        self.server: Server | None = None
        self.engine_error: str | None = None
        self.loading: asyncio.Future | None = None

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and not self.draining

    async def start(self) -> Server:
        server = self.config.server
        self.server = await serve(
            self.handle,
            server.host,
            server.port,
            process_request=self.process_request,
            max_size=server.max_frame_bytes,
            ping_interval=20,
            ping_timeout=20,
        )
        self.loading = asyncio.get_running_loop().run_in_executor(None, self._load)
        return self.server

    def _load(self) -> None:
        try:
            engine = self.load_engine()
        except Exception as err:  # reported by /readyz and the log; the process keeps serving
            self.engine_error = f"{type(err).__name__}: {err}"
            log.error("engine failed to load", extra={"error": self.engine_error})
            return
        scheduler = Scheduler(
            engine,
            SchedulerConfig(
                max_batch=self.config.engine.max_batch,
                **dataclasses.asdict(self.config.scheduler),
            ),
        )
        scheduler.start()
        self.metrics.watch(scheduler)
        self.scheduler = scheduler
        log.info("engine ready", extra={"family": engine.family, "device": engine.device})

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    # --- HTTP ----------------------------------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return _text(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.ready and len(self.connections) < self.config.server.max_sessions:
                return _text(http.HTTPStatus.OK, "ready\n")
            why = self.engine_error or ("draining" if self.draining else "not ready")
            return _text(http.HTTPStatus.SERVICE_UNAVAILABLE, f"{why}\n")
        if path == "/metrics":
            return _text(
                http.HTTPStatus.OK,
                self.metrics.render().decode(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        if path not in ROUTES:
            return _text(http.HTTPStatus.NOT_FOUND, f"no such endpoint: {path}\n")
        if self.keys and _api_key(request) not in self.keys:
            self.metrics.rejections.labels("auth").inc()
            return _text(http.HTTPStatus.UNAUTHORIZED, "missing or invalid API key\n")
        if not self.ready or len(self.connections) >= self.config.server.max_sessions:
            reason = (
                "draining"
                if self.draining
                else ("loading" if self.scheduler is None else "capacity")
            )
            self.metrics.rejections.labels(reason).inc()
            response = _text(http.HTTPStatus.SERVICE_UNAVAILABLE, f"unavailable: {reason}\n")
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
        return None

    # --- WebSocket ---------------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        parts = urlsplit(ws.request.path)
        dialect = ROUTES[parts.path]()
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        connection = Connection(ws, dialect, query, self.config, self.scheduler, self.metrics)
        self.connections.add(connection)
        self.metrics.sessions.labels(dialect.name).inc()
        self.metrics.sessions_active.inc()
        try:
            await connection.run()
        except Exception:
            log.exception("connection failed", extra={"session": connection.id})
            await ws.close(1011, "internal error")
        finally:
            self.connections.discard(connection)
            self.metrics.sessions_active.dec()

    async def drain(self) -> None:
        """Refuse new streams, flush every open one, deliver its finals, then stop."""
        self.draining = True
        grace = self.config.server.drain_grace_s
        await asyncio.gather(*(c.drain(grace) for c in list(self.connections)))
        self.server.close()
        await self.server.wait_closed()
        if self.scheduler is not None:
            self.scheduler.stop(timeout=grace)


def _text(status: http.HTTPStatus, body: str, content_type: str = "text/plain; charset=utf-8"):
    headers = Headers([("Content-Type", content_type), ("Connection", "close")])
    return Response(status.value, status.phrase, headers, body.encode())


def _api_key(request: Request) -> str | None:
    """`Authorization: Bearer KEY` (or `Token KEY`), else `?api_key=KEY` for clients that
    cannot set headers."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    return dict(parse_qsl(urlsplit(request.path).query)).get("api_key")


async def run(config: Config, load_engine: Callable[[], Engine]) -> str | None:
    """Serve until SIGTERM/SIGINT, then drain. Returns the reason when the engine could not be
    loaded (the process should exit with an error), else None."""
    gateway = Gateway(config, load_engine)
    await gateway.start()
    log.warning("listening", extra={"host": config.server.host, "port": gateway.port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((stopping, gateway.loading), return_when=asyncio.FIRST_COMPLETED)
    if gateway.engine_error is None:
        await stopping
    stopping.cancel()
    log.warning("draining", extra={"sessions": len(gateway.connections)})
    await gateway.drain()
    return gateway.engine_error

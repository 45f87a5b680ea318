"""The scheduler of another process, over a unix socket: one engine process per device serves
several gateway processes (`server.workers`), and stays the single owner of batching.

`serve` runs in the engine process beside its `Scheduler`: each gateway connection sends
requests and cancels, and gets back outcomes and, a few times a second, a snapshot of the
scheduler's counters and backlog (so `status` messages and metrics read them locally).
`RemoteScheduler` is what a gateway process holds instead of a `Scheduler`: the same calls
(`submit`, `cancel`, `backlog`, `stats`, `engine`, `refine_engine`), answered through the
socket. A request's audio crosses once; results come back through its `on_done`, as from a
local scheduler. When the engine process goes, every request in flight fails with a reason
and the gateway reports not ready until a new engine process answers.

Frames are length-prefixed pickles: both ends are this program, on one machine, as one user
(the socket lives in a private directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import pickle
import struct
from collections.abc import Hashable
from dataclasses import dataclass

from .api import Engine, engine_languages, engine_translations
from .scheduler import Outcome, Request, Scheduler, SchedulerStats

log = logging.getLogger("engine.remote")

HEADER = struct.Struct("!I")  # frame length
STATS_EVERY_S = 0.25  # how often the engine process sends its counters and backlog
RECONNECT_S = 0.2  # how often a gateway tries to reach a (re)starting engine process


@dataclass(frozen=True)
class EngineInfo:
    """What a gateway needs to know of a model it does not hold (see engine/api.py)."""

    family: str
    device: str
    languages: frozenset[str] | None
    translations: frozenset[str]

    @classmethod
    def of(cls, engine: Engine) -> EngineInfo:
        return cls(
            engine.family, str(engine.device), engine_languages(engine), engine_translations(engine)
        )


async def _send(writer: asyncio.StreamWriter, message: tuple) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(HEADER.pack(len(data)) + data)
    await writer.drain()


async def _receive(reader: asyncio.StreamReader) -> tuple:
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    return pickle.loads(await reader.readexactly(size))


# --- the engine process --------------------------------------------------------------------


async def serve(scheduler: Scheduler, path: str) -> None:
    """Serve `scheduler` to gateway processes on the unix socket `path` until cancelled."""
    info = (
        EngineInfo.of(scheduler.engine),
        None if scheduler.refine_engine is None else EngineInfo.of(scheduler.refine_engine),
    )

    handlers: set[asyncio.Task] = set()

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[tuple] = asyncio.Queue()
        keys: set[Hashable] = set()  # this gateway's segments, cancelled when it goes

        def answer(request_id: int, outcome: Outcome) -> None:  # on the scheduler's thread
            reply = ("done", request_id, outcome.status, outcome.hypothesis, outcome.reason)
            reply += (outcome.queue_ms, outcome.compute_ms, outcome.batch_size)
            loop.call_soon_threadsafe(outbox.put_nowait, reply)

        async def write() -> None:
            await _send(writer, ("info", *info))
            while True:
                try:
                    message = await asyncio.wait_for(outbox.get(), STATS_EVERY_S)
                except TimeoutError:
                    message = ("stats", _snapshot(scheduler.stats), scheduler.backlog())
                await _send(writer, message)

        writing = asyncio.create_task(write())
        try:
            while True:
                message = await _receive(reader)
                if message[0] == "submit":
                    _, request_id, kind, key, segment, first_text, deadline = message
                    keys.add(key)
                    scheduler.submit(
                        Request(
                            kind,
                            key,
                            segment,
                            lambda outcome, rid=request_id: answer(rid, outcome),
                            first_text=first_text,
                            deadline=deadline,
                        )
                    )
                elif message[0] == "cancel":
                    keys.discard(message[1])
                    scheduler.cancel(message[1])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the gateway process went
        except asyncio.CancelledError:
            pass  # the engine process stops: closing the socket tells the gateway
        finally:
            writing.cancel()
            for key in keys:
                scheduler.cancel(key)
            writer.close()
            handlers.discard(asyncio.current_task())

    server = await asyncio.start_unix_server(gateway, path)
    try:
        async with server:
            await server.serve_forever()
    finally:
        for handler in list(handlers):
            handler.cancel()


def _snapshot(stats: SchedulerStats) -> SchedulerStats:
    """A copy of counters the scheduler's thread keeps changing (a dict may grow while it is
    copied: try again)."""
    while True:
        try:
            return copy.deepcopy(stats)
        except RuntimeError:
            continue


# --- a gateway process ---------------------------------------------------------------------


class RemoteScheduler:
    """A `Scheduler` in the engine process, seen from a gateway process (see module doc)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.engine: EngineInfo | None = None
        self.refine_engine: EngineInfo | None = None
        self.stats = SchedulerStats()
        self._backlog = (0.0, 0.0)
        self._ids = itertools.count()
        self._pending: dict[int, Request] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def available(self) -> bool:
        """The engine process answers (requests can be submitted)."""
        return self._writer is not None

    async def start(self, timeout_s: float) -> None:
        """Connect, and keep reconnecting whenever the engine process goes; returns once the
        engine process has answered (TimeoutError after `timeout_s`)."""
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    async def _run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            try:
                await self._serve(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()
            self._lost()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, self.engine, self.refine_engine = await _receive(reader)
        self._writer = writer
        self._connected.set()
        log.info("engine process connected", extra={"path": self.path})
        while True:
            message = await _receive(reader)
            if message[0] == "done":
                _, request_id, status, hypothesis, reason, queue_ms, compute_ms, size = message
                request = self._pending.pop(request_id, None)
                if request is not None:
                    outcome = Outcome(
                        request, status, hypothesis, reason, queue_ms, compute_ms, size
                    )
                    request.on_done(outcome)
            elif message[0] == "stats":
                self.stats, self._backlog = message[1], message[2]

    def _lost(self) -> None:
        """The engine process went: what it had in hand fails now, not at some timeout."""
        self._writer = None
        self._connected.clear()
        pending, self._pending = self._pending, {}
        if pending:
            log.warning("engine process lost", extra={"requests_failed": len(pending)})
        for request in pending.values():
            request.on_done(Outcome(request, "failed", reason="engine process stopped"))

    def submit(self, request: Request) -> None:
        """As `Scheduler.submit`. Its `deadline` (time.monotonic) keeps its meaning in the
        engine process: CLOCK_MONOTONIC is one clock per machine."""
        if self._writer is None:
            request.on_done(Outcome(request, "failed", reason="engine process not running"))
            return
        request_id = next(self._ids)
        self._pending[request_id] = request
        self._write(
            (
                "submit",
                request_id,
                request.kind,
                request.key,
                request.segment,
                request.first_text,
                request.deadline,
            )
        )

    def cancel(self, key: Hashable) -> None:
        if self._writer is not None:
            self._write(("cancel", key))

    def _write(self, message: tuple) -> None:
        """Queue a frame without waiting (the transport buffers it; the engine process reads
        as fast as it batches)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(HEADER.pack(len(data)) + data)

    def backlog(self) -> tuple[float, float]:
        return self._backlog

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered: how loaded this engine is."""
        return len(self._pending)

    def queue_lengths(self) -> dict[str, int]:
        return {"in_flight": self.in_flight}

    def stop(self, timeout: float | None = None) -> None:
        """The gateway is done with it (the engine process has its own lifetime)."""
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()



class SchedulerPool:
    """Several engine processes (one per device, `engine.device: cuda:0,cuda:1`) seen as one
    scheduler: a segment's requests go to one engine (a partial or final supersedes the
    segment's pending partial there), chosen as the least loaded when its first request comes;
    refine work and other segments spread the same way."""

    def __init__(self, members: list[RemoteScheduler]) -> None:
        self.members = members
        self._homes: dict[Hashable, RemoteScheduler] = {}  # open segment -> its engine

    @property
    def engine(self) -> EngineInfo | None:
        return self.members[0].engine

    @property
    def refine_engine(self) -> EngineInfo | None:
        return self.members[0].refine_engine

    @property
    def available(self) -> bool:
        return any(member.available for member in self.members)

    @property
    def stats(self) -> SchedulerStats:
        """Every engine's counters, summed (batch sizes: all of them)."""
        total = SchedulerStats()
        for stats in (member.stats for member in self.members):
            for name in ("batches", "completed", "dropped", "refine_skipped"):
                mine = getattr(total, name)
                for key, value in getattr(stats, name).items():
                    mine[key] = mine.get(key, 0) + value
            total.failed += stats.failed
            total.refine_failed += stats.refine_failed
            total.batch_sizes.extend(stats.batch_sizes)
            total.audio_seconds += stats.audio_seconds
            total.compute_seconds += stats.compute_seconds
        return total

    def submit(self, request: Request) -> None:
        home = self._homes.get(request.key)
        if home is None or not home.available:
            up = [member for member in self.members if member.available] or self.members
            home = min(up, key=lambda member: member.in_flight)
        if request.kind == "final":
            self._homes.pop(request.key, None)  # the segment's last request
        elif request.kind == "partial":
            self._homes[request.key] = home
        home.submit(request)

    def cancel(self, key: Hashable) -> None:
        home = self._homes.pop(key, None)
        for member in [home] if home is not None else self.members:
            member.cancel(key)

    def backlog(self) -> tuple[float, float]:
        """The longest wait of any engine's oldest final, and all the queued audio."""
        backlogs = [member.backlog() for member in self.members]
        return max(lag for lag, _ in backlogs), sum(queued for _, queued in backlogs)

    def queue_lengths(self) -> dict[str, int]:
        return {"in_flight": sum(member.in_flight for member in self.members)}

    def stop(self, timeout: float | None = None) -> None:
        for member in self.members:
            member.stop(timeout)

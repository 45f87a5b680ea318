"""`server.workers` above 1: N gateway processes and one engine process on one machine.

One event-loop thread saturates near 600 streams, and a gateway sharing its process with the
model shares the GIL with the model's Python code. So the supervisor (this process) starts:

- one engine process per device (`engine.device: cuda:0,cuda:1`): loads the models, runs the
  `Scheduler` (the single owner of batching on its device), and serves it on a unix socket
  (engine/remote.py); a worker sends each segment to the least loaded one;
- N gateway workers: each a whole gateway (every port, dialect and endpoint) listening on the
  same ports with SO_REUSEPORT, so the kernel spreads connections over them; their engine is a
  `RemoteScheduler`. `max_sessions` counts streams of every worker (shared memory), /metrics
  reports the whole server (prometheus_client's multiprocess mode), and SIGTERM drains every
  worker before the engine process stops.

A worker that dies loses only its own streams and is started again; an engine process that
dies fails the requests it held (each stream gets an `error`), the workers report not ready
while it is down, and it is started again. A model that cannot load stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import queue
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from prometheus_client import multiprocess

from streaming.ops import auth
from streaming.ops.config import Config

log = logging.getLogger("streaming.supervisor")

POLL_S = 0.2  # how often the supervisor looks at its processes and messages
STOP_MARGIN_S = 5.0  # beyond drain_grace_s, how long a worker may take to exit before a kill
ENGINE_STOP_S = 30.0  # how long the engine process may take to finish its queued finals
RESTART_PAUSE_S = 1.0  # between a process dying and its restart (no tight crash loop)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies


def worker_count(setting: str) -> int:
    """`server.workers`: a number, or `auto` (one per CPU core)."""
    return os.cpu_count() or 1 if setting == "auto" else int(setting)


def reserve_ports(config: Config) -> tuple[Config, list[socket.socket]]:
    """Turn every port 0 (any free port) into one port that all workers share: bind it once
    here with SO_REUSEPORT (without listening, so no connection comes to it) and keep that
    socket until the server stops, so the port stays ours."""
    server = config.server
    held: list[socket.socket] = []

    def reserve(port: int) -> int:
        if port != 0:
            return port
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((server.host, 0))
        held.append(sock)
        return sock.getsockname()[1]

    changed = dataclasses.replace(
        server,
        port=reserve(server.port),
        http_port=reserve(server.http_port) if server.http_port >= 0 else server.http_port,
        audiosocket_port=server.audiosocket_port and reserve(server.audiosocket_port),
    )
    return dataclasses.replace(config, server=changed), held


def shared_token_secret(config: Config) -> Config:
    """Every worker must sign and check tokens with one secret: without a configured one, one
    is drawn here for this run (a single process would draw its own)."""
    server = config.server
    if server.token_secret or server.token_secret_file:
        return config
    secret = secrets.token_hex(32)
    return dataclasses.replace(config, server=dataclasses.replace(server, token_secret=secret))


# --- the child processes (started with `spawn`: a fresh interpreter, no inherited threads) ---


def _follow_parent(parent: int) -> None:
    """A child must not outlive a supervisor that was killed (SIGKILL gives it no chance to
    stop us): on Linux the kernel sends us SIGTERM when the parent dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def engine_main(
    config: Config, path: str, messages: multiprocessing.Queue, parent: int
) -> None:
    """The engine process: load the models, then serve the scheduler until SIGTERM."""
    from engine import remote, selection
    from streaming.ops.logs import setup_logging
    from streaming.server import build_scheduler

    setup_logging(config.logging)
    _follow_parent(parent)
    refine = config.engine.refine
    try:
        scheduler = build_scheduler(
            config,
            lambda: selection.load_engine(**config.engine.load_keywords()),
            None if refine is None else lambda: selection.load_engine(
                **config.engine.load_keywords(refine)
            ),
        )
    except Exception as err:  # the reason, in one line, for the supervisor to print
        messages.put(("engine_failed", str(err)))
        return

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor says when
        serving = asyncio.create_task(remote.serve(scheduler, path))
        messages.put(("engine_ready", scheduler.engine.device))
        await stop.wait()
        serving.cancel()

    asyncio.run(serve())
    scheduler.stop(timeout=ENGINE_STOP_S)  # the queued finals first


def worker_main(
    config: Config,
    index: int,
    slots,  # multiprocessing.RawArray of session counts, one per worker
    paths: tuple[str, ...],
    handoffs: tuple[str, ...],
    key_use: tuple | None,
    messages: multiprocessing.Queue,
    ready_lines: Callable[[object], list[str]] | None,
    parent: int,
) -> None:
    """A gateway worker: serve until SIGTERM, then drain."""
    from streaming import server
    from streaming.ops.admission import SharedCount
    from streaming.ops.logs import setup_logging
    from streaming.transport import eventloop

    setup_logging(config.logging)
    _follow_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which says
    worker = server.Worker(index, SharedCount(slots, index), paths, handoffs, key_use)

    def on_ready(gateway) -> None:
        lines = ready_lines(gateway) if ready_lines is not None else []
        messages.put(("ready", index, lines))

    run = eventloop.runner(config.server.event_loop)
    run(server.run(config, _no_local_engine, on_ready=on_ready, worker=worker))


def _no_local_engine():
    raise RuntimeError("a worker's engine is the engine process's")


# --- the supervisor --------------------------------------------------------------------------


class Supervisor:
    """Starts, watches, restarts and stops the engine process and the workers."""

    def __init__(
        self, config: Config, workers: int, ready_lines: Callable[[object], list[str]]
    ) -> None:
        self.config = config
        self.count = workers
        self.ready_lines = ready_lines
        self.context = multiprocessing.get_context("spawn")
        self.messages = self.context.Queue()
        self.slots = self.context.RawArray("i", workers)
        keys = len(auth.parse_keys(config.server.api_keys))  # server.key_limits, per key
        self.key_use = (
            (
                self.context.RawArray("i", workers * keys),
                self.context.RawArray("d", workers * keys),
                self.context.RawArray("i", workers),
            )
            if keys
            else None
        )
        self.folder = tempfile.mkdtemp(prefix="streamscribe-")  # 0700: ours alone
        self.devices = config.engine.device.split(",")
        self.engine_sockets = tuple(
            os.path.join(self.folder, f"engine-{index}.sock") for index in range(len(self.devices))
        )
        self.engines: list[BaseProcess | None] = [None] * len(self.devices)
        self.handoff_sockets = tuple(
            os.path.join(self.folder, f"worker-{index}.sock") for index in range(workers)
        )
        self.workers: list[BaseProcess | None] = [None] * workers
        self.stopping = False

    def run(self) -> str | None:
        """Serve until SIGTERM/SIGINT; the reason when the model could not load, else None."""
        metrics = os.path.join(self.folder, "metrics")
        os.mkdir(metrics)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics  # read by each child at start
        config, held = reserve_ports(self.config)
        self.config = shared_token_secret(config)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._forward_hangup)
        try:
            for index in range(len(self.devices)):
                self._start_engine(index)
            for index in range(self.count):
                self._start_worker(index)
            return self._watch()
        finally:
            self._shutdown()
            for sock in held:
                sock.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _forward_hangup(self, signum: int, frame: object) -> None:
        for process in self.workers:  # SIGHUP: each worker reloads its TLS pair
            if process is not None and process.is_alive():
                os.kill(process.pid, signal.SIGHUP)

    def _start_engine(self, index: int) -> None:
        path = self.engine_sockets[index]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        engine = dataclasses.replace(self.config.engine, device=self.devices[index])
        process = self.context.Process(
            target=engine_main,
            args=(
                dataclasses.replace(self.config, engine=engine),
                path,
                self.messages,
                os.getpid(),
            ),
            name=f"streamscribe-engine-{index}",
        )
        process.start()
        self.engines[index] = process
        log.info("engine process started", extra={"pid": process.pid, "device": engine.device})

    def _start_worker(self, index: int) -> None:
        self.slots[index] = 0
        if self.key_use is not None:  # a dead worker's streams are gone; its audio counts
            streams, _, _ = self.key_use
            width = len(streams) // self.count
            streams[index * width : (index + 1) * width] = [0] * width
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.handoff_sockets[index])
        process = self.context.Process(
            target=worker_main,
            args=(
                self.config,
                index,
                self.slots,
                self.engine_sockets,
                self.handoff_sockets,
                self.key_use,
                self.messages,
                self.ready_lines if index == 0 else None,
                os.getpid(),
            ),
            name=f"streamscribe-worker-{index}",
        )
        process.start()
        self.workers[index] = process
        log.info("worker started", extra={"worker": index, "pid": process.pid})

    def _watch(self) -> str | None:
        ready: set[int] = set()
        announced = False
        lines: list[str] = []
        while not self.stopping:
            try:
                message = self.messages.get(timeout=POLL_S)
            except queue.Empty:
                message = None
            if message is not None:
                if message[0] == "engine_failed":
                    return message[1]
                if message[0] == "ready":
                    ready.add(message[1])
                    lines = message[2] or lines
                if message[0] == "engine_ready" and announced:
                    log.warning("engine process restarted")
            if not announced and len(ready) == self.count:
                announced = True
                print("\n".join(self._summary(lines)), flush=True)
            self._restart_the_dead()
        return None

    def _summary(self, lines: list[str]) -> list[str]:
        engines = len(self.devices)
        note = (
            f"  workers   {self.count} gateway process{'es' if self.count > 1 else ''} on these "
            "ports, "
            + ("one engine process" if engines == 1 else f"{engines} engine processes")
            + " (server.workers)"
        )
        return [*lines[:1], note, *lines[1:]]

    def _restart_the_dead(self) -> None:
        for index, engine in enumerate(self.engines):
            if engine is None or engine.is_alive() or self.stopping:
                continue
            log.warning(
                "engine process died; starting it again",
                extra={"device": self.devices[index], "exit": engine.exitcode},
            )
            time.sleep(RESTART_PAUSE_S)
            self._start_engine(index)
        for index, process in enumerate(self.workers):
            if process is None or process.is_alive() or self.stopping:
                continue
            log.warning(
                "worker died; starting it again", extra={"worker": index, "exit": process.exitcode}
            )
            multiprocess.mark_process_dead(process.pid)
            self._start_worker(index)

    def _shutdown(self) -> None:
        """Drain every worker (SIGTERM: each delivers its streams' last finals within
        drain_grace_s), then let the engine process finish and stop."""
        self.stopping = True
        live = [p for p in self.workers if p is not None and p.is_alive()]
        for process in live:
            os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.drain_grace_s + STOP_MARGIN_S
        for process in live:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        engines = [p for p in self.engines if p is not None and p.is_alive()]
        for engine in engines:
            os.kill(engine.pid, signal.SIGTERM)
        deadline = time.monotonic() + ENGINE_STOP_S
        for engine in engines:
            engine.join(max(0.0, deadline - time.monotonic()))
            if engine.is_alive():
                engine.kill()
                engine.join()


def serve(config: Config, workers: int, ready_lines: Callable[[object], list[str]]) -> str | None:
    """Run the server as `workers` gateway processes and one engine process (see the module
    doc); returns the reason when the model could not load, else None."""
    if not config.server.redis_url:
        print(
            "streamscribe: note: with several workers, call events and caption exports reach "
            "only the worker that holds the call; set server.redis_url to share them",
            file=sys.stderr,
        )
    return Supervisor(config, workers, ready_lines).run()

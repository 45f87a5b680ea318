"""`streamscribe serve` in its own process for soak and fuzz runs: a crash there is an exit
status, not a dead test process; its ERROR log lines are collected as they come; its memory,
file descriptors and threads are read from /proc."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.fuzzing import ErrorLog

REPO = Path(__file__).resolve().parents[1]
# `streamscribe serve` as the tests run it: from the checkout, logging JSON records at info
SERVE = [sys.executable, "-m", "streaming", "--log-level", "info", "serve"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Usage:
    """One sample of the server process's resources."""

    rss_kb: int
    fds: int
    threads: int


def usage(pid: int) -> Usage:
    """RSS (VmRSS), open file descriptors (/proc/PID/fd) and threads of a Linux process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return Usage(
        rss_kb=int(fields["VmRSS"].split()[0]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(fields["Threads"]),
    )


@dataclass
class ServerProcess:
    """A running server: its ports, its collected errors and its last stderr lines."""

    proc: subprocess.Popen
    port: int
    http_port: int
    audiosocket_port: int
    errors: ErrorLog = field(default_factory=ErrorLog)
    tail: list[str] = field(default_factory=list)
    warnings: int = 0  # Python warnings printed on stderr (not errors)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def usage(self) -> Usage:
        return usage(self.pid)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait for the exit status (killed, None, if it does not stop in time)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def start(
    server: dict, model: str = "noop", workdir: Path | None = None, timeout_s: float = 120.0
) -> ServerProcess:
    """Start `python -m streaming serve` with `server` settings (plus free ports, AudioSocket on)
    and the `model`; return once /readyz answers 200."""
    folder = workdir or Path(os.environ.get("TMPDIR", "/tmp"))
    config = folder / f"streamscribe-{os.getpid()}-{time.monotonic_ns()}.yaml"
    audiosocket_port = free_port()
    settings = {"host": "127.0.0.1", "port": 0, "http_port": 0, **server}
    settings["audiosocket_port"] = audiosocket_port
    config.write_text(
        yaml.safe_dump({"server": settings, "engine": {"model": model, "device": "cpu"}})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSCRIBE_")}
    proc = subprocess.Popen(
        [*SERVE, "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    listening: dict = {}
    ready = threading.Event()
    server_process = ServerProcess(proc, 0, 0, audiosocket_port)
    threading.Thread(
        target=_read_stderr, args=(server_process, listening, ready), daemon=True
    ).start()
    deadline = time.monotonic() + timeout_s
    try:
        if not ready.wait(timeout_s):
            raise RuntimeError("the server did not report its ports")
        server_process.port = listening["port"]
        server_process.http_port = listening["http_port"]
        while time.monotonic() < deadline and server_process.alive():
            if _status(server_process.port, "/readyz") == 200:
                return server_process
            time.sleep(0.1)
        raise RuntimeError(f"the server did not turn ready: {server_process.tail[-5:]}")
    except BaseException:
        server_process.stop(5)
        raise
    finally:
        config.unlink(missing_ok=True)


# A Python warning on stderr: "file.py:LINE: Category: message", then its source line indented.
WARNING_LINE = re.compile(r"^\S+:\d+: \w+: ")


def _read_stderr(server: ServerProcess, listening: dict, ready: threading.Event) -> None:
    """Every stderr line: the "listening" record gives the ports, ERROR records go to the
    ErrorLog, and any other line that is not a JSON record or a Python warning (a crash's
    traceback, a fatal error) counts as an error too."""
    after_warning = False
    for line in server.proc.stderr:
        server.tail = [*server.tail[-49:], line.rstrip()]
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if WARNING_LINE.match(line):
                server.warnings += 1
                after_warning = True
            elif after_warning and line[:1].isspace():
                after_warning = False
            elif line.strip():
                server.errors.add(f"stderr: {line.strip()[:300]}")
            continue
        after_warning = False
        if record.get("msg") == "listening":
            listening.update(record)
            ready.set()
        if record.get("level") in ("error", "critical"):
            message = (str(record.get("msg", "")).splitlines() or [""])[0]
            exc = str(record.get("exc", "")).strip().splitlines()
            cause = f" [{exc[-1]}]" if exc else ""
            server.errors.add(f"{record.get('logger')}: {message}{cause}"[:400])


def _status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def healthy(port: int) -> bool:
    return _status(port, "/healthz") == 200

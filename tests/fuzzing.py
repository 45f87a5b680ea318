"""The endpoint fuzzer: seeded hostile cases (tests/fuzz_cases.py) run against a live server,
each outcome classified (the good stream that runs meanwhile: tests/good_stream.py).

One connection per case, at most `concurrency` at a time. A case sends its bytes, then reads
until the server ends the connection or `bound_s` passes. A WebSocket case that the server has
not closed gets the dialect's polite end (native `close`, Deepgram `CloseStream`, Twilio
`stop`), and a close frame once the server has been quiet for `quiet_s`; an HTTP or AudioSocket
case ends its sending side (EOF) where the case says so.

Outcome classes (`classify`, then `attribute`):
- OK: a close code in OK_CLOSE_CODES; an HTTP status below 500 with a body (or 505, the RFC's
  answer to an HTTP version it does not speak); an AudioSocket call that ends; a request the
  HTTP parser cannot read, closed without an answer (websockets sends no 400 for those);
- BAD: close 1011 or a code outside OK_CLOSE_CODES; HTTP 5xx; a 4xx without a body; a
  WebSocket dropped after its 101 without a close frame; nothing decisive within the bound (a
  hang); the server process gone; and `server_error`, a case that makes the server log an
  error (a traceback) whatever the client saw, found by replaying the cases in flight when
  the server logged one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from tests.fuzz_cases import ENDPOINTS, Case, Limits, make_case
from tests.wsraw import CLOSE, TEXT, Reader, Reply, abort, close_frame, read_body, read_head

# RFC 6455's answers to a client that broke the protocol (1002 protocol error, 1007 invalid
# UTF-8) are as clear as the server's own 1008/1009 and 4000-range codes; 1013 ("try again
# later") is the documented answer to a call with too many subscribers.
OK_CLOSE_CODES = frozenset({1000, 1001, 1002, 1007, 1008, 1009, 1013, *range(4000, 4100)})

# The server settings the fuzzer is built for: small frames (oversize cases stay cheap), call
# subscribers held 1 s, uploads that must arrive within 2 s and streams idle for 2 s closed, so
# that every case can end within its bound.
FUZZ_SERVER = {
    "max_frame_bytes": 65536,
    "call_subscriber_hold_s": 1.0,
    "upload_timeout_s": 2.0,
    "idle_timeout_s": 2.0,  # a stream left mid-frame is answered within the bound
}
LIMITS = Limits(max_frame_bytes=FUZZ_SERVER["max_frame_bytes"])


@dataclass(frozen=True)
class Ports:
    main: int
    rest: int
    audiosocket: int

    def of(self, case: Case) -> int:
        return getattr(self, case.port)


@dataclass
class Outcome:
    case: Case
    label: str  # e.g. close_4001, http_400, eof_after_error, hang
    bad: bool
    seconds: float
    errors: int = 0  # `error` messages (or error packets) the server sent
    detail: str = ""

    def line(self) -> str:
        return f"{self.label:14s} {self.case.ref} {self.detail}".rstrip()


@dataclass
class Report:
    """Counts per endpoint and outcome, and every BAD case (to replay by seed and index)."""

    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    bad: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    # (started, ended, seed, index, label) of every case, for `attribute`
    timeline: list[tuple[float, float, int, int, str]] = field(default_factory=list)
    server_errors: int = 0  # errors the server logged during the run
    unattributed: list[str] = field(default_factory=list)  # ... that no replay repeated

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.case.endpoint][outcome.label] += 1
        if outcome.bad:
            self.bad.append(outcome)

    def add_attributed(self, outcome: Outcome, first_label: str) -> None:
        """A case found by `attribute`: BAD, whatever its first run (`first_label`) looked
        like."""
        counts = self.counts[outcome.case.endpoint]
        counts[first_label] -= 1
        if not counts[first_label]:
            del counts[first_label]
        counts["server_error"] += 1
        self.bad.append(outcome)

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def per_endpoint(self) -> dict[str, dict[str, int]]:
        """{endpoint: {"cases", "bad", "errors" ..., and each outcome label}}."""
        table = {}
        for endpoint in ENDPOINTS:
            counts = self.counts.get(endpoint, Counter())
            bad = sum(1 for o in self.bad if o.case.endpoint == endpoint)
            table[endpoint] = {"cases": sum(counts.values()), "bad": bad, **dict(counts)}
        return table

    def table(self) -> str:
        lines = [f"{'endpoint':12s} {'cases':>6s} {'bad':>4s}  outcomes"]
        for endpoint, row in self.per_endpoint().items():
            outcomes = ", ".join(
                f"{k} {v}"
                for k, v in sorted(row.items(), key=lambda kv: -kv[1])
                if k not in ("cases", "bad")
            )
            lines.append(f"{endpoint:12s} {row['cases']:6d} {row['bad']:4d}  {outcomes}")
        lines.append(f"{'total':12s} {self.total:6d} {len(self.bad):4d}")
        return "\n".join(lines)


def cases(seed: int, count: int, limits: Limits = LIMITS, start: int = 0) -> Iterable[Case]:
    """Cases start..start+count-1 of the run seeded `seed`, built lazily (some are large)."""
    return (make_case(seed, i, limits) for i in range(start, start + count))


# --- running one case -----------------------------------------------------------------------


async def run_case(case: Case, ports: Ports, bound_s: float = 5.0, quiet_s: float = 0.5) -> Outcome:
    started = time.monotonic()
    reply = Reply()
    try:
        async with asyncio.timeout(bound_s):
            if case.kind == "ws":
                await _ws(case, ports.of(case), reply, quiet_s)
            else:
                await _plain(case, ports.of(case), reply)
    except TimeoutError:
        reply.timed_out = True
    except (ConnectionError, OSError) as err:
        reply.reset = True
        reply.close_reason = f"{type(err).__name__}: {err}"
    outcome = classify(case, reply)
    outcome.seconds = time.monotonic() - started
    return outcome


async def _send(writer: asyncio.StreamWriter, data: bytes) -> bool:
    """Write and drain; False once the server has gone (it may close as soon as it objects)."""
    if writer.is_closing():
        return False
    try:
        writer.write(data)
        await writer.drain()
    except (ConnectionError, OSError):
        return False
    return True


async def _ws(case: Case, port: int, reply: Reply, quiet_s: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _send(writer, case.request)
        if case.half_close and writer.can_write_eof():
            writer.write_eof()
        status, headers, _ = await read_head(reader)
        reply.status = status
        if status is None:
            reply.eof = True
            return
        if status != 101:
            reply.body = await read_body(reader, headers)
            return
        frames = Reader(reader)
        incoming: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        pump = asyncio.create_task(_pump(frames, incoming))
        try:
            for data in case.frames:
                if not await _send(writer, data):
                    break
            for data in case.ender:
                await _send(writer, data)
            await _read_frames(incoming, writer, reply, quiet_s)
        finally:
            pump.cancel()
    finally:
        abort(writer)


async def _pump(frames: Reader, into: asyncio.Queue) -> None:
    """Every server frame into the queue, then None at the end of the connection."""
    try:
        while True:
            into.put_nowait(await frames.next())
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        into.put_nowait(None)


async def _read_frames(
    incoming: asyncio.Queue, writer: asyncio.StreamWriter, reply: Reply, quiet_s: float
) -> None:
    """Read until the server's close frame or the end of the connection; a server quiet for
    `quiet_s` is sent our close frame (the bound of the whole case still applies)."""
    while True:
        try:
            item = await asyncio.wait_for(incoming.get(), quiet_s if not reply.sent_close else None)
        except TimeoutError:
            reply.sent_close = True
            await _send(writer, close_frame(1000))
            continue
        if item is None:
            reply.eof = True
            return
        opcode, payload = item
        if opcode == CLOSE:
            reply.close_code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
            reply.close_reason = payload[2:].decode("utf-8", "replace")
            return
        if opcode < 0x8:
            reply.messages.append(payload.decode("utf-8", "replace") if opcode == TEXT else payload)


async def _plain(case: Case, port: int, reply: Reply) -> None:
    """HTTP on the main or REST port, or an AudioSocket call: send, maybe EOF, read to the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        sent = await _send(writer, case.request)
        for data in case.ender:
            sent = sent and await _send(writer, data)
        if case.half_close and sent and writer.can_write_eof():
            with contextlib.suppress(ConnectionError, OSError):
                writer.write_eof()
        if case.kind == "http":
            status, headers, _ = await read_head(reader)
            reply.status = status
            if status is not None:
                reply.body = await read_body(reader, headers)
            else:
                reply.eof = True
        else:
            reply.body = await reader.read()
            reply.eof = True
    finally:
        abort(writer)


# --- classification -----------------------------------------------------------------------------


def _errors(case: Case, reply: Reply) -> int:
    """Error messages in the reply: each dialect's error shape, or AudioSocket error packets."""
    if case.kind == "tcp":
        return reply.body.count(b"\xff\x00")  # an error packet's header (short payloads)
    count = 0
    for message in reply.messages:
        if not isinstance(message, str):
            continue
        with contextlib.suppress(ValueError):
            decoded = json.loads(message)
            if isinstance(decoded, dict) and str(decoded.get("type", "")).lower() == "error":
                count += 1
    return count


def classify(case: Case, reply: Reply) -> Outcome:
    errors = _errors(case, reply)
    detail = reply.close_reason[:120]

    def outcome(label: str, bad: bool) -> Outcome:
        return Outcome(case, label, bad, 0.0, errors, detail)

    if reply.timed_out:
        return outcome("hang", True)
    if case.kind == "tcp":
        return outcome("ended_after_error" if errors else "ended", False)
    if reply.status is not None and reply.status != 101:
        detail = reply.body[:120].decode("utf-8", "replace")
        if reply.status >= 500 and reply.status != 505:  # 505: the version is the client's
            return outcome(f"http_{reply.status}", True)
        # A 4xx without a body says nothing; HEAD answers never carry one.
        bare = reply.status >= 400 and not reply.body and not case.request.startswith(b"HEAD")
        return outcome(f"http_{reply.status}" + ("_no_body" if bare else ""), bare)
    if reply.status == 101:
        if reply.close_code is None:
            return outcome("dropped", True)
        code = reply.close_code
        label = f"close_{code}" + ("_after_client_close" if reply.sent_close else "")
        if code == 1011:
            return outcome(label, True)
        return outcome(label, code not in OK_CLOSE_CODES)
    # No response at all: the HTTP parser's answer to a request it cannot read (websockets
    # closes without a 400); a server that failed here logs it, which `attribute` catches.
    return outcome("closed_no_response", False)


# --- running many ---------------------------------------------------------------------------------


class ErrorLog:
    """Errors the server logged (a traceback, asyncio's "Fatal error"), with when they were
    seen: a server that fails a connection may still look clean from the client's side (no
    response, or a close that looks ordinary), and only its log tells. Fed by `LogCapture`
    (in-process) or by a reader of the server process's stderr."""

    def __init__(self) -> None:
        self.entries: list[tuple[float, str]] = []

    def add(self, message: str) -> None:
        self.entries.append((time.monotonic(), message))

    def since(self, mark: int) -> list[str]:
        return [message for _, message in self.entries[mark:]]


class LogCapture(logging.Handler):
    """Records ERROR and above of this process's loggers into an ErrorLog."""

    def __init__(self, log: ErrorLog) -> None:
        super().__init__(logging.ERROR)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        cause = f" [{type(error).__name__}: {error}]" if error is not None else ""
        self.log.add(f"{record.name}: {record.getMessage().splitlines()[0]}{cause}"[:400])


@contextlib.contextmanager
def captured_errors() -> Iterator[ErrorLog]:
    """An ErrorLog of every ERROR record logged in this process meanwhile."""
    log = ErrorLog()
    handler = LogCapture(log)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield log
    finally:
        root.removeHandler(handler)


async def run_cases(
    all_cases: Iterable[Case],
    ports: Ports,
    concurrency: int = 8,
    bound_s: float = 5.0,
    alive: Callable[[], bool] = lambda: True,
    progress: Callable[[Report], None] | None = None,
    every: int = 500,
) -> Report:
    """Run every case, `concurrency` at a time; `alive()` False (the server process ended)
    stops the run with the case in flight marked `server_gone`."""
    report = Report()
    started = time.monotonic()
    queue: asyncio.Queue[Case | None] = asyncio.Queue(maxsize=concurrency * 2)

    async def worker() -> None:
        while (case := await queue.get()) is not None:
            began = time.monotonic()
            outcome = await run_case(case, ports, bound_s)
            if not alive():
                outcome.label, outcome.bad = "server_gone", True
            report.add(outcome)
            report.timeline.append((began, time.monotonic(), case.seed, case.index, outcome.label))
            if progress is not None and report.total % every == 0:
                progress(report)

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        for case in all_cases:
            if not alive():
                break
            await queue.put(case)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
    report.seconds = time.monotonic() - started
    return report


def signature(message: str) -> str:
    """An error message without its addresses and numbers, to tell errors of one kind."""
    return re.sub(r"0x[0-9a-f]+|\d+", "#", message)


async def attribute(
    report: Report,
    errors: ErrorLog,
    ports: Ports,
    limits: Limits = LIMITS,
    settle_s: float = 0.3,
    slack_s: float = 1.0,
    max_replays: int = 300,
) -> None:
    """Find which cases made the server log an error (`slack_s`: how late a log line may be
    seen after its case ended). An error logged while a BAD case was in flight is put down to
    it, one error per BAD case; for any other, the cases in flight then are replayed one at a
    time until one logs an error again: that one is a BAD `server_error`. Cases of a kind
    (mutation) already found to log that kind of error are replayed first, then the nearest in
    time. Errors that no replay repeats are kept in `report.unattributed`."""
    report.server_errors = len(errors.entries)
    spans = {(seed, index): (began, ended) for began, ended, seed, index, _ in report.timeline}
    labels = {(seed, index): label for _, _, seed, index, label in report.timeline}
    unused = [spans[(o.case.seed, o.case.index)] for o in report.bad]
    known = {(o.case.seed, o.case.index) for o in report.bad}
    culprits: dict[str, set[str]] = defaultdict(set)  # error signature -> mutations found
    replays = 0
    for at, message in list(errors.entries):
        explains = [span for span in unused if span[0] - 0.1 <= at <= span[1] + slack_s]
        if explains:
            unused.remove(explains[0])
            continue
        kinds = culprits[signature(message)]
        suspects = sorted(
            (make_case(seed, index, limits).mutation not in kinds, abs(ended - at), seed, index)
            for (seed, index), (began, ended) in spans.items()
            if began - 0.1 <= at <= ended + slack_s and (seed, index) not in known
        )
        found = False
        for _, _, seed, index in suspects[: max(0, max_replays - replays)]:
            replays += 1
            mark = len(errors.entries)
            case = make_case(seed, index, limits)
            outcome = await run_case(case, ports)
            await asyncio.sleep(settle_s)
            logged = errors.since(mark)
            if logged:
                outcome.label, outcome.bad = "server_error", True
                outcome.detail = f"{outcome.detail} {logged[0]}".strip()
                report.add_attributed(outcome, labels[(seed, index)])
                known.add((seed, index))
                kinds.add(case.mutation)
                found = True
                break
        if not found:
            report.unattributed.append(message)


def replay(seed: int, index: int, ports: Ports, limits: Limits = LIMITS) -> Outcome:
    """Run one case again by its seed and index (what a BAD line of a report names)."""
    return asyncio.run(run_case(make_case(seed, index, limits), ports))

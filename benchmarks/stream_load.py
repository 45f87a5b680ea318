"""Load test of the streaming server: N concurrent real-time streams of real speech.

The server runs as its own process (its CPU time, with its child processes', is read from
/proc/<pid>/stat, and the load generator does not share its event loop); `--workers 1,2` starts
one server per count of gateway worker processes (server.workers) and runs every level on each.
Each stream plays the LibriVox clips of pocketsphinx-testdata separated by 1.5-3 s of quiet,
paced at real time over the native protocol, then sends `close`. Streams start at evenly spread
points of the same cyclic tape, so they do not all speak at once; a clip cut by a stream's start
or end is replaced by quiet.

Pacing is that of a live microphone: frame k (audio [k*f, (k+1)*f)) leaves when its last sample
has been spoken, at t0 + (k+1)*f, and audio time t is spoken at t0 + t. Latencies are measured
from when the audio was spoken, so they include up to one frame of capture delay, as a user's do:

- first partial: first non-empty partial of the utterance (or its final, when no partial came
  first) minus the speech onset (first 10 ms of the clip above -35 dBFS);
- finalization: arrival of a final minus the end of its last word, with the server's own split
  (endpoint wait, queue, compute) from the final's `latency`;
- final (commit): arrival of the message that last changed the utterance's committed words (the
  stable text of partials, the final's text; usually the final) minus the end of its speech
  (last 10 ms above -35 dBFS), and its growth over the run (`lag_growth_ms`);
- partial stability (`StabilityStats`), partials dropped by the server (/metrics deltas), lag
  (`status` messages and `streamscribe_lag_seconds` polled every second), finals received for
  every utterance played, and server CPU seconds per stream per second of audio;
- with `--refine-model M` (the server's accuracy pass; streams keep the default refine
  settings: async), refine latency: arrival of `transcript.refined` minus arrival of its final,
  and the counts refined (with `changed`) and skipped by reason.

Targets depend on the engine (`target_profile`, `--targets`): Whisper on the CPU has its own,
for 1 stream and for more; the noop engine and GPU engines are held to the gateway's.

The load generator shares the machine: each level also reports how late it sent frames and how
much CPU other processes took, so a run disturbed by either can be told apart and repeated.

    python -m benchmarks.stream_load --model noop --streams 100 --seconds 30
    python -m benchmarks.stream_load --model whisper --streams 1,2,4
    python -m benchmarks.stream_load --model whisper --ramp --streams 1   # 1, 2, 4, ...
    python -m benchmarks.stream_load --model whisper --refine-model base --streams 1,4
    python -m benchmarks.stream_load --model noop --workers 1,2 --streams 200,400,600,800
    python -m benchmarks.stream_load --url ws://127.0.0.1:8765 --streams 8   # a running server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from benchmarks.manifests import librivox
from benchmarks.results import write_result
from streaming.core.audiofile import read_audio
from streaming.core.stability import StabilityStats, word_key

REPO = Path(__file__).resolve().parents[1]
RATE = 16000
GAP_S = (1.5, 3.0)  # quiet between clips; longer than any sensible hangover
TAIL_MS = 1500  # a clip is played only if this much quiet follows it before the stream ends
NOISE = 1e-3  # the quiet is faint noise (-60 dBFS), like a real line
ONSET_DBFS = -35.0  # the clips' background is -45..-50 dBFS
SEED = 0
FIRST_PARTIAL_TARGET_MS = 500.0
FINALIZATION_MARGIN_MS = 150.0  # target: p95 finalization <= hangover + this
STREAMS_PER_CORE_TARGET = 500.0  # gateway + VAD alone (noop engine), 100 ms frames
LAG_GROWTH_TARGET_MS = 300.0  # last third's median final latency over the first third's
CAPTION_DELAY_TARGET_S = 3.0  # end of a word's audio to the caption that holds it, p95
CONNECT_AT_ONCE = 32
METRICS_EVERY_S = 1.0
SEND_LATE_WARN_MS = 20.0
OTHER_CPU_WARN_CORES = 0.2


# --- the speech tape ------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    id: str
    frames: tuple[bytes, ...]  # s16le, the last one padded with quiet
    onset_ms: int  # speech onset within the clip
    speech_end_ms: int  # end of its speech (the clip ends in quiet)
    duration_ms: int


@dataclass(frozen=True)
class Tape:
    """One period of the cyclic tape every stream plays a window of: (first frame, clip)."""

    placed: tuple[tuple[int, Clip], ...]
    period: int  # frames
    silence: bytes  # one frame of quiet


@dataclass(frozen=True)
class Utterance:
    """A clip in a stream, in stream audio time."""

    start_ms: int
    onset_ms: int
    speech_end_ms: int
    end_ms: int


@dataclass(frozen=True)
class StreamPlan:
    frames: list[bytes]
    utterances: list[Utterance]


def s16le(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def _loud_windows(audio: np.ndarray, rate: int, dbfs: float) -> np.ndarray:
    """Indices of the 10 ms windows louder than `dbfs`."""
    win = rate // 100
    n = len(audio) // win
    power = (audio[: n * win].reshape(n, win).astype(np.float64) ** 2).mean(axis=1)
    return np.flatnonzero(10 * np.log10(power + 1e-12) > dbfs)


def speech_onset_ms(audio: np.ndarray, rate: int = RATE, dbfs: float = ONSET_DBFS) -> int:
    """Start of the first 10 ms window louder than `dbfs`: clips open with a breath of quiet
    that is not speech yet (240-330 ms in the LibriVox clips)."""
    loud = _loud_windows(audio, rate, dbfs)
    return int(loud[0]) * 10 if len(loud) else 0


def speech_end_ms(audio: np.ndarray, rate: int = RATE, dbfs: float = ONSET_DBFS) -> int:
    """End of the last 10 ms window louder than `dbfs`: the LibriVox clips close with 220-430 ms
    of quiet, which no one waits through for the final."""
    loud = _loud_windows(audio, rate, dbfs)
    return (int(loud[-1]) + 1) * 10 if len(loud) else 0


def to_frames(audio: np.ndarray, frame_ms: int, rng: np.random.Generator) -> tuple[bytes, ...]:
    """`audio` as s16le frames of `frame_ms`, the last one padded with quiet (NOISE)."""
    size = RATE * frame_ms // 1000
    padded = np.concatenate(
        [audio, NOISE * rng.standard_normal(-len(audio) % size).astype(np.float32)]
    )
    data = s16le(padded)
    return tuple(data[i : i + 2 * size] for i in range(0, len(data), 2 * size))


def load_clips(frame_ms: int) -> list[Clip]:
    """The LibriVox clips, shortest first, cut into pre-encoded frames."""
    rng = np.random.default_rng(SEED)
    clips = []
    for utt in librivox():
        audio, rate = read_audio(utt.audio)
        if rate != RATE:
            raise SystemExit(f"{utt.audio}: expected {RATE} Hz, got {rate}")
        onset, end = speech_onset_ms(audio), speech_end_ms(audio)
        frames = to_frames(audio, frame_ms, rng)
        clips.append(Clip(utt.id, frames, onset, end, len(audio) * 1000 // RATE))
    return sorted(clips, key=lambda c: c.duration_ms)


def build_tape(clips: Sequence[Clip], frame_ms: int, seed: int = SEED) -> Tape:
    rng = np.random.default_rng(seed)
    placed, at = [], 0
    for clip in clips:
        at += round(rng.uniform(*GAP_S) * 1000 / frame_ms)
        placed.append((at, clip))
        at += len(clip.frames)
    silence = s16le(NOISE * rng.standard_normal(RATE * frame_ms // 1000).astype(np.float32))
    return Tape(tuple(placed), at, silence)


def plan_stream(tape: Tape, offset: int, n_frames: int, frame_ms: int) -> StreamPlan:
    """The window [offset, offset + n_frames) of the cyclic tape; clips that do not fit whole
    (with TAIL_MS of quiet after them) are replaced by quiet."""
    frames = [tape.silence] * n_frames
    utterances = []
    tail = math.ceil(TAIL_MS / frame_ms)
    for rep in range((offset + n_frames) // tape.period + 1):
        for first, clip in tape.placed:
            at = rep * tape.period + first - offset
            if at < 0 or at + len(clip.frames) + tail > n_frames:
                continue
            frames[at : at + len(clip.frames)] = clip.frames
            start = at * frame_ms
            utterances.append(
                Utterance(
                    start,
                    start + clip.onset_ms,
                    start + clip.speech_end_ms,
                    start + clip.duration_ms,
                )
            )
    return StreamPlan(frames, utterances)


def plan_streams(tape: Tape, count: int, seconds: float, frame_ms: int) -> list[StreamPlan]:
    """`count` streams starting at evenly spread points of the tape."""
    n_frames = round(seconds * 1000 / frame_ms)
    return [
        plan_stream(tape, round(i * tape.period / count), n_frames, frame_ms) for i in range(count)
    ]


# --- pure helpers ----------------------------------------------------------------------------


def spoken_at(t0: float, audio_ms: float) -> float:
    """Clock time at which stream audio time `audio_ms` was spoken (audio time 0 at `t0`)."""
    return t0 + audio_ms / 1000


def frame_due(t0: float, index: int, frame_s: float) -> float:
    """Clock time frame `index` is sent: when its last sample has been spoken."""
    return t0 + (index + 1) * frame_s


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def summary(values: Sequence[float]) -> dict:
    """n, p50, p95, p99 and max of `values` (None for the figures of an empty list)."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    figures = {f"p{q}": round(percentile(values, q), 1) for q in (50, 95, 99)}
    return {"n": len(values), **figures, "max": round(max(values), 1)}


def proc_cpu_seconds(stat: str, ticks_per_s: int) -> float:
    """utime + stime of a /proc/<pid>/stat line (all threads). The command name, in parentheses,
    may hold spaces, so fields are counted after the last ')': utime and stime are fields 14-15."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (/proc/<pid>/task/*/children, recursively)."""
    pids = [pid]
    for parent in pids:  # grows as children are found
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # a thread or process that just ended
                pids += [int(child) for child in children.read_text().split()]
    return pids


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants: a server with server.workers > 1 is a
    supervisor with an engine process and gateway workers. A child is counted only while it
    lives: one that exits between two readings (a worker restarted mid-run) loses its time."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = proc_cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), ticks)
    for child in process_tree(pid)[1:]:
        with contextlib.suppress(OSError):  # it ended since it was listed
            total += proc_cpu_seconds(Path(f"/proc/{child}/stat").read_text(), ticks)
    return total


def machine_busy_seconds(stat: str, ticks_per_s: int) -> float:
    """CPU seconds all cores spent busy (not idle or iowait), from /proc/stat's `cpu` line: with
    the server's and the generator's own time it tells how much else ran during a level."""
    ticks = [int(x) for x in stat.splitlines()[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / ticks_per_s  # guest time is in user already


def machine_cpu_seconds() -> float:
    return machine_busy_seconds(Path("/proc/stat").read_text(), os.sysconf("SC_CLK_TCK"))


# sample name -> {sorted (label, value) pairs: value}
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> Samples:
    """Prometheus text exposition -> {sample name: {sorted (label, value) pairs: value}}."""
    samples: Samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:  # comments (# HELP, # TYPE) and blank lines
            continue
        name, labels, value = match.groups()
        key = tuple(sorted(_LABEL.findall(labels or "")))
        samples.setdefault(name, {})[key] = float(value)
    return samples


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(key).get(label, ""): value for key, value in samples.get(name, {}).items()}


def scalar(samples: Samples, name: str) -> float:
    return samples.get(name, {}).get((), 0.0)


def histogram_p95(before: Samples, after: Samples, name: str, kind: str) -> float | None:
    """The bucket bound under which 95 % of the observations made between two scrapes fall
    (an upper estimate, as fine as the histogram's buckets); None without observations."""
    counts: dict[float, float] = {}
    for source, sign in ((after, 1.0), (before, -1.0)):
        for key, value in source.get(f"{name}_bucket", {}).items():
            labels = dict(key)
            if labels.get("kind") == kind:
                bound = float(labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sign * value
    total = counts.get(float("inf"), 0.0)
    if total <= 0:
        return None
    return next(bound for bound in sorted(counts) if counts[bound] >= 0.95 * total)


# --- what one stream saw ---------------------------------------------------------------------


@dataclass
class StreamRecord:
    """What a stream sent and received, with clock times (the event loop's monotonic clock)."""

    t0: float = 0.0
    messages: list[tuple[float, dict]] = field(default_factory=list)
    send_late_ms: list[float] = field(default_factory=list)
    error: str = ""  # why the stream could not be opened or did not finish


@dataclass
class StreamMeasures:
    utterances: int = 0
    finals: int = 0
    missing: int = 0  # utterances no final covers
    extra_finals: int = 0  # finals that cover no utterance
    empty_finals: int = 0
    first_text_ms: list[float] = field(default_factory=list)
    no_partial: int = 0  # utterances whose first text came in the final
    finalization_ms: list[float] = field(default_factory=list)
    # per utterance with a final: (end of its speech in audio ms, ms from then to the arrival
    # of the message that last changed its committed words)
    final_change: list[tuple[int, float]] = field(default_factory=list)
    split_ms: dict[str, list[float]] = field(
        default_factory=lambda: {"endpoint": [], "queue": [], "compute": [], "delivery": []}
    )
    partial_delay_ms: list[float] = field(default_factory=list)
    segments: list[tuple[list[tuple[str, str]], str]] = field(default_factory=list)
    partials: int = 0
    status_lag_ms: list[float] = field(default_factory=list)
    refine_ms: list[float] = field(default_factory=list)  # final's arrival -> refined's arrival
    refined: int = 0
    refine_changed: int = 0
    refine_skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    closed: bool = False


def _shown(message: dict) -> bool:
    return bool(message["stable_text"].strip() or message["volatile_text"].strip())


def committed_words(message: dict) -> tuple[str, ...]:
    """The words a message commits (a partial's stable text, a final's text), case and
    punctuation ignored: a final that only capitalises or punctuates the stable text changes
    nothing a reader waits for."""
    text = message["stable_text"] if message["type"] == "transcript.partial" else message["text"]
    return tuple(key for key in map(word_key, text.split()) if key)


def measure_stream(plan: StreamPlan, record: StreamRecord) -> StreamMeasures:
    """Match the stream's segments to the utterances it played and take the latencies."""
    out = StreamMeasures(utterances=len(plan.utterances))
    partials: dict[tuple, list[tuple[float, dict]]] = {}
    finals: dict[tuple, tuple[float, dict]] = {}
    committed: dict[tuple, tuple[str, ...]] = {}
    last_change: dict[tuple, float] = {}  # arrival of the message that last changed `committed`
    for arrival, message in record.messages:
        kind = message["type"]
        key = (message.get("channel", 0), message.get("segment_id"))
        if kind in ("transcript.partial", "transcript.final"):
            words = committed_words(message)
            if words != committed.get(key, ()):
                committed[key], last_change[key] = words, arrival
        if kind == "transcript.partial":
            partials.setdefault(key, []).append((arrival, message))
            spoken = spoken_at(record.t0, message["end_ms"])
            out.partial_delay_ms.append(1000 * (arrival - spoken))
        elif kind == "transcript.final":
            finals[key] = (arrival, message)
        elif kind == "transcript.refined":
            if key in finals:
                out.refine_ms.append(1000 * (arrival - finals[key][0]))
            if message.get("skipped"):
                reason = message.get("reason", "")
                out.refine_skipped[reason] = out.refine_skipped.get(reason, 0) + 1
            else:
                out.refined += 1
                out.refine_changed += bool(message.get("changed"))
        elif kind == "status":
            out.status_lag_ms.append(message["lag_ms"])
        elif kind == "session.closed":
            out.closed = True
    out.partials = sum(len(p) for p in partials.values())

    extent: dict[tuple, tuple[int, int]] = {}
    for key, items in [*partials.items(), *((k, [v]) for k, v in finals.items())]:
        lo, hi = extent.get(key, (math.inf, -math.inf))
        for _, message in items:
            lo, hi = min(lo, message["start_ms"]), max(hi, message["end_ms"])
        extent[key] = (lo, hi)

    def covers(key: tuple, utt: Utterance) -> bool:
        lo, hi = extent[key]
        return lo < utt.end_ms and hi > utt.start_ms

    for utt in plan.utterances:
        keys = [key for key in extent if covers(key, utt)]
        if not any(key in finals for key in keys):
            out.missing += 1
        shown = [a for key in keys for a, m in partials.get(key, []) if _shown(m)]
        if not shown:
            shown = [finals[k][0] for k in keys if k in finals and finals[k][1]["text"].strip()]
            out.no_partial += bool(shown)
        if shown:
            out.first_text_ms.append(1000 * (min(shown) - spoken_at(record.t0, utt.onset_ms)))
        changed = [last_change[key] for key in keys if key in last_change]
        if changed and any(key in finals for key in keys):
            latency = 1000 * (max(changed) - spoken_at(record.t0, utt.speech_end_ms))
            out.final_change.append((utt.speech_end_ms, latency))

    for key, (arrival, final) in finals.items():
        out.finals += 1
        out.extra_finals += not any(covers(key, utt) for utt in plan.utterances)
        shown_partials = sorted(partials.get(key, []), key=lambda item: item[1]["rev"])
        out.segments.append(
            ([(m["stable_text"], m["volatile_text"]) for _, m in shown_partials], final["text"])
        )
        if not final["words"]:
            out.empty_finals += 1
            continue
        spoken = spoken_at(record.t0, final["words"][-1]["end_ms"])
        latency = final["latency"]
        server_ms = latency["endpoint_ms"] + latency["queue_ms"] + latency["compute_ms"]
        out.finalization_ms.append(1000 * (arrival - spoken))
        for stage in ("endpoint", "queue", "compute"):
            out.split_ms[stage].append(latency[f"{stage}_ms"])
        # the rest: capture (< 1 frame), the server reading audio late, sending, the client
        out.split_ms["delivery"].append(out.finalization_ms[-1] - server_ms)
    return out


# --- talking to the server -------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    stream: str  # ws://host:port/v1/stream
    http: str  # http://host:port


def endpoints(url: str) -> Endpoints:
    parts = urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return Endpoints(
        f"{parts.scheme}://{parts.netloc}{parts.path or '/v1/stream'}",
        f"{scheme}://{parts.netloc}",
    )


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def scrape(server: Endpoints) -> dict:
    status, text = await asyncio.to_thread(http_get, f"{server.http}/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return parse_prometheus(text)


@dataclass
class ServerProcess:
    pid: int | None  # None: a server this program did not start (no CPU figures)
    server: Endpoints
    event_loop: str | None = None  # as the started server reports it
    family: str | None = None  # the started server's engine family


@contextlib.asynccontextmanager
async def spawned_server(
    model: str, config: str | None, refine_model: str | None = None, workers: int = 1
) -> AsyncIterator[ServerProcess]:
    """`python -m streaming serve` on a free loopback port, ready (model loaded) on entry and
    drained with SIGTERM on exit. Its log goes to a file, named on stderr. With `workers` > 1
    (server.workers) it is a supervisor: every gateway worker logs "listening" and the engine
    process "engine ready", all to the same log."""
    fd, name = tempfile.mkstemp(prefix="stream_load-server-", suffix=".log")
    log = Path(name)
    command = [sys.executable, "-m", "streaming", "--log-level", "info"]
    command += ["--config", config] if config else []
    command += ["serve", "--host", "127.0.0.1", "--port", "0", "--model", model]
    command += ["--refine-model", refine_model] if refine_model else []
    # JSON logs to find the port; the REST endpoint on a free port, not its fixed default one
    # (so the benchmark runs beside a developer's server)
    env = {
        **os.environ,
        "STREAMSCRIBE_LOGGING__FORMAT": "json",
        "STREAMSCRIBE_SERVER__HTTP_PORT": "0",
        "STREAMSCRIBE_SERVER__WORKERS": str(workers),
    }
    note = f"server.workers {workers}, " if workers > 1 else ""
    progress(f"starting server: {' '.join(command[1:])} ({note}log: {log})")
    with os.fdopen(fd, "w") as sink:
        proc = subprocess.Popen(command, cwd=REPO, stderr=sink, env=env)
    try:
        listening = await _log_record(proc, log, "listening", 120, count=workers)
        port = int(listening["port"])
        server = Endpoints(f"ws://127.0.0.1:{port}/v1/stream", f"http://127.0.0.1:{port}")
        # the kernel spreads connections over the workers: ready several times in a row, so
        # that each worker has answered ready (has reached the engine process) in all likelihood
        await _until_ready(server, proc, log, in_a_row=1 if workers == 1 else 8 * workers)
        ready = await _log_record(proc, log, "engine ready", 10)  # logged as it turns ready
        yield ServerProcess(proc.pid, server, listening.get("event_loop"), ready.get("family"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _died(proc: subprocess.Popen, log: Path) -> SystemExit:
    tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
    return SystemExit(f"the server exited with status {proc.returncode}:\n{tail}")


async def _log_record(
    proc: subprocess.Popen, log: Path, msg: str, timeout_s: float, count: int = 1
) -> dict:
    """The server's `count`th log record with `msg` (the first by default): "listening" (its
    port, its event loop; one per gateway worker), "engine ready" (its engine family and
    device)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = []
        for line in log.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if record.get("msg") == msg:
                    found.append(record)
        if len(found) >= count:
            return found[count - 1]
        if proc.poll() is not None:
            raise _died(proc, log)
        await asyncio.sleep(0.1)
    raise SystemExit(f"the server did not log {msg!r} within {timeout_s:g} s (log: {log})")


async def _until_ready(
    server: Endpoints,
    proc: subprocess.Popen | None,
    log: Path | None,
    timeout_s: float = 600,
    in_a_row: int = 1,
) -> None:
    """Until /readyz answers 200 `in_a_row` times in a row (each on a new connection)."""
    deadline = time.monotonic() + timeout_s
    why, ready = "no answer", 0
    while time.monotonic() < deadline:
        try:  # a server started beside the benchmark may not listen yet
            status, why = await asyncio.to_thread(http_get, f"{server.http}/readyz")
        except OSError as err:
            status, why = 0, str(err)
        ready = ready + 1 if status == 200 else 0
        if ready >= in_a_row:
            return
        if proc is not None and proc.poll() is not None:
            raise _died(proc, log)
        if not ready:
            await asyncio.sleep(0.2)
    raise SystemExit(f"the server was not ready within {timeout_s:g} s: {why.strip()}")


async def open_stream(server: Endpoints) -> tuple[ClientConnection, dict]:
    """A connection and its `session.started` message (the effective session options)."""
    ws = await connect(server.stream, compression=None, open_timeout=30, max_size=2**22)
    try:
        started = json.loads(await ws.recv())
        if started.get("type") != "session.started":
            raise RuntimeError(f"expected session.started, got {started}")
    except BaseException:
        await ws.close()
        raise
    return ws, started


async def play(
    ws: ClientConnection, plan: StreamPlan, record: StreamRecord, frame_s: float, tail_s: float
) -> None:
    """Send the frames at real-time pace, then `close`; a second task timestamps arrivals."""
    loop = asyncio.get_running_loop()

    async def receive() -> None:
        async for raw in ws:
            message = json.loads(raw)
            record.messages.append((loop.time(), message))
            if message["type"] == "session.closed":
                return

    receiver = asyncio.create_task(receive())
    try:
        for index, frame in enumerate(plan.frames):
            due = frame_due(record.t0, index, frame_s)
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            record.send_late_ms.append(1000 * (loop.time() - due))
            await ws.send(frame)
        await ws.send(json.dumps({"type": "close"}))
        await asyncio.wait_for(receiver, tail_s)
    except TimeoutError:
        record.error = f"no session.closed within {tail_s:g} s of close"
    except Exception as err:  # a stream that breaks is reported, the others go on
        record.error = f"{type(err).__name__}: {err}"
    finally:
        receiver.cancel()
        await ws.close()


async def warm_up(server: Endpoints, frames: Sequence[bytes]) -> None:
    """One clip sent unpaced, so the engine's first-call costs are not measured."""
    ws, _ = await open_stream(server)
    try:
        for frame in frames:
            await ws.send(frame)
        await ws.send(json.dumps({"type": "close"}))
        async with asyncio.timeout(300):
            async for raw in ws:
                if json.loads(raw)["type"] == "session.closed":
                    break
    finally:
        await ws.close()


# --- one load level --------------------------------------------------------------------------


@dataclass
class LevelRun:
    """What one level saw: the streams, /metrics before and after (and lag polled during), CPU."""

    records: list[StreamRecord]
    before: Samples = field(default_factory=dict)
    after: Samples = field(default_factory=dict)
    lag_s: list[float] = field(default_factory=list)
    queued_audio_s: list[float] = field(default_factory=list)
    server_cpu_s: float | None = None
    generator_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0  # every process on the machine
    wall_s: float = 0.0
    session_options: dict = field(default_factory=dict)


async def watch(server: Endpoints, run: LevelRun) -> None:
    """Poll /metrics every second; report progress on stderr every 5 s."""
    started = last_report = time.monotonic()
    while True:
        samples = await scrape(server)
        run.lag_s.append(scalar(samples, "streamscribe_lag_seconds"))
        run.queued_audio_s.append(scalar(samples, "streamscribe_queued_audio_seconds"))
        if time.monotonic() - last_report >= 5:
            last_report = time.monotonic()
            kinds = [m["type"] for r in run.records for _, m in r.messages]
            progress(
                f"  {last_report - started:5.0f} s: {kinds.count('transcript.partial')} partials,"
                f" {kinds.count('transcript.final')} finals, lag {run.lag_s[-1]:.2f} s"
            )
        await asyncio.sleep(METRICS_EVERY_S)


async def run_level(
    server: ServerProcess, plans: list[StreamPlan], frame_ms: int, seconds: float
) -> LevelRun:
    """Open every stream first, then play them all together."""
    loop = asyncio.get_running_loop()
    run = LevelRun([StreamRecord() for _ in plans])
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def opened(record: StreamRecord) -> ClientConnection | None:
        async with gate:
            try:
                ws, started = await open_stream(server.server)
            except Exception as err:
                record.error = f"{type(err).__name__}: {err}"
                return None
        run.session_options.update(started.get("config") or {})
        return ws

    began = time.monotonic()
    run.before = await scrape(server.server)
    cpu_before = process_cpu_seconds(server.pid) if server.pid else 0.0
    generator_before = time.process_time()
    machine_before = machine_cpu_seconds()
    connections = await asyncio.gather(*(opened(r) for r in run.records))
    frame_s = frame_ms / 1000
    start = loop.time() + 0.5
    for i, record in enumerate(run.records):  # phases spread over a frame: no lock-step bursts
        record.t0 = start + frame_s * i / len(run.records)
    watcher = asyncio.create_task(watch(server.server, run))
    try:
        await asyncio.gather(
            *(
                play(ws, plan, record, frame_s, tail_s=60 + seconds)
                for ws, plan, record in zip(connections, plans, run.records, strict=True)
                if ws is not None
            )
        )
    finally:
        watcher.cancel()
    if server.pid:
        run.server_cpu_s = process_cpu_seconds(server.pid) - cpu_before
    run.generator_cpu_s = time.process_time() - generator_before
    run.machine_cpu_s = machine_cpu_seconds() - machine_before
    run.after = await scrape(server.server)
    run.wall_s = time.monotonic() - began
    return run


def level_figures(
    plans: list[StreamPlan], run: LevelRun, frame_ms: int, gateway_only: bool, engine: str
) -> dict:
    """The figures of one level and whether the targets of `engine` (TARGETS) hold."""
    measures = [measure_stream(p, r) for p, r in zip(plans, run.records, strict=True)]
    total = StreamMeasures()
    stability = StabilityStats()
    for m in measures:
        for name in ("utterances", "finals", "missing", "extra_finals", "empty_finals"):
            setattr(total, name, getattr(total, name) + getattr(m, name))
        total.no_partial += m.no_partial
        total.partials += m.partials
        total.first_text_ms += m.first_text_ms
        total.finalization_ms += m.finalization_ms
        total.final_change += m.final_change
        total.partial_delay_ms += m.partial_delay_ms
        total.status_lag_ms += m.status_lag_ms
        total.refine_ms += m.refine_ms
        total.refined += m.refined
        total.refine_changed += m.refine_changed
        for reason, count in m.refine_skipped.items():
            total.refine_skipped[reason] = total.refine_skipped.get(reason, 0) + count
        for stage, values in m.split_ms.items():
            total.split_ms[stage] += values
        for partials, final in m.segments:
            stability.add_segment(partials, final)
    failed = [r.error for r in run.records if r.error]
    played = [p for p, r in zip(plans, run.records, strict=True) if not r.error]
    audio_s = sum(len(p.frames) for p in played) * frame_ms / 1000
    cpu_per_stream_s = (
        run.server_cpu_s / audio_s if run.server_cpu_s is not None and audio_s else None
    )
    streams_per_core = round(1 / cpu_per_stream_s, 1) if cpu_per_stream_s else None
    dropped_name = "streamscribe_partials_dropped_total"
    dropped_before = by_label(run.before, dropped_name, "reason")
    dropped = {
        reason: int(value - dropped_before.get(reason, 0.0))
        for reason, value in sorted(by_label(run.after, dropped_name, "reason").items())
        if value > dropped_before.get(reason, 0.0)
    }
    compute_name = "streamscribe_engine_compute_seconds_total"
    # /proc/stat counts in whole ticks: a few hundredths of a core either way are noise
    other_cpu_s = run.machine_cpu_s - (run.server_cpu_s or 0.0) - run.generator_cpu_s
    hangover_ms = float(run.session_options.get("hangover_ms", 500))

    first = summary(total.first_text_ms)
    final = summary(total.finalization_ms)
    final_change = summary([latency for _, latency in total.final_change])
    duration_ms = max((len(p.frames) * frame_ms for p in plans), default=0)
    growth = lag_growth_ms(total.final_change, duration_ms)
    caption_p95 = {
        kind: histogram_p95(run.before, run.after, "streamscribe_caption_delay_seconds", kind)
        for kind in ("cue", "append")
    }
    measured = [v for v in caption_p95.values() if v is not None]
    profile = target_profile(engine, len(plans), hangover_ms)
    targets = {
        "first_partial_p95_ms": target(first["p95"], profile.first_text_ms, "<="),
        "finalization_p95_ms": target(final["p95"], profile.finalization_ms, "<="),
        "final_change_p95_ms": target(final_change["p95"], profile.final_change_ms, "<="),
        "finals_missing": target(total.missing + len(failed), 0, "<="),
        "status_lag_messages": target(len(total.status_lag_ms), 0, "<="),
        "lag_growth_ms": target(growth, profile.lag_growth_ms, "<="),
        "caption_delay_p95_s": target(
            max(measured) if measured else None, CAPTION_DELAY_TARGET_S, "<="
        ),
        "cpu_s_per_stream_s": target(
            None if cpu_per_stream_s is None else round(cpu_per_stream_s, 3),
            profile.cpu_s_per_stream_s,
            "<=",
        ),
        "streams_per_core": target(
            streams_per_core, STREAMS_PER_CORE_TARGET if gateway_only else None, ">="
        ),
    }
    final_target = (
        "finalization_p95_ms" if profile.final_change_ms is None else "final_change_p95_ms"
    )
    return {
        "streams": len(plans),
        "streams_failed": len(failed),
        "stream_errors": sorted(set(failed))[:5],
        "streams_closed": sum(m.closed for m in measures),
        "audio_s": round(audio_s, 1),
        "wall_s": round(run.wall_s, 1),
        "utterances": total.utterances,
        "finals": total.finals,
        "finals_missing": total.missing,
        "finals_extra": total.extra_finals,
        "finals_empty": total.empty_finals,
        "first_partial_ms": first,
        "first_text_in_final": total.no_partial,
        "finalization_ms": final,
        "final_change_ms": final_change,
        "lag_growth_ms": growth,
        **{f"{stage}_ms": summary(v) for stage, v in total.split_ms.items()},
        "partials": total.partials,
        "partial_delay_ms": summary(total.partial_delay_ms),
        "refine": {
            "latency_ms": summary(total.refine_ms),
            "refined": total.refined,
            "changed": total.refine_changed,
            "skipped": dict(sorted(total.refine_skipped.items())),
        },
        "partials_dropped": dropped,
        "change_rate": round(stability.change_rate, 4),
        "stable_change_rate": round(stability.stable_change_rate, 4),
        "words_shown": stability.words_shown,
        "status_messages": len(total.status_lag_ms),
        "status_lag_max_ms": max(total.status_lag_ms, default=0),
        "lag_s": {
            "max": round(max(run.lag_s, default=0.0), 3),
            "p95": round(percentile(run.lag_s, 95), 3) if run.lag_s else None,
            "samples": len(run.lag_s),
        },
        "queued_audio_max_s": round(max(run.queued_audio_s, default=0.0), 2),
        "batch_size_mean": round(scalar(run.after, "streamscribe_batch_size_mean"), 2),
        "engine_compute_s": round(
            scalar(run.after, compute_name) - scalar(run.before, compute_name), 2
        ),
        "server_cpu_s": None if run.server_cpu_s is None else round(run.server_cpu_s, 2),
        "server_cpu_ms_per_stream_s": (
            None if cpu_per_stream_s is None else round(1000 * cpu_per_stream_s, 3)
        ),
        "streams_per_core": streams_per_core,
        "generator_cpu_s": round(run.generator_cpu_s, 2),
        "other_cpu_cores": round(max(0.0, other_cpu_s) / run.wall_s, 2),
        "machine_busy_cores": round(run.machine_cpu_s / run.wall_s, 2),
        "generator_send_late_ms": summary([x for r in run.records for x in r.send_late_ms]),
        "hangover_ms": hangover_ms,
        "caption_delay_p95_s": caption_p95,
        "target_profile": profile.name,
        "targets": targets,
        "sustained": bool(targets[final_target]["ok"] and targets["finals_missing"]["ok"]),
        "at_slo": all(targets[name]["ok"] for name in SLO if targets[name]["limit"] is not None),
    }


# the targets that say whether a level is served within the latency objectives
SLO = (
    "first_partial_p95_ms",
    "finalization_p95_ms",
    "final_change_p95_ms",
    "finals_missing",
    "status_lag_messages",
    "lag_growth_ms",
)


def target(value: float | None, limit: float | None, op: str) -> dict:
    """A target check; `ok` is None when the value was not measured or there is no target
    (`limit` None), so the value is still recorded where it is not judged."""
    if limit is None:
        return {"value": value, "limit": None, "ok": None}
    ok = None if value is None else (value <= limit if op == "<=" else value >= limit)
    return {"value": value, "limit": f"{op} {limit:g}", "ok": ok}


@dataclass(frozen=True)
class TargetProfile:
    """The latency and cost targets of one kind of engine at one load level (None: none)."""

    name: str
    first_text_ms: float  # p95, speech onset -> first partial with text
    finalization_ms: float | None  # p95, end of the last word -> the final
    final_change_ms: float | None  # p95, end of speech -> last change of the committed words
    cpu_s_per_stream_s: float | None  # server CPU seconds per second of stream audio
    lag_growth_ms: float | None  # lag_growth_ms()


TARGETS = ("gateway", "whisper")  # --targets: the noop and GPU engines' targets, or the CPU's


def target_profile(engine: str, streams: int, hangover_ms: float) -> TargetProfile:
    """The targets of `engine` (one of TARGETS) at a level of `streams`.

    Whisper on the CPU has its own (the CPU-engine issue): 1 stream: first text <= 0.7 s,
    final <= 1.1 s, <= 0.5 CPU-s per stream-second; more streams (measured at 4): first text
    <= 1.2 s, final <= 1.5 s, no growing lag. The gateway's (noop, and engines on a GPU) bound
    the finalization by the hangover the server must wait anyway.
    """
    if engine == "whisper" and streams <= 1:
        return TargetProfile("whisper-cpu, 1 stream", 700.0, None, 1100.0, 0.5, None)
    if engine == "whisper":
        return TargetProfile(
            "whisper-cpu, 4 streams", 1200.0, None, 1500.0, None, LAG_GROWTH_TARGET_MS
        )
    return TargetProfile(
        "gateway", FIRST_PARTIAL_TARGET_MS, hangover_ms + FINALIZATION_MARGIN_MS, None, None, None
    )


def lag_growth_ms(samples: Sequence[tuple[float, float]], duration_ms: float) -> float | None:
    """Median final latency of the utterances whose speech ended in the last third of the
    streams minus that of the first third: an engine that cannot keep up falls further behind
    as the run goes on, which a p95 over the whole run hides. None when a third has none."""
    first = [latency for at, latency in samples if at < duration_ms / 3]
    last = [latency for at, latency in samples if at >= 2 * duration_ms / 3]
    if not first or not last:
        return None
    return round(percentile(last, 50) - percentile(first, 50), 1)


# --- the command -----------------------------------------------------------------------------


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stream_load", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="noop", help="noop[:ms], whisper, auto or a folder")
    parser.add_argument(
        "--streams", default="16", help="concurrent streams, or a list run in turn: 1,4,16"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per stream")
    parser.add_argument("--frame-ms", type=int, default=100, help="audio per WebSocket frame")
    parser.add_argument("--url", help="use this running server (ws://host:port) instead")
    parser.add_argument(
        "--workers",
        default="1",
        help="gateway worker processes of the started server (server.workers, over --config's),"
        " or a list: 1,2 starts a server with each count in turn and runs every level on it",
    )
    parser.add_argument(
        "--refine-model",
        metavar="M",
        help="the started server's refine model (its --refine-model); streams refine async",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML settings for the started server")
    parser.add_argument(
        "--captions",
        choices=("popon", "rollup", "off"),
        default="popon",
        help="caption mode of every stream (caption delay is measured from /metrics)",
    )
    parser.add_argument(
        "--targets",
        choices=("auto", *TARGETS),
        default="auto",
        help="which targets to judge by: whisper (CPU engine) or gateway (noop, GPU engines); "
        "auto: by the engine family the started server reports, else by --model",
    )
    parser.add_argument(
        "--ramp",
        action="store_true",
        help="stop at the first level that breaks p95 finalization or loses finals; one "
        "--streams value doubles until then",
    )
    args = parser.parse_args(argv)
    try:
        args.levels = [int(n) for n in args.streams.split(",")]
    except ValueError:
        parser.error(f"--streams: expected numbers separated by commas, got {args.streams!r}")
    try:
        args.worker_counts = [int(n) for n in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers: expected numbers separated by commas, got {args.workers!r}")
    if any(n < 1 for n in args.worker_counts):
        parser.error("--workers must be >= 1")
    if args.url and args.worker_counts != [1]:
        parser.error("--workers starts servers with that many workers: not with --url")
    if any(n < 1 for n in args.levels) or args.seconds <= 0 or args.frame_ms < 10:
        parser.error("--streams must be >= 1, --seconds > 0 and --frame-ms >= 10")
    return args


def engine_targets(choice: str, family: str) -> str:
    """The TARGETS entry to judge by: `choice` unless it is auto, else by the engine family."""
    if choice != "auto":
        return choice
    return "whisper" if family == "whisper" else "gateway"


def levels_to_run(levels: list[int], ramp: bool) -> list[int]:
    if ramp and len(levels) == 1:
        return [levels[0] * 2**i for i in range(16)]
    return levels


async def run_levels(
    args: argparse.Namespace, clips: list[Clip], tape: Tape, workers: int
) -> tuple[list[dict], ServerProcess, str]:
    """Run every level on one server (started with `workers` gateway workers, or --url): the
    levels' figures, the server and the targets judged by."""
    gateway_only = args.url is None and args.model.startswith("noop") and args.frame_ms == 100
    async with contextlib.AsyncExitStack() as stack:
        if args.url:
            server = ServerProcess(None, endpoints(args.url))
            await _until_ready(server.server, None, None)
        else:
            server = await stack.enter_async_context(
                spawned_server(args.model, args.config, args.refine_model, workers)
            )
        engine = engine_targets(args.targets, server.family or args.model)
        if args.captions != "off":
            stream = f"{server.server.stream}?captions_mode={args.captions}"
            server = dataclasses.replace(
                server, server=dataclasses.replace(server.server, stream=stream)
            )
        progress("warming up the engine with one clip")
        await warm_up(server.server, clips[0].frames)
        levels = []
        for count in levels_to_run(args.levels, args.ramp):
            progress(f"level: {count} streams x {args.seconds:g} s")
            plans = plan_streams(tape, count, args.seconds, args.frame_ms)
            run = await run_level(server, plans, args.frame_ms, args.seconds)
            figures = level_figures(plans, run, args.frame_ms, gateway_only, engine)
            print(report(figures, args.model, args.frame_ms), flush=True)
            levels.append(figures)
            if args.ramp and not figures["sustained"]:
                break
            await asyncio.sleep(1.0)  # let the server close the last sessions
    return levels, server, engine


def outcome(levels: list[dict]) -> dict:
    """The levels of one server and the highest sustained and at the targets (0: none)."""
    return {
        "levels": levels,
        "highest_sustained_streams": max(
            (f["streams"] for f in levels if f["sustained"]), default=0
        ),
        "highest_streams_at_slo": max((f["streams"] for f in levels if f["at_slo"]), default=0),
    }


def compare_workers(runs: list[tuple[int, list[dict]]]) -> dict:
    """The figures of several servers, one per worker count (`runs`: count, its levels): each
    one's outcome, whether a higher level failed (else the highest level run is only a lower
    bound of the limit), and its ratios to the smallest count's."""
    entries = []
    for workers, levels in runs:
        entry = {"workers": workers, **outcome(levels)}
        for key, verdict in (
            ("highest_sustained_streams", "sustained"),
            ("highest_streams_at_slo", "at_slo"),
        ):
            entry[f"{verdict}_bracketed"] = any(
                f["streams"] > entry[key] and not f[verdict] for f in levels
            )
        entries.append(entry)
    base = min(entries, key=lambda e: e["workers"])
    for entry in entries:
        for key, ratio in (
            ("highest_sustained_streams", "sustained_ratio"),
            ("highest_streams_at_slo", "at_slo_ratio"),
        ):
            entry[ratio] = round(entry[key] / base[key], 2) if base[key] else None
    return {"workers": entries, "ratio_to_workers": base["workers"]}


def workers_report(result: dict) -> str:
    """The comparison of worker counts (compare_workers), for the end of the printed report."""

    def highest(entry: dict, key: str, verdict: str) -> str:
        return f"{'' if entry[f'{verdict}_bracketed'] else '>= '}{entry[key]}"

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:g}"

    base = result["ratio_to_workers"]
    lines = ["== gateway workers (server.workers, one engine process): highest streams =="]
    for entry in result["workers"]:
        n = entry["workers"]
        line = (
            f"{n} worker{'s' if n > 1 else ' '}: "
            f"{highest(entry, 'highest_sustained_streams', 'sustained')} sustained, "
            f"{highest(entry, 'highest_streams_at_slo', 'at_slo')} at the targets"
        )
        if n != base:
            line += (
                f"; {n} : {base} workers = {ratio(entry['sustained_ratio'])} sustained, "
                f"{ratio(entry['at_slo_ratio'])} at the targets"
            )
        lines.append(line)
    if not all(e["sustained_bracketed"] and e["at_slo_bracketed"] for e in result["workers"]):
        lines.append("(>=: no higher level run failed, so the limit lies above it)")
    return "\n".join(lines)


async def run_benchmark(args: argparse.Namespace) -> tuple[dict, Path]:
    """Run every level on one server per worker count and record the figures with write_result:
    one count keeps the record of one server; several are side by side under `workers`."""
    clips = load_clips(args.frame_ms)
    tape = build_tape(clips, args.frame_ms)
    runs = []
    for workers in args.worker_counts:
        if len(args.worker_counts) > 1:
            progress(f"server with {workers} gateway worker(s)")
        levels, server, engine = await run_levels(args, clips, tape, workers)
        runs.append((workers, levels))
    if len(runs) == 1:
        result = outcome(runs[0][1])
    else:
        result = compare_workers(runs)
    settings = {
        "model": args.model,
        "refine_model": args.refine_model,
        "url": args.url,
        "config": args.config,
        "workers": args.worker_counts,
        "streams": list(dict.fromkeys(f["streams"] for _, levels in runs for f in levels)),
        "ramp": args.ramp,
        "seconds_per_stream": args.seconds,
        "frame_ms": args.frame_ms,
        "captions": args.captions,
        "server_event_loop": server.event_loop,
        "server_engine_family": server.family,
        "targets": engine,
        "pacing": "frame k sent at t0+(k+1)*frame; latencies from when the audio was spoken",
        "clips": [
            {"id": c.id, "onset_ms": c.onset_ms, "duration_ms": c.duration_ms} for c in clips
        ],
        "gap_s": GAP_S,
        "tail_ms": TAIL_MS,
        "tape_period_s": tape.period * args.frame_ms / 1000,
        "onset_dbfs": ONSET_DBFS,
        "seed": SEED,
    }
    path = write_result("stream_load", result, settings)
    if len(runs) == 1:
        progress(
            f"highest sustained level: {result['highest_sustained_streams']} streams; "
            f"at SLO: {result['highest_streams_at_slo']}; written to {path}"
        )
    else:
        print(workers_report(result), flush=True)
        progress(f"written to {path}")
    return result, path


def report(f: dict, model: str, frame_ms: int) -> str:
    """A human-readable summary of one level."""

    def row(label: str, s: dict) -> str:
        if not s["n"]:
            return f"{label:15s} no samples"
        return (
            f"{label:15s} p50 {s['p50']:7.0f}  p95 {s['p95']:7.0f}  p99 {s['p99']:7.0f}  "
            f"max {s['max']:7.0f} ms  (n={s['n']})"
        )

    def verdict(name: str) -> str:
        t = f["targets"][name]
        if t["limit"] is None:
            return "(no target)"
        ok = {True: "ok", False: "FAIL", None: "n/a"}[t["ok"]]
        return f"target {t['limit']}: {ok}"

    growth = "n/a" if f["lag_growth_ms"] is None else f"{f['lag_growth_ms']:+.0f} ms"
    refine = f["refine"]
    lines = [
        f"== {f['streams']} streams x {f['audio_s'] / max(1, f['streams']):.0f} s "
        f"({model}, {frame_ms} ms frames, hangover {f['hangover_ms']:g} ms; "
        f"targets: {f['target_profile']}) ==",
        f"{row('first partial', f['first_partial_ms'])}  {verdict('first_partial_p95_ms')}"
        f"  [{f['first_text_in_final']} first shown in the final]",
        f"{row('finalization', f['finalization_ms'])}  {verdict('finalization_p95_ms')}",
        f"{row('final (commit)', f['final_change_ms'])}  {verdict('final_change_p95_ms')}"
        "  (end of speech to the last change of the committed words)",
        f"lag growth      {growth}  {verdict('lag_growth_ms')}"
        "  (median final (commit), last third of the run vs the first)",
        *(
            row(f"  {stage}", f[f"{stage}_ms"])
            for stage in ("endpoint", "queue", "compute", "delivery")
        ),
        row("partial delay", f["partial_delay_ms"]) + "  (from the end of its audio)",
        f"finals          {f['finals']} for {f['utterances']} utterances: "
        f"{f['finals_missing']} missing, {f['finals_extra']} extra, {f['finals_empty']} empty; "
        f"{f['streams_failed']} streams failed  {verdict('finals_missing')}",
        f"partials        {f['partials']} received, dropped by the server: "
        f"{f['partials_dropped'] or 'none'}; change rate {f['change_rate']:.3f}, "
        f"stable change rate {f['stable_change_rate']:.3f} ({f['words_shown']} words shown)",
        f"lag             {f['status_messages']} status messages (max {f['status_lag_max_ms']} ms);"
        f" /metrics lag max {f['lag_s']['max']:.2f} s, queued audio max "
        f"{f['queued_audio_max_s']:.1f} s; batch size mean {f['batch_size_mean']}",
        *(
            [
                f"{row('refine', refine['latency_ms'])}  (final's arrival to its refined)",
                f"refined         {refine['refined']} ({refine['changed']} changed), skipped: "
                + (", ".join(f"{n} {why}" for why, n in refine["skipped"].items()) or "none"),
            ]
            if refine["refined"] or refine["skipped"]
            else []
        ),
        f"caption delay   p95 cue {f['caption_delay_p95_s']['cue']} s, append "
        f"{f['caption_delay_p95_s']['append']} s (bucket bounds)  {verdict('caption_delay_p95_s')}",
    ]
    if f["server_cpu_s"] is not None:
        lines.append(
            f"server CPU      {f['server_cpu_s']:.2f} s for {f['audio_s']:.0f} s of audio = "
            f"{f['server_cpu_ms_per_stream_s']:.3f} ms per stream-second -> "
            f"{f['streams_per_core']:,.0f} real-time streams per core  "
            f"{verdict('streams_per_core')}; CPU-s per stream-second "
            f"{verdict('cpu_s_per_stream_s')}"
        )
    late = f["generator_send_late_ms"]
    lines.append(
        f"load generator  {f['generator_cpu_s']:.1f} s CPU in {f['wall_s']:.0f} s; frames sent "
        f"late by p95 {late['p95']} ms, max {late['max']} ms; other processes"
        f"{'' if f['server_cpu_s'] is not None else ' (the server included)'} used "
        f"{f['other_cpu_cores']:.2f} cores; the machine was busy "
        f"{f['machine_busy_cores']:.2f} cores"
    )
    if late["p95"] is not None and late["p95"] > SEND_LATE_WARN_MS:
        lines.append("WARNING: the load generator fell behind real time; latencies overstated")
    if f["server_cpu_s"] is not None and f["other_cpu_cores"] > OTHER_CPU_WARN_CORES:
        lines.append("WARNING: other processes competed for the CPU; latencies overstated")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(run_benchmark(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The cross-stream batching worker: the only caller of a model.

Requests from every session land in two queues. One worker thread owns the engine and repeatedly
takes a batch: finals first (oldest first, never dropped), else partials: those that would show
a segment's first words before the rest, then the oldest, with others of similar length (one
length bucket), so one stream's partial does not wait for, nor get padded to, another's much
longer audio.
A partial is dropped, never computed, when a newer partial or the final of its segment arrives,
or when it has waited longer than `partial_deadline_ms` (the engine is behind: shed partials
first). An exception in a batch fails only the requests in it.

Results are delivered through each request's `on_done` callback, called on the worker thread;
an asyncio gateway hands them back to its loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Literal

from .api import DEFAULT_OPTIONS, Engine, Hypothesis, Segment, length_bucket

log = logging.getLogger("engine.scheduler")

Kind = Literal["partial", "final"]


@dataclass(eq=False)
class Request:
    kind: Kind
    key: Hashable  # one open segment, e.g. (session id, channel, segment id)
    segment: Segment
    on_done: Callable[[Outcome], None]
    submitted: float = field(default_factory=time.monotonic)
    first_text: bool = False  # a partial whose segment shows no words yet: it goes first

    @property
    def audio_s(self) -> float:
        return len(self.segment.audio) / self.segment.sample_rate


@dataclass(frozen=True)
class Outcome:
    request: Request
    status: Literal["done", "dropped", "failed"]
    hypothesis: Hypothesis | None = None
    reason: str = ""
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0


@dataclass
class SchedulerStats:
    """Counters read by the metrics endpoint and the load benchmark."""

    batches: dict[str, int] = field(default_factory=lambda: {"partial": 0, "final": 0})
    completed: dict[str, int] = field(default_factory=lambda: {"partial": 0, "final": 0})
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> partials dropped
    failed: int = 0
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=1000))
    audio_seconds: float = 0.0
    compute_seconds: float = 0.0


@dataclass(frozen=True)
class SchedulerConfig:
    """How requests from all sessions are batched for the model: the `scheduler` section of
    the server's configuration, declared here once. Each field's metadata holds the limits the
    configuration loader checks (`ge`/`gt`: at least / above), so the engine needs no loader."""

    max_wait_ms: float = field(default=10.0, metadata={"ge": 0})
    max_batch_audio_s: float = field(default=240.0, metadata={"gt": 0})
    partial_deadline_ms: float = field(default=1000.0, metadata={"gt": 0})
    max_partials: int = field(default=4096, metadata={"ge": 1})


class Scheduler:
    """`max_batch`: the most requests per engine call, the engine's own limit
    (`engine.max_batch`), which the engine family is loaded with too."""

    def __init__(
        self,
        engine: Engine,
        config: SchedulerConfig | None = None,
        *,
        max_batch: int = DEFAULT_OPTIONS.max_batch,
    ) -> None:
        self.engine = engine
        self.config = config or SchedulerConfig()
        self.max_batch = max_batch
        self.stats = SchedulerStats()
        self._finals: deque[Request] = deque()
        self._partials: dict[Hashable, Request] = {}  # newest partial per segment, oldest first
        self._cond = threading.Condition()
        self._stopping = False
        self._idle = False  # the worker waits for work (not for a batch to fill)
        self._thread: threading.Thread | None = None

    # --- submitting -----------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request; supersedes the pending partial of the same segment."""
        dropped: list[tuple[Request, str]] = []
        with self._cond:
            if self._stopping and request.kind == "partial":
                dropped.append((request, "stopping"))
            else:
                old = self._partials.pop(request.key, None)
                if old is not None:
                    dropped.append((old, "superseded" if request.kind == "partial" else "final"))
                if request.kind == "final":
                    self._finals.append(request)
                else:
                    self._partials[request.key] = request
                    if len(self._partials) > self.config.max_partials:
                        oldest = next(iter(self._partials))
                        dropped.append((self._partials.pop(oldest), "queue_full"))
                # Wake the worker when it has nothing to do or a batch is full; while it waits
                # for a batch to fill, waking it per request would only cost thread switches.
                queued = len(self._finals) + len(self._partials)
                if self._idle or queued >= self.max_batch:
                    self._cond.notify()
        for req, reason in dropped:
            self._drop(req, reason)

    def cancel(self, key: Hashable) -> None:
        """Forget the pending partial of a segment (its session went away)."""
        with self._cond:
            old = self._partials.pop(key, None)
        if old is not None:
            self._drop(old, "cancelled")

    # --- state for status messages and metrics ----------------------------------------------

    def backlog(self) -> tuple[float, float]:
        """(lag_ms, queued_audio_ms): how long the oldest queued final has waited, and the audio
        waiting in both queues."""
        now = time.monotonic()
        with self._cond:
            lag = (now - self._finals[0].submitted) * 1000 if self._finals else 0.0
            queued = sum(r.audio_s for r in self._finals)
            queued += sum(r.audio_s for r in self._partials.values())
        return lag, queued * 1000

    def queue_lengths(self) -> dict[str, int]:
        with self._cond:
            return {"final": len(self._finals), "partial": len(self._partials)}

    # --- the worker ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued finals, drop the queued partials, and stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self, block: bool = False) -> bool:
        """Take and run one batch (for tests and single-threaded use); False when idle."""
        batch = self._next_batch(block)
        if batch is None:
            return False
        self._run(batch)
        return True

    def _work(self) -> None:
        while True:
            batch = self._next_batch(block=True)
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self, block: bool) -> list[Request] | None:
        cfg = self.config
        stale: list[Request] = []
        with self._cond:
            while block and not (self._finals or self._partials or self._stopping):
                self._idle = True
                self._cond.wait()
            self._idle = False
            if block and not self._stopping:
                self._wait_for_more()
            stale = self._shed_stale()
            if self._stopping:
                stale += list(self._partials.values())
                self._partials.clear()
            batch = self._take(self._finals, cfg) if self._finals else []
            if not batch and self._partials:
                batch = self._take_partials(cfg)
        for req in stale:
            self._drop(req, "deadline" if not self._stopping else "stopping")
        if not batch:
            return None if (self._stopping or not block) else []
        return batch

    def _wait_for_more(self) -> None:
        """Give other sessions up to `max_wait_ms` after the oldest queued request arrived to
        join the batch, unless it is already full."""
        queued = [*self._finals, *self._partials.values()]
        oldest = min(r.submitted for r in queued) if queued else time.monotonic()
        deadline = oldest + self.config.max_wait_ms / 1000
        while len(self._finals) + len(self._partials) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                return
            self._cond.wait(remaining)

    def _shed_stale(self) -> list[Request]:
        limit = time.monotonic() - self.config.partial_deadline_ms / 1000
        stale = [k for k, r in self._partials.items() if r.submitted < limit]
        return [self._partials.pop(k) for k in stale]

    def _take(self, queue: deque[Request], cfg: SchedulerConfig) -> list[Request]:
        batch: list[Request] = []
        audio = 0.0
        while queue and len(batch) < self.max_batch:
            if batch and audio + queue[0].audio_s > cfg.max_batch_audio_s:
                break
            audio += queue[0].audio_s
            batch.append(queue.popleft())
        return batch

    def _take_partials(self, cfg: SchedulerConfig) -> list[Request]:
        """The oldest partial and the oldest others of its length bucket (`length_bucket`), so
        a partial never waits behind, or is padded to, much longer audio. Partials that would
        show a segment's first words go before those that refresh text already shown: the
        first text is what a caller waits for."""
        waiting = sorted(self._partials.values(), key=lambda r: not r.first_text)  # stable
        bucket = length_bucket(waiting[0].audio_s)
        queue = deque(r for r in waiting if length_bucket(r.audio_s) == bucket)
        batch = self._take(queue, cfg)
        for req in batch:
            del self._partials[req.key]
        return batch

    def _run(self, batch: list[Request]) -> None:
        if not batch:
            return
        kind = batch[0].kind
        call = self.engine.transcribe if kind == "final" else self.engine.draft
        started = time.monotonic()
        try:
            hypotheses = call([r.segment for r in batch])
        except Exception as err:  # a bad batch fails its own requests, nothing else
            log.exception("batch failed", extra={"kind": kind, "size": len(batch)})
            self.stats.failed += len(batch)
            for req in batch:
                self._finish(
                    Outcome(
                        req,
                        "failed",
                        reason=f"{type(err).__name__}: {err}",
                        queue_ms=(started - req.submitted) * 1000,
                    )
                )
            return
        compute_ms = (time.monotonic() - started) * 1000
        stats = self.stats
        stats.batches[kind] += 1
        stats.completed[kind] += len(batch)
        stats.batch_sizes.append(len(batch))
        stats.audio_seconds += sum(r.audio_s for r in batch)
        stats.compute_seconds += compute_ms / 1000
        for req, hyp in zip(batch, hypotheses, strict=True):
            self._finish(
                Outcome(
                    req,
                    "done",
                    hyp,
                    queue_ms=(started - req.submitted) * 1000,
                    compute_ms=compute_ms,
                    batch_size=len(batch),
                )
            )

    def _drop(self, request: Request, reason: str) -> None:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
        self._finish(Outcome(request, "dropped", reason=reason))

    @staticmethod
    def _finish(outcome: Outcome) -> None:
        try:
            outcome.request.on_done(outcome)
        except Exception:  # a broken callback must not stop the worker
            log.exception("result callback failed")

"""The cross-stream batching worker: the only caller of a model.

Requests from every session land in three queues. One worker thread owns the engines and
repeatedly takes a batch: finals first (oldest first, never dropped), else partials: those that
would show a segment's first words before the rest, then the oldest, with others of similar
length (one length bucket), so one stream's partial does not wait for, nor get padded to,
another's much longer audio.
A partial is dropped, never computed, when a newer partial or the final of its segment arrives,
or when it has waited longer than `partial_deadline_ms` (the engine is behind: shed partials
first). An exception in a batch fails only the requests in it.

Refine requests (an accuracy pass: `refine_engine` re-transcribes a final's audio) are the
lowest priority: a small batch of them (one length bucket) is taken only when no final or
partial waits, so they delay the primary by at most the one refine batch already running. They
are independent of partials and finals of the same key (neither supersedes the other); they
are skipped, never computed, when their queue is full, past their `deadline`, cancelled or
stopping.

Results are delivered through each request's `on_done` callback, called on the worker thread;
an asyncio gateway hands them back to its loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Literal

from .api import DEFAULT_OPTIONS, Engine, Hypothesis, Segment, length_bucket

log = logging.getLogger("engine.scheduler")

Kind = Literal["partial", "final", "refine"]
KINDS: tuple[Kind, ...] = typing.get_args(Kind)


@dataclass(eq=False)
class Request:
    kind: Kind
    key: Hashable  # one open segment, e.g. (session id, channel, segment id)
    segment: Segment
    on_done: Callable[[Outcome], None]
    submitted: float = field(default_factory=time.monotonic)
    first_text: bool = False  # a partial whose segment shows no words yet: it goes first
    deadline: float | None = None  # time.monotonic() after which a refine result is of no use

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

    batches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    completed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> partials dropped
    refine_skipped: dict[str, int] = field(default_factory=dict)  # reason -> refines dropped
    failed: int = 0  # every failed request, refine ones included: an engine raised
    refine_failed: int = 0  # the refine requests among `failed`
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
    max_refine_queue: int = field(default=32, metadata={"ge": 1})


class Scheduler:
    """`max_batch`: the most requests per engine call, the engine's own limit
    (`engine.max_batch`), which the engine family is loaded with too. `refine_engine`: the
    model of the refine pass (None: no refine pass; refine requests are then refused)."""

    def __init__(
        self,
        engine: Engine,
        config: SchedulerConfig | None = None,
        *,
        max_batch: int = DEFAULT_OPTIONS.max_batch,
        refine_engine: Engine | None = None,
    ) -> None:
        self.engine = engine
        self.refine_engine = refine_engine
        self.config = config or SchedulerConfig()
        self.max_batch = max_batch
        self.stats = SchedulerStats()
        self._finals: deque[Request] = deque()
        self._partials: dict[Hashable, Request] = {}  # newest partial per segment, oldest first
        self._refines: deque[Request] = deque()  # oldest first; several may share a key
        self._cond = threading.Condition()
        self._stopping = False
        self._idle = False  # the worker waits for work (not for a batch to fill)
        self._thread: threading.Thread | None = None

    # --- submitting -----------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request; a partial or final supersedes the pending partial of the same
        segment. A refine request is answered at once when it cannot be computed in time."""
        if request.kind == "refine":
            self._submit_refine(request)
            return
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

    def _submit_refine(self, request: Request) -> None:
        """Queue a refine request unless it is already useless (stopping, past its deadline) or
        the queue is full: the refine pass is optional, so it is skipped rather than queued
        without bound. Expired requests are shed first so they do not take a live one's place."""
        if self.refine_engine is None:
            raise ValueError("a refine request needs a Scheduler with a refine_engine")
        dropped: list[tuple[Request, str]] = []
        with self._cond:
            expired = self._shed_expired_refines()
            dropped += [(req, "deadline") for req in expired]
            if self._stopping:
                dropped.append((request, "stopping"))
            elif request.deadline is not None and request.deadline <= time.monotonic():
                dropped.append((request, "deadline"))
            elif len(self._refines) >= self.config.max_refine_queue:
                dropped.append((request, "queue_full"))
            else:
                self._refines.append(request)
                if self._idle:
                    self._cond.notify()
        for req, reason in dropped:
            self._drop(req, reason)

    def cancel(self, key: Hashable) -> None:
        """Forget the pending partial and refine requests of a segment (its session went
        away)."""
        with self._cond:
            old = self._partials.pop(key, None)
            cancelled = [r for r in self._refines if r.key == key]
            if cancelled:
                self._refines = deque(r for r in self._refines if r.key != key)
        if old is not None:
            cancelled.insert(0, old)
        for req in cancelled:
            self._drop(req, "cancelled")

    # --- state for status messages and metrics ----------------------------------------------

    def backlog(self) -> tuple[float, float]:
        """(lag_ms, queued_audio_ms): how long the oldest queued final has waited, and the audio
        waiting in the finals and partials queues (refine work never holds up a stream's
        results, so it is not the stream's backlog)."""
        now = time.monotonic()
        with self._cond:
            lag = (now - self._finals[0].submitted) * 1000 if self._finals else 0.0
            queued = sum(r.audio_s for r in self._finals)
            queued += sum(r.audio_s for r in self._partials.values())
        return lag, queued * 1000

    def queue_lengths(self) -> dict[str, int]:
        with self._cond:
            return {
                "final": len(self._finals),
                "partial": len(self._partials),
                "refine": len(self._refines),
            }

    # --- the worker ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued finals, drop the queued partials and refines, and stop the
        worker."""
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
        with self._cond:
            while block and not (self._finals or self._partials or self._refines or self._stopping):
                self._idle = True
                self._cond.wait()
            self._idle = False
            if block and not self._stopping:
                self._wait_for_more()
            stale = self._shed_stale() + self._shed_expired_refines()
            if self._stopping:
                stale += [*self._partials.values(), *self._refines]
                self._partials.clear()
                self._refines.clear()
            batch = self._take(self._finals, cfg, self.max_batch) if self._finals else []
            if not batch and self._partials:
                batch = self._take_partials(cfg)
            if not batch and self._refines:
                batch = self._take_refines(cfg)
        for req in stale:
            self._drop(req, "deadline" if not self._stopping else "stopping")
        if not batch:
            return None if (self._stopping or not block) else []
        return batch

    def _wait_for_more(self) -> None:
        """Give other sessions up to `max_wait_ms` after the oldest queued request arrived to
        join the batch, unless it is already full. Refine requests count only when nothing else
        waits, so a long-queued refine does not cut short the wait of a fresh final."""
        queued = [*self._finals, *self._partials.values()] or list(self._refines)
        oldest = min(r.submitted for r in queued) if queued else time.monotonic()
        deadline = oldest + self.config.max_wait_ms / 1000
        while not self._batch_full():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                return
            self._cond.wait(remaining)

    def _batch_full(self) -> bool:
        primary = len(self._finals) + len(self._partials)
        if primary:
            return primary >= self.max_batch
        return len(self._refines) >= self.max_refine_batch

    @property
    def max_refine_batch(self) -> int:
        """Refine batches are small so that a final arriving meanwhile waits little."""
        return max(1, self.max_batch // 4)

    def _shed_stale(self) -> list[Request]:
        limit = time.monotonic() - self.config.partial_deadline_ms / 1000
        stale = [k for k, r in self._partials.items() if r.submitted < limit]
        return [self._partials.pop(k) for k in stale]

    def _shed_expired_refines(self) -> list[Request]:
        """Remove and return the refine requests past their deadline (their result is of no
        use); called with the lock held."""
        now = time.monotonic()
        expired = [r for r in self._refines if r.deadline is not None and r.deadline <= now]
        if expired:
            self._refines = deque(
                r for r in self._refines if r.deadline is None or r.deadline > now
            )
        return expired

    def _take(self, queue: deque[Request], cfg: SchedulerConfig, limit: int) -> list[Request]:
        batch: list[Request] = []
        audio = 0.0
        while queue and len(batch) < limit:
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
        batch = self._take(queue, cfg, self.max_batch)
        for req in batch:
            del self._partials[req.key]
        return batch

    def _take_refines(self, cfg: SchedulerConfig) -> list[Request]:
        """The oldest refine request and the oldest others of its length bucket, at most
        `max_refine_batch` of them."""
        bucket = length_bucket(self._refines[0].audio_s)
        queue = deque(r for r in self._refines if length_bucket(r.audio_s) == bucket)
        batch = self._take(queue, cfg, self.max_refine_batch)
        taken = {id(r) for r in batch}
        self._refines = deque(r for r in self._refines if id(r) not in taken)
        return batch

    def _run(self, batch: list[Request]) -> None:
        if not batch:
            return
        kind = batch[0].kind
        started = time.monotonic()
        try:
            hypotheses = self._call(kind, [r.segment for r in batch])
        except Exception as err:  # a bad batch fails its own requests, nothing else
            log.exception("batch failed", extra={"kind": kind, "size": len(batch)})
            self.stats.failed += len(batch)
            if kind == "refine":
                self.stats.refine_failed += len(batch)
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

    def _call(self, kind: Kind, segments: list[Segment]) -> list[Hypothesis]:
        if kind == "final":
            return self.engine.transcribe(segments)
        if kind == "partial":
            return self.engine.draft(segments)
        if self.refine_engine is None:  # unset after the request was queued
            raise RuntimeError("the refine engine was removed")
        return self.refine_engine.transcribe(segments)

    def _drop(self, request: Request, reason: str) -> None:
        counts = self.stats.refine_skipped if request.kind == "refine" else self.stats.dropped
        counts[reason] = counts.get(reason, 0) + 1
        self._finish(Outcome(request, "dropped", reason=reason))

    @staticmethod
    def _finish(outcome: Outcome) -> None:
        try:
            outcome.request.on_done(outcome)
        except Exception:  # a broken callback must not stop the worker
            log.exception("result callback failed")

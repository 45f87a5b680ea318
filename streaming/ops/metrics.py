"""Prometheus metrics of one server process, all named `streamscribe_*`.

Each server owns its registry (tests can run several servers in one process); scheduler
counters are read at scrape time rather than pushed from the worker thread.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from engine.remote import RemoteScheduler, SchedulerPool
from engine.scheduler import KINDS, Scheduler

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.4, 0.6, 0.8, 1.0, 1.5, 2.5, 5.0, 10.0)
CAPTION_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_active = Gauge(
            "streamscribe_sessions_active",
            "Open streams",
            registry=r,
            multiprocess_mode="livesum",  # several workers: the sum over the live ones
        )
        self.scheduler: SchedulerCollector | None = None
        self.sessions = Counter(
            "streamscribe_sessions", "Streams accepted", ["dialect"], registry=r
        )
        self.rejections = Counter(
            "streamscribe_rejections", "Handshakes refused", ["reason"], registry=r
        )
        self.audio_seconds = Counter(
            "streamscribe_audio_seconds", "Audio received (per channel, 16 kHz time)", registry=r
        )
        self.final_latency = Histogram(
            "streamscribe_final_latency_seconds",
            "From the end of a segment's last word to its final, by stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_partial_latency = Histogram(
            "streamscribe_first_partial_latency_seconds",
            "From speech start (audio time) to the first non-empty partial",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.caption_delay = Histogram(
            "streamscribe_caption_delay_seconds",
            "From the end of a caption's last word to the caption being sent (audio received "
            "meanwhile), by kind: append (roll-up) or cue (pop-on)",
            ["kind"],
            buckets=CAPTION_BUCKETS,
            registry=r,
        )
        self.resumes = Counter(
            "streamscribe_session_resumes",
            "Streams whose connection dropped without a close, by outcome: detached (kept for a "
            "resume), resumed, expired (no client came back within server.resume_window_s)",
            ["outcome"],
            registry=r,
        )
        self.errors = Counter("streamscribe_errors", "Errors sent to clients", ["code"], registry=r)
        self.finals = Counter("streamscribe_finals", "Finals delivered", registry=r)
        self.partials = Counter("streamscribe_partials", "Partials delivered", registry=r)

    def watch(self, scheduler: Scheduler | RemoteScheduler | SchedulerPool) -> None:
        """Export the scheduler's counters from now on (the engine loads after start-up)."""
        self.scheduler = SchedulerCollector(scheduler)
        self.registry.register(self.scheduler)

    def render(self) -> bytes:
        """This server's metrics; with several worker processes (server.workers sets
        PROMETHEUS_MULTIPROC_DIR for them), every worker's, summed, and the engine's once."""
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, folder)
        if self.scheduler is not None:
            registry.register(self.scheduler)
        return generate_latest(registry)


class SchedulerCollector:
    """Reads the scheduler's counters when Prometheus scrapes."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self):
        stats = self.scheduler.stats
        batches = CounterMetricFamily("streamscribe_batches", "Engine batches run", labels=["kind"])
        requests = CounterMetricFamily(
            "streamscribe_engine_requests", "Engine requests completed", labels=["kind"]
        )
        for kind in KINDS:
            batches.add_metric([kind], stats.batches[kind])
            requests.add_metric([kind], stats.completed[kind])
        dropped = CounterMetricFamily(
            "streamscribe_partials_dropped",
            "Partial requests dropped, never computed",
            labels=["reason"],
        )
        for reason, count in sorted(stats.dropped.items()):
            dropped.add_metric([reason], count)
        refine_skipped = CounterMetricFamily(
            "streamscribe_refine_skipped",
            "Refine requests skipped, never computed",
            labels=["reason"],
        )
        for reason, count in sorted(stats.refine_skipped.items()):
            refine_skipped.add_metric([reason], count)
        failed = CounterMetricFamily("streamscribe_engine_failures", "Engine requests that failed")
        failed.add_metric([], stats.failed)
        lag_ms, queued_ms = self.scheduler.backlog()
        lag = GaugeMetricFamily("streamscribe_lag_seconds", "Wait of the oldest queued final")
        lag.add_metric([], lag_ms / 1000)
        queued = GaugeMetricFamily("streamscribe_queued_audio_seconds", "Audio waiting")
        queued.add_metric([], queued_ms / 1000)
        sizes = list(stats.batch_sizes)
        mean_batch = GaugeMetricFamily(
            "streamscribe_batch_size_mean", "Mean size of the last 1000 batches"
        )
        mean_batch.add_metric([], sum(sizes) / len(sizes) if sizes else 0.0)
        compute = CounterMetricFamily(
            "streamscribe_engine_compute_seconds", "Time spent in the engine"
        )
        compute.add_metric([], stats.compute_seconds)
        yield from (
            batches,
            requests,
            dropped,
            refine_skipped,
            failed,
            lag,
            queued,
            mean_batch,
            compute,
        )

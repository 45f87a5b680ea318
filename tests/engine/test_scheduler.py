"""The batching worker: priorities, superseding, shedding, failures, draining."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.api import Hypothesis, Segment
from engine.scheduler import Request, Scheduler, SchedulerConfig


class FakeEngine:
    """Answers with the segment length; records every batch; can fail or be slow."""

    family, device = "fake", "cpu"

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.delay = delay
        self.fail_on: set[int] = set()  # segment lengths that make a batch raise

    def _answer(self, kind: str, segments) -> list[Hypothesis]:
        lengths = [len(s.audio) for s in segments]
        self.calls.append((kind, lengths))
        time.sleep(self.delay)
        if self.fail_on & set(lengths):
            raise RuntimeError("boom")
        return [Hypothesis(text=f"{kind}:{n}") for n in lengths]

    def draft(self, segments):
        return self._answer("draft", segments)

    def transcribe(self, segments):
        return self._answer("transcribe", segments)


def seg(n: int) -> Segment:
    return Segment(np.zeros(n, dtype=np.float32))


class Collector:
    def __init__(self) -> None:
        self.outcomes = []
        self.lock = threading.Lock()

    def __call__(self, outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def by_status(self, status: str):
        return [o for o in self.outcomes if o.status == status]


@pytest.fixture
def setup():
    engine = FakeEngine()
    sched = Scheduler(engine, SchedulerConfig(max_wait_ms=0), max_batch=3)
    return engine, sched, Collector()


def test_finals_go_before_partials(setup):
    engine, sched, done = setup
    sched.submit(Request("partial", "a", seg(100), done))
    sched.submit(Request("final", "b", seg(200), done))
    sched.submit(Request("partial", "c", seg(300), done))
    while sched.run_once():
        pass
    assert engine.calls == [("transcribe", [200]), ("draft", [100, 300])]
    assert sorted(o.hypothesis.text for o in done.by_status("done")) == [
        "draft:100",
        "draft:300",
        "transcribe:200",
    ]


def test_superseded_partial_is_dropped_not_computed(setup):
    engine, sched, done = setup
    sched.submit(Request("partial", "a", seg(100), done))
    sched.submit(Request("partial", "a", seg(150), done))
    sched.run_once()
    assert engine.calls == [("draft", [150])]
    (dropped,) = done.by_status("dropped")
    assert dropped.reason == "superseded" and len(dropped.request.segment.audio) == 100
    assert sched.stats.dropped == {"superseded": 1}


def test_final_drops_pending_partial_of_its_segment(setup):
    engine, sched, done = setup
    sched.submit(Request("partial", "a", seg(100), done))
    sched.submit(Request("final", "a", seg(120), done))
    while sched.run_once():
        pass
    assert engine.calls == [("transcribe", [120])]
    assert [o.reason for o in done.by_status("dropped")] == ["final"]


def test_batch_limits_count_and_audio():
    engine = FakeEngine()
    sched = Scheduler(engine, SchedulerConfig(max_batch_audio_s=1.0, max_wait_ms=0), max_batch=2)
    done = Collector()
    for n in (6000, 6000, 6000, 16000, 100):
        sched.submit(Request("final", n, seg(n), done))
    while sched.run_once():
        pass
    # 2 per batch at most; 6000+6000 = 0.75 s fits, 6000 + 16000 > 1 s does not.
    assert engine.calls == [
        ("transcribe", [6000, 6000]),
        ("transcribe", [6000]),
        ("transcribe", [16000]),
        ("transcribe", [100]),
    ]
    assert len(done.by_status("done")) == 5


def test_a_failing_batch_fails_only_its_requests(setup):
    engine, sched, done = setup
    engine.fail_on = {666}
    sched.submit(Request("final", "x", seg(666), done))
    sched.submit(Request("final", "y", seg(1), done))
    sched.max_batch = 1
    sched.config = SchedulerConfig(max_wait_ms=0)
    sched.submit(Request("final", "z", seg(2), done))
    while sched.run_once():
        pass
    failed = done.by_status("failed")
    assert [len(o.request.segment.audio) for o in failed] == [666]
    assert "RuntimeError: boom" in failed[0].reason
    assert sorted(o.hypothesis.text for o in done.by_status("done")) == [
        "transcribe:1",
        "transcribe:2",
    ]
    assert sched.stats.failed == 1


def test_stale_partials_are_shed(setup):
    engine, sched, done = setup
    sched.max_batch = 3
    sched.config = SchedulerConfig(max_wait_ms=0, partial_deadline_ms=1)
    sched.submit(Request("partial", "a", seg(100), done))
    time.sleep(0.01)
    sched.run_once()
    assert engine.calls == []
    assert [o.reason for o in done.by_status("dropped")] == ["deadline"]


def test_partial_queue_is_bounded(setup):
    engine, sched, done = setup
    sched.config = SchedulerConfig(max_partials=2)
    for key in "abc":
        sched.submit(Request("partial", key, seg(10), done))
    assert sched.queue_lengths() == {"final": 0, "partial": 2, "refine": 0}
    assert done.by_status("dropped")[0].request.key == "a"


def test_backlog_reports_lag_and_queued_audio(setup):
    _, sched, done = setup
    sched.submit(Request("final", "a", seg(16000), done))
    sched.submit(Request("partial", "b", seg(8000), done))
    time.sleep(0.02)
    lag, queued = sched.backlog()
    assert lag >= 20 and queued == pytest.approx(1500)


def test_worker_thread_batches_across_threads_and_drains_on_stop():
    engine = FakeEngine(delay=0.005)
    sched = Scheduler(engine, SchedulerConfig(max_wait_ms=5), max_batch=8)
    done = Collector()
    sched.start()

    def client(i: int) -> None:
        for j in range(10):
            sched.submit(Request("partial", (i, j), seg(10 + j), done))
            sched.submit(Request("final", (i, j), seg(100 + j), done))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sched.stop(timeout=10)
    finals = [o for o in done.outcomes if o.request.kind == "final"]
    assert len(finals) == 80 and all(o.status == "done" for o in finals)
    assert len(done.outcomes) == 160  # every partial was computed or dropped, none forgotten
    assert max(len(lengths) for _, lengths in engine.calls) > 1  # requests were batched
    assert all(o.queue_ms >= 0 and o.compute_ms > 0 for o in finals)


def test_a_batch_waits_at_most_max_wait_and_goes_as_soon_as_it_is_full():
    engine = FakeEngine()
    sched = Scheduler(engine, SchedulerConfig(max_wait_ms=1000), max_batch=4)
    done = Collector()
    sched.start()
    try:
        started = time.monotonic()
        for i in range(2):  # half a batch: it waits for more, up to max_wait_ms
            sched.submit(Request("final", i, seg(10), done))
        while len(done.outcomes) < 2:
            time.sleep(0.005)
        waited = time.monotonic() - started
        assert 0.95 <= waited < 5.0 and engine.calls == [("transcribe", [10, 10])]

        started = time.monotonic()
        for i in range(4):  # a full batch is taken at once, not at the deadline
            sched.submit(Request("final", 10 + i, seg(20), done))
        while len(done.outcomes) < 6:
            time.sleep(0.005)
        assert time.monotonic() - started < 0.8 and engine.calls[-1] == ("transcribe", [20] * 4)
    finally:
        sched.stop(timeout=10)


def test_partials_are_batched_within_one_length_bucket():
    engine = FakeEngine()
    sched = Scheduler(engine, SchedulerConfig(max_wait_ms=0), max_batch=8)
    done = Collector()
    seconds = (1.5, 7.0, 1.8, 3.0, 1.2, 6.0)
    for i, s in enumerate(seconds):
        sched.submit(Request("partial", i, seg(int(s * 16000)), done))
    while sched.run_once():
        pass
    # oldest first; each batch holds only partials of the oldest one's bucket (<= 2, 8, 4 s)
    assert engine.calls == [
        ("draft", [24000, 28800, 19200]),
        ("draft", [112000, 96000]),
        ("draft", [48000]),
    ]
    assert len(done.by_status("done")) == len(seconds)


def test_length_buckets():
    from engine.api import LENGTH_BUCKETS_S, length_bucket

    assert [length_bucket(s) for s in (0.0, 1.0, 1.01, 3.9, 16.0, 31.9)] == [1, 1, 2, 4, 16, 32]
    assert length_bucket(33.0) == 64 and length_bucket(100.0) == 128
    assert list(LENGTH_BUCKETS_S) == sorted(LENGTH_BUCKETS_S)


def test_partials_showing_a_segments_first_words_go_first():
    engine = FakeEngine()
    sched = Scheduler(engine, SchedulerConfig(max_wait_ms=0), max_batch=2)
    done = Collector()
    sched.submit(Request("partial", "old", seg(16000), done))
    sched.submit(Request("partial", "older", seg(17000), done))
    sched.submit(Request("partial", "new", seg(18000), done, first_text=True))
    while sched.run_once():
        pass
    # the first-text partial anchors the batch; its bucket (<= 2 s) takes 17000, not 16000
    assert engine.calls == [("draft", [18000, 17000]), ("draft", [16000])]


# --- the refine pass ----------------------------------------------------------------------------


class RefineEngine(FakeEngine):
    """The second model: its `transcribe` calls are recorded as "refine"."""

    def transcribe(self, segments):
        return self._answer("refine", segments)


class GatedRefineEngine(RefineEngine):
    """A refine engine whose calls wait until `gate` is set: a batch held running."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def transcribe(self, segments):
        hypotheses = super().transcribe(segments)
        assert self.gate.wait(10)
        return hypotheses


def refine_setup(max_batch: int = 4, **config) -> tuple[FakeEngine, Scheduler, Collector]:
    """A scheduler whose primary and refine engines record their calls in one list, in order."""
    engine, refiner = FakeEngine(), RefineEngine()
    refiner.calls = engine.calls
    sched = Scheduler(
        engine, SchedulerConfig(max_wait_ms=0, **config), max_batch=max_batch, refine_engine=refiner
    )
    return engine, sched, Collector()


def refine(key, n: int, done, deadline: float | None = None) -> Request:
    return Request("refine", key, seg(n), done, deadline=deadline)


def test_refine_runs_only_when_finals_and_partials_are_empty():
    engine, sched, done = refine_setup(max_batch=4)  # refine batches of 1
    sched.submit(refine("a", 100, done))
    sched.submit(refine("b", 101, done))
    sched.submit(Request("partial", "c", seg(200), done))
    sched.run_once()
    sched.submit(Request("final", "d", seg(300), done))  # while refine requests wait
    while sched.run_once():
        pass
    assert engine.calls == [
        ("draft", [200]),
        ("transcribe", [300]),
        ("refine", [100]),
        ("refine", [101]),
    ]
    refined = [o for o in done.outcomes if o.request.kind == "refine"]
    assert [o.hypothesis.text for o in refined] == ["refine:100", "refine:101"]
    assert all(o.status == "done" and o.batch_size == 1 for o in refined)


def test_refine_batches_are_small_and_within_one_length_bucket():
    engine, sched, done = refine_setup(max_batch=8)  # refine batches of at most 2
    for i, s in enumerate((1.5, 7.0, 1.8, 1.2)):
        sched.submit(refine(i, int(s * 16000), done))
    while sched.run_once():
        pass
    assert engine.calls == [
        ("refine", [24000, 28800]),
        ("refine", [112000]),
        ("refine", [19200]),
    ]


def test_a_final_arriving_during_a_refine_batch_goes_next_and_stop_drops_refines():
    engine = FakeEngine()
    refiner = GatedRefineEngine()
    refiner.calls = engine.calls
    sched = Scheduler(engine, SchedulerConfig(max_wait_ms=0), max_batch=4, refine_engine=refiner)
    done = Collector()
    sched.start()
    try:
        for i in range(3):
            sched.submit(refine(i, 100 + i, done))
        while not engine.calls:  # the first refine batch is running
            time.sleep(0.001)
        sched.submit(Request("final", 0, seg(500), done))
        refiner.gate.set()
        while not any(o.request.kind == "final" for o in done.outcomes):
            time.sleep(0.005)
    finally:
        sched.stop(timeout=10)
    assert engine.calls[:2] == [("refine", [100]), ("transcribe", [500])]
    refined = [o for o in done.outcomes if o.request.kind == "refine"]
    assert len(refined) == 3  # each computed or dropped, none forgotten
    stopped = [o for o in refined if o.status == "dropped"]
    assert all(o.reason == "stopping" for o in stopped)
    assert sched.stats.refine_skipped == ({"stopping": len(stopped)} if stopped else {})
    assert sched.stats.completed["refine"] == 3 - len(stopped)

    sched.submit(refine("late", 10, done))  # after stop: answered at once
    assert done.outcomes[-1].status == "dropped" and done.outcomes[-1].reason == "stopping"


def test_a_full_refine_queue_answers_queue_full_at_once():
    engine, sched, done = refine_setup(max_refine_queue=2)
    for key in "abc":
        sched.submit(refine(key, 10, done))
    (full,) = done.outcomes  # before any batch ran
    assert (full.request.key, full.status, full.reason) == ("c", "dropped", "queue_full")
    assert sched.queue_lengths() == {"final": 0, "partial": 0, "refine": 2}
    while sched.run_once():
        pass
    assert engine.calls == [("refine", [10]), ("refine", [10])]
    assert sched.stats.refine_skipped == {"queue_full": 1}
    assert sched.stats.dropped == {}  # partials' counter untouched


def test_refine_past_its_deadline_is_never_computed():
    engine, sched, done = refine_setup()
    sched.submit(refine("past", 10, done, deadline=time.monotonic() - 1))
    assert [(o.request.key, o.reason) for o in done.outcomes] == [("past", "deadline")]
    sched.submit(refine("soon", 20, done, deadline=time.monotonic() + 0.01))
    sched.submit(refine("open", 30, done))  # no deadline: never expires
    time.sleep(0.02)
    while sched.run_once():
        pass
    assert engine.calls == [("refine", [30])]
    assert [(o.request.key, o.status) for o in done.outcomes[1:]] == [
        ("soon", "dropped"),
        ("open", "done"),
    ]
    assert done.outcomes[1].reason == "deadline"
    assert sched.stats.refine_skipped == {"deadline": 2}


def test_a_failing_refine_engine_fails_only_refine_requests():
    engine, sched, done = refine_setup(max_batch=8)
    sched.refine_engine.fail_on = {666}
    sched.submit(refine("a", 666, done))
    sched.submit(refine("b", 667, done))
    sched.submit(Request("final", "a", seg(666), done))  # same audio, primary engine
    while sched.run_once():
        pass
    sched.submit(Request("partial", "c", seg(50), done))
    sched.run_once()
    assert engine.calls == [
        ("transcribe", [666]),
        ("refine", [666, 667]),
        ("draft", [50]),
    ]
    failed = done.by_status("failed")
    assert [o.request.key for o in failed] == ["a", "b"]
    assert all(o.request.kind == "refine" and "RuntimeError: boom" in o.reason for o in failed)
    assert sorted(o.hypothesis.text for o in done.by_status("done")) == [
        "draft:50",
        "transcribe:666",
    ]
    assert (sched.stats.refine_failed, sched.stats.failed) == (2, 2)
    assert sched.stats.completed == {"partial": 1, "final": 1, "refine": 0}


def test_cancel_drops_refine_requests_of_the_key():
    engine, sched, done = refine_setup()
    sched.submit(Request("partial", "a", seg(10), done))
    sched.submit(refine("a", 11, done))
    sched.submit(refine("a", 12, done))
    sched.submit(refine("b", 13, done))
    sched.cancel("a")
    assert [(o.request.kind, o.reason) for o in done.outcomes] == [
        ("partial", "cancelled"),
        ("refine", "cancelled"),
        ("refine", "cancelled"),
    ]
    while sched.run_once():
        pass
    assert engine.calls == [("refine", [13])]
    assert sched.stats.refine_skipped == {"cancelled": 2}
    assert sched.stats.dropped == {"cancelled": 1}


def test_refines_and_partials_or_finals_of_one_key_never_supersede_each_other():
    engine, sched, done = refine_setup()
    sched.submit(Request("partial", "a", seg(10), done))
    sched.submit(refine("a", 20, done))  # the partial stays queued
    assert sched.queue_lengths() == {"final": 0, "partial": 1, "refine": 1}
    sched.submit(Request("final", "a", seg(30), done))  # drops the partial, not the refine
    sched.submit(refine("a", 40, done))  # a second refine of the key: both stay
    assert sched.queue_lengths() == {"final": 1, "partial": 0, "refine": 2}
    while sched.run_once():
        pass
    assert engine.calls == [("transcribe", [30]), ("refine", [20]), ("refine", [40])]
    assert [o.reason for o in done.by_status("dropped")] == ["final"]
    assert sched.stats.refine_skipped == {}


def test_refine_stats_reach_the_metrics():
    from streaming.ops.metrics import Metrics

    engine, sched, done = refine_setup(max_refine_queue=1)
    metrics = Metrics()
    metrics.watch(sched)
    sched.submit(refine("a", 10, done))
    sched.submit(refine("b", 10, done))  # queue full
    sched.submit(refine("c", 10, done, deadline=time.monotonic() - 1))
    sched.submit(Request("final", "a", seg(10), done))
    while sched.run_once():
        pass
    stats = sched.stats
    assert stats.batches == {"partial": 0, "final": 1, "refine": 1}
    assert stats.completed == {"partial": 0, "final": 1, "refine": 1}
    assert stats.refine_skipped == {"deadline": 1, "queue_full": 1}
    body = metrics.render().decode()
    for line in (
        'streamscribe_batches_total{kind="refine"} 1.0',
        'streamscribe_engine_requests_total{kind="refine"} 1.0',
        'streamscribe_refine_skipped_total{reason="queue_full"} 1.0',
        'streamscribe_refine_skipped_total{reason="deadline"} 1.0',
        'streamscribe_batches_total{kind="final"} 1.0',
    ):
        assert line in body.splitlines(), line
    assert "streamscribe_partials_dropped_total{" not in body


def test_refine_request_without_refine_engine_is_an_error(setup):
    engine, sched, done = setup
    assert sched.refine_engine is None
    with pytest.raises(ValueError, match="refine_engine"):
        sched.submit(refine("a", 10, done))
    assert done.outcomes == [] and sched.queue_lengths()["refine"] == 0
    assert not sched.run_once() and engine.calls == []

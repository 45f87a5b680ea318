"""Connection churn, the fast subset of `python -m benchmarks.churn`: a few hundred connections
of every kind, most cut off rudely, against a `streamscribe serve` process with the noop engine;
its file descriptors and threads must come back to their warm-up level and its memory must not
grow beyond a bound."""

from __future__ import annotations

import asyncio

import pytest

from tests import serverproc
from tests.churning import churn, kinds

CYCLES, WARMUP, EVERY = 510, 102, 102  # multiples of the 17 kinds: each kind in every stretch
RSS_BOUND_KB = 16 * 1024
MARGIN = 2  # file descriptors and threads
SERVER = {"resume_window_s": 1.0, "call_subscriber_hold_s": 2.0}


@pytest.fixture(scope="module")
def soaked():
    server = serverproc.start(SERVER, model="noop")
    try:
        soak = asyncio.run(churn(server, CYCLES, warmup=WARMUP, every=EVERY, concurrency=16))
        alive = server.alive() and serverproc.healthy(server.port)
    finally:
        exit_status = server.stop()
    return soak, alive, exit_status, server.errors.since(0)


def test_every_kind_of_cycle_ends_as_it_should(soaked):
    soak, alive, exit_status, errors = soaked
    assert set(soak.outcomes) == set(kinds())
    assert {kind: dict(c) for kind, c in soak.outcomes.items() if set(c) != {"ok"}} == {}
    assert sum(sum(c.values()) for c in soak.outcomes.values()) == CYCLES
    assert alive and exit_status == 0
    assert errors == []


def test_descriptors_and_threads_return_to_the_warmup_level(soaked):
    soak = soaked[0]
    warm, last = soak.samples[0], soak.samples[-1]
    assert len(soak.samples) == CYCLES // EVERY
    assert last.fds <= warm.fds + MARGIN, soak.table()
    assert last.threads <= warm.threads + MARGIN, soak.table()


def test_memory_growth_after_the_warmup_is_bounded(soaked):
    soak = soaked[0]
    assert soak.growth()["rss_kb"] <= RSS_BOUND_KB, soak.table()

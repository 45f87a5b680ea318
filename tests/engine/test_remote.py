"""engine/remote.py: a Scheduler served over a unix socket answers as a local one would, and a
lost engine process fails what it held at once."""

from __future__ import annotations

import asyncio

import numpy as np

from engine.api import Segment
from engine.remote import RemoteScheduler, serve
from engine.scheduler import Request, Scheduler
from tests.gateway_harness import EchoEngine


def test_requests_outcomes_stats_and_a_lost_engine(tmp_path):
    path = str(tmp_path / "engine.sock")

    async def main():
        engine = EchoEngine(delay_s=0.05)
        scheduler = Scheduler(engine)
        scheduler.start()
        serving = asyncio.create_task(serve(scheduler, path))
        remote = RemoteScheduler(path)
        await remote.start(timeout_s=10)
        loop = asyncio.get_running_loop()
        done: list = []

        def request(kind, seconds, key):
            audio = np.zeros(int(16000 * seconds), np.float32)
            return Request(kind, key, Segment(audio), lambda o: done.append(o))

        remote.submit(request("final", 0.9, ("s", 0, 1)))
        remote.submit(request("partial", 0.6, ("s", 0, 2)))
        while len(done) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.4)  # a stats frame
        stats = remote.stats.completed
        info = (remote.engine.family, remote.engine.device, remote.available)

        engine.delay_s = 2.0  # the next one is in the engine's hands when it goes
        remote.submit(request("final", 0.9, ("s", 0, 3)))
        await asyncio.sleep(0.3)
        serving.cancel()  # the engine process goes away
        started = loop.time()
        while len(done) < 3:
            await asyncio.sleep(0.01)
        failed_after = loop.time() - started
        down = remote.available
        remote.submit(request("final", 0.3, ("s", 0, 4)))  # refused at once while down
        remote.stop()
        scheduler.stop(timeout=5)
        return done, stats, info, failed_after, down

    done, stats, info, failed_after, down = asyncio.run(main())
    first, second = sorted(done[:2], key=lambda o: o.request.key)
    assert first.status == "done" and first.hypothesis.text == "w0 w1 w2"
    assert second.status == "done" and second.hypothesis.text == "w0 w1"
    assert stats["final"] == 1 and stats["partial"] == 1
    assert info == ("echo", "cpu", True)
    assert done[2].status == "failed" and "engine process" in done[2].reason
    assert failed_after < 1.0 and not down
    assert done[3].status == "failed" and done[3].reason == "engine process not running"


def test_a_pool_keeps_a_segment_on_one_engine_and_spreads_the_rest(tmp_path):
    from engine.remote import SchedulerPool

    async def main():
        engines = [EchoEngine(delay_s=0.2), EchoEngine(delay_s=0.2)]
        schedulers = [Scheduler(engine) for engine in engines]
        servers = []
        members = []
        for index, scheduler in enumerate(schedulers):
            scheduler.start()
            path = str(tmp_path / f"engine-{index}.sock")
            servers.append(asyncio.create_task(serve(scheduler, path)))
            members.append(RemoteScheduler(path))
            await members[-1].start(timeout_s=10)
        pool = SchedulerPool(members)
        done: list = []

        def request(kind, key):
            audio = np.zeros(16000, np.float32)
            return Request(kind, key, Segment(audio), lambda o: done.append(o))

        pool.submit(request("partial", ("a", 0, 1)))  # segment a: engine 0 (both idle)
        pool.submit(request("partial", ("b", 0, 1)))  # segment b: engine 1, the less loaded
        pool.submit(request("final", ("a", 0, 1)))  # a's final follows a's partial
        while len(done) < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.4)
        calls = [engine.calls for engine in engines]
        stats = pool.stats.completed
        for task in servers:
            task.cancel()
        pool.stop()
        for scheduler in schedulers:
            scheduler.stop(timeout=5)
        return calls, stats, done

    calls, stats, done = asyncio.run(main())
    assert all(o.status in ("done", "dropped") for o in done)
    # a's partial and final went to one engine (the final superseded the partial there or
    # followed it), b's partial to the other: each engine was called
    assert calls[0] >= 1 and calls[1] >= 1
    assert stats["final"] == 1 and stats["final"] + stats["partial"] >= 2

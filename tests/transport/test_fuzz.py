"""The endpoint fuzzer's fast seeded subset (the full run is `python -m benchmarks.fuzz`):
hundreds of hostile connections across every endpoint, each answered clearly within its bound,
while a good stream of real speech keeps its text; afterwards the server still serves.

The gateway runs in-process with the real Whisper tiny.en engine when faster-whisper is
installed (the `cpu` extra), else with the deterministic EchoEngine; the good stream's text is
compared with its own run on the quiet server either way."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from tests import fuzzing
from tests.fuzz_cases import ENDPOINTS
from tests.fuzzing import FUZZ_SERVER, Ports, Report
from tests.gateway_harness import EchoEngine, gateway_config, http_get, running
from tests.good_stream import keep_streaming, speech_clip, transcribe
from tests.serverproc import free_port

SEED = 2026
CASES = 400  # 40 per endpoint
SPEED = 3.0  # the good stream, x real time


def engine():
    try:
        from engine.whisper import load_engine
    except ImportError:
        return EchoEngine()
    try:
        return load_engine("tiny.en")
    except Exception:  # no packaged weights: the fuzz still runs, on the fake engine
        return EchoEngine()


@dataclass
class Run:
    report: Report
    baseline: str
    texts: list[str]
    health: int
    fresh: str


@pytest.fixture(scope="module")
def run() -> Run:
    clip = speech_clip()

    async def main() -> Run:
        config = gateway_config(audiosocket_port=free_port(), **FUZZ_SERVER)
        with fuzzing.captured_errors() as errors:
            async with running(config, engine(), timeout_s=120) as gw:
                audiosocket = gw.audiosocket.sockets[0].getsockname()[1]
                ports = Ports(gw.port, gw.rest.port, audiosocket)
                baseline = await transcribe(gw.port, clip, SPEED)
                stop = asyncio.Event()
                good = asyncio.create_task(keep_streaming(gw.port, clip, stop, SPEED))
                report = await fuzzing.run_cases(fuzzing.cases(SEED, CASES), ports, concurrency=8)
                stop.set()
                texts = await good
                await asyncio.sleep(0.3)
                await fuzzing.attribute(report, errors, ports)
                health, _, _ = await http_get(gw.port, "/healthz")
                fresh = await transcribe(gw.port, clip, SPEED)
        return Run(report, baseline, texts, health, fresh)

    return asyncio.run(main())


def test_every_endpoint_gets_its_share(run):
    table = run.report.per_endpoint()
    assert set(table) == set(ENDPOINTS)
    assert all(row["cases"] == CASES // len(ENDPOINTS) for row in table.values()), table
    # Not everything is refused at the door: streams were opened and closed by the server.
    assert sum(row.get("close_1000", 0) for row in table.values()) > CASES // 10


def test_no_hostile_connection_gets_a_crash_a_hang_or_a_5xx(run):
    bad = [outcome.line() for outcome in run.report.bad]
    assert not bad, f"{len(bad)} BAD of {run.report.total}:\n" + "\n".join(bad)
    assert not run.report.unattributed, run.report.unattributed


def test_the_good_stream_keeps_its_text_throughout(run):
    assert run.baseline.strip()
    assert run.texts and all(text == run.baseline for text in run.texts), run.texts


def test_the_server_still_serves_afterwards(run):
    assert run.health == 200
    assert run.fresh == run.baseline

"""Fuzz every endpoint of a `streamscribe serve` process while one good stream of real speech
runs throughout.

The server runs as its own process (a crash is an exit status, and its ERROR log lines are
read as they come). Thousands of seeded hostile connections (tests/fuzz_cases.py: mutated
messages of every dialect, bad WebSocket framing and handshakes, bad HTTP, REST multipart
garbage, bad AudioSocket packets, unknown call ids and caption exports) go to every endpoint,
`--concurrency` at a time, each classified OK or BAD (tests/fuzzing.py). Meanwhile a native
stream plays a LibriVox clip at `--speed` x real time, again and again: each run's finals must
read as on the quiet server before the fuzz. Afterwards the server must still answer /healthz
and a fresh stream, and exit 0 on SIGTERM.

Exit status 0 when there is no BAD case, no unexplained server error, and the good stream's text
never changed; 1 otherwise (the BAD cases are listed with the seed and index that rebuild them:
`python -m benchmarks.fuzz --seed S --replay I`).

    python -m benchmarks.fuzz                       # 5000 cases, seed 1, Whisper tiny.en
    python -m benchmarks.fuzz --cases 300 --seed 7 --model noop
    python -m benchmarks.fuzz --seed 1 --replay 117  # one case again, with its outcome
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence

from benchmarks.results import write_result
from tests import serverproc
from tests.fuzz_cases import make_case
from tests.fuzzing import FUZZ_SERVER, LIMITS, Ports, Report, attribute, cases, run_case, run_cases
from tests.good_stream import keep_streaming, speech_clip, transcribe

MAX_LISTED = 200  # BAD cases written to the record (all are printed)


class Progress:
    """A line on stderr every so many cases."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, report: Report) -> None:
        rate = report.total / max(time.monotonic() - self.started, 1e-9)
        print(f"  {report.total} cases, {len(report.bad)} BAD, {rate:.0f}/s", file=sys.stderr)


async def fuzz(server: serverproc.ServerProcess, args: argparse.Namespace) -> dict:
    ports = Ports(server.port, server.http_port, server.audiosocket_port)
    clip = speech_clip(args.clip)
    baseline = await transcribe(server.port, clip, args.speed)
    print(f"good stream on the quiet server: {baseline!r}")
    before = server.usage()
    stop = asyncio.Event()
    good = asyncio.create_task(keep_streaming(server.port, clip, stop, args.speed))
    load_before = os.getloadavg()
    report = await run_cases(
        cases(args.seed, args.cases, LIMITS),
        ports,
        concurrency=args.concurrency,
        bound_s=args.bound,
        alive=server.alive,
        progress=Progress(),
        every=max(100, args.cases // 10),
    )
    stop.set()
    try:
        texts = await good
        good_error = None
    except Exception as err:  # the good stream itself failed: a finding, not a crash here
        texts, good_error = [], f"{type(err).__name__}: {err}"
    await asyncio.sleep(0.5)  # the last cases' log lines
    await attribute(report, server.errors, ports)
    after_ok = server.alive() and serverproc.healthy(server.port)
    fresh = await transcribe(server.port, clip, args.speed) if after_ok else None
    after = server.usage() if server.alive() else None
    return {
        "cases": report.total,
        "seconds": round(report.seconds, 1),
        "cases_per_s": round(report.total / max(report.seconds, 1e-9), 1),
        "bad": len(report.bad),
        "per_endpoint": report.per_endpoint(),
        "bad_cases": [o.line() for o in report.bad[:MAX_LISTED]],
        "server_errors_logged": report.server_errors,
        "server_errors_unattributed": report.unattributed[:MAX_LISTED],
        "good_stream": {
            "baseline": baseline,
            "runs": len(texts),
            "changed": sum(1 for t in texts if t != baseline),
            "texts_that_differ": sorted({t for t in texts if t != baseline}),
            "error": good_error,
            "fresh_after": fresh,
        },
        "server_alive_after": after_ok,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "server_usage": {
            "before": vars(before),
            "after": vars(after) if after is not None else None,
        },
        "_report": report,
    }


def _replay(server: serverproc.ServerProcess, seed: int, index: int) -> int:
    ports = Ports(server.port, server.http_port, server.audiosocket_port)
    case = make_case(seed, index, LIMITS)
    print(f"{case.ref}\nrequest: {case.request[:400]!r}")
    for data in case.frames[:10]:
        print(f"frame: {data[:200]!r}")
    mark = len(server.errors.entries)
    outcome = asyncio.run(run_case(case, ports))
    time.sleep(0.5)
    print(f"outcome: {outcome.line()}  (errors sent: {outcome.errors})")
    for message in server.errors.since(mark):
        print(f"server logged: {message}")
    return 1 if outcome.bad or server.errors.since(mark) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8, help="hostile connections at once")
    parser.add_argument("--bound", type=float, default=5.0, help="seconds a case may take")
    parser.add_argument("--model", default="whisper", help="engine.model (whisper, noop, ...)")
    parser.add_argument("--speed", type=float, default=3.0, help="good stream, x real time")
    parser.add_argument("--clip", type=int, default=0, help="which LibriVox clip it plays")
    parser.add_argument("--replay", type=int, metavar="INDEX", help="run one case and stop")
    args = parser.parse_args(argv)
    if args.cases < 1 or args.concurrency < 1 or args.bound <= 0 or args.speed <= 0:
        parser.error("--cases, --concurrency, --bound and --speed must be positive")
    server = serverproc.start(FUZZ_SERVER, model=args.model)
    print(
        f"server pid {server.pid}: port {server.port}, REST {server.http_port}, "
        f"AudioSocket {server.audiosocket_port}, model {args.model}"
    )
    try:
        if args.replay is not None:
            return _replay(server, args.seed, args.replay)
        figures = asyncio.run(fuzz(server, args))
    finally:
        exit_status = server.stop()
    report: Report = figures.pop("_report")
    figures["server_exit_status"] = exit_status
    print(report.table())
    for outcome in report.bad:
        print(f"BAD {outcome.line()}")
    for message in report.unattributed:
        print(f"server error no case repeats: {message}")
    good = figures["good_stream"]
    print(
        f"{figures['cases']} cases in {figures['seconds']} s, {figures['bad']} BAD; "
        f"server errors logged {figures['server_errors_logged']}; good stream: "
        f"{good['runs']} runs, {good['changed']} changed; server exit {exit_status}"
    )
    settings = {
        "cases": args.cases,
        "seed": args.seed,
        "concurrency": args.concurrency,
        "bound_s": args.bound,
        "model": args.model,
        "speed": args.speed,
        "clip": args.clip,
        "server": FUZZ_SERVER,
    }
    path = write_result("fuzz", figures, settings)
    print(f"written to {path}")
    clean = (
        not report.bad
        and not report.unattributed
        and good["changed"] == 0
        and good["error"] is None
        and good["fresh_after"] == good["baseline"]
        and exit_status == 0
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())

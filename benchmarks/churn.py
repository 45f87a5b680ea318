"""Connection churn soak: thousands of connect/send/abort cycles of every kind against a
`streamscribe serve` process with the noop engine, with its memory, file descriptors and threads
sampled after a warm-up and at intervals.

Cycles (tests/churning.py) take turns: each WebSocket dialect's stream aborted (TCP reset) after a
little audio, or closed normally; upgrade requests cut mid-handshake; call-event subscribers that
vanish or close; REST uploads cut mid-body, and completed ones; AudioSocket calls cut, or hung up.
Each sample is taken once the connections have settled (descriptors back at the warm-up level,
or `--settle` seconds). A native stream aborted by its client is kept for the server's
`resume_window_s`, so the last sample waits that out. The soak sets it to 2 s (`--resume-window`;
the server's default is 30 s): at hundreds of aborts a minute, 30 s of kept sessions is a
high-water mark of memory that hides a per-connection leak rather than shows one.

Flat means, from the warm-up sample to the last: file descriptors and threads within `--margin`
(2), and RSS growth within `--rss-bound-mb` (16 MB). Exit status 0 when flat and every cycle
ended as it should, else 1.

    python -m benchmarks.churn                     # 3000 cycles, 16 at a time
    python -m benchmarks.churn --cycles 500 --every 100 --resume-window 2
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
from tests.churning import Sample, Soak, churn, sessions_active, settle

CHURN_SERVER = {"call_subscriber_hold_s": 2.0, "max_sessions": 1000}
RSS_BOUND_MB = 16.0
MARGIN = 2


def flat(soak: Soak, rss_bound_mb: float, margin: int) -> bool:
    growth = soak.growth()
    return (
        growth["fds"] <= margin
        and growth["threads"] <= margin
        and growth["rss_kb"] <= rss_bound_mb * 1024
    )


def failures(soak: Soak) -> dict[str, dict[str, int]]:
    """Cycles that did not end "ok", by kind and outcome."""
    return {
        kind: {outcome: n for outcome, n in counts.items() if outcome != "ok"}
        for kind, counts in soak.outcomes.items()
        if any(outcome != "ok" for outcome in counts)
    }


async def soak(server: serverproc.ServerProcess, args: argparse.Namespace) -> Soak:
    def progress(sample: Sample) -> None:
        print(
            f"  {sample.cycles} cycles: RSS {sample.rss_kb / 1024:.1f} MB, {sample.fds} fds, "
            f"{sample.threads} threads",
            file=sys.stderr,
        )

    result = await churn(
        server,
        args.cycles,
        warmup=args.warmup,
        every=args.every,
        concurrency=args.concurrency,
        seed=args.seed,
        settle_s=args.settle,
        progress=progress,
    )
    # Aborted native streams outlive their link by resume_window_s: the last sample after it.
    await asyncio.sleep(args.resume_window + 1.0)
    usage = await settle(server, None, args.settle)
    last = result.samples[-1]
    result.samples.append(
        Sample(
            cycles=last.cycles,
            seconds=round(last.seconds + args.resume_window + 1.0, 1),
            rss_kb=usage.rss_kb,
            fds=usage.fds,
            threads=usage.threads,
            sessions_active=await asyncio.to_thread(sessions_active, server.port),
        )
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=1000, help="cycles before the first sample")
    parser.add_argument("--every", type=int, default=500, help="cycles between samples")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait per sample")
    parser.add_argument(
        "--resume-window",
        type=float,
        default=2.0,
        help="server.resume_window_s (default 2 s; the server's own default is 30 s)",
    )
    parser.add_argument("--rss-bound-mb", type=float, default=RSS_BOUND_MB)
    parser.add_argument("--margin", type=int, default=MARGIN, help="fds and threads")
    args = parser.parse_args(argv)
    if min(args.cycles, args.warmup, args.every, args.concurrency) < 1:
        parser.error("--cycles, --warmup, --every and --concurrency must be positive")
    if args.warmup >= args.cycles:
        parser.error("--warmup must be below --cycles")
    server_settings = {**CHURN_SERVER, "resume_window_s": args.resume_window}
    server = serverproc.start(server_settings, model="noop")
    start_usage = server.usage()
    load_before = os.getloadavg()
    print(f"server pid {server.pid}, model noop: {vars(start_usage)}")
    started = time.monotonic()
    try:
        result = asyncio.run(soak(server, args))
        alive = server.alive() and serverproc.healthy(server.port)
    finally:
        exit_status = server.stop()
    print(result.table())
    growth = result.growth()
    is_flat = flat(result, args.rss_bound_mb, args.margin)
    bad_cycles = failures(result)
    print(
        f"{result.cycles} cycles in {result.seconds:.1f} s "
        f"({result.cycles / max(result.seconds, 1e-9):.0f}/s); growth after warm-up: "
        f"RSS {growth['rss_kb'] / 1024:+.1f} MB, fds {growth['fds']:+d}, "
        f"threads {growth['threads']:+d}: {'flat' if is_flat else 'NOT flat'} "
        f"(bounds: RSS {args.rss_bound_mb:g} MB, fds/threads +{args.margin})"
    )
    for kind, outcomes in bad_cycles.items():
        print(f"  {kind}: {outcomes}")
    print(f"server errors logged: {len(server.errors.entries)}; exit status {exit_status}")
    for message in server.errors.since(0)[:20]:
        print(f"  {message}")
    figures = {
        **result.record(),
        "start": vars(start_usage),
        "flat": is_flat,
        "cycles_not_ok": bad_cycles,
        "server_errors_logged": len(server.errors.entries),
        "server_errors": server.errors.since(0)[:50],
        "server_alive_after": alive,
        "server_exit_status": exit_status,
        "wall_s": round(time.monotonic() - started, 1),
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    settings = {
        "cycles": args.cycles,
        "warmup": args.warmup,
        "every": args.every,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "settle_s": args.settle,
        "rss_bound_mb": args.rss_bound_mb,
        "margin": args.margin,
        "server": server_settings,
        "model": "noop",
    }
    path = write_result("churn", figures, settings)
    print(f"written to {path}")
    clean = is_flat and alive and exit_status == 0 and not bad_cycles and not server.errors.entries
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())

"""`streamscribe bench NAME [ARGS...]`: the benchmarks of `benchmarks/` behind one verb, so a
user can size a machine without learning the module paths.

The benchmarks live in the source checkout, not in the installed packages (they read test
recordings and write `benchmarks/results/`), so the verb needs an editable install or a clone.
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

# What each benchmark answers; the name is its module in benchmarks/.
BENCHMARKS = {
    "rtfx": "engine speed: real-time factor of one model call per batch size",
    "wer": "accuracy: word error rate on real speech (LibriVox, espeak-ng, 8 kHz mu-law)",
    "stream_load": "capacity: concurrent real-time streams, latency and CPU per stream",
    "caption_wer": "live text: roll-up caption WER next to the finals' WER",
    "partial_cost": "partial cost: CPU per partial as the open segment grows",
    "telephony_wer": "telephony: 16 kHz native vs 8 kHz mu-law through the Twilio path",
}
CHECKOUT = Path(__file__).resolve().parents[1]


def add_bench_command(
    subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add `bench` to a command line's subparsers; it runs through `args.run(args)`."""
    listing = "\n".join(f"  {name:<14} {what}" for name, what in BENCHMARKS.items())
    bench = subparsers.add_parser(
        "bench",
        parents=list(parents),
        help="run a benchmark (rtfx, wer, stream_load, ...); figures go to benchmarks/results/",
        description="Run one of the project's benchmarks; `bench NAME --help` shows its options."
        "\n\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME", help="the benchmark")
    bench.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="ARGS", help="options of that benchmark"
    )
    bench.set_defaults(run=run_bench)
    return bench


def run_bench(args: argparse.Namespace) -> int:
    """Run `benchmarks.<name>` as `python -m` would, with the remaining arguments."""
    if not (CHECKOUT / "benchmarks" / f"{args.name}.py").is_file():
        print(
            "streamscribe bench: error: the benchmarks are in the source checkout, which this "
            "installation does not have: clone the repository and `pip install -e .`",
            file=sys.stderr,
        )
        return 2
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    module = f"benchmarks.{args.name}"
    importlib.invalidate_caches()
    saved = sys.argv
    sys.argv = [f"streamscribe bench {args.name}", *args.args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:  # the benchmark's own exit status
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0

"""Writing a benchmark's figures with the machine, date and commit they were measured on."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=RESULTS_DIR.parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=RESULTS_DIR.parent,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, figures: dict, settings: dict) -> Path:
    """Save one run as benchmarks/results/<name>-<UTC timestamp>.json and return the path."""
    now = dt.datetime.now(dt.timezone.utc)
    record = {
        "benchmark": name,
        "date": now.isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "settings": settings,
        "figures": figures,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def streams_per_core(figures: dict, label: str, cpu_s: float, audio_s: float) -> None:
    """Record and print a per-stream cost: CPU ms per second of audio, and the real-time
    streams one core keeps up with at that cost."""
    ms_per_s = 1000 * cpu_s / audio_s
    figures[f"{label}_cpu_ms_per_audio_s"] = round(ms_per_s, 4)
    figures[f"{label}_streams_per_core"] = round(1000 / ms_per_s)
    print(
        f"{label:20s} {ms_per_s:.3f} ms CPU per audio second = "
        f"{1000 / ms_per_s:,.0f} real-time streams per core"
    )

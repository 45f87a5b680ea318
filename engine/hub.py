"""Turning a model source (a local folder or a hub id) into a local folder, without hanging.

Shared by the Granite families: each one names the files it needs, so a download fetches
nothing else (the AR repository, for instance, also ships a speculative-decoding head).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from .api import ModelLoadError

log = logging.getLogger("engine.hub")


def resolve_source(
    source: str, hub_timeout_s: float, *, patterns: Sequence[str], setting: str
) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or found in the local cache).

    Only files matching `patterns` are fetched. Reaching the hub is bounded by `hub_timeout_s`,
    so a machine without network fails fast; `setting` is the configuration key named in the
    error that tells the user to pass a folder instead."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelLoadError(f"{source!r} is neither a checkpoint folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    allow = list(patterns)
    try:
        return Path(snapshot_download(source, allow_patterns=allow, local_files_only=True))
    except Exception:  # not cached: go to the network below
        pass
    _check_hub_reachable(source, hub_timeout_s, setting)
    log.info("downloading checkpoint", extra={"source": source})
    try:
        return Path(snapshot_download(source, allow_patterns=allow, etag_timeout=hub_timeout_s))
    except Exception as err:
        raise ModelLoadError(f"download of {source!r} failed: {err}") from None


def _check_hub_reachable(repo_id: str, timeout_s: float, setting: str) -> None:
    """Ask the hub about the repository in a thread we stop waiting for after the timeout."""
    from huggingface_hub import HfApi

    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            HfApi().model_info(repo_id, timeout=timeout_s)
            outcome["error"] = None
        except BaseException as err:  # reported to the caller below
            outcome["error"] = err

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" not in outcome:
        raise ModelLoadError(
            f"model hub not reachable within {timeout_s:g} s for {repo_id!r}; "
            f"pass a local checkpoint folder ({setting} or --model PATH)"
        )
    if outcome["error"] is not None:
        raise ModelLoadError(
            f"cannot fetch {repo_id!r} from the model hub ({type(outcome['error']).__name__}: "
            f"{outcome['error']}); pass a local checkpoint folder instead"
        )

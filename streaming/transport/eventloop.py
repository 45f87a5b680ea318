"""Which asyncio event loop the server runs on.

uvloop (libuv under asyncio's API) halves the per-frame cost of the event loop and of socket
reads, the largest part of a gateway core's work at hundreds of streams; the standard loop stays
available (`server.event_loop: asyncio`) and is what `auto` falls back to where uvloop is not
installed (it does not support Windows).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def runner(choice: str) -> Runner:
    """`asyncio.run` on the loop `choice` names: "auto" (uvloop when installed), "uvloop" or
    "asyncio". Asking for uvloop where it is missing is an error, not a silent fallback."""
    if choice == "asyncio" or (choice == "auto" and not uvloop_available()):
        return asyncio.run
    try:
        import uvloop
    except ImportError as err:
        raise RuntimeError(
            "server.event_loop is uvloop but uvloop is not installed (pip install uvloop)"
        ) from err
    return uvloop.run


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """"uvloop" or "asyncio": what the running loop is, for the start-up log line."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"

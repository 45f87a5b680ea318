"""Choosing the server's event loop: uvloop when installed, the standard loop on request."""

from __future__ import annotations

import asyncio
import sys

import pytest

from streaming.transport import eventloop


def test_auto_takes_uvloop_when_installed_and_reports_it():
    import uvloop

    run = eventloop.runner("auto")
    assert run is uvloop.run
    assert run(_running_loop_name()) == "uvloop"


def test_asyncio_choice_runs_the_standard_loop():
    run = eventloop.runner("asyncio")
    assert run is asyncio.run
    assert run(_running_loop_name()) == "asyncio"


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch):
    monkeypatch.setattr(eventloop, "uvloop_available", lambda: False)
    assert eventloop.runner("auto") is asyncio.run


def test_uvloop_asked_for_but_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` fail
    with pytest.raises(RuntimeError, match="uvloop is not installed"):
        eventloop.runner("uvloop")


async def _running_loop_name() -> str:
    return eventloop.loop_name(asyncio.get_running_loop())

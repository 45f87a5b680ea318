"""Shared fixtures: tiny random Granite NAR checkpoints written once per test session."""

from __future__ import annotations

import pytest

from tests.checkpoints.granite_nar import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-nar"), seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from engine.api import EngineOptions
    from engine.granite_nar.engine import load_engine

    return load_engine(str(tiny_checkpoint), EngineOptions(device="cpu", dtype="float32"))

"""Who may start a stream: one decision for handshakes, /readyz, AudioSocket calls and uploads."""

import pytest

from streaming.ops.admission import refusal


def test_a_loaded_server_under_its_cap_admits():
    assert refusal(loaded=True, draining=False, active=199, limit=200) is None


def test_at_the_cap_the_reason_is_capacity():
    assert refusal(loaded=True, draining=False, active=200, limit=200) == "capacity"
    assert refusal(loaded=True, draining=False, active=201, limit=200) == "capacity"


def test_without_a_cap_any_number_is_admitted():
    assert refusal(loaded=True, draining=False, active=10_000) is None


def test_before_the_model_loads_the_reason_is_loading():
    assert refusal(loaded=False, draining=False, active=0, limit=200) == "loading"


def test_a_failed_load_is_named_only_when_asked():
    assert refusal(loaded=False, draining=False, failed=True) == "engine_failed"
    assert refusal(loaded=False, draining=False) == "loading"


@pytest.mark.parametrize("loaded", [True, False])
@pytest.mark.parametrize("active", [0, 200])
def test_draining_wins_over_every_other_reason(loaded, active):
    reason = refusal(loaded=loaded, draining=True, active=active, limit=200, failed=not loaded)
    assert reason == "draining"


def test_loading_wins_over_capacity():
    assert refusal(loaded=False, draining=False, active=200, limit=200) == "loading"

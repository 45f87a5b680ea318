"""Per-key limits (streaming/ops/limits.py): parsing server.key_limits, concurrent streams per
key (a token's cap included), audio hours per UTC day with its rollover and Retry-After."""

from __future__ import annotations

import pytest

from streaming.ops.config import ConfigError, load_config
from streaming.ops.limits import KeyLimit, Limits, parse_limits

MIDNIGHT = 1_800_057_600.0  # a UTC midnight (divisible by 86400)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_parse_items_with_a_default():
    assert parse_limits("") == {}
    assert parse_limits(" k1:2:1.5 , *:4:0,k2:0:0.0003") == {
        "k1": KeyLimit(2, 1.5),
        "*": KeyLimit(4, 0.0),
        "k2": KeyLimit(0, 0.0003),
    }
    for bad in ("k1:2", "k1:x:1", ":2:1", "k1:2:1,k1:3:1", "k1:-1:1"):
        with pytest.raises(ConfigError, match="server.key_limits item"):
            parse_limits(bad)


def test_the_setting_takes_only_the_documented_shape():
    assert load_config(overrides={"server.key_limits": "*:4:10"}).server.key_limits == "*:4:10"
    with pytest.raises(ConfigError, match="KEY:STREAMS:HOURS"):
        load_config(overrides={"server.key_limits": "k1:4"})


def test_build_maps_keys_to_identities_and_ignores_unknown_keys():
    limits = Limits.build("k1:2:0,ghost:9:9,*:5:1", {"k1", "k2"}, lambda key: f"id-{key}")
    assert limits.by_id == {"id-k1": KeyLimit(2, 0)}
    assert limits.limit("id-k1") == KeyLimit(2, 0)
    assert limits.limit("id-k2") == KeyLimit(5, 1)  # the default


def test_streams_are_counted_per_key_and_given_back():
    limits = Limits({"a": KeyLimit(streams=2)})
    assert limits.hold("s1", "a") is None and limits.hold("s2", "a") is None
    refused = limits.hold("s3", "a")
    assert refused.retry_after == 5 and "2 open, at most 2" in refused.reason
    assert limits.hold("other", "b") is None  # the default: unlimited
    limits.release("s1")
    limits.release("s1")  # given back once only
    assert limits.open["a"] == 1
    assert limits.hold("s3", "a") is None
    assert limits.hold("s4", "a") is not None


def test_a_tokens_max_streams_caps_the_keys_count():
    limits = Limits({"a": KeyLimit(streams=5)})
    assert limits.hold("s1", "a") is None
    assert limits.hold("s2", "a", cap=1).reason.endswith("1 open, at most 1")
    assert limits.hold("s2", "a", cap=2) is None
    unlimited = Limits({})
    assert unlimited.hold("s1", "a", cap=1) is None
    assert unlimited.hold("s2", "a", cap=1) is not None  # the token caps an unlimited key


def test_audio_allowance_is_spent_then_refused_until_utc_midnight():
    clock = Clock(MIDNIGHT - 3600.5)  # 23:00 minus half a second
    limits = Limits({"a": KeyLimit(hours=0.001)}, clock=clock)  # 3.6 s of audio a day
    assert limits.hold("s1", "a") is None
    quota = limits.meter("s1")
    assert quota(2000) is None and limits.used_ms["a"] == 2000
    assert quota(3000) is None and limits.used_ms["a"] == 3000  # only what is new counts
    reason = quota(3600)
    assert reason and "0.001 h per day" in reason
    limits.charge("a", 10)  # an upload after it still counts
    refused = limits.hold("s2", "a")
    assert refused.retry_after == 3601  # seconds to 00:00 UTC, rounded up
    assert limits.spent("b") is None  # another key is not touched
    clock.now = MIDNIGHT + 1  # a new UTC day: the allowance is back
    assert limits.spent("a") is None and limits.hold("s2", "a") is None
    assert limits.used_ms["a"] == 0


def test_streams_without_an_allowance_get_no_meter():
    limits = Limits({"a": KeyLimit(streams=3)})
    limits.hold("s1", "a")
    assert limits.meter("s1") is None  # no hours: nothing to keep
    assert limits.meter("never-held") is None
    limits.charge("a", 1e9)
    assert limits.spent("a") is None

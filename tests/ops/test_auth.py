"""API keys (streaming/ops/auth.py): one rule for the offered key, constant-time comparison,
the bad-key throttle, and the settings that must not turn authentication off by accident."""

from __future__ import annotations

import hmac

import pytest

from streaming.ops import access, auth
from streaming.ops.config import ConfigError, load_config
from streaming.ops.tokens import Signer


def test_key_ok_compares_every_key_in_constant_time(monkeypatch):
    compared, compare = [], hmac.compare_digest

    def spy(a, b):
        compared.append(b)
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert auth.key_ok("k1", ["k1", "k2"]) and compared == [b"k1", b"k2"]
    assert not auth.key_ok("k", ["k1"]) and not auth.key_ok(None, ["k1"])


def test_throttle_blocks_an_address_after_repeated_bad_keys():
    guard = auth.Guard(frozenset({"good"}), auth.Throttle(allowed=3, window_s=60, block_s=30))
    gate = access.Access(guard, Signer(b"s" * 32))

    def check(key: str, client: str, now: float):
        verdict = gate.check(access.Credential(key), client, now, 0.0, None)
        return (verdict.status, verdict.retry_after) if isinstance(verdict, access.Denial) else None

    assert [check("bad", "a", 0.0) for _ in range(3)] == [(401, None)] * 3
    assert check("good", "a", 1.0) == (429, 29)  # blocked, even with the right key
    assert check("good", "b", 1.0) is None  # other addresses are not
    assert check("good", "a", 31.0) is None  # the block ends


def test_throttle_forgets_old_failures_and_stays_bounded():
    throttle = auth.Throttle(allowed=2, window_s=10, block_s=30, max_clients=3)
    throttle.failed("a", 0.0)
    throttle.failed("a", 11.0)  # a new window: one failure, not two
    assert throttle.retry_after("a", 11.0) is None
    for client in "bcde":
        throttle.failed(client, 12.0)
    assert len(throttle.clients) == 3 and "a" not in throttle.clients


@pytest.mark.parametrize("keys", [" , ", ",", "   "])
def test_blank_api_keys_are_refused_not_read_as_no_authentication(keys):
    with pytest.raises(ConfigError, match="server.api_keys"):
        load_config(env={"STREAMSCRIBE_SERVER__API_KEYS": keys})


def test_api_keys_and_audiosocket_host_defaults():
    config = load_config(env={"STREAMSCRIBE_SERVER__API_KEYS": "k1, ,k2"})
    assert auth.parse_keys(config.server.api_keys) == {"k1", "k2"}
    assert load_config(env={}).server.audiosocket_host == "127.0.0.1"


def test_the_client_behind_a_trusted_proxy_is_the_nearest_untrusted_forwarded_address():
    trusted = auth.parse_networks("127.0.0.1, 10.0.0.0/8")
    assert auth.client_address("127.0.0.1", "203.0.113.7", trusted) == "203.0.113.7"
    # a client may put anything on the left; the proxies' own hops are skipped from the right
    assert auth.client_address("127.0.0.1", "1.2.3.4, 203.0.113.7, 10.1.2.3", trusted) == (
        "203.0.113.7"
    )
    assert auth.client_address("198.51.100.9", "203.0.113.7", trusted) == "198.51.100.9"
    assert auth.client_address("127.0.0.1", "", trusted) == "127.0.0.1"
    assert auth.client_address("127.0.0.1", "203.0.113.7", ()) == "127.0.0.1"
    with pytest.raises(ValueError, match="'nginx'"):
        auth.parse_networks("127.0.0.1,nginx")


def test_behind_a_trusted_proxy_one_clients_bad_keys_do_not_block_the_others():
    import asyncio

    from tests.gateway_harness import EchoEngine, gateway_config, running

    async def main():
        config = gateway_config(api_keys="good", trusted_proxies="127.0.0.1")
        async with running(config, EchoEngine()) as gw:
            statuses = []
            for forwarded, key in [("203.0.113.7", "bad")] * 11 + [("198.51.100.9", "good")]:
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(
                    f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                    f"X-Forwarded-For: {forwarded}\r\n\r\n".encode()
                )
                statuses.append(int((await reader.readline()).split()[1]))
                writer.close()
            return statuses

    statuses = asyncio.run(main())
    assert statuses[:10] == [401] * 10 and statuses[10] == 429  # that client is blocked
    assert statuses[11] == 200  # another client, through the same proxy, is not

"""API keys: parsed, compared in constant time, and guessing throttled by client address; the
one rule for what a request offers (a key or a token, on both ports) is streaming/ops/access.py."""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Collection

AUTH_SCHEMES = ("bearer", "token")  # `Authorization: Bearer KEY` or `Token KEY`
AUTH_SUBPROTOCOLS = ("token", "bearer")  # browsers: new WebSocket(url, ["token", KEY])
FAILURES_ALLOWED = 10  # bad keys from one client address within FAILURE_WINDOW_S ...
FAILURE_WINDOW_S = 60.0
BLOCK_S = 60.0  # ... then every request from it gets 429 for this long
MAX_CLIENTS = 10000  # addresses remembered; the least recently failed one goes first


def parse_keys(text: str) -> frozenset[str]:
    """The keys of `server.api_keys` (comma-separated; empty items ignored)."""
    return frozenset(key.strip() for key in text.split(",") if key.strip())


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """`server.trusted_proxies`: comma-separated addresses or networks (CIDR); ValueError
    names an entry that is neither."""
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"not an IP address or network: {item!r}") from None
    return tuple(networks)


def client_address(peer: str, forwarded_for: str, trusted: tuple[Network, ...]) -> str:
    """Who a request comes from, for the bad-key throttle: the TCP peer, unless it is a
    trusted proxy (nginx in front of several instances); then the nearest address in
    `X-Forwarded-For` that is not a trusted proxy itself (the ones further left could be
    made up by the client)."""
    if not trusted or not _trusted(peer, trusted):
        return peer
    for hop in reversed([part.strip() for part in forwarded_for.split(",") if part.strip()]):
        if not _trusted(hop, trusted):
            return hop
    return peer


def _trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def key_ok(offered: str | None, keys: Collection[str]) -> bool:
    """Whether `offered` is one of `keys`, compared in constant time (every key is compared,
    so the time taken does not tell how much of a key was right)."""
    if offered is None:
        return False
    given = offered.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found


class Throttle:
    """Bad keys by client address: after `allowed` failures within `window_s`, the address is
    refused for `block_s` (so keys cannot be guessed at line rate). A small in-memory table,
    at most `max_clients` addresses."""

    def __init__(
        self,
        allowed: int = FAILURES_ALLOWED,
        window_s: float = FAILURE_WINDOW_S,
        block_s: float = BLOCK_S,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.allowed = allowed
        self.window_s = window_s
        self.block_s = block_s
        self.max_clients = max_clients
        # address -> (failures in the window, window start, blocked until)
        self.clients: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    def retry_after(self, client: str, now: float) -> int | None:
        """Seconds until `client` may try again, or None when it is not blocked."""
        entry = self.clients.get(client)
        if entry is None or entry[2] <= now:
            return None
        return max(1, math.ceil(entry[2] - now))

    def failed(self, client: str, now: float) -> None:
        """Count one bad key from `client`."""
        count, start, until = self.clients.pop(client, (0, now, 0.0))
        if now - start > self.window_s:
            count, start = 0, now
        count += 1
        if count >= self.allowed:
            until = now + self.block_s
            count, start = 0, now
        self.clients[client] = (count, start, until)
        while len(self.clients) > self.max_clients:
            self.clients.popitem(last=False)


class Guard:
    """The keys of one server and their throttle (streaming/ops/access.py decides requests)."""

    def __init__(self, keys: frozenset[str], throttle: Throttle | None = None) -> None:
        self.keys = keys
        self.throttle = throttle if throttle is not None else Throttle()

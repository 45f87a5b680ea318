"""The bus between server instances: what one gateway process tells the others.

With several processes or machines behind one address, a telephony call may stream into one
instance while its events subscriber is connected to another, and a caption export may be asked
of an instance that never saw the session. The call hub (streaming/transport/calls.py) and the
caption store's share (streaming/transport/caption_share.py) speak to the other instances
through a `Bus`:

- `send` queues writes (`("SADD", key, member)`, ...) and `publish` queues messages on a
  channel, both in one order and without waiting: the audio path must never wait for the
  network, so a bus drains its queue in a task of its own;
- `subscribe(channel, handler)` calls `handler(sender, payload)` for each message another
  instance publishes there (an instance never hears its own: it has delivered those locally);
- `query` reads (None when the bus cannot answer now), `on_connect` callbacks run after each
  (re)connection, once the channels are subscribed again, to catch up on what was missed.

`LocalBus` is a single instance: nothing crosses, nothing is kept (the behaviour with
`server.redis_url` empty). `RedisBus` (streaming/transport/redis_bus.py) is Redis pub/sub.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from streaming.ops.config import ConfigError

Command = tuple[str | int | float, ...]  # a Redis command and its arguments
Handler = Callable[[str, str], None]  # (sending instance, payload)
OnConnect = Callable[[], Awaitable[None]]


class Bus(ABC):
    """What a gateway may ask of the instances around it."""

    shared: bool  # False: no other instance can hear; callers skip the work

    def __init__(self) -> None:
        self.instance = secrets.token_hex(8)  # tells this instance's messages from the others'

    @abstractmethod
    async def start(self) -> None:
        """Begin connecting in the background; never waits for the other side."""

    @abstractmethod
    async def aclose(self, timeout_s: float = 1.0) -> None:
        """Deliver what is queued within `timeout_s`, then disconnect."""

    @abstractmethod
    def send(self, *commands: Command) -> None:
        """Queue writes, in order with `publish`; never blocks."""

    @abstractmethod
    def publish(self, channel: str, payload: str) -> None:
        """Queue a message for the other instances' subscribers of `channel`; never blocks."""

    @abstractmethod
    def subscribe(self, channel: str, handler: Handler) -> None:
        """Hear `channel` from now on (again after each reconnection)."""

    @abstractmethod
    def unsubscribe(self, channel: str) -> None:
        """Stop hearing `channel`."""

    @abstractmethod
    async def subscribed(self, channel: str, timeout_s: float) -> bool:
        """Wait until messages published on `channel` from now on reach this instance; False
        when that cannot be had within `timeout_s` (the bus is down)."""

    @abstractmethod
    async def query(self, *commands: Command, timeout_s: float = 2.0) -> list[Any] | None:
        """The replies to `commands`, or None when the bus cannot answer now."""

    @abstractmethod
    def on_connect(self, callback: OnConnect) -> None:
        """Run `callback` after each (re)connection, once every channel is subscribed again."""


class LocalBus(Bus):
    """One instance alone: there is no one to tell, and nothing to read."""

    shared = False

    async def start(self) -> None:
        pass

    async def aclose(self, timeout_s: float = 1.0) -> None:
        pass

    def send(self, *commands: Command) -> None:
        pass

    def publish(self, channel: str, payload: str) -> None:
        pass

    def subscribe(self, channel: str, handler: Handler) -> None:
        pass

    def unsubscribe(self, channel: str) -> None:
        pass

    async def subscribed(self, channel: str, timeout_s: float) -> bool:
        return True  # nothing can be published here that this instance would not see

    async def query(self, *commands: Command, timeout_s: float = 2.0) -> list[Any] | None:
        return None

    def on_connect(self, callback: OnConnect) -> None:
        pass


def build_bus(redis_url: str) -> Bus:
    """`server.redis_url`: empty is one instance alone; `redis://HOST:PORT/DB` is Redis (the
    `redis` package, the `redis` extra, is imported only then)."""
    if not redis_url:
        return LocalBus()
    try:
        from streaming.transport.redis_bus import RedisBus
    except ImportError as err:
        raise ConfigError(
            f"server.redis_url needs the redis package ({err}): pip install 'streamscribe[redis]'"
        ) from err
    return RedisBus(redis_url)

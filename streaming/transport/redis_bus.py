"""The bus over Redis: pub/sub between instances, and a few keys that outlive a message.

Two connections. Writes and PUBLISHes go through one, from a bounded queue drained by a task in
pipelines, in the order they were queued: the caller never waits. Subscriptions are held on the
other, read by a task; it pings when idle, so that a Redis that vanished without closing the
socket is noticed within `DEAD_S`.

When Redis goes away: one warning, then reconnection with exponential backoff. Meanwhile the
queue keeps up to `QUEUE_MAX` commands (more are dropped, with one warning) and sends them once
Redis is back; a batch that failed is sent again (at least once: a message may repeat, with the
same `seq`). Subscriptions are restored on reconnection, and `on_connect` callbacks run then to
catch up on what was missed. Local subscribers never depend on any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streaming.transport.bus import Bus, Command, Handler, OnConnect

log = logging.getLogger("streaming.transport.redis_bus")

QUEUE_MAX = 10_000  # commands waiting for Redis (while it is away); more are dropped
BATCH_MAX = 500  # commands per pipeline
BACKOFF_S, BACKOFF_MAX_S = 0.1, 5.0  # first reconnection delay, doubling up to the maximum
CONNECT_TIMEOUT_S = 1.0
COMMAND_TIMEOUT_S = 5.0
FLUSH_MAX_S = 2.0  # most a shutdown waits to send what is queued
PING_S = 5.0  # the subscriber connection pings after this long...
DEAD_S = 15.0  # ...and is dropped (then reconnected) after this long without hearing anything
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)  # whatever a command may raise
_OUTAGES = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)  # retried


class RedisBus(Bus):
    """`Bus` over one Redis server (`redis://HOST:PORT/DB`)."""

    shared = True

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        parts = urlsplit(url)
        self.where = f"{parts.hostname}:{parts.port or 6379}"  # for logs: never the password
        self.home = f"streamscribe:bus:{self.instance}"  # always subscribed: the link itself
        self.queue: deque[Command] = deque()
        self.in_flight = 0  # commands of the pipeline being sent
        self.wakeup = asyncio.Event()
        self.channels: dict[str, Handler] = {}
        self.sent: set[str] = set()  # channels asked of the current subscriber connection
        self.confirmed: set[str] = set()  # ...and those Redis confirmed
        self.waiters: dict[str, list[asyncio.Future]] = {}
        self.changed = asyncio.Event()  # `channels` changed: the connection must follow
        self.hooks: list[OnConnect] = []
        self.up: bool | None = None  # None: not connected yet
        self.full = False  # the queue dropped commands (warned once until it drains)
        self.closing = False
        self.tasks: set[asyncio.Task] = set()
        self.client: aredis.Redis | None = None
        self.listener: aredis.Redis | None = None
        self.writer: asyncio.Task | None = None
        self.heard = 0.0  # loop time the subscriber connection last heard from Redis

    # --- Bus ------------------------------------------------------------------------------

    async def start(self) -> None:
        options: dict[str, Any] = {
            "decode_responses": True,
            "retry": Retry(NoBackoff(), 0),  # this module does the retrying, with backoff
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
        }
        self.client = aredis.Redis.from_url(self.url, socket_timeout=COMMAND_TIMEOUT_S, **options)
        self.listener = aredis.Redis.from_url(self.url, socket_timeout=None, **options)
        self.writer = self._spawn(self._write())
        self._spawn(self._listen())

    async def aclose(self, timeout_s: float = 1.0) -> None:
        self.closing = True
        self.wakeup.set()
        if self.writer is not None and self.up:  # Redis away: nothing to wait for
            await asyncio.wait((self.writer,), timeout=min(timeout_s, FLUSH_MAX_S))
        if self.queue or self.in_flight:
            log.warning(
                "redis: queued commands not sent before shutdown",
                extra={"dropped": len(self.queue) + self.in_flight, "redis": self.where},
            )
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in (self.client, self.listener):
            if client is not None:
                with contextlib.suppress(*_FAILURES):
                    await client.aclose()

    def send(self, *commands: Command) -> None:
        for command in commands:
            self._queue(command)

    def publish(self, channel: str, payload: str) -> None:
        self._queue(("PUBLISH", channel, f"{self.instance} {payload}"))

    def subscribe(self, channel: str, handler: Handler) -> None:
        self.channels[channel] = handler
        self.changed.set()

    def unsubscribe(self, channel: str) -> None:
        # `confirmed` keeps it until UNSUBSCRIBE is sent: subscribed again before that, the
        # connection never stopped hearing it.
        if self.channels.pop(channel, None) is not None:
            self.changed.set()

    async def subscribed(self, channel: str, timeout_s: float) -> bool:
        if channel in self.confirmed and channel in self.channels:
            return True
        if channel not in self.channels:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(channel, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            waiting = self.waiters.get(channel, [])
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self.waiters.pop(channel, None)

    async def query(self, *commands: Command, timeout_s: float = 2.0) -> list[Any] | None:
        if self.client is None or self.closing:
            return None
        try:
            return await asyncio.wait_for(self._pipeline(commands), timeout_s)
        except _FAILURES as err:
            log.debug("redis query failed", extra={"error": str(err), "redis": self.where})
            return None

    def on_connect(self, callback: OnConnect) -> None:
        self.hooks.append(callback)

    # --- writing ----------------------------------------------------------------------------

    def _queue(self, command: Command) -> None:
        if self.closing and self.writer is not None and self.writer.done():
            return
        if len(self.queue) + self.in_flight >= QUEUE_MAX:
            if not self.full:
                self.full = True
                log.warning(
                    "redis backlog full; messages for other instances are dropped",
                    extra={"queued": QUEUE_MAX, "redis": self.where},
                )
            return
        self.queue.append(command)
        self.wakeup.set()

    async def _write(self) -> None:
        """Send the queue in pipelines, in order; on failure keep it and retry with backoff."""
        delay = BACKOFF_S
        while True:
            if not self.queue:
                self.full = False
                if self.closing:
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch = [self.queue.popleft() for _ in range(min(len(self.queue), BATCH_MAX))]
            self.in_flight = len(batch)
            try:
                replies = await self._pipeline(batch)
            except _OUTAGES as err:
                self.queue.extendleft(reversed(batch))
                self._down(err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            except RedisError:  # not the link: the batch itself (sending it again cannot help)
                log.exception("redis refused a batch; dropped", extra={"commands": len(batch)})
                continue
            finally:
                self.in_flight = 0
            delay = BACKOFF_S
            self._up()
            refused = next((r for r in replies if isinstance(r, Exception)), None)
            if refused is not None:  # a command Redis refused (a bug here, not an outage)
                log.warning("redis refused a command", extra={"error": str(refused)})

    async def _pipeline(self, commands: tuple[Command, ...] | list[Command]) -> list[Any]:
        assert self.client is not None
        async with self.client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=False)

    # --- listening --------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Hold the subscriber connection: (re)connect with backoff, follow `channels`."""
        assert self.listener is not None
        delay = BACKOFF_S
        while True:
            pubsub = self.listener.pubsub()
            parts: list[asyncio.Task] = []
            try:
                self.sent = {self.home, *self.channels}
                self.changed.clear()
                await pubsub.subscribe(*self.sent)
                delay = BACKOFF_S  # connected: a later outage backs off afresh
                parts = [
                    asyncio.create_task(self._read(pubsub, set(self.sent))),
                    asyncio.create_task(self._follow(pubsub)),
                    asyncio.create_task(self._ping(pubsub)),
                ]
                done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # raises what ended the connection
            except Exception as err:
                if not isinstance(err, _FAILURES):
                    log.exception("redis subscriber connection failed")
                self._down(err)
            finally:
                for task in parts:
                    task.cancel()
                await asyncio.gather(*parts, return_exceptions=True)
                self.sent.clear()
                self.confirmed.clear()
                with contextlib.suppress(*_FAILURES):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _read(self, pubsub: PubSub, initial: set[str]) -> None:
        loop = asyncio.get_running_loop()
        self.heard = loop.time()
        while True:
            message = await pubsub.get_message(timeout=None)
            self.heard = loop.time()
            if message is None:
                continue
            kind, channel = message["type"], message["channel"]
            if kind == "message":
                self._deliver(channel, message["data"])
            elif kind == "subscribe":
                self._confirm(channel)
                if initial:
                    initial.discard(channel)
                    if not initial:  # every channel is heard again: catch up
                        self._up()
                        for hook in self.hooks:
                            self._spawn(hook())

    async def _follow(self, pubsub: PubSub) -> None:
        """Subscribe to channels added since connecting, unsubscribe from those dropped."""
        while True:
            await self.changed.wait()
            self.changed.clear()
            wanted = {self.home, *self.channels}
            added, dropped = wanted - self.sent, self.sent - wanted
            self.sent = wanted
            self.confirmed -= dropped
            if added:
                await pubsub.subscribe(*added)
            if dropped:
                await pubsub.unsubscribe(*dropped)

    async def _ping(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PING_S)
            if loop.time() - self.heard > DEAD_S:
                raise ConnectionError(f"no answer from redis for {DEAD_S:g} s")
            if loop.time() - self.heard >= PING_S:
                await pubsub.ping()

    def _deliver(self, channel: str, data: str) -> None:
        sender, _, payload = data.partition(" ")
        handler = self.channels.get(channel)
        if sender == self.instance or handler is None:
            return  # its own message (delivered locally already), or a channel just dropped
        try:
            handler(sender, payload)
        except Exception:
            log.exception("bus message handler failed", extra={"channel": channel})

    def _confirm(self, channel: str) -> None:
        if channel not in self.channels and channel != self.home:
            return  # dropped again before Redis confirmed it
        self.confirmed.add(channel)
        for waiter in self.waiters.pop(channel, []):
            if not waiter.done():
                waiter.set_result(None)

    # --- state --------------------------------------------------------------------------------

    def _up(self) -> None:
        if self.up is not True:
            self.up = True
            log.info("redis connected", extra={"redis": self.where})

    def _down(self, err: BaseException) -> None:
        """One warning per outage; callers retry with backoff."""
        if self.up is not False and not self.closing:
            log.warning(
                "redis unavailable; other instances miss this one's call events and captions "
                "until it is back (local subscribers are served); retrying",
                extra={"redis": self.where, "error": f"{type(err).__name__}: {err}"},
            )
        self.up = False

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("redis bus task failed", exc_info=task.exception())

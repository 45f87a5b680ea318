"""Calls: the transcripts of a telephony call, delivered to whoever follows that call.

A telephony dialect names its call once the platform has said which it is (Twilio's `callSid`,
jambonz's `callSid`, an AudioSocket UUID), and the Connection then publishes every event of the
stream here. The hub encodes each event once in the native protocol (with the call's own `seq`,
the `call_id`, and `channel` as the track's label, e.g. "inbound") and hands it to

- WebSocket subscribers of `/v1/calls/{call_id}/events`: a subscriber may connect before the
  call starts and is held up to `server.call_subscriber_hold_s`; each has a bounded queue and is
  cut off when it falls that far behind, so a slow subscriber never holds up a call's audio;
- the webhook (`server.webhook_url`): finals, errors and the session's start and end are POSTed
  as JSON by a background task per call, in order, retried with exponential backoff.

Across instances (`server.redis_url`; streaming/transport/bus.py), a call may stream into one
instance while its subscriber is connected to another. The instance carrying the call publishes
each message (numbered by its own `seq`) on the call's channel, says "start" and "end" there,
and keeps its id in the call's live set (expiring unless refreshed, so a crashed instance
leaves no call live for good). An instance with a subscriber hears that channel and reads the
live set when it joins, so the hold works as within one process; it never posts the webhook,
which stays with the instance carrying the call. Local subscribers never wait on the bus.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from websockets.exceptions import ConnectionClosed

from streaming.core.close_codes import CLOSE_NO_CALL, CLOSE_NORMAL, CLOSE_TRY_AGAIN
from streaming.core.events import Event
from streaming.dialects.native import NativeDialect
from streaming.transport.bus import Bus, LocalBus
from streaming.transport.wsserver import WebSocket

log = logging.getLogger("streaming.transport.calls")

CALL_PATH = re.compile(r"/v1/calls/([A-Za-z0-9._~:-]{1,128})/events")
SUBSCRIBER_QUEUE = 1000  # messages a subscriber may fall behind before it is cut off
MAX_SUBSCRIBERS = 32  # per call
WEBHOOK_QUEUE = 1000  # messages of one call waiting for the webhook; more are dropped (logged)
WEBHOOK_EVENTS = frozenset({"session.started", "transcript.final", "error", "session.closed"})
WEBHOOK_TIMEOUT_S = 5.0
BACKOFF_S, BACKOFF_MAX_S = 0.25, 8.0  # first retry delay, doubling up to the maximum
# Across instances: the call's messages ("start", "msg {json}", "end") and who carries it.
CALL_CHANNEL = "streamscribe:call:{}"
CALL_LIVE = "streamscribe:call:{}:live"  # a set of instance ids, expiring after LIVE_TTL_S
LIVE_TTL_S = 30
SWEEP_S = 10.0  # refresh the live sets of calls carried here; check those followed from here
FOLLOW_TIMEOUT_S = 1.0  # most a subscriber waits for the bus before it is held locally only

# What a subscriber's queue carries besides messages.
_END = object()  # the call is over: close normally
_GONE = object()  # the subscriber disconnected
_HOLD_OVER = object()  # the hold time ran out: close unless the call has started


def call_events_id(path: str) -> str | None:
    """The call id of a `/v1/calls/{call_id}/events` path, else None."""
    match = CALL_PATH.fullmatch(path)
    return match.group(1) if match else None


@dataclass(eq=False)
class _Subscriber:
    ws: WebSocket
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # bounded by `offer`

    def offer(self, item: object) -> bool:
        """Queue a message; False when the subscriber is SUBSCRIBER_QUEUE messages behind."""
        if isinstance(item, str) and self.queue.qsize() >= SUBSCRIBER_QUEUE:
            return False
        self.queue.put_nowait(item)
        return True


@dataclass(eq=False)
class _Call:
    id: str
    encoder: NativeDialect = field(default_factory=NativeDialect)  # the call's own `seq`
    publishers: set[str] = field(default_factory=set)  # connections carrying this call
    subscribers: set[_Subscriber] = field(default_factory=set)
    live: bool = False  # an event has been published (here or, as heard, elsewhere)
    webhook: asyncio.Queue | None = None  # bounded by `_post_later`
    owned: bool = False  # this instance told the others that it carries the call
    remote: set[str] = field(default_factory=set)  # other instances carrying it, as heard
    followed: asyncio.Future | None = None  # hearing its channel (a subscriber is here)
    orphaned: bool = False  # a sweep found no instance carrying it: ended at the next one


class CallHub:
    """call_id -> subscribers and webhook deliveries; fed by Connections on the event loop."""

    def __init__(
        self,
        hold_s: float,
        webhook_url: str = "",
        webhook_retries: int = 3,
        bus: Bus | None = None,
    ) -> None:
        self.hold_s = hold_s
        self.bus = bus if bus is not None else LocalBus()
        self.sweeper: asyncio.Task | None = None  # with a shared bus, once a call is seen
        if self.bus.shared:
            self.bus.on_connect(self._sweep_once)  # catch up on what an outage hid
        self.webhook_url = webhook_url
        self.webhook_retries = webhook_retries
        self.calls: dict[str, _Call] = {}
        self.deliveries: set[asyncio.Task] = set()
        self.http: aiohttp.ClientSession | None = None
        self.closed = False  # shut down: late events (after the drain's grace) go nowhere
        self.subscribed = 0  # subscriber connections open now: they count against max_sessions

    # --- publishing (Connections) ------------------------------------------------------------

    def publish(self, call_id: str, source: str, labels: Sequence[str], event: Event) -> None:
        """Fan one event of the call out; never blocks (slow subscribers are cut off)."""
        if self.closed:
            return
        call = self._call(call_id)
        call.publishers.add(source)
        call.live = True
        if self.bus.shared and not call.owned:
            self._announce(call)
        frames = call.encoder.encode(event)
        if not frames:
            return
        message = json.loads(frames[0])
        channel = message.get("channel")
        if isinstance(channel, int) and 0 <= channel < len(labels):
            message["channel"] = labels[channel]
        message["call_id"] = call_id
        text = json.dumps(message)
        self._offer(call, text)
        if self.bus.shared:
            self.bus.publish(CALL_CHANNEL.format(call_id), f"msg {text}")
        if self.webhook_url and message["type"] in WEBHOOK_EVENTS:
            self._post_later(call, text)

    def _call(self, call_id: str) -> _Call:
        call = self.calls.get(call_id)
        if call is None:
            call = self.calls[call_id] = _Call(call_id)
        return call

    def end(self, call_id: str | None, source: str) -> None:
        """`source` stopped carrying the call; once none does, its subscribers are closed."""
        call = self.calls.get(call_id) if call_id is not None else None
        if call is None or source not in call.publishers:
            return
        call.publishers.discard(source)
        if not call.publishers:
            self._release(call)
            if not call.remote:  # else its subscribers wait for the other instances too
                self._finish(call)

    def _offer(self, call: _Call, text: str) -> None:
        for subscriber in list(call.subscribers):
            if not subscriber.offer(text):
                self._cut_off(call, subscriber)

    def _finish(self, call: _Call) -> None:
        self._forget(call)
        for subscriber in call.subscribers:
            subscriber.offer(_END)
        if call.webhook is not None:
            call.webhook.put_nowait(_END)

    def _forget(self, call: _Call) -> None:
        if self.calls.get(call.id) is call:
            del self.calls[call.id]
        if call.followed is not None:
            call.followed = None
            self.bus.unsubscribe(CALL_CHANNEL.format(call.id))

    # --- across instances -------------------------------------------------------------------

    def _announce(self, call: _Call) -> None:
        """Tell the other instances this one carries the call from now on."""
        call.owned = True
        live = CALL_LIVE.format(call.id)
        self.bus.send(("SADD", live, self.bus.instance), ("EXPIRE", live, LIVE_TTL_S))
        self.bus.publish(CALL_CHANNEL.format(call.id), "start")
        self._sweeping()

    def _release(self, call: _Call) -> None:
        """This instance carries the call no more."""
        if call.owned:
            call.owned = False
            self.bus.send(("SREM", CALL_LIVE.format(call.id), self.bus.instance))
            self.bus.publish(CALL_CHANNEL.format(call.id), "end")

    async def _follow(self, call: _Call) -> None:
        """Hear the call's channel, then learn whether another instance carries it already;
        at most about 2 x FOLLOW_TIMEOUT_S when the bus is down."""
        if call.followed is None:
            call.followed = asyncio.ensure_future(self._hear(call))
            self._sweeping()
        await asyncio.shield(call.followed)

    async def _hear(self, call: _Call) -> None:
        channel = CALL_CHANNEL.format(call.id)
        self.bus.subscribe(channel, lambda sender, payload: self._heard(call.id, sender, payload))
        await self.bus.subscribed(channel, FOLLOW_TIMEOUT_S)
        carriers = await self._carriers(call.id)
        if carriers:
            call.remote |= carriers
            call.live = True

    async def _carriers(self, call_id: str) -> set[str] | None:
        """The other instances carrying the call (None: the bus cannot say now)."""
        replies = await self.bus.query(
            ("SMEMBERS", CALL_LIVE.format(call_id)), timeout_s=FOLLOW_TIMEOUT_S
        )
        if replies is None or not isinstance(replies[0], (set, list)):
            return None
        return set(replies[0]) - {self.bus.instance}

    def _heard(self, call_id: str, sender: str, payload: str) -> None:
        """A message of the call from the instance `sender`, for this one's subscribers."""
        call = self.calls.get(call_id)
        if call is None or self.closed:
            return
        kind, _, text = payload.partition(" ")
        if kind == "end":
            call.remote.discard(sender)
            if not call.remote and not call.publishers:
                self._finish(call)
            return
        call.remote.add(sender)
        call.live = True
        call.orphaned = False
        if kind == "msg":
            self._offer(call, text)

    def _sweeping(self) -> None:
        if self.sweeper is None and not self.closed:
            self.sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            if self.closed:
                return
            try:
                await self._sweep_once()
            except Exception:
                log.exception("call sweep failed")

    async def _sweep_once(self) -> None:
        """Keep this instance in the live sets of the calls it carries (they expire otherwise,
        and may have during an outage); end the calls followed here whose carriers are all
        gone (crashed, or ended while the bus was away) at the second sweep that finds none."""
        for call in list(self.calls.values()):
            if call.owned:
                live = CALL_LIVE.format(call.id)
                self.bus.send(("SADD", live, self.bus.instance), ("EXPIRE", live, LIVE_TTL_S))
        for call in list(self.calls.values()):
            if call.followed is None or call.publishers or not call.live:
                continue
            carriers = await self._carriers(call.id)
            if carriers is None or self.calls.get(call.id) is not call:
                continue
            if carriers:
                call.remote |= carriers
                call.orphaned = False
            elif call.orphaned:
                call.remote.clear()
                self._finish(call)
            else:
                call.orphaned = True

    def _cut_off(self, call: _Call, subscriber: _Subscriber) -> None:
        log.warning(
            "call subscriber fell behind; connection dropped",
            extra={"call_id": call.id, "queued": subscriber.queue.qsize()},
        )
        call.subscribers.discard(subscriber)
        subscriber.ws.transport.abort()

    # --- subscribers ------------------------------------------------------------------------

    async def serve(self, ws: WebSocket, call_id: str) -> None:
        """Send the call's events to one subscriber until the call ends (close 1000), the hold
        time passes before the call starts (error `call_not_found`, close 4004), or the
        subscriber leaves. Messages a subscriber sends are read and ignored."""
        self.subscribed += 1
        try:
            await self._serve(ws, call_id)
        finally:
            self.subscribed -= 1

    async def _serve(self, ws: WebSocket, call_id: str) -> None:
        call = self._call(call_id)
        if len(call.subscribers) >= MAX_SUBSCRIBERS:
            await _refuse(ws, "too_many_subscribers", f"call {call_id} has enough subscribers")
            await ws.close(CLOSE_TRY_AGAIN, "too many subscribers")
            return
        # Added before the call's channel is followed, so that no message heard meanwhile
        # misses it; the hold starts once it hears the call wherever it runs.
        subscriber = _Subscriber(ws)
        call.subscribers.add(subscriber)
        if self.bus.shared:  # what it hears meanwhile (even the call's end) is queued for it
            await self._follow(call)
        reader = asyncio.create_task(_read_until_closed(subscriber))
        hold = asyncio.get_running_loop().call_later(self.hold_s, subscriber.offer, _HOLD_OVER)
        try:
            while True:
                item = await subscriber.queue.get()
                if item is _GONE:
                    return
                if item is _END:
                    await ws.close(CLOSE_NORMAL)
                    return
                if item is _HOLD_OVER:
                    if call.live:
                        continue
                    await _refuse(
                        ws, "call_not_found", f"no call {call_id} within {self.hold_s:g} s"
                    )
                    await ws.close(CLOSE_NO_CALL, "call not found")
                    return
                await ws.send(item)
        except ConnectionClosed:
            pass
        finally:
            hold.cancel()
            reader.cancel()
            call.subscribers.discard(subscriber)
            if not call.publishers and not call.subscribers:
                self._forget(call)

    # --- webhook ----------------------------------------------------------------------------

    def _post_later(self, call: _Call, text: str) -> None:
        if call.webhook is None:
            call.webhook = asyncio.Queue()
            task = asyncio.create_task(self._deliver(call.id, call.webhook))
            self.deliveries.add(task)
            task.add_done_callback(self.deliveries.discard)
        if call.webhook.qsize() >= WEBHOOK_QUEUE:
            log.warning("webhook backlog full; event dropped", extra={"call_id": call.id})
            return
        call.webhook.put_nowait(text)

    async def _deliver(self, call_id: str, queue: asyncio.Queue) -> None:
        while (text := await queue.get()) is not _END:
            await self._post(call_id, text)

    async def _post(self, call_id: str, text: str) -> bool:
        """POST one message; retry network errors, timeouts, 408, 429 and 5xx with backoff."""
        if self.http is None:
            self.http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)
            )
        why = ""
        for attempt in range(self.webhook_retries + 1):
            if attempt:
                await asyncio.sleep(min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_MAX_S))
            try:
                async with self.http.post(
                    self.webhook_url, data=text, headers={"Content-Type": "application/json"}
                ) as response:
                    if response.status < 300:
                        return True
                    why = f"HTTP {response.status}"
                    if response.status < 500 and response.status not in (408, 429):
                        break  # the receiver refuses this message: retrying will not help
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                why = f"{type(err).__name__}: {err}"
        log.warning(
            "webhook delivery failed",
            extra={"call_id": call_id, "error": why, "attempts": attempt + 1},
        )
        return False

    # --- shutdown ---------------------------------------------------------------------------

    async def aclose(self, timeout_s: float) -> None:
        """Close every subscriber, give pending webhook deliveries `timeout_s`, then stop."""
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
        for call in list(self.calls.values()):
            call.publishers.clear()
            self._release(call)
            self._finish(call)
        if self.deliveries:
            _, late = await asyncio.wait(self.deliveries, timeout=timeout_s)
            for task in late:
                task.cancel()
        if self.http is not None:
            await self.http.close()
            self.http = None


async def _refuse(ws: WebSocket, code: str, message: str) -> None:
    await ws.send(json.dumps({"type": "error", "seq": 1, "code": code, "message": message}))


async def _read_until_closed(subscriber: _Subscriber) -> None:
    try:
        async for _ in subscriber.ws:
            pass
    except ConnectionClosed:
        pass
    subscriber.offer(_GONE)

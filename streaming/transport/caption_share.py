"""Pop-on caption cues shared between server instances, so any instance serves any export.

`GET /v1/sessions/{id}/captions.vtt|srt` is answered inside the HTTP handshake, without
waiting on the network, so each instance keeps the cues it serves in its own `CaptionStore`.
This module is that store's sink and source over the bus (streaming/transport/bus.py):

- each cue of this instance's sessions is written to Redis and published on `CHANNEL`; every
  instance mirrors what it hears into its store, within the store's bounds
  (`server.caption_sessions`, `server.caption_cues`), which thus span all the instances;
- Redis keeps, for an instance that starts (or reconnects) later, the cues of the last
  `caption_sessions` sessions: a list per session (at most `caption_cues`), its timecode
  origin, and an index by last cue time. Each key expires `TTL_S` after the session's last cue;
  a session that falls out of the index has its keys deleted. On each (re)connection an
  instance reads them back (`catch_up`), merged by cue id with what it heard live.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

from streaming.core.captions import CaptionStore
from streaming.core.events import CaptionCue
from streaming.transport.bus import Bus

log = logging.getLogger("streaming.transport.caption_share")

CHANNEL = "streamscribe:captions"  # {"session", "origin_ms", "cue"} or {..., "open": true}
RECENT = "streamscribe:captions:recent"  # sorted set: session id -> unix time of its last cue
PREFIX = "streamscribe:caption:"  # + "{session}:cues" (list of JSON cues), + "{session}:origin"
TTL_S = 24 * 3600  # keys live this long after a session's last cue
CATCH_UP_BATCH = 16  # sessions read back per round trip

# (Re)start a session: its origin, an empty list, its place in the index; then drop the sessions
# beyond the newest ARGV[5], keys and all. KEYS: RECENT, origin, cues; ARGV: session, now,
# origin_ms, ttl, max_sessions, PREFIX.
_OPEN = """
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[5])
if extra > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, extra - 1)) do
    redis.call('DEL', ARGV[6] .. id .. ':origin', ARGV[6] .. id .. ':cues')
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1)
end
return extra
"""


def _origin_key(session_id: str) -> str:
    return f"{PREFIX}{session_id}:origin"


def _cues_key(session_id: str) -> str:
    return f"{PREFIX}{session_id}:cues"


def encode_cue(cue: CaptionCue) -> dict[str, Any]:
    return dataclasses.asdict(cue)


def decode_cue(fields: dict[str, Any]) -> CaptionCue:
    """A cue from its JSON fields; ValueError/TypeError/KeyError when it is not one."""
    cue = CaptionCue(**{f.name: fields[f.name] for f in dataclasses.fields(CaptionCue)})
    if not isinstance(cue.id, int) or not all(isinstance(line, str) for line in cue.lines):
        raise ValueError(f"not a caption cue: {fields!r}")
    return cue


class SharedCaptions:
    """A `CaptionSink` writing to the bus, and the feed of other instances' cues into a store."""

    def __init__(self, bus: Bus, max_sessions: int, max_cues: int, ttl_s: int = TTL_S) -> None:
        self.bus = bus
        self.max_sessions = max_sessions
        self.max_cues = max_cues
        self.ttl_s = ttl_s
        self.store: CaptionStore | None = None

    def attach(self, store: CaptionStore) -> None:
        """Mirror other instances' cues into `store` from now on."""
        self.store = store
        self.bus.subscribe(CHANNEL, self._heard)
        self.bus.on_connect(self.catch_up)

    # --- CaptionSink ------------------------------------------------------------------------

    def opened(self, session_id: str, origin_ms: int) -> None:
        keys = (RECENT, _origin_key(session_id), _cues_key(session_id))
        args = (session_id, time.time(), origin_ms, self.ttl_s, self.max_sessions, PREFIX)
        self.bus.send(("EVAL", _OPEN, len(keys), *keys, *args))
        message = {"session": session_id, "origin_ms": origin_ms, "open": True}
        self.bus.publish(CHANNEL, json.dumps(message))

    def added(self, session_id: str, origin_ms: int, cue: CaptionCue) -> None:
        fields = encode_cue(cue)
        cues, ttl = _cues_key(session_id), self.ttl_s
        self.bus.send(
            ("RPUSH", cues, json.dumps(fields)),
            ("LTRIM", cues, -self.max_cues, -1),
            ("EXPIRE", cues, ttl),
            ("SET", _origin_key(session_id), origin_ms, "EX", ttl),
            ("ZADD", RECENT, time.time(), session_id),
            ("EXPIRE", RECENT, ttl),
        )
        message = {"session": session_id, "origin_ms": origin_ms, "cue": fields}
        self.bus.publish(CHANNEL, json.dumps(message))

    # --- other instances' cues --------------------------------------------------------------

    def _heard(self, sender: str, payload: str) -> None:
        if self.store is None:
            return
        try:
            message = json.loads(payload)
            session_id, origin_ms = str(message["session"]), int(message["origin_ms"])
            cues = [] if message.get("open") else [decode_cue(message["cue"])]
        except (ValueError, TypeError, KeyError) as err:
            log.warning("unreadable caption message", extra={"from": sender, "error": str(err)})
            return
        self.store.mirror(session_id, origin_ms, cues, fresh=bool(message.get("open")))

    async def catch_up(self) -> None:
        """Read back the recent sessions of other instances: what was kept before this one
        started, or said while it was away from Redis. Oldest first, so the store forgets in
        the same order."""
        store = self.store
        if store is None:
            return
        recent = await self.bus.query(("ZRANGE", RECENT, -self.max_sessions, -1))
        if not recent:
            return
        sessions = [s for s in recent[0] if not store.is_local(s)]
        for at in range(0, len(sessions), CATCH_UP_BATCH):
            batch = sessions[at : at + CATCH_UP_BATCH]
            commands = []
            for session_id in batch:
                commands.append(("GET", _origin_key(session_id)))
                commands.append(("LRANGE", _cues_key(session_id), -self.max_cues, -1))
            replies = await self.bus.query(*commands)
            if replies is None:
                return  # gone again: the next connection catches up
            for n, session_id in enumerate(batch):
                origin, texts = replies[2 * n], replies[2 * n + 1]
                if not isinstance(origin, str) or not isinstance(texts, list):
                    continue  # expired meanwhile
                try:
                    cues = [decode_cue(json.loads(text)) for text in texts]
                    store.mirror(session_id, int(origin), cues)
                except (ValueError, TypeError, KeyError) as err:
                    log.warning(
                        "unreadable captions in redis",
                        extra={"session": session_id, "error": str(err)},
                    )


def caption_store(bus: Bus, max_sessions: int, max_cues: int) -> CaptionStore:
    """The gateway's store: shared through `bus` when other instances can hear it."""
    if not bus.shared:
        return CaptionStore(max_sessions, max_cues)
    shared = SharedCaptions(bus, max_sessions, max_cues)
    store = CaptionStore(max_sessions, max_cues, sink=shared)
    shared.attach(store)
    return store

"""Per-key limits (`server.key_limits`): concurrent streams and audio hours per UTC day, so that
one customer's key cannot take the whole server.

Counted per key identity (`Signer.key_id`): streams opened with the key itself and with any of
its tokens share the key's count. A token's `max_streams` caps the streams it may open further:
a stream opened with it is refused when the key already has min(key limit, max_streams) open.
A stream slot is taken at the handshake and given back when its connection ends; the audio of
streams (told by their `quota` meter about once a second) and of uploads adds to the key's use of
the current UTC day, which starts again at 00:00 UTC. State is in memory; with several
worker processes (`server.workers`) each publishes its use in shared memory (`SharedUse`) and
the limits count every worker's.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass

from streaming.ops.config import ConfigError

DEFAULT = "*"  # the item for every key without its own
STREAM_RETRY_AFTER_S = 5  # a stream slot may free soon: try again shortly
DAY_S = 86400
MS_PER_HOUR = 3_600_000


@dataclass(frozen=True)
class KeyLimit:
    """One key's limits; 0 = unlimited."""

    streams: int = 0  # concurrent streams
    hours: float = 0.0  # audio hours per UTC day


@dataclass(frozen=True)
class Refusal:
    """Why a stream or upload is refused (HTTP 429), and when to try again."""

    reason: str
    retry_after: int


def parse_limits(text: str) -> dict[str, KeyLimit]:
    """The items of `server.key_limits`, "KEY:STREAMS:HOURS" comma-separated, by KEY (`*` for
    the default). ConfigError for an item that is not of that shape, or a key given twice."""
    limits: dict[str, KeyLimit] = {}
    for number, item in enumerate((i.strip() for i in text.split(",") if i.strip()), 1):
        key, _, rest = item.rpartition(":")
        key, _, streams = key.rpartition(":")
        try:
            limit = KeyLimit(int(streams), float(rest))
        except ValueError:
            limit = None
        if not key or limit is None or limit.streams < 0 or not limit.hours >= 0:
            raise ConfigError(f"server.key_limits item {number}: expected KEY:STREAMS:HOURS")
        if key in limits:
            raise ConfigError(f"server.key_limits item {number}: the key has an item already")
        limits[key] = KeyLimit(limit.streams, limit.hours)
    return limits


class SharedUse:
    """Every worker's use of every key, in shared memory: row `index` is this worker's (only
    it writes there; the supervisor zeroes a dead worker's row), columns are the server's API
    keys in sorted order. Two workers admitting at the same instant may pass a key's stream
    limit by one each."""

    def __init__(self, streams, audio_ms, days, index: int, key_ids: list[str]) -> None:
        """`streams` (int) and `audio_ms` (float): workers x keys arrays; `days`: the UTC day
        of each worker's audio row."""
        self.streams_by_row = streams
        self.audio_by_row = audio_ms
        self.days = days
        self.index = index
        self.columns = {key_id: column for column, key_id in enumerate(key_ids)}
        self.width = len(key_ids)

    def publish(self, open_streams: Counter[str], used_ms: Counter[str], day: int) -> None:
        start = self.index * self.width
        for key_id, column in self.columns.items():
            self.streams_by_row[start + column] = open_streams[key_id]
            self.audio_by_row[start + column] = used_ms[key_id]
        self.days[self.index] = day

    def streams(self, key_id: str) -> int:
        column = self.columns.get(key_id)
        if column is None:
            return 0
        return sum(self.streams_by_row[column :: self.width])

    def used_ms(self, key_id: str, day: int) -> float:
        column = self.columns.get(key_id)
        if column is None:
            return 0.0
        rows = range(len(self.days))
        return sum(
            self.audio_by_row[row * self.width + column] for row in rows if self.days[row] == day
        )


class Limits:
    """The limits of one server's keys and what each key uses now. `clock` is unix time (a
    test may move it across midnight)."""

    def __init__(
        self,
        by_id: dict[str, KeyLimit],
        default: KeyLimit = KeyLimit(),
        clock: Callable[[], float] = time.time,
        shared: SharedUse | None = None,
    ) -> None:
        self.by_id = by_id
        self.shared = shared
        self.default = default
        self.clock = clock
        self.holders: dict[Hashable, str] = {}  # stream (its connection) -> key identity
        self.open: Counter[str] = Counter()  # key identity -> streams open
        self.day = self._today()
        self.used_ms: Counter[str] = Counter()  # key identity -> audio ms today

    @classmethod
    def build(
        cls,
        text: str,
        keys: Collection[str],
        key_id: Callable[[str], str],
        shared: SharedUse | None = None,
    ) -> Limits:
        """From `server.key_limits`; items for keys that are not in `keys` are ignored (a key
        is a secret: it is not named in an error), `*` applies to every key without its own.
        `shared`: the other workers' use (server.workers)."""
        items = parse_limits(text)
        default = items.pop(DEFAULT, KeyLimit())
        by_id = {key_id(key): limit for key, limit in items.items() if key in keys}
        return cls(by_id, default, shared=shared)

    def limit(self, key_id: str) -> KeyLimit:
        return self.by_id.get(key_id, self.default)

    def hold(self, holder: Hashable, key_id: str, cap: int | None = None) -> Refusal | None:
        """Take a stream slot of the key for `holder` (until `release`), or say why not: the
        day's audio is spent, or the key has its streams open (at most `cap` when given: a
        token's max_streams)."""
        spent = self.spent(key_id)
        if spent is not None:
            return spent
        allowed = min((n for n in (self.limit(key_id).streams, cap or 0) if n > 0), default=0)
        open_now = self.open[key_id] if self.shared is None else self.shared.streams(key_id)
        if allowed and open_now >= allowed:
            return Refusal(
                f"too many streams for this key: {open_now} open, at most {allowed}",
                STREAM_RETRY_AFTER_S,
            )
        self.release(holder)
        self.holders[holder] = key_id
        self.open[key_id] += 1
        self._publish()
        return None

    def release(self, holder: Hashable) -> None:
        """Give the holder's stream slot back (once; a holder without one is ignored)."""
        key_id = self.holders.pop(holder, None)
        if key_id is not None:
            self.open[key_id] -= 1
            if self.open[key_id] <= 0:
                del self.open[key_id]
            self._publish()

    def spent(self, key_id: str) -> Refusal | None:
        """A refusal until the next UTC midnight when the key's audio of today is used up."""
        hours = self.limit(key_id).hours
        if not hours:
            return None
        self._roll()
        used = (
            self.used_ms[key_id]
            if self.shared is None
            else self.shared.used_ms(key_id, self.day)
        )
        if used < hours * MS_PER_HOUR:
            return None
        now = self.clock()
        retry = max(1, math.ceil((math.floor(now / DAY_S) + 1) * DAY_S - now))
        return Refusal(
            f"audio allowance of this key is spent: {hours:g} h per day, again from 00:00 UTC",
            retry,
        )

    def charge(self, key_id: str, audio_ms: float) -> None:
        """Add audio to the key's use of today."""
        if audio_ms > 0 and self.limit(key_id).hours:
            self._roll()
            self.used_ms[key_id] += audio_ms
            self._publish()

    def meter(self, holder: Hashable) -> Callable[[int], str | None] | None:
        """The `quota` of the holder's stream (None: no allowance to keep): told the stream's
        total audio, it charges what came since its last call and answers why the stream
        must stop once the allowance is spent."""
        key_id = self.holders.get(holder)
        if key_id is None or not self.limit(key_id).hours:
            return None
        counted = 0

        def quota(total_ms: int) -> str | None:
            nonlocal counted
            self.charge(key_id, total_ms - counted)
            counted = max(counted, total_ms)
            refusal = self.spent(key_id)
            return None if refusal is None else refusal.reason

        return quota

    def _today(self) -> int:
        return math.floor(self.clock() / DAY_S)

    def _roll(self) -> None:
        today = self._today()
        if today != self.day:
            self.day = today
            self.used_ms.clear()
            self._publish()

    def _publish(self) -> None:
        if self.shared is not None:
            self.shared.publish(self.open, self.used_ms, self.day)

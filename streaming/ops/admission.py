"""Whether a new stream may start now, decided in one place for every way in (WebSocket
handshakes, AudioSocket calls, file uploads), so that all refuse for the same reasons, in the
same words, with the same advice on when to come back."""

from __future__ import annotations

from collections.abc import MutableSequence
from typing import Literal

RETRY_AFTER_S = 5  # the Retry-After of every refusal: how long a client waits before retrying

Refusal = Literal["loading", "engine_failed", "draining", "capacity"]


def refusal(
    *,
    loaded: bool,
    draining: bool,
    active: int = 0,
    limit: int | None = None,
    failed: bool = False,
) -> Refusal | None:
    """Why a new stream cannot start, or None to admit it.

    `loaded`: the model is ready; `draining`: the server is shutting down; `active` streams are
    open out of at most `limit` (None: no cap, as for uploads). `failed`: the model will never
    load; only callers that name that reason pass it (a stream handshake says `loading`).
    Draining is named first: a server on its way out turns everyone away for good.
    """
    if draining:
        return "draining"
    if not loaded:
        return "engine_failed" if failed else "loading"
    if limit is not None and active >= limit:
        return "capacity"
    return None


class SharedCount:
    """Streams open in every worker process of one server (`server.workers`), so that
    `max_sessions` caps the server, not each worker: each worker writes its own slot of an
    array in shared memory (no lock to be left held by a worker that dies; the supervisor
    zeroes a dead worker's slot). Two workers admitting at the same instant may overshoot the
    cap by at most one stream each."""

    def __init__(self, slots: MutableSequence[int], index: int) -> None:
        self.slots = slots
        self.index = index

    def total(self, mine: int) -> int:
        """Publish this worker's count and return the server's."""
        self.slots[self.index] = mine
        return sum(self.slots)

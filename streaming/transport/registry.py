"""The live streams of one server, by session id.

A stream's state (its `StreamProtocol`: the session, its pending finals, the dialect's seq) is
held here, apart from the socket adapter that drives it now, so that it can outlive one socket
and a later one can take it over. The gateway counts, watches and drains its streams here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from streaming.core.protocol import StreamProtocol


class Attached(Protocol):
    """A transport driving a stream (streaming/transport/websocket.py's Connection)."""

    protocol: StreamProtocol


T = TypeVar("T", bound=Attached)


@dataclass
class LiveStream(Generic[T]):
    state: StreamProtocol
    connection: T | None  # the transport driving it now


class StreamRegistry(Generic[T]):
    def __init__(self) -> None:
        self.streams: dict[str, LiveStream[T]] = {}
        self.resumable: dict[str, str] = {}  # resume token -> session id

    def register(self, connection: T) -> None:
        """`connection` drives its protocol's stream, from now until `unregister`."""
        state = connection.protocol
        self.streams[state.id] = LiveStream(state, connection)
        token = state.dialect.resume_token
        if token is not None:
            self.resumable[token] = state.id

    def unregister(self, connection: T) -> None:
        """The stream is over (unless another connection has taken it over meanwhile)."""
        live = self.streams.get(connection.protocol.id)
        if live is not None and live.connection is connection:
            del self.streams[connection.protocol.id]
            self.resumable.pop(connection.protocol.dialect.resume_token or "", None)

    def by_resume_token(self, token: str) -> T | None:
        """The connection of the live stream that `token` (its `resume_token`) resumes."""
        session_id = self.resumable.get(token)
        live = self.streams.get(session_id) if session_id is not None else None
        return live.connection if live is not None else None

    def state(self, session_id: str) -> StreamProtocol | None:
        live = self.streams.get(session_id)
        return live.state if live is not None else None

    def __len__(self) -> int:
        return len(self.streams)

    def __iter__(self) -> Iterator[T]:
        """The connections driving live streams (a copy: safe while streams come and go)."""
        return iter([live.connection for live in self.streams.values() if live.connection])

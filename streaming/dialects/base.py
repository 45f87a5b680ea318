"""What every dialect turns client messages into, and the interface the gateway drives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from streaming.events import Event


@dataclass(frozen=True)
class Configure:
    """(Re)configure the session before audio starts: session option overrides."""

    options: Mapping[str, object]
    hotwords: tuple[str, ...] = ()


@dataclass(frozen=True)
class Update:
    """Change what may change mid-stream."""

    options: Mapping[str, object]
    hotwords: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Audio:
    data: bytes


@dataclass(frozen=True)
class Finalize:
    pass


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class KeepAlive:
    pass


@dataclass(frozen=True)
class Reject:
    """The client sent something wrong; `close_code` set means the session cannot continue."""

    code: str
    message: str
    close_code: int | None = None


Command = Configure | Update | Audio | Finalize | Close | KeepAlive | Reject


@dataclass
class Opening:
    """What a dialect makes of the handshake: session options from the URL, and hotwords."""

    options: dict[str, object] = field(default_factory=dict)
    hotwords: tuple[str, ...] = ()


class Dialect(Protocol):
    name: str

    def opening(self, query: Mapping[str, str]) -> Opening: ...

    def on_text(self, text: str) -> list[Command]: ...

    def on_binary(self, data: bytes) -> list[Command]: ...

    def encode(self, event: Event) -> list[str | bytes]: ...

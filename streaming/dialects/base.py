"""What every dialect turns client messages into, and the interface the gateway drives."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

from streaming.core.events import Event


@dataclass(frozen=True)
class Configure:
    """(Re)configure the session before audio starts: session option overrides."""

    options: Mapping[str, object]
    hotwords: tuple[str, ...] = ()


@dataclass(frozen=True)
class Update:
    """Change what may change mid-stream. `reply` (an acknowledgement, as in `Reply`) is sent
    only if the session takes the options: one it refuses is answered with an error alone."""

    options: Mapping[str, object]
    hotwords: tuple[str, ...] | None = None
    reply: object | None = None


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


@dataclass(frozen=True)
class Reply:
    """An answer that no session event stands for (an acknowledgement such as OpenAI's
    `input_audio_buffer.cleared`): the gateway hands `message` back to the dialect's `encode`,
    in order with the session's events."""

    message: object


Command = Configure | Update | Audio | Finalize | Close | KeepAlive | Reject | Reply


@dataclass
class Opening:
    """What a dialect makes of the handshake: session options from the URL, and hotwords; or
    why the URL cannot start a session (`error`: the gateway sends it and closes with 4001)."""

    options: dict[str, object] = field(default_factory=dict)
    hotwords: tuple[str, ...] = ()
    error: str | None = None


class Dialect(ABC):
    """A wire protocol: client messages to commands, session events to messages.

    Telephony dialects also name the call their stream belongs to: once `call_id` is set, every
    event of the stream also goes to the call's subscribers and webhook under `channel_labels`,
    and a dropped connection is the call's hang-up (`on_hangup`), not an abandoned stream.
    """

    name: str
    # Every non-empty binary frame is audio: `on_binary` returns only `Audio` commands for it,
    # so the gateway may feed it to the session as soon as it is parsed (the fast path).
    binary_audio: bool
    call_id: str | None = None  # the telephony call this stream carries, once it is known
    # It has a message for a refined text after the final (native `transcript.refined`); if
    # not, a refine pass holds the final back and sends the refined text as the final.
    refined_messages: bool = False
    channel_labels: tuple[str, ...] = ()  # the call's name for each channel

    @abstractmethod
    def opening(self, query: Mapping[str, str]) -> Opening: ...

    @abstractmethod
    def on_text(self, text: str) -> list[Command]: ...

    @abstractmethod
    def on_binary(self, data: bytes) -> list[Command]: ...

    @abstractmethod
    def encode(self, event: Event) -> list[str | bytes]: ...

    def due(self) -> list[Reply]:
        """Messages that fall due as audio arrives rather than with a session event (Deepgram's
        UtteranceEnd after a silence): looked at after each audio frame, sent in order."""
        return []

    def on_hangup(self) -> list[Command]:
        """What the connection dropping means for a stream that carries a call (`call_id`)."""
        return []


def parse_message(text: str) -> dict | Reject:
    """A text frame as a JSON object with a string `type`, or the Reject that says why not."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as err:
        return Reject("bad_json", f"text frames must be JSON: {err}")
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return Reject("bad_message", "a control message is a JSON object with a 'type'")
    return message

"""What every dialect turns client messages into, and the interface the gateway drives."""

from __future__ import annotations

import json
import re
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
    # Session resume (server.resume_window_s): a resumable dialect numbers its messages with
    # `seq` (one message per event) and names the stream's `resume_token` when it starts.
    resumable: bool = False
    resume_token: str | None = None
    seq: int = 0

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


# A text frame is parsed only within these bounds: json.loads recurses once per nesting level
# (a frame of 50,000 brackets is a RecursionError) and a long number is a ValueError (Python's
# int-from-str digit limit); control messages need neither. The transport's frame limit
# (server.max_frame_bytes) is normally lower than MAX_TEXT_CHARS; this one holds for any caller.
MAX_TEXT_CHARS = 16 << 20
MAX_JSON_DEPTH = 64
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = re.compile(r"[\[\]{}]")


class BadJSON(ValueError):
    """A text frame that is not JSON this server will parse; the message says why."""


def _too_deep(text: str) -> bool:
    """Whether brackets outside strings nest deeper than MAX_JSON_DEPTH (a scan in C where the
    frame has few brackets, as every real control message has)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            return True
    return False


def load_json(text: str) -> object:
    """`json.loads` of a text frame, bounded in size and nesting; raises BadJSON, never the
    RecursionError or ValueError of a hostile frame."""
    if len(text) > MAX_TEXT_CHARS:
        raise BadJSON(f"text frame of {len(text)} characters; at most {MAX_TEXT_CHARS}")
    if _too_deep(text):
        raise BadJSON(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise BadJSON(str(err)) from None


def parse_message(text: str) -> dict | Reject:
    """A text frame as a JSON object with a string `type`, or the Reject that says why not."""
    try:
        message = load_json(text)
    except BadJSON as err:
        return Reject("bad_json", f"text frames must be JSON: {err}")
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return Reject("bad_message", "a control message is a JSON object with a 'type'")
    return message

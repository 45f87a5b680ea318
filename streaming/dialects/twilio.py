"""Twilio Media Streams at /v1/telephony/twilio.

Twilio sends JSON text frames: `connected`, then `start` (call and stream ids, `tracks`,
`mediaFormat`, and `customParameters` from the TwiML `<Parameter>`s, which here are session
options), then `media` (20 ms of base64 mu-law 8 kHz per message and track), `dtmf`, `mark` and
finally `stop`. The tracks become the channels of one session, inbound first, so a two-track
call is one 2-channel stream decoded and resampled once by the session core.

Twilio reads nothing but audio and marks back (bidirectional streams only), so events are not
sent on this socket: they go to the call's subscribers and webhook
(streaming/transport/calls.py), with `channel` labelled `inbound` / `outbound`. Errors are
logged; a fatal one closes the socket with its code and reason. A `mark` from Twilio
acknowledges a mark the server sent after its own audio; this server sends neither, so marks
(and DTMF digits) are accepted and ignored.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping

from streaming.core.close_codes import CLOSE_BAD_CONFIG, CLOSE_BAD_SEQUENCE
from streaming.core.events import ErrorEvent, Event
from streaming.dialects.base import (
    Audio,
    BadJSON,
    Close,
    Command,
    Configure,
    Dialect,
    KeepAlive,
    Opening,
    Reject,
    load_json,
)
from streaming.dialects.native import split_hotwords

log = logging.getLogger("streaming.dialects.twilio")

TRACKS = ("inbound", "outbound")  # channel order
MEDIA_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
SAMPLE_RATE = 8000
TRACK_WAIT_MS = 200  # a track this far behind the other is filled with silence
MULAW_SILENCE = 0xFF  # the mu-law codeword of 0
FORMAT_OPTIONS = ("encoding", "sample_rate", "channels")  # set by the stream, not parameters


class TrackAligner:
    """Interleaves per-track mu-law bytes into 2-channel frames as both tracks arrive.

    A track that falls more than `wait_samples` behind the other (Twilio sends nothing on it,
    or its messages lag) is filled with silence up to the other, so it never stalls the other
    track and neither buffer holds more than about `wait_samples`.
    """

    def __init__(self, tracks: tuple[str, ...], wait_samples: int) -> None:
        self.buffers = {track: bytearray() for track in tracks}
        self.wait_samples = wait_samples

    def push(self, track: str, data: bytes) -> bytes:
        self.buffers[track] += data
        if len(self.buffers) == 1:
            return self._take(len(data))
        short, long = sorted(self.buffers.values(), key=len)
        if len(long) - len(short) > self.wait_samples:
            short += bytes([MULAW_SILENCE]) * (len(long) - len(short))
        return self._take(len(short))

    def flush(self) -> bytes:
        """Everything buffered, the shorter track filled with silence."""
        longest = max(len(buffer) for buffer in self.buffers.values())
        for buffer in self.buffers.values():
            buffer += bytes([MULAW_SILENCE]) * (longest - len(buffer))
        return self._take(longest)

    def _take(self, n: int) -> bytes:
        buffers = list(self.buffers.values())
        if len(buffers) == 1:
            out = bytes(buffers[0][:n])
        else:
            frames = bytearray(2 * n)
            frames[0::2], frames[1::2] = buffers[0][:n], buffers[1][:n]
            out = bytes(frames)
        for buffer in buffers:
            del buffer[:n]
        return out


class TwilioDialect(Dialect):
    name = "twilio"
    binary_audio = False

    def __init__(self) -> None:
        self.call_id: str | None = None  # Twilio's callSid, once `start` arrives
        self.channel_labels: tuple[str, ...] = ()
        self.stream_sid: str | None = None
        self.state = "new"  # new -> started -> stopped
        self.aligner: TrackAligner | None = None

    def opening(self, query: Mapping[str, str]) -> Opening:
        """Twilio's stream URL takes no query string; options come with `start`. A query string
        (for other senders of this protocol) is read like the native one."""
        options = {k: v for k, v in query.items() if k not in ("hotwords", "api_key")}
        hotwords = split_hotwords(query["hotwords"]) if "hotwords" in query else ()
        return Opening(options, hotwords)

    def on_binary(self, data: bytes) -> list[Command]:
        return [Reject("unexpected_binary", "Twilio Media Streams messages are JSON text frames")]

    def on_text(self, text: str) -> list[Command]:
        try:
            message = load_json(text)
        except BadJSON as err:
            return [Reject("bad_json", f"text frames must be JSON: {err}")]
        if not isinstance(message, dict) or not isinstance(message.get("event"), str):
            return [Reject("bad_message", "a Twilio message is a JSON object with an 'event'")]
        handler = {
            "connected": self._ignored,
            "start": self._start,
            "media": self._media,
            "dtmf": self._ignored,
            "mark": self._ignored,
            "stop": self._stop,
        }.get(message["event"])
        if handler is None:
            return [
                Reject(
                    "unknown_event",
                    f"unknown event {message['event']!r}; expected one of "
                    "connected, start, media, dtmf, mark, stop",
                )
            ]
        return handler(message)

    def on_hangup(self) -> list[Command]:
        """The socket closed without `stop`: end the call with what arrived."""
        return self._stop({})

    def _ignored(self, message: dict) -> list[Command]:
        log.debug("twilio event", extra={"event": message["event"], "call_id": self.call_id})
        return [KeepAlive()]

    def _start(self, message: dict) -> list[Command]:
        if self.state != "new":
            return [Reject("invalid_sequence", "a second start is ignored")]
        start = message.get("start")
        if not isinstance(start, dict):
            return [_fatal("bad_start", "start carries no 'start' object")]
        call_sid = start.get("callSid")
        stream_sid = message.get("streamSid", start.get("streamSid"))
        tracks = start.get("tracks", ["inbound"])
        if not isinstance(call_sid, str) or not call_sid or not isinstance(stream_sid, str):
            return [_fatal("bad_start", "start must name its callSid and streamSid")]
        if not isinstance(tracks, list) or not tracks or not all(t in TRACKS for t in tracks):
            return [_fatal("bad_start", f"tracks must be a list of inbound/outbound: {tracks!r}")]
        media_format = start.get("mediaFormat", MEDIA_FORMAT)
        if media_format != MEDIA_FORMAT:
            return [
                _fatal(
                    "unsupported_format",
                    f"mediaFormat {media_format!r} is not Twilio's {MEDIA_FORMAT!r}",
                )
            ]
        parameters = start.get("customParameters") or {}
        if not isinstance(parameters, dict):
            return [_fatal("bad_start", "customParameters must be an object")]
        fixed = sorted(set(parameters) & set(FORMAT_OPTIONS))
        if fixed:
            return [
                _fatal(
                    "invalid_config",
                    f"{', '.join(fixed)} cannot be set: a Twilio stream is mu-law 8 kHz, "
                    "one channel per track",
                )
            ]
        options = dict(parameters)
        try:
            hotwords = split_hotwords(options.pop("hotwords")) if "hotwords" in options else ()
        except ValueError as err:
            return [_fatal("invalid_config", str(err))]
        self.channel_labels = tuple(track for track in TRACKS if track in tracks)
        self.call_id, self.stream_sid, self.state = call_sid, stream_sid, "started"
        self.aligner = TrackAligner(self.channel_labels, SAMPLE_RATE * TRACK_WAIT_MS // 1000)
        options.update(encoding="mulaw", sample_rate=SAMPLE_RATE, channels=len(self.channel_labels))
        return [Configure(options, hotwords)]

    def _media(self, message: dict) -> list[Command]:
        if self.state == "new":
            return [
                Reject(
                    "invalid_sequence",
                    "media before start: the stream's tracks and format are unknown",
                    CLOSE_BAD_SEQUENCE,
                )
            ]
        if self.state == "stopped":
            return [Reject("invalid_sequence", "media after stop is ignored")]
        media = message.get("media")
        if message.get("streamSid", self.stream_sid) != self.stream_sid:
            return [Reject("bad_message", f"media of another stream {message['streamSid']!r}")]
        if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
            return [Reject("bad_message", "media carries no 'media.payload' string")]
        track = media.get("track", "inbound")
        if track not in self.channel_labels:
            return [
                Reject(
                    "unknown_track",
                    f"media of track {track!r}; this stream has {', '.join(self.channel_labels)}",
                )
            ]
        try:
            payload = base64.b64decode(media["payload"], validate=True)
        except (binascii.Error, ValueError) as err:
            return [Reject("bad_payload", f"media payload is not base64: {err}")]
        data = self.aligner.push(track, payload)
        return [Audio(data)] if data else []

    def _stop(self, message: dict) -> list[Command]:
        if self.state == "stopped":
            return [Reject("invalid_sequence", "a second stop is ignored")]
        commands: list[Command] = []
        if self.aligner is not None:
            rest = self.aligner.flush()
            if rest:
                commands.append(Audio(rest))
        self.state = "stopped"
        return [*commands, Close()]

    def encode(self, event: Event) -> list[str | bytes]:
        """Nothing goes back to Twilio; errors are logged for the operator."""
        if isinstance(event, ErrorEvent):
            log.warning(
                "twilio stream error",
                extra={
                    "call_id": self.call_id,
                    "stream_sid": self.stream_sid,
                    "code": event.code,
                    "error": event.message,
                },
            )
        return []


def _fatal(code: str, message: str) -> Reject:
    return Reject(code, message, CLOSE_BAD_CONFIG)

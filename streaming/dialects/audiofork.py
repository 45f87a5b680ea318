"""FreeSWITCH mod_audio_fork and jambonz `listen` at /v1/telephony/audiofork.

Both open a WebSocket, send one text frame of metadata, then binary frames of 16-bit
little-endian PCM (L16), channels interleaved. jambonz's metadata is a JSON object with the
call's attributes (`callSid`, `from`, `to`, ...) plus `sampleRate` and `mixType` (`mono`: the
caller; `mixed`: both parties in one channel; `stereo`: caller and callee). mod_audio_fork sends
whatever metadata the dialplan passed to `uuid_audio_fork <uuid> start <url> <mix> <rate>
<metadata>`, and may send none: the format is then the URL's query string
(`?sample_rate=16000&channels=2`), unless the metadata has `sampleRate` / `mixType` too.

Session options go in the query string, as in the native protocol. The call id (for
`/v1/calls/{call_id}/events`) is the query's `call_id`, else the metadata's `callSid` (jambonz)
or `call_id`. Text frames after the first are application data (mod_audio_fork's `send_text`)
and are ignored. Back on the socket go each final as `{"type": "transcription", "data": <native
transcript.final>}` and each error as `{"type": "error", "data": <native error>}`, which
mod_audio_fork raises as `mod_audio_fork::transcription` / `mod_audio_fork::error` events; the
call's subscribers and webhook get every event.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from streaming.core.close_codes import CLOSE_BAD_CONFIG
from streaming.core.events import ErrorEvent, Event, FinalTranscript
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
from streaming.dialects.native import NativeDialect, split_hotwords

log = logging.getLogger("streaming.dialects.audiofork")

MIX_TYPES = {"mono": ("caller",), "mixed": ("mixed",), "stereo": ("caller", "callee")}
NOT_OPTIONS = ("hotwords", "api_key", "call_id")  # query keys that are not session options


class AudioForkDialect(Dialect):
    name = "audiofork"
    binary_audio = True

    def __init__(self) -> None:
        self.call_id: str | None = None
        self.channel_labels: tuple[str, ...] = MIX_TYPES["mono"]
        self.state = "metadata"  # metadata (the first text frame may come) -> streaming
        self.native = NativeDialect()

    def opening(self, query: Mapping[str, str]) -> Opening:
        options = {k: v for k, v in query.items() if k not in NOT_OPTIONS}
        hotwords = split_hotwords(query["hotwords"]) if "hotwords" in query else ()
        self.call_id = query.get("call_id") or None
        if query.get("channels") == "2":
            self.channel_labels = MIX_TYPES["stereo"]
        return Opening(options, hotwords)

    def on_binary(self, data: bytes) -> list[Command]:
        self.state = "streaming"
        return [Audio(data)]

    def on_text(self, text: str) -> list[Command]:
        if self.state != "metadata":
            log.debug("audio fork text ignored", extra={"call_id": self.call_id})
            return [KeepAlive()]
        self.state = "streaming"
        try:
            metadata = load_json(text)
        except BadJSON as err:
            return [Reject("bad_metadata", f"metadata must be a JSON object: {err}")]
        if not isinstance(metadata, dict):
            return [Reject("bad_metadata", "metadata must be a JSON object")]
        options: dict[str, object] = {}
        if "sampleRate" in metadata:
            options["sample_rate"] = metadata["sampleRate"]
        if "mixType" in metadata:
            mix = metadata["mixType"]
            labels = MIX_TYPES.get(mix) if isinstance(mix, str) else None
            if labels is None:
                return [
                    Reject(
                        "invalid_config",
                        f"mixType {metadata['mixType']!r}; expected one of {', '.join(MIX_TYPES)}",
                        CLOSE_BAD_CONFIG,
                    )
                ]
            self.channel_labels = labels
            options["channels"] = len(labels)
        named = metadata.get("callSid") or metadata.get("call_id")
        if self.call_id is None and isinstance(named, str) and named:
            self.call_id = named
        elif not options:
            return [KeepAlive()]
        return [Configure(options)]

    def on_hangup(self) -> list[Command]:
        """Both platforms end the stream by closing the socket."""
        return [Close()]

    def encode(self, event: Event) -> list[str | bytes]:
        if not isinstance(event, FinalTranscript | ErrorEvent):
            return []
        (native,) = self.native.encode(event)
        if isinstance(event, ErrorEvent):
            log.warning(
                "audio fork stream error",
                extra={"call_id": self.call_id, "code": event.code, "error": event.message},
            )
            return [f'{{"type": "error", "data": {native}}}']
        return [f'{{"type": "transcription", "data": {native}}}']

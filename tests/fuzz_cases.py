"""Seeded malformed inputs for every endpoint of the server, one `Case` per (seed, index).

Each case is built from its own `random.Random(f"{seed}:{index}")`, so any one of thousands can
be rebuilt alone from the two numbers a report prints (`make_case`), and a case's endpoint is
`index % len(ENDPOINTS)`, so every endpoint gets its share of any run. Most cases start from a
valid message of the endpoint's protocol and break one thing in it (a field dropped, doubled or
retyped, a size or nesting past a bound, a wrong order, a wrong frame kind); the rest are wire
garbage (bad handshakes, bad HTTP, bad WebSocket framing, bad packets).
"""

from __future__ import annotations

import base64
import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

from tests.fuzz_plain import audiosocket_case, captions_case, http_case, packet, pcm, rest_case
from tests.wsraw import BINARY, CLOSE, CONT, PING, PONG, TEXT, close_frame, frame

ENDPOINTS = (
    "native",
    "deepgram",
    "twilio",
    "audiofork",
    "realtime",
    "calls",
    "http",
    "captions",
    "rest",
    "audiosocket",
)
WS_PATHS = {
    "native": "/v1/stream",
    "deepgram": "/v1/listen",
    "twilio": "/v1/telephony/twilio",
    "audiofork": "/v1/telephony/audiofork",
    "realtime": "/v1/realtime",
}


@dataclass(frozen=True)
class Limits:
    """The server settings the generators aim just past."""

    max_frame_bytes: int = 65536


@dataclass(frozen=True)
class Case:
    """One hostile connection: what to send, and to which port.

    kind "ws": `request` is the opening handshake; after a 101, `frames` then `ender` (the
    dialect's polite end, sent if the server has not closed) go out. kind "http" / "tcp":
    `request` is every byte sent; `half_close` then ends our side (EOF)."""

    seed: int
    index: int
    endpoint: str
    mutation: str
    kind: str  # ws | http | tcp
    port: str  # main | rest | audiosocket
    request: bytes
    frames: tuple[bytes, ...] = ()
    ender: tuple[bytes, ...] = ()
    half_close: bool = False

    @property
    def ref(self) -> str:
        return f"seed={self.seed} index={self.index} ({self.endpoint}/{self.mutation})"


# --- values --------------------------------------------------------------------------------


def odd_value(rng: random.Random) -> object:
    """A value of a type nobody expects, or a size nobody expects."""
    return rng.choice(
        [
            None,
            True,
            False,
            0,
            -1,
            2**63,
            -(2**70),
            1e308,
            -0.0,
            float("nan"),
            float("inf"),
            "",
            "x" * rng.randint(1, 300),
            "\u0000\u202e\ud800",
            "١٢",
            "²",
            [],
            {},
            [[1]],
            [None, {}],
            {"a": {"b": [1, "2"]}},
            rng.random(),
            rng.randint(-(10**6), 10**6),
        ]
    )


def dumps(value: object) -> str:
    """JSON with NaN/Infinity literals allowed (Python's parser accepts them too)."""
    return json.dumps(value, allow_nan=True)


def deep(depth: int, rng: random.Random) -> str:
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    return opener * depth + "0" + closer * depth


def huge_number(rng: random.Random) -> str:
    return rng.choice(
        [
            "1" * rng.randint(4300, 20000),
            "-" + "9" * 5000,
            "1e999",
            "-1e999",
            "0." + "0" * 5000 + "1",
            "1" * 400 + "." + "1" * 400 + "e-99999",
            "NaN",
            "Infinity",
            "-Infinity",
        ]
    )


# --- JSON mutations of a valid message ------------------------------------------------------


def _paths(message: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into dicts (lists are leaves: mutating their items is rarely useful)."""
    found = [prefix] if prefix else []
    if isinstance(message, dict):
        for key, value in message.items():
            found += _paths(value, (*prefix, key))
    return found


def _parent(message: dict, path: tuple) -> dict:
    for key in path[:-1]:
        message = message[key]
    return message


PLACEHOLDER = "@@fuzz-placeholder@@"


def mutate_json(message: dict, rng: random.Random, limits: Limits) -> tuple[str, str]:
    """(mutation name, text) of one broken variant of `message`."""
    message = json.loads(json.dumps(message))
    paths = _paths(message)
    path = rng.choice(paths) if paths else ()
    how = rng.choice(
        (
            "drop_field retype_field retype_field duplicate_field huge_string deep_nesting "
            "deep_nesting_near_bound huge_number wrong_top_level truncated_json unknown_type "
            "extra_fields control_chars"
        ).split()
    )
    if how == "drop_field" and path:
        del _parent(message, path)[path[-1]]
    elif how == "retype_field" and path:
        _parent(message, path)[path[-1]] = odd_value(rng)
    elif how == "duplicate_field" and path:
        text = dumps(message)
        return how, text[:-1] + f', "{path[0]}": {dumps(odd_value(rng))}' + "}"
    elif how == "huge_string" and path:
        size = rng.choice([1000, 60000, limits.max_frame_bytes - 200])
        _parent(message, path)[path[-1]] = "é" * (size // 2)
    elif how in ("deep_nesting", "deep_nesting_near_bound", "huge_number"):
        if how == "huge_number":
            literal = huge_number(rng)
        elif how == "deep_nesting":
            literal = deep(rng.randint(100, limits.max_frame_bytes // 6), rng)
        else:
            literal = deep(rng.randint(60, 70), rng)
        if path:
            _parent(message, path)[path[-1]] = PLACEHOLDER
        else:
            message["x"] = PLACEHOLDER
        return how, dumps(message).replace(f'"{PLACEHOLDER}"', literal, 1)
    elif how == "wrong_top_level":
        return how, rng.choice(
            ["[]", '"session.start"', "0", "null", "true", dumps([message]), "[" * 5]
        )
    elif how == "truncated_json":
        text = dumps(message)
        return how, text[: rng.randint(0, max(0, len(text) - 1))]
    elif how == "unknown_type":
        for field in ("type", "event"):
            if field in message:
                message[field] = rng.choice(["", "x" * 5000, "session.started", "TYPE", "\u0000"])
    elif how == "extra_fields":
        for i in range(rng.randint(1, 50)):
            message[f"k{i}"] = odd_value(rng)
    elif how == "control_chars":
        return how, dumps(message).replace(" ", rng.choice(["\u0000", "\t\r\n", "\u2028", "\x7f"]))
    return how, dumps(message)


# --- WebSocket framing --------------------------------------------------------------------------


def text(data: str | bytes, rng: random.Random | None = None) -> bytes:
    payload = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    mask = bytes(rng.randbytes(4)) if rng is not None and len(payload) < 4096 else None
    return frame(TEXT, payload, mask=mask or b"\x00\x00\x00\x00")


def binary(data: bytes) -> bytes:
    return frame(BINARY, data)


def wire_garbage(rng: random.Random, limits: Limits) -> tuple[str, tuple[bytes, ...]]:
    """Frames that break WebSocket itself (RFC 6455), not the dialect."""
    big = limits.max_frame_bytes
    choices: dict[str, Callable[[], tuple[bytes, ...]]] = {
        "invalid_utf8_text": lambda: (frame(TEXT, b'{"type": "\xff\xfe\xc3"}'),),
        "surrogate_utf8_text": lambda: (frame(TEXT, b'{"type": "\xed\xa0\x80"}'),),
        "zero_length_text": lambda: (frame(TEXT, b""),),
        "zero_length_binary": lambda: (frame(BINARY, b""),),
        "oversize_binary": lambda: (frame(BINARY, bytes(big + rng.randint(1, 64))),),
        "oversize_text": lambda: (frame(TEXT, b'"' + b"a" * (big + 1) + b'"'),),
        "oversize_fragmented": lambda: (
            frame(BINARY, bytes(big // 2), fin=False),
            frame(CONT, bytes(big // 2), fin=False),
            frame(CONT, bytes(64)),
        ),
        "declared_huge_length": lambda: (frame(BINARY, b"abc", declared=2**62),),
        "reserved_opcode": lambda: (frame(rng.choice([3, 4, 5, 6, 7, 0xB, 0xF]), b"x"),),
        "rsv_bits": lambda: (frame(TEXT, b'{"type": "keepalive"}', rsv=rng.randint(1, 7)),),
        "unmasked": lambda: (frame(BINARY, bytes(320), mask=None),),
        "orphan_continuation": lambda: (frame(CONT, b"abc"),),
        "interleaved_data_frames": lambda: (
            frame(TEXT, b'{"type":', fin=False),
            frame(BINARY, bytes(10)),
        ),
        "fragmented_control": lambda: (frame(PING, b"x", fin=False),),
        "long_ping": lambda: (frame(PING, bytes(126)),),
        "unsolicited_pong": lambda: (frame(PONG, b"hi"), frame(PING, b"there")),
        "bad_close_code": lambda: (
            close_frame(rng.choice([0, 999, 1004, 1005, 1006, 1015, 5000])),
        ),
        "one_byte_close": lambda: (frame(CLOSE, b"\x03"),),
        "close_bad_utf8_reason": lambda: (close_frame(1000, b"\xff\xfe"),),
        "split_text_fragments": lambda: (
            frame(TEXT, b'{"type": "ke', fin=False),
            frame(CONT, b'epalive"}'),
        ),
        "fragment_splits_utf8": lambda: (
            frame(TEXT, b'{"type": "\xc3', fin=False),
            frame(CONT, b'\xa9"}'),
        ),
        "flood_pings": lambda: tuple(frame(PING, rng.randbytes(8)) for _ in range(200)),
        "raw_bytes": lambda: (rng.randbytes(rng.randint(1, 500)),),
        "truncated_frame": lambda: (frame(BINARY, bytes(100))[:50],),
    }
    name = rng.choice(sorted(choices))
    return name, choices[name]()


# --- the WebSocket opening handshake ------------------------------------------------------------


def handshake(rng: random.Random, path: str, extra: str = "") -> bytes:
    key = base64.b64encode(rng.randbytes(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def bad_handshake(rng: random.Random, path: str) -> tuple[str, bytes, bool]:
    """(mutation, request bytes, half_close) of an opening handshake that is wrong."""
    key = base64.b64encode(rng.randbytes(16)).decode()
    good = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]

    def join(lines: list[str]) -> bytes:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    how = rng.choice(
        (
            "missing_key bad_key bad_version missing_upgrade post_method http10 bad_extension "
            "bad_subprotocols huge_header many_headers header_without_colon non_ascii_header "
            "truncated_handshake duplicate_key"
        ).split()
    )
    lines = list(good)
    if how == "missing_key":
        del lines[4]
    elif how == "bad_key":
        lines[4] = f"Sec-WebSocket-Key: {rng.choice(['', 'abc', '!!!!', 'a' * 200])}"
    elif how == "bad_version":
        lines[5] = f"Sec-WebSocket-Version: {rng.choice(['8', '', '13, 8', '99999999999'])}"
    elif how == "missing_upgrade":
        del lines[2]
    elif how == "post_method":
        lines[0] = f"{rng.choice(['POST', 'PUT', 'DELETE', 'FOO', 'get'])} {path} HTTP/1.1"
    elif how == "http10":
        lines[0] = f"GET {path} HTTP/1.0"
    elif how == "bad_extension":
        lines.append(
            "Sec-WebSocket-Extensions: "
            + rng.choice(
                [
                    "permessage-deflate; server_max_window_bits=99",
                    "permessage-deflate; client_max_window_bits=0",
                    "x-unknown; a=b",
                    "permessage-deflate;;;",
                ]
            )
        )
    elif how == "bad_subprotocols":
        lines.append("Sec-WebSocket-Protocol: " + rng.choice([",,,", "token", "a b c", "é"]))
    elif how == "huge_header":
        lines.append("X-Big: " + "a" * rng.choice([8000, 70000]))
    elif how == "many_headers":
        lines += [f"X-H{i}: {i}" for i in range(rng.choice([150, 1000]))]
    elif how == "header_without_colon":
        lines.insert(2, "NoColonHere")
    elif how == "non_ascii_header":
        lines.append("X-Name: \udcff\udcfe caf\u00e9")
    elif how == "duplicate_key":
        lines.append(f"Sec-WebSocket-Key: {key}")
    data = join(lines)
    if how == "truncated_handshake":
        return how, data[: rng.randint(1, len(data) - 3)], True
    return how, data, False


def bad_query(rng: random.Random, endpoint: str) -> tuple[str, str]:
    """(mutation, query string) with unknown options, bad values or bad encodings."""
    options = {
        "native": (
            "encoding sample_rate channels language hotwords interim_results "
            "partial_interval_ms captions_mode hangover_ms max_segment_ms resume last_seq"
        ).split(),
        "deepgram": (
            "encoding sample_rate channels multichannel endpointing utterance_end_ms "
            "interim_results language keyterm keywords punctuate vad_events"
        ).split(),
        "twilio": ["encoding", "hotwords", "language"],
        "audiofork": ["sample_rate", "channels", "call_id", "hotwords", "language"],
        "realtime": ["intent", "model", "encoding"],
        "calls": ["x", "api_key"],
    }[endpoint]
    values = [
        "",
        "abc",
        "-1",
        "0",
        "1e9",
        "NaN",
        "99999999999999999999999",
        "%FF%FE",
        "%00",
        "%zz",
        "true",
        "maybe",
        "١٦٠٠٠",
        "²",
        "x" * 3000,
        "pcm_s16le",
        "8000",
        "2",
        "3",
        "opus",
        "%F0%9F%98%80",
    ]
    how = rng.choice(["bad_values", "unknown_options", "bad_encoding", "repeated", "huge_query"])
    if how == "bad_values":
        pairs = [f"{rng.choice(options)}={rng.choice(values)}" for _ in range(rng.randint(1, 4))]
    elif how == "unknown_options":
        pairs = [f"opt{rng.randint(0, 99)}={rng.choice(values)}" for _ in range(3)]
    elif how == "bad_encoding":
        pairs = [rng.choice(["%", "=%", "a=%G0", "&&&", "=", "a==b", "%FF=%FF", "+=+"])]
    elif how == "repeated":
        key = rng.choice(options)
        pairs = [f"{key}={rng.choice(values)}" for _ in range(rng.randint(2, 20))]
    else:
        pairs = [f"{rng.choice(options)}={'9' * 6000}"]
    return "query_" + how, "&".join(pairs)


# --- valid messages of each dialect, the seeds of mutation -------------------------------------

TWILIO_START = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "accountSid": "AC1",
        "streamSid": "MZ1",
        "callSid": "CAfuzz",
        "tracks": ["inbound"],
        "customParameters": {"language": "en"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    },
    "streamSid": "MZ1",
}


def twilio_media(rng: random.Random, track: str = "inbound") -> dict:
    payload = base64.b64encode(rng.randbytes(160)).decode()
    return {"event": "media", "streamSid": "MZ1", "media": {"track": track, "payload": payload}}


def native_messages(rng: random.Random) -> list[dict]:
    return [
        {
            "type": "session.start",
            "encoding": "pcm_s16le",
            "sample_rate": 16000,
            "channels": 1,
            "hotwords": ["Streamscribe"],
            "captions": {"mode": "popon", "preset": 37},
            "config": {"interim_results": True},
        },
        {
            "type": "session.update",
            "interim_results": False,
            "partial_interval_ms": 600,
            "language": "en",
            "hotwords": "a, b",
        },
        {"type": "finalize"},
        {"type": "keepalive"},
    ]


def realtime_messages(rng: random.Random) -> list[dict]:
    audio = base64.b64encode(pcm(rng, 100, 24000)).decode()
    return [
        {
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "turn_detection": {
                            "type": "server_vad",
                            "threshold": 0.5,
                            "silence_duration_ms": 500,
                            "prefix_padding_ms": 300,
                        },
                        "transcription": {
                            "model": "whisper-1",
                            "language": "en",
                            "prompt": "words",
                            "keywords": ["a"],
                        },
                    }
                },
            },
        },
        {
            "type": "transcription_session.update",
            "session": {
                "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                "turn_detection": None,
            },
        },
        {"type": "input_audio_buffer.append", "audio": audio, "event_id": "e1"},
        {"type": "input_audio_buffer.commit"},
        {"type": "input_audio_buffer.clear"},
    ]


def deepgram_messages(rng: random.Random) -> list[dict]:
    return [{"type": "KeepAlive"}, {"type": "Finalize"}]


def twilio_messages(rng: random.Random) -> list[dict]:
    return [
        {"event": "connected", "protocol": "Call", "version": "1.0.0"},
        TWILIO_START,
        twilio_media(rng),
        {"event": "dtmf", "dtmf": {"digit": "1", "track": "inbound_track"}},
        {"event": "mark", "mark": {"name": "m"}},
    ]


def audiofork_messages(rng: random.Random) -> list[dict]:
    return [
        {
            "callSid": f"fork-{rng.randint(0, 9)}",
            "sampleRate": 8000,
            "mixType": "mono",
            "from": "+1555",
            "to": "+1666",
        },
    ]


MESSAGES = {
    "native": native_messages,
    "deepgram": deepgram_messages,
    "twilio": twilio_messages,
    "audiofork": audiofork_messages,
    "realtime": realtime_messages,
}
ENDERS = {
    "native": ('{"type": "close"}',),
    "deepgram": ('{"type": "CloseStream"}',),
    "twilio": ('{"event": "stop", "streamSid": "MZ1"}',),
    "audiofork": (),
    "realtime": (),
    "calls": (),
}


def dialect_sequence(endpoint: str, rng: random.Random) -> tuple[str, list[bytes]]:
    """Valid messages in a wrong order, or one of the dialect's order rules broken."""
    if endpoint == "native":
        return rng.choice(
            [
                ("start_after_audio", [binary(pcm(rng, 100)), text('{"type": "session.start"}')]),
                ("update_fixed_option", [text('{"type": "session.update", "sample_rate": 8000}')]),
                ("close_twice", [text('{"type": "close"}'), text('{"type": "close"}')]),
                ("finalize_before_audio", [text('{"type": "finalize"}')] * 3),
                ("audio_after_close", [text('{"type": "close"}'), binary(pcm(rng, 100))]),
                ("odd_length_pcm", [binary(rng.randbytes(rng.choice([1, 3, 3201])))] * 3),
                (
                    "f32_nan_audio",
                    [
                        text('{"type": "session.start", "encoding": "pcm_f32le"}'),
                        binary(
                            struct.pack("<4f", float("nan"), float("inf"), -float("inf"), 1e38)
                            * 400
                        ),
                    ],
                ),
                (
                    "stereo_odd_frames",
                    [
                        text('{"type": "session.start", "channels": 2}'),
                        binary(rng.randbytes(3)),
                        binary(rng.randbytes(6402)),
                    ],
                ),
                (
                    "flood_updates",
                    [text('{"type": "session.update", "partial_interval_ms": 100}')] * 100,
                ),
            ]
        )
    if endpoint == "twilio":
        return rng.choice(
            [
                ("media_before_start", [text(dumps(twilio_media(rng)))]),
                ("start_twice", [text(dumps(TWILIO_START))] * 2),
                (
                    "stop_twice",
                    [
                        text(dumps(TWILIO_START)),
                        text('{"event": "stop"}'),
                        text('{"event": "stop"}'),
                    ],
                ),
                (
                    "media_after_stop",
                    [
                        text(dumps(TWILIO_START)),
                        text('{"event": "stop"}'),
                        text(dumps(twilio_media(rng))),
                    ],
                ),
                (
                    "bad_base64_media",
                    [
                        text(dumps(TWILIO_START)),
                        text(
                            dumps(
                                {
                                    **twilio_media(rng),
                                    "media": {"payload": rng.choice(["@@@", "YQ", "=" * 9, "é"])},
                                }
                            )
                        ),
                    ],
                ),
                (
                    "unknown_track",
                    [text(dumps(TWILIO_START)), text(dumps(twilio_media(rng, "outbound")))],
                ),
                (
                    "other_stream_sid",
                    [
                        text(dumps(TWILIO_START)),
                        text(dumps({**twilio_media(rng), "streamSid": "MZ2"})),
                    ],
                ),
                ("binary_audio", [text(dumps(TWILIO_START)), binary(rng.randbytes(160))]),
            ]
        )
    if endpoint == "audiofork":
        return rng.choice(
            [
                (
                    "metadata_after_audio",
                    [binary(pcm(rng, 100, 8000)), text(dumps(audiofork_messages(rng)[0]))],
                ),
                ("no_metadata_odd_audio", [binary(rng.randbytes(rng.choice([1, 3, 321])))]),
                (
                    "stereo_metadata_mono_audio",
                    [text('{"mixType": "stereo", "sampleRate": 16000}'), binary(rng.randbytes(3))],
                ),
                ("text_data_flood", [text(f'{{"n": {i}}}') for i in range(60)]),
            ]
        )
    if endpoint == "realtime":
        return rng.choice(
            [
                ("commit_empty", [text('{"type": "input_audio_buffer.commit"}')]),
                ("binary_audio", [binary(pcm(rng, 100, 24000))]),
                (
                    "format_change_after_audio",
                    [
                        text(dumps(realtime_messages(rng)[2])),
                        text(dumps(realtime_messages(rng)[1])),
                    ],
                ),
                (
                    "bad_base64_audio",
                    [
                        text(
                            dumps(
                                {
                                    "type": "input_audio_buffer.append",
                                    "audio": rng.choice(["@@", "YQ", "é"]),
                                }
                            )
                        )
                    ],
                ),
                (
                    "odd_length_audio",
                    [
                        text(
                            dumps(
                                {
                                    "type": "input_audio_buffer.append",
                                    "audio": base64.b64encode(b"abc").decode(),
                                }
                            )
                        )
                    ],
                ),
                (
                    "clear_commit_clear",
                    [
                        text('{"type": "input_audio_buffer.clear"}'),
                        text('{"type": "input_audio_buffer.commit"}'),
                    ]
                    * 3,
                ),
            ]
        )
    if endpoint == "deepgram":
        return rng.choice(
            [
                ("closestream_twice", [text('{"type": "CloseStream"}')] * 2),
                (
                    "audio_after_closestream",
                    [text('{"type": "CloseStream"}'), binary(pcm(rng, 100))],
                ),
                ("odd_length_pcm", [binary(rng.randbytes(rng.choice([1, 3, 3201])))]),
                ("finalize_flood", [text('{"type": "Finalize"}')] * 50),
            ]
        )
    return "subscriber_chatter", [text(dumps(odd_value(rng))), binary(rng.randbytes(100))]


def ws_case(endpoint: str, rng: random.Random, limits: Limits) -> tuple[str, bytes, list[bytes]]:
    """(mutation, handshake, frames) of one hostile WebSocket connection."""
    path = WS_PATHS.get(endpoint) or f"/v1/calls/{call_id(rng)}/events"
    roll = rng.random()
    if roll < 0.08:
        how, request, _ = bad_handshake(rng, path)
        return how, request, []
    if roll < 0.2:
        how, query = bad_query(rng, endpoint)
        return how, handshake(rng, f"{path}?{query}"), _prelude(endpoint, rng)
    if roll < 0.35:
        how, frames = wire_garbage(rng, limits)
        return how, handshake(rng, path), [*_prelude(endpoint, rng), *frames]
    if roll < 0.5 or endpoint == "calls":
        how, frames = dialect_sequence(endpoint, rng)
        return how, handshake(rng, path), frames
    messages = MESSAGES[endpoint](rng)
    target = rng.randrange(len(messages))
    frames = [text(dumps(m), rng) for m in messages[:target]]
    if rng.random() < 0.15:  # the right message as the wrong frame kind
        frames.append(binary(dumps(messages[target]).encode()))
        how = "binary_for_text"
    else:
        how, broken = mutate_json(messages[target], rng, limits)
        frames.append(text(broken))
    if endpoint in ("native", "deepgram", "audiofork") and rng.random() < 0.5:
        frames.append(
            binary(pcm(rng, rng.choice([20, 100, 250]), 8000 if endpoint == "audiofork" else 16000))
        )
    if rng.random() < 0.1:
        frames.append(text(base64.b64encode(rng.randbytes(64)).decode()))  # audio as text
        how += "+text_for_binary"
    return how, handshake(rng, path), frames


def _prelude(endpoint: str, rng: random.Random) -> list[bytes]:
    """The valid start a dialect may need before the broken part."""
    if endpoint == "twilio" and rng.random() < 0.7:
        return [text(dumps(TWILIO_START))]
    if endpoint == "audiofork" and rng.random() < 0.5:
        return [text(dumps(audiofork_messages(rng)[0]))]
    return []


def call_id(rng: random.Random) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~:-"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 128)))


# --- one case ----------------------------------------------------------------------------------


def make_case(seed: int, index: int, limits: Limits = Limits()) -> Case:
    """Case `index` of the run seeded `seed`: the same bytes every time."""
    rng = random.Random(f"{seed}:{index}")
    endpoint = ENDPOINTS[index % len(ENDPOINTS)]
    common = {"seed": seed, "index": index, "endpoint": endpoint}
    if endpoint in WS_PATHS or endpoint == "calls":
        how, request, frames = ws_case(endpoint, rng, limits)
        ender = tuple(text(e) for e in ENDERS[endpoint])
        half_close = how == "truncated_handshake"
        return Case(
            **common,
            mutation=how,
            kind="ws",
            port="main",
            request=request,
            frames=tuple(frames),
            ender=ender,
            half_close=half_close,
        )
    if endpoint == "http":
        how, request, half_close = http_case(rng)
        return Case(
            **common, mutation=how, kind="http", port="main", request=request, half_close=half_close
        )
    if endpoint == "captions":
        how, request = captions_case(rng)
        return Case(**common, mutation=how, kind="http", port="main", request=request)
    if endpoint == "rest":
        how, request, half_close = rest_case(rng)
        return Case(
            **common, mutation=how, kind="http", port="rest", request=request, half_close=half_close
        )
    how, request = audiosocket_case(rng)
    return Case(
        **common,
        mutation=how,
        kind="tcp",
        port="audiosocket",
        request=request,
        ender=(packet(0x00),),
        half_close=True,
    )

"""Seeded malformed inputs for the endpoints that are not WebSocket dialects: plain HTTP on the
main port (GET endpoints, the browser page's files), caption exports, REST uploads (multipart
garbage, lying lengths, junk audio files) and AudioSocket packets. Each builder takes the case's
own random generator and returns the mutation's name and the bytes to send; tests/fuzz_cases.py
puts them into `Case`s."""

from __future__ import annotations

import io
import random
import struct
import uuid
import wave

REST_PATH = "/v1/audio/transcriptions"


def pcm(rng: random.Random, ms: int, rate: int = 16000, width: int = 2) -> bytes:
    """Loud noise or silence of `ms` milliseconds."""
    n = rate * ms // 1000 * width
    return rng.randbytes(n) if rng.random() < 0.5 else bytes(n)


# --- plain HTTP on the main port -------------------------------------------------------------


def http_case(rng: random.Random) -> tuple[str, bytes, bool]:
    """(mutation, request bytes, half_close) against the main port's GET endpoints."""
    target = rng.choice(
        [
            "/healthz",
            "/readyz",
            "/metrics",
            "/",
            "/web/app.js",
            "/web/index.html",
            "/web/" + "a" * rng.choice([100, 101, 5000]) + ".js",
            "/web/../../etc/passwd",
            "/web/%2e%2e/secret",
            "/web/.hidden.js",
            "/web/",
            "/nowhere",
            "/v1/stream/extra",
            "//healthz",
            "/healthz?" + "a=" * 2000,
            "/%00",
            "/\u00e9",
            "/web/a\u0000.js",
            "*",
            "http://127.0.0.1/healthz",
        ]
    )
    how = rng.choice(
        (
            "plain_get wrong_method bad_request_line bad_headers truncated pipelined "
            "body_on_get chunked_garbage random_bytes empty"
        ).split()
    )
    head = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1"]
    half_close = False
    if how == "wrong_method":
        head[0] = (
            f"{rng.choice(['POST', 'PUT', 'DELETE', 'HEAD', 'OPTIONS', 'TRACE', 'PATCH', 'BREW', 'CONNECT'])} {target} HTTP/1.1"  # noqa: E501
        )
    elif how == "bad_request_line":
        head[0] = rng.choice(
            [
                "GET",
                "GET /",
                "GET / HTTP/9.9",
                "GET  /  HTTP/1.1",
                "\x00\x01\x02 / HTTP/1.1",
                f"GET {target} HTTP/1.1 extra",
                "GET /" + "a" * 70000 + " HTTP/1.1",
                "GET / HTTP/1.1\nHost: x",
                "/healthz",
                "HTTP/1.1 200 OK",
            ]
        )
    elif how == "bad_headers":
        head += rng.choice(
            [
                ["NoColon"],
                ["X: " + "b" * 70000],
                [": empty name"],
                ["Bad Name: x"],
                ["X: \u00e9\udcff"],
                ["Host: second"],
                ["Content-Length: -5"],
                ["Content-Length: abc"],
                [f"X{i}: y" for i in range(300)],
                ["X:\x00\x01"],
                [" folded: header"],
            ]
        )
    elif how == "body_on_get":
        head += ["Content-Length: 5"]
        return how, ("\r\n".join(head) + "\r\n\r\nhello").encode(), False
    elif how == "chunked_garbage":
        head += ["Transfer-Encoding: chunked"]
        return how, ("\r\n".join(head) + "\r\n\r\nzz\r\nabc\r\n").encode(), True
    elif how == "random_bytes":
        # Ended by EOF: a request that stalls half-sent is a slow client, not a fuzz input.
        return how, rng.randbytes(rng.randint(1, 2000)), True
    elif how == "empty":
        return how, b"", True
    data = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    if how == "truncated":
        data, half_close = data[: rng.randint(1, len(data) - 2)], True
    elif how == "pipelined":
        data = data * rng.randint(2, 5)
    return how, data, half_close


def captions_case(rng: random.Random) -> tuple[str, bytes]:
    """(mutation, request) for caption exports of unknown sessions and bad channel params."""
    alphabet = "0123456789abcdefABCDEF_-"
    session = "".join(rng.choice(alphabet) for _ in range(rng.choice([1, 32, 200, 3000])))
    kind = rng.choice(["vtt", "srt", "txt", "VTT", "vtt.", ""])
    channel = rng.choice(
        [
            None,
            "0",
            "1",
            "-1",
            "abc",
            "",
            "1e9",
            "99999999999999999999999",
            "%C2%B2",
            "%D9%A1",
            "0x1",
            "%00",
            "1&channel=2",
            " 1",
            "%E2%91%A0",
        ]
    )
    query = "" if channel is None else f"?channel={channel}"
    how = "caption_bad_channel" if channel not in (None, "0", "1") else "caption_unknown_session"
    target = f"/v1/sessions/{session}/captions.{kind}{query}"
    return how, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


# --- REST uploads -----------------------------------------------------------------------------


def wav_bytes(rng: random.Random, seconds: float = 0.5, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(int(rate * seconds) * 2))
    return buffer.getvalue()


def junk_audio(rng: random.Random) -> tuple[str, bytes]:
    good = wav_bytes(rng)
    options = {
        "random_bytes": rng.randbytes(rng.randint(0, 5000)),
        "cut_wav": good[: rng.randint(1, 60)],
        "wav_huge_rate": good[:24] + struct.pack("<I", 0xFFFFFFFF) + good[28:],
        "wav_zero_rate": good[:24] + struct.pack("<I", 0) + good[28:],
        "wav_many_channels": good[:22] + struct.pack("<H", 65535) + good[24:],
        "wav_lying_size": good[:40] + struct.pack("<I", 0xFFFFFFF0) + good[44:],
        "wav_bad_format": good[:20]
        + struct.pack("<H", rng.choice([0, 2, 0x55, 0xFFFE]))
        + good[22:],
        "flac_magic_junk": b"fLaC" + rng.randbytes(rng.randint(0, 3000)),
        "ogg_magic_junk": b"OggS" + rng.randbytes(rng.randint(0, 3000)),
        "mp3_magic_junk": b"ID3\x04" + rng.randbytes(rng.randint(0, 3000)),
        "riff_garbage": b"RIFF" + rng.randbytes(4) + b"WAVE" + rng.randbytes(rng.randint(0, 200)),
        "aiff_magic_junk": b"FORM\x00\x00\x10\x00AIFF" + rng.randbytes(200),
        "valid_wav": good,
    }
    name = rng.choice(sorted(options))
    return name, options[name]


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str) -> bytes:
    """A multipart/form-data body: (field name, content, filename or None) per part."""
    out = b""
    for name, content, filename in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode(
            "utf-8", "surrogateescape"
        )
        out += content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def rest_case(rng: random.Random) -> tuple[str, bytes, bool]:
    """(mutation, request bytes, half_close) of one POST /v1/audio/transcriptions."""
    boundary = "b" + rng.randbytes(8).hex()
    audio_name, audio = junk_audio(rng)
    fields: list[tuple[str, bytes, str | None]] = [
        ("file", audio, rng.choice(["a.wav", "a.flac", "", "../../x", "é\udcff.wav", "a" * 500]))
    ]
    field_values = {
        "model": ["whisper-1", "", "x" * 70000],
        "response_format": ["json", "text", "srt", "vtt", "verbose_json", "xml", ""],
        "temperature": ["0", "1.5", "abc", "nan", "-0", "1e999"],
        "stream": ["true", "false", "maybe", ""],
        "timestamp_granularities[]": ["word", "segment", "char", ""],
        "language": ["en", "fr", "", "zz-ZZ", "x" * 1000],
        "prompt": ["hello", "", "\u0000" * 10],
    }
    for name in rng.sample(sorted(field_values), rng.randint(0, 4)):
        fields.append(
            (name, rng.choice(field_values[name]).encode("utf-8", "surrogateescape"), None)
        )
    how = rng.choice(
        (
            "junk_audio junk_audio no_boundary wrong_boundary cut_body cut_body_eof "
            "huge_content_length bad_content_length file_as_text_field no_file "
            "wrong_content_type wrong_method wrong_path nested_multipart many_parts empty_body "
            "chunked_garbage chunked_valid"
        ).split()
    )
    content_type = f"multipart/form-data; boundary={boundary}"
    method, path, half_close = "POST", REST_PATH, False
    if how == "file_as_text_field":
        fields[0] = ("file", audio, None)
    elif how == "no_file":
        fields = fields[1:] or [("model", b"whisper-1", None)]
    elif how == "nested_multipart":
        inner = multipart([("file", audio, "a.wav")], "inner")
        fields.append(("sub", inner, None))
        content_type = f"multipart/mixed; boundary={boundary}"
    elif how == "many_parts":
        fields += [(f"f{i}", b"v", None) for i in range(rng.choice([200, 2000]))]
    body = multipart(fields, boundary)
    length = len(body)
    if how == "no_boundary":
        content_type = "multipart/form-data"
    elif how == "wrong_boundary":
        content_type = "multipart/form-data; boundary=" + rng.choice(["other", "", '"', "a" * 100])
    elif how == "cut_body":
        body = body[: rng.randint(0, len(body) - 1)]
        length = len(body)
    elif how == "cut_body_eof":
        body = body[: rng.randint(0, len(body) - 1)]
        half_close = True
    elif how == "huge_content_length":
        length = rng.choice([10**12, 2**63 - 1, 26214400 + 65536 + 1])  # 413 before any body
    elif how == "bad_content_length":
        length = rng.choice(["-1", "abc", "1, 2", " ", "0x10"])  # type: ignore[assignment]
    elif how == "wrong_content_type":
        content_type = rng.choice(["application/json", "audio/wav", "", "multipart/", "text/plain"])
    elif how == "wrong_method":
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
    elif how == "wrong_path":
        path = rng.choice(["/v1/audio/translations", "/", "/v1/audio/transcriptions/x", "/%00"])
    elif how == "empty_body":
        body, length = b"", 0
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    if how.startswith("chunked"):
        head.append("Transfer-Encoding: chunked")
        if how == "chunked_valid":
            body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        else:
            body = rng.choice([b"zz\r\n", b"ffffffffffffffffff\r\nab", b"5\r\nabc"])
    else:
        head.append(f"Content-Length: {length}")
    head.append("Connection: close")
    request = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
    return f"{how}:{audio_name}", request, half_close


# --- AudioSocket ------------------------------------------------------------------------------


def packet(kind: int, payload: bytes = b"", declared: int | None = None) -> bytes:
    return struct.pack(">BH", kind, len(payload) if declared is None else declared) + payload


def audiosocket_case(rng: random.Random) -> tuple[str, bytes]:
    """(mutation, bytes) of one AudioSocket call; the runner hangs up and half-closes after."""
    call = packet(0x01, uuid.UUID(int=rng.getrandbits(128)).bytes)
    audio = packet(0x10, pcm(rng, 20, 8000))
    options = {
        "valid_call": call + audio * rng.randint(1, 20),
        "audio_before_uuid": audio + call,
        "uuid_wrong_length": packet(0x01, rng.randbytes(rng.choice([0, 1, 15, 17, 300]))),
        "second_uuid": call + audio + call,
        "unknown_kind": call + packet(rng.choice([0x02, 0x04, 0x0F, 0x20, 0x7F, 0xFE]), b"x"),
        "other_slin_kind": call + packet(rng.randint(0x11, 0x18), pcm(rng, 20, 16000)),
        "error_packet": call + packet(0xFF, rng.choice([b"", b"\x01", b"\x02", b"\x04xyz"])),
        "dtmf": call + packet(0x03, rng.choice([b"1", b"", b"#" * 100])),
        "odd_length_audio": call + packet(0x10, rng.randbytes(rng.choice([1, 3, 321]))),
        "zero_length_audio": call + packet(0x10) * rng.randint(1, 50),
        "max_length_packet": call + packet(0x10, rng.randbytes(65535)),
        "truncated_packet": call + packet(0x10, rng.randbytes(100), declared=320),
        "header_fragment": call + bytes([0x10, 0x01])[: rng.randint(1, 2)],
        "random_bytes": rng.randbytes(rng.randint(1, 3000)),
        "immediate_hangup": packet(0x00),
        "nothing": b"",
    }
    name = rng.choice(sorted(options))
    return name, options[name]

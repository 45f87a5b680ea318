"""Twilio Media Streams (/v1/telephony/twilio): the dialect against Twilio's documented messages,
two-track calls of real speech replayed by the simulator, subscribers, webhook, and bad input."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from clients.telephony import twilio_sim
from streaming.core.events import FinalTranscript, Latency
from streaming.dialects.base import Audio, Close, Configure, KeepAlive, Reject
from streaming.dialects.twilio import MULAW_SILENCE, TrackAligner, TwilioDialect
from streaming.ops.config import ConfigError, SessionConfig, override_section
from tests.gateway_harness import EchoEngine, gateway_config, running
from tests.streams import RATE, librivox_clips

EXAMPLES = Path(__file__).resolve().parents[2] / "clients" / "telephony"
CALL_SID = "CA" + "0" * 32

# Messages as Twilio's documentation shows them (Media Streams, "WebSocket Messages").
CONNECTED = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
START = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "accountSid": "AC" + "1" * 32,
        "streamSid": "MZ" + "2" * 32,
        "callSid": CALL_SID,
        "tracks": ["inbound", "outbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"hangover_ms": "600", "hotwords": "Twilio, streamscribe"},
    },
    "streamSid": "MZ" + "2" * 32,
}


def media(track: str, payload: bytes, chunk: int = 1) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(chunk + 1),
            "media": {
                "track": track,
                "chunk": str(chunk),
                "timestamp": str(20 * chunk),
                "payload": base64.b64encode(payload).decode(),
            },
            "streamSid": START["streamSid"],
        }
    )


def started() -> TwilioDialect:
    dialect = TwilioDialect()
    dialect.on_text(json.dumps(CONNECTED))
    dialect.on_text(json.dumps(START))
    return dialect


# --- the aligner ------------------------------------------------------------------------------


def test_aligner_interleaves_tracks_as_both_arrive():
    aligner = TrackAligner(("inbound", "outbound"), wait_samples=1600)
    assert aligner.push("inbound", b"\x01\x02\x03") == b""
    assert aligner.push("outbound", b"\x11\x12") == b"\x01\x11\x02\x12"
    assert aligner.flush() == bytes([0x03, MULAW_SILENCE])
    assert aligner.flush() == b""


def test_a_silent_track_is_filled_after_the_wait_and_never_stalls_the_other():
    aligner = TrackAligner(("inbound", "outbound"), wait_samples=400)
    out = b"".join(aligner.push("inbound", bytes([7]) * 160) for _ in range(50))
    assert len(out) // 2 >= 50 * 160 - 400  # all but at most the wait is out already
    assert set(out[0::2]) == {7} and set(out[1::2]) == {MULAW_SILENCE}
    assert max(len(b) for b in aligner.buffers.values()) <= 400  # bounded
    # The outbound party speaks again: its audio follows the silence, aligned from now on.
    assert aligner.push("outbound", bytes([9]) * 160)[1::2] == bytes([9]) * 160


def test_one_track_passes_through():
    aligner = TrackAligner(("inbound",), wait_samples=400)
    assert aligner.push("inbound", b"abc") == b"abc"


# --- the dialect ------------------------------------------------------------------------------


def test_start_configures_the_session_from_the_stream_and_custom_parameters():
    dialect = TwilioDialect()
    assert dialect.on_text(json.dumps(CONNECTED)) == [KeepAlive()]
    assert dialect.call_id is None
    (configure,) = dialect.on_text(json.dumps(START))
    assert configure == Configure(
        {"hangover_ms": "600", "encoding": "mulaw", "sample_rate": 8000, "channels": 2},
        ("Twilio", "streamscribe"),
    )
    assert dialect.call_id == CALL_SID and dialect.channel_labels == ("inbound", "outbound")
    options = override_section("session", SessionConfig(), configure.options, "test")
    assert (options.hangover_ms, options.channels, options.encoding) == (600, 2, "mulaw")


def test_media_of_both_tracks_becomes_interleaved_audio_and_stop_flushes():
    dialect = started()
    assert dialect.on_text(media("inbound", b"\x01\x02")) == []
    assert dialect.on_text(media("outbound", b"\x11")) == [Audio(b"\x01\x11")]
    assert dialect.on_text(json.dumps({"event": "stop", "streamSid": "x", "stop": {}})) == [
        Audio(bytes([0x02, MULAW_SILENCE])),
        Close(),
    ]


def test_inbound_only_stream_is_one_channel():
    dialect = TwilioDialect()
    start = json.loads(json.dumps(START))
    start["start"]["tracks"] = ["inbound"]
    start["start"]["customParameters"] = {}
    (configure,) = dialect.on_text(json.dumps(start))
    assert configure.options["channels"] == 1 and dialect.channel_labels == ("inbound",)
    assert dialect.on_text(media("inbound", b"\x05\x06")) == [Audio(b"\x05\x06")]


def test_dtmf_and_mark_are_accepted_and_send_nothing():
    dialect = started()
    dtmf = {"event": "dtmf", "streamSid": "MZ", "dtmf": {"track": "inbound_track", "digit": "1"}}
    mark = {"event": "mark", "streamSid": "MZ", "mark": {"name": "greeting"}}
    assert dialect.on_text(json.dumps(dtmf)) == [KeepAlive()]
    assert dialect.on_text(json.dumps(mark)) == [KeepAlive()]
    final = FinalTranscript(0, 1, 0, 500, "hi", [], 0.9, Latency(0, 0, 0), "endpoint")
    assert dialect.encode(final) == []


@pytest.mark.parametrize(
    "message, code, fatal",
    [
        ("{not json", "bad_json", False),
        (json.dumps({"no": "event"}), "bad_message", False),
        (json.dumps({"event": "dance"}), "unknown_event", False),
        (
            json.dumps({"event": "media", "media": {"track": "inbound", "payload": "a$=="}}),
            "bad_payload",
            False,
        ),
        (
            json.dumps({"event": "media", "media": {"track": "sideways", "payload": ""}}),
            "unknown_track",
            False,
        ),
        (
            json.dumps({"event": "media", "streamSid": "MZother", "media": {"payload": ""}}),
            "bad_message",
            False,
        ),
        (json.dumps(START), "invalid_sequence", False),
    ],
)
def test_bad_messages_are_rejected_and_the_stream_goes_on(message, code, fatal):
    dialect = started()
    (reject,) = dialect.on_text(message)
    assert isinstance(reject, Reject) and reject.code == code
    assert (reject.close_code is not None) == fatal
    assert dialect.on_text(media("inbound", b"\x01")) == []  # still streaming


def test_sequence_errors():
    dialect = TwilioDialect()
    (early,) = dialect.on_text(media("inbound", b"\x01"))
    assert (early.code, early.close_code) == ("invalid_sequence", 4002)
    dialect = started()
    stop = json.dumps({"event": "stop", "streamSid": START["streamSid"]})
    assert dialect.on_text(stop)[-1] == Close()
    (again,) = dialect.on_text(stop)
    assert (again.code, again.close_code) == ("invalid_sequence", None)
    (late,) = dialect.on_text(media("inbound", b"\x01"))
    assert (late.code, late.close_code) == ("invalid_sequence", None)
    assert dialect.on_binary(b"\x00")[0].code == "unexpected_binary"


@pytest.mark.parametrize(
    "change, code",
    [
        (
            {"mediaFormat": {"encoding": "audio/x-alaw", "sampleRate": 8000, "channels": 1}},
            "unsupported_format",
        ),
        (
            {"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 16000, "channels": 1}},
            "unsupported_format",
        ),
        ({"customParameters": {"encoding": "pcm_s16le"}}, "invalid_config"),
        ({"tracks": ["both_tracks"]}, "bad_start"),
        ({"callSid": None}, "bad_start"),
        ({"customParameters": "hangover_ms=600"}, "bad_start"),
    ],
)
def test_bad_start_is_fatal(change, code):
    start = json.loads(json.dumps(START))
    start["start"].update(change)
    (reject,) = TwilioDialect().on_text(json.dumps(start))
    assert (reject.code, reject.close_code) == (code, 4001)


def test_example_twiml_parameters_are_valid_session_options():
    root = ET.parse(EXAMPLES / "twiml.xml").getroot()
    streams = root.findall(".//Stream")
    assert streams and all(s.get("url").endswith("/v1/telephony/twilio") for s in streams)
    assert {s.get("track") for s in streams} == {"both_tracks"}
    for stream in streams:
        parameters = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
        parameters.pop("hotwords", None)
        override_section("session", SessionConfig(), parameters, "twiml.xml")
    with pytest.raises(ConfigError):
        override_section("session", SessionConfig(), {"hangover": "600"}, "typo")


# --- calls over loopback ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_party_call():
    """Inbound speaks first, then outbound answers; each track silent while the other talks."""
    (_, first, _), (_, second, _) = librivox_clips()[:2]
    quiet = np.zeros(int(1.5 * RATE), np.float32)
    inbound = np.concatenate([quiet, first, quiet, np.zeros_like(second), quiet])
    outbound = np.concatenate([quiet, np.zeros_like(first), quiet, second, quiet])
    return {
        "inbound": twilio_sim.to_mulaw(inbound, RATE),
        "outbound": twilio_sim.to_mulaw(outbound, RATE),
    }


async def subscribe(port: int, call_sid: str):
    ws = await connect(f"ws://127.0.0.1:{port}/v1/calls/{call_sid}/events")
    return ws


async def until_subscribed(gateway, call_sid: str, count: int = 1) -> None:
    while len(getattr(gateway.calls.calls.get(call_sid), "subscribers", ())) < count:
        await asyncio.sleep(0.01)


async def read_all(ws) -> list[dict]:
    """Every message until the server closes (normally or not)."""
    messages = []
    async with asyncio.timeout(60):
        with contextlib.suppress(ConnectionClosed):
            while True:
                messages.append(json.loads(await ws.recv()))
    return messages


async def settled(gateway) -> None:
    """Wait for the server to free every connection and call."""
    async with asyncio.timeout(10):
        while gateway.connections or gateway.calls.calls:
            await asyncio.sleep(0.01)


def stream_url(gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}/v1/telephony/twilio"


def test_subscriber_before_the_call_gets_labelled_finals_in_order(two_party_call):
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            subscriber = await subscribe(gw.port, CALL_SID)
            await until_subscribed(gw, CALL_SID)
            await asyncio.sleep(0.3)  # held: the call has not started yet
            stream = twilio_sim.messages(two_party_call, CALL_SID, {"hangover_ms": "400"}, "12")
            # at real time: blasted, a busy machine could see every partial of a channel
            # superseded before the engine took one (partials are shed, never queued)
            await twilio_sim.replay(stream_url(gw), list(stream), realtime=True)
            events = await read_all(subscriber)
            await settled(gw)  # every resource of the call is freed
            return events, subscriber.close_code

    events, close_code = asyncio.run(main())
    assert close_code == 1000
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["call_id"] == CALL_SID for e in events)
    assert events[0]["type"] == "session.started" and events[-1]["type"] == "session.closed"
    assert events[0]["config"]["channels"] == 2 and events[0]["config"]["hangover_ms"] == 400
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert [f["channel"] for f in finals] == ["inbound", "outbound"]
    assert finals[0]["end_ms"] <= finals[1]["start_ms"]
    first, second = (len(c) * 1000 // RATE for _, c, _ in librivox_clips()[:2])
    assert (
        abs(finals[0]["start_ms"] - 1500) <= 400
        and abs(finals[1]["start_ms"] - (3000 + first)) <= 400
    )
    assert abs((finals[1]["end_ms"] - finals[1]["start_ms"]) - second) <= 1000
    partials = {e["channel"] for e in events if e["type"] == "transcript.partial"}
    assert partials == {"inbound", "outbound"}


def test_a_subscriber_waits_only_the_hold_time():
    async def main():
        async with running(gateway_config(call_subscriber_hold_s=0.3), EchoEngine()) as gw:
            subscriber = await subscribe(gw.port, "CAnobody")
            events = await read_all(subscriber)
            await settled(gw)
            return events, subscriber.close_code

    events, close_code = asyncio.run(main())
    assert [e["code"] for e in events] == ["call_not_found"] and close_code == 4004


class WebhookReceiver:
    """A loopback HTTP server that fails the first `failures` POSTs with 503."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0
        self.received: list[dict] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.failures:
            return web.Response(status=503)
        self.received.append(await request.json())
        return web.Response(status=204)

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def test_webhook_gets_the_call_in_order_after_a_failed_first_attempt(two_party_call):
    receiver = WebhookReceiver(failures=1)

    async def main():
        async with receiver as url:
            async with running(gateway_config(webhook_url=url), EchoEngine()) as gw:
                stream = twilio_sim.messages(two_party_call, CALL_SID)
                await twilio_sim.replay(stream_url(gw), list(stream))
                async with asyncio.timeout(30):
                    while (
                        not receiver.received or receiver.received[-1]["type"] != "session.closed"
                    ):
                        await asyncio.sleep(0.02)

    asyncio.run(main())
    kinds = [m["type"] for m in receiver.received]
    assert kinds == ["session.started", "transcript.final", "transcript.final", "session.closed"]
    assert receiver.attempts == len(kinds) + 1  # the first POST failed and was retried
    assert [m["channel"] for m in receiver.received[1:3]] == ["inbound", "outbound"]
    assert all(m["call_id"] == CALL_SID for m in receiver.received)


def test_bad_input_is_answered_per_session_and_other_calls_are_untouched(two_party_call):
    good_sid, bad_sid = "CA" + "a" * 32, "CA" + "b" * 32

    async def bad_session(gw) -> tuple[list[dict], int]:
        """Malformed JSON, unknown event, bad base64, binary, then a normal end."""
        subscriber = await subscribe(gw.port, bad_sid)
        await until_subscribed(gw, bad_sid)
        async with connect(stream_url(gw)) as ws:
            start = json.loads(json.dumps(START))
            start["start"]["callSid"] = bad_sid
            await ws.send(json.dumps(start))
            await ws.send("{not json")
            await ws.send(json.dumps({"event": "dance"}))
            bad = json.loads(media("inbound", b""))
            bad["media"]["payload"] = "%%%"
            await ws.send(json.dumps(bad))
            await ws.send(b"\x00\x01")
            await ws.send(media("inbound", b"\xff" * 160))
            stop = json.dumps({"event": "stop", "streamSid": START["streamSid"]})
            await ws.send(stop)
            await ws.send(stop)  # duplicated: the stream is already ending
            await ws.wait_closed()
            return await read_all(subscriber), ws.close_code

    async def fatal(url: str, first: str | None, message: str) -> tuple[int, str]:
        async with connect(url) as ws:
            if first is not None:
                await ws.send(first)
            await ws.send(message)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return ws.close_code, ws.close_reason

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            url = stream_url(gw)
            good_subscriber = await subscribe(gw.port, good_sid)
            await until_subscribed(gw, good_sid)
            good = asyncio.create_task(
                twilio_sim.replay(url, list(twilio_sim.messages(two_party_call, good_sid)))
            )
            bad = await bad_session(gw)
            early_media = await fatal(url, None, media("inbound", b"\xff"))
            alaw = json.loads(json.dumps(START))
            alaw["start"]["mediaFormat"]["encoding"] = "audio/x-alaw"
            wrong_encoding = await fatal(url, None, json.dumps(alaw))
            typo = json.loads(json.dumps(START))
            typo["start"]["customParameters"] = {"hangover": "600"}
            bad_option = await fatal(url, None, json.dumps(typo))
            await good
            good_events = await read_all(good_subscriber)
            await settled(gw)
            return bad, early_media, wrong_encoding, bad_option, good_events, gw.metrics.render()

    bad, early_media, wrong_encoding, bad_option, good_events, metrics = asyncio.run(main())
    bad_events, bad_close = bad
    codes = [e["code"] for e in bad_events if e["type"] == "error"]
    assert codes == ["bad_json", "unknown_event", "bad_payload", "unexpected_binary"]
    assert bad_events[-1]["type"] == "session.closed" and bad_close == 1000
    assert early_media == (4002, "invalid_sequence")
    assert wrong_encoding == (4001, "unsupported_format")
    assert bad_option == (4001, "invalid_config")
    good_finals = [e["channel"] for e in good_events if e["type"] == "transcript.final"]
    assert good_finals == ["inbound", "outbound"] and good_events[-1]["type"] == "session.closed"
    assert 'streamscribe_errors_total{code="bad_payload"} 1.0' in metrics.decode()


def test_hang_up_without_stop_still_delivers_the_last_final(two_party_call):
    async def main():
        async with running(gateway_config(), EchoEngine(delay_s=0.2)) as gw:
            subscriber = await subscribe(gw.port, CALL_SID)
            await until_subscribed(gw, CALL_SID)
            stream = list(twilio_sim.messages(two_party_call, CALL_SID))[:-1]  # no `stop`
            await twilio_sim.replay(stream_url(gw), stream)
            return await read_all(subscriber)

    events = asyncio.run(main())
    finals = [e["channel"] for e in events if e["type"] == "transcript.final"]
    assert finals == ["inbound", "outbound"] and events[-1]["type"] == "session.closed"


def test_streamed_mulaw_call_with_the_cpu_model_is_as_good_as_offline_8k():
    """The CI form of benchmarks/telephony_wer.py: a looser bound than the benchmark's +10 %."""
    pytest.importorskip("faster_whisper", reason="pip install -e '.[cpu]'")
    from benchmarks.telephony_wer import measure
    from engine.api import EngineOptions
    from engine.whisper import load_engine

    clips = librivox_clips()
    engine = load_engine("tiny.en", EngineOptions(device="cpu"))

    async def main():
        async with running(gateway_config(), engine, timeout_s=120) as gw:
            return await measure(engine, gw.port, [c for _, c, _ in clips], [r for *_, r in clips])

    figures = asyncio.run(main())
    twilio, offline = figures["twilio_mulaw_8k"]["wer"], figures["offline_mulaw_8k"]["wer"]
    assert twilio <= offline * 1.5 + 0.03, figures
    assert figures["native_16k"]["wer"] <= 0.15, figures
    assert figures["twilio_channels"] == ["inbound"]

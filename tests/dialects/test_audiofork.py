"""FreeSWITCH mod_audio_fork and jambonz `listen` (/v1/telephony/audiofork): metadata then L16
frames, stereo as caller and callee, results back on the socket and to the call's subscribers."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streaming.core.events import ErrorEvent, FinalTranscript, Latency, PartialTranscript
from streaming.dialects.audiofork import AudioForkDialect
from streaming.dialects.base import Audio, Close, Configure, KeepAlive, Opening, Reject
from tests.gateway_harness import EchoEngine, gateway_config, read_all, running, subscribe
from tests.streams import RATE, librivox_clips, to_s16le

CALL_SID = "9fb35c28-9688-4531-943c-e280b04f3adf"
# The first text frame of a jambonz `listen` (docs.jambonz.org, "listen"): the call's
# attributes plus sampleRate and mixType.
JAMBONZ_METADATA = {
    "callSid": CALL_SID,
    "direction": "inbound",
    "from": "+15083084809",
    "to": "+15083728299",
    "callId": "d8907723-0bc7-123b-09b5-12e962f3039b",
    "sipStatus": 200,
    "callStatus": "in-progress",
    "accountSid": "4bfe85c1-96bb-4af7-ac83-68fe7ebd562d",
    "applicationSid": "7a489343-02ed-471e-8df0-fc5e1b98ce8a",
    "sampleRate": 16000,
    "mixType": "stereo",
}


def test_jambonz_metadata_sets_format_call_and_labels():
    dialect = AudioForkDialect()
    assert dialect.opening({"hangover_ms": "600", "api_key": "k"}) == Opening(
        {"hangover_ms": "600"}
    )
    assert dialect.call_id is None
    assert dialect.on_text(json.dumps(JAMBONZ_METADATA)) == [
        Configure({"sample_rate": 16000, "channels": 2})
    ]
    assert dialect.call_id == CALL_SID and dialect.channel_labels == ("caller", "callee")
    assert dialect.on_binary(b"\x01\x00\x02\x00") == [Audio(b"\x01\x00\x02\x00")]
    assert dialect.on_text('{"type": "dtmf"}') == [KeepAlive()]  # application data later
    assert dialect.on_hangup() == [Close()]


@pytest.mark.parametrize(
    "mix, labels", [("mono", ("caller",)), ("mixed", ("mixed",)), ("stereo", ("caller", "callee"))]
)
def test_mix_types(mix, labels):
    dialect = AudioForkDialect()
    (configure,) = dialect.on_text(json.dumps({"mixType": mix, "sampleRate": 8000}))
    assert configure.options == {"sample_rate": 8000, "channels": len(labels)}
    assert dialect.channel_labels == labels


def test_mod_audio_fork_without_metadata_takes_the_format_from_the_url():
    dialect = AudioForkDialect()
    opening = dialect.opening({"sample_rate": "8000", "channels": "2", "call_id": "fs-uuid"})
    assert opening.options == {"sample_rate": "8000", "channels": "2"}
    assert dialect.call_id == "fs-uuid" and dialect.channel_labels == ("caller", "callee")
    assert dialect.on_binary(b"\x00\x00") == [Audio(b"\x00\x00")]
    assert dialect.on_text(json.dumps({"sampleRate": 16000})) == [KeepAlive()]  # too late


def test_freeswitch_metadata_names_the_call():
    dialect = AudioForkDialect()
    assert dialect.on_text(json.dumps({"call_id": "fs-1", "caller": "1000"})) == [Configure({})]
    assert dialect.call_id == "fs-1"
    dialect = AudioForkDialect()
    assert dialect.on_text(json.dumps({"caller": "1000"})) == [KeepAlive()]


@pytest.mark.parametrize(
    "metadata, code, fatal",
    [
        ("{'caller': '1000'}", "bad_metadata", False),
        ("[1, 2]", "bad_metadata", False),
        (json.dumps({"mixType": "quad"}), "invalid_config", True),
    ],
)
def test_bad_metadata(metadata, code, fatal):
    (reject,) = AudioForkDialect().on_text(metadata)
    assert isinstance(reject, Reject) and reject.code == code
    assert (reject.close_code == 4001) is fatal


def test_finals_and_errors_go_back_as_mod_audio_fork_events():
    dialect = AudioForkDialect()
    final = FinalTranscript(1, 3, 100, 900, "hello", [], 0.9, Latency(1, 2, 3), "endpoint")
    (frame,) = dialect.encode(final)
    message = json.loads(frame)
    assert message["type"] == "transcription"
    assert message["data"]["type"] == "transcript.final" and message["data"]["text"] == "hello"
    (frame,) = dialect.encode(ErrorEvent("bad_metadata", "no"))
    assert (
        json.loads(frame)["type"] == "error" and json.loads(frame)["data"]["code"] == "bad_metadata"
    )
    assert dialect.encode(PartialTranscript(0, 1, 1, 0, 100, "he", "llo")) == []


# --- over loopback ----------------------------------------------------------------------------


def stereo(left: np.ndarray, right: np.ndarray) -> bytes:
    frames = np.zeros((max(len(left), len(right)), 2), np.float32)
    frames[: len(left), 0], frames[: len(right), 1] = left, right
    return to_s16le(frames.reshape(-1))


def test_jambonz_stereo_call_hung_up_mid_speech():
    (_, caller, _), (_, callee, _) = librivox_clips()[:2]
    quiet = np.zeros(RATE, np.float32)
    first = stereo(np.concatenate([quiet, caller, quiet]), np.zeros(len(caller) + 2 * RATE))
    second = stereo(np.zeros(len(callee)), callee)  # the callee is still talking at hang-up

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            subscriber = await subscribe(gw, CALL_SID)
            url = f"ws://127.0.0.1:{gw.port}/v1/telephony/audiofork?hangover_ms=400"
            async with connect(url, subprotocols=["audio.jambonz.org"]) as ws:
                await ws.send(json.dumps(JAMBONZ_METADATA))
                for offset in range(0, len(first), 6400):
                    await ws.send(first[offset : offset + 6400])
                back = json.loads(await asyncio.wait_for(ws.recv(), 30))
                for offset in range(0, len(second), 6400):
                    await ws.send(second[offset : offset + 6400])
            return back, await read_all(subscriber)

    back, events = asyncio.run(main())
    assert back["type"] == "transcription" and back["data"]["channel"] == 0
    assert events[0]["type"] == "session.started" and events[0]["config"]["sample_rate"] == 16000
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert [f["channel"] for f in finals] == ["caller", "callee"]
    assert finals[1]["reason"] == "flush" and events[-1]["type"] == "session.closed"


def test_mod_audio_fork_mono_call_with_app_text_frames_and_bad_metadata():
    (_, speech, _) = librivox_clips()[0]
    quiet = np.zeros(RATE // 2, np.float32)
    audio = np.concatenate([quiet, speech, quiet])
    narrow = to_s16le(audio[::2])  # 8 kHz is enough for the echo engine

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            subscriber = await subscribe(gw, "fs-call")
            query = "?sample_rate=8000&call_id=fs-call"
            url = f"ws://127.0.0.1:{gw.port}/v1/telephony/audiofork{query}"
            async with connect(url, subprotocols=["audio.drachtio.org"]) as ws:
                await ws.send("{'caller': '1000'}")  # not JSON: an error, the call goes on
                error = json.loads(await ws.recv())
                for offset in range(0, len(narrow), 3200):
                    await ws.send(narrow[offset : offset + 3200])
                await ws.send("DTMF 5")  # uuid_audio_fork send_text: application data
            return error, await read_all(subscriber)

    error, events = asyncio.run(main())
    assert error["type"] == "error" and error["data"]["code"] == "bad_metadata"
    codes = [e.get("code") for e in events if e["type"] == "error"]
    assert codes == ["bad_metadata"]
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert [f["channel"] for f in finals] == ["caller"] and events[-1]["type"] == "session.closed"


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"sampleRate": 64000, "mixType": "mono"}, "sample_rate"),  # jambonz allows 64 kHz
        ({"sampleRate": 8000, "mixType": "surround"}, "mixType"),
    ],
)
def test_unsupported_formats_close_the_session_with_4001(metadata, expected):
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            url = f"ws://127.0.0.1:{gw.port}/v1/telephony/audiofork"
            async with connect(url) as ws:
                await ws.send(json.dumps({"callSid": "c-bad", **metadata}))
                error = json.loads(await asyncio.wait_for(ws.recv(), 10))
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                return error, ws.close_code

    error, code = asyncio.run(main())
    assert error["type"] == "error" and error["data"]["code"] == "invalid_config"
    assert expected in error["data"]["message"] and code == 4001

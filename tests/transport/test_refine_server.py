"""The refine pass through a running server: async and sync on the native protocol, sync for
Deepgram, OpenAI Realtime and Twilio clients, shedding under load, and a refine model that fails
on one batch."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect

from engine.api import EngineOptions, Hypothesis
from engine.granite_ar.engine import load_engine as load_ar_engine
from streaming.core.audio import encode_mulaw
from tests.checkpoints.granite_ar import write_tiny_ar_checkpoint
from tests.gateway_harness import EchoEngine, collect, gateway_config, http_get, read_all, running
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le


class LoudEngine(EchoEngine):
    """The refine model: the primary's words in capitals; slow or failing when asked."""

    def __init__(self, delay_s: float = 0.0, fail_first: int = 0) -> None:
        super().__init__(delay_s)
        self.fail_first = fail_first

    def transcribe(self, segments):
        answers = self._answer(segments)
        if self.fail_first:
            self.fail_first -= 1
            raise RuntimeError("refine exploded")
        loud = []
        for answer in answers:
            words = [dataclasses.replace(w, word=w.word.upper()) for w in answer.words]
            loud.append(Hypothesis(answer.text.upper(), words=words, confidence=0.95))
        return loud


@pytest.fixture(scope="module")
def speech():
    return joined([audio for _, audio, _ in librivox_clips()[:2]], silence_s=1.5)


def native_url(gateway, query: str = "") -> str:
    return f"ws://127.0.0.1:{gateway.port}/v1/stream{query}"


async def stream_native(gateway, speech, query: str = "", pace: float = 5.0) -> list[dict]:
    async with connect(native_url(gateway, query)) as ws:
        for chunk in chunks(to_s16le(speech), RATE * 2 // 10):
            await ws.send(chunk)
            await asyncio.sleep(0.1 / pace)
        await ws.send(json.dumps({"type": "close"}))
        return await collect(ws)


def of(messages: list[dict], kind: str) -> list[dict]:
    return [m for m in messages if m["type"] == kind]


def test_async_final_first_then_transcript_refined(speech):
    async def main():
        async with running(gateway_config(), EchoEngine(), refine_engine=LoudEngine()) as gw:
            messages = await stream_native(gw, speech)
            started = messages[0]
            return messages, started

    messages, _ = asyncio.run(main())
    finals, refined = of(messages, "transcript.final"), of(messages, "transcript.refined")
    assert len(finals) == 2 and len(refined) == 2
    for final, ref in zip(finals, refined, strict=True):
        assert messages.index(final) < messages.index(ref)
        assert ref["segment_id"] == final["segment_id"] and ref["text"] == final["text"].upper()
        assert ref["changed"] is True and "skipped" not in ref
    assert messages[-1]["type"] == "session.closed"


def test_sync_sends_the_refined_text_once_as_the_final(speech):
    async def main():
        async with running(gateway_config(), EchoEngine(), refine_engine=LoudEngine()) as gw:
            return await stream_native(gw, speech, "?refine_mode=sync")

    messages = asyncio.run(main())
    finals = of(messages, "transcript.final")
    assert len(finals) == 2 and all(f["text"].isupper() for f in finals)
    assert of(messages, "transcript.refined") == []


def test_refine_false_and_no_refine_model_send_plain_finals(speech):
    async def main():
        async with running(gateway_config(), EchoEngine(), refine_engine=LoudEngine()) as gw:
            off = await stream_native(gw, speech, "?refine=false")
        async with running(gateway_config(), EchoEngine()) as gw:
            none = await stream_native(gw, speech)
        return off, none

    for messages in asyncio.run(main()):
        finals = of(messages, "transcript.final")
        assert len(finals) == 2 and not any(f["text"].isupper() for f in finals)
        assert of(messages, "transcript.refined") == []


def test_deepgram_and_realtime_clients_get_the_refined_text_as_their_final(speech):
    mulaw = encode_mulaw(speech[::2])  # 8 kHz mu-law for the Realtime G.711 format

    async def deepgram(gw):
        query = "?encoding=linear16&sample_rate=16000"
        async with connect(f"ws://127.0.0.1:{gw.port}/v1/listen{query}") as ws:
            for chunk in chunks(to_s16le(speech), RATE * 2 // 10):
                await ws.send(chunk)
                await asyncio.sleep(0.02)
            await ws.send(json.dumps({"type": "CloseStream"}))
            return await read_all(ws)

    async def realtime(gw):
        async with connect(f"ws://127.0.0.1:{gw.port}/v1/realtime") as ws:
            await ws.recv()  # session.created
            update = {"input_audio_format": "g711_ulaw", "turn_detection": {"type": "server_vad"}}
            await ws.send(json.dumps({"type": "transcription_session.update", "session": update}))
            for chunk in chunks(mulaw, 800):
                audio = base64.b64encode(chunk).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
                await asyncio.sleep(0.02)
            done = []
            async with asyncio.timeout(30):
                while len(done) < 2:
                    message = json.loads(await ws.recv())
                    if message["type"].endswith("input_audio_transcription.completed"):
                        done.append(message["transcript"])
            return done

    async def main():
        async with running(gateway_config(), EchoEngine(), refine_engine=LoudEngine()) as gw:
            return await deepgram(gw), await realtime(gw)

    deepgram_messages, completed = asyncio.run(main())
    finals = [
        m["channel"]["alternatives"][0]["transcript"]
        for m in deepgram_messages
        if m.get("type") == "Results" and m.get("is_final")
    ]
    assert len(finals) == 2 and all(text and text.isupper() for text in finals)
    assert len(completed) == 2 and all(text and text.isupper() for text in completed)


def test_a_slow_refine_model_never_delays_a_final_and_late_refines_are_skipped(speech):
    slow = LoudEngine(delay_s=1.5)
    config = gateway_config()
    config = dataclasses.replace(
        config, scheduler=dataclasses.replace(config.scheduler, max_refine_queue=1)
    )

    async def main():
        async with running(config, EchoEngine(), refine_engine=slow) as gw:
            streams = [
                stream_native(gw, speech, "?refine_deadline_ms=500&partial_interval_ms=200")
                for _ in range(3)
            ]
            results = await asyncio.gather(*streams)
            _, _, metrics = await http_get(gw.port, "/metrics")
            return results, metrics

    results, metrics = asyncio.run(main())
    for messages in results:
        finals, refined = of(messages, "transcript.final"), of(messages, "transcript.refined")
        assert len(finals) == 2 and len(refined) == 2  # every final, every refine answered
        assert all(f["latency"]["queue_ms"] < 1500 for f in finals)  # never behind a refine
        assert messages[-1]["type"] == "session.closed"
    skipped = [r for m in results for r in of(m, "transcript.refined") if r.get("skipped")]
    assert skipped and {r["reason"] for r in skipped} <= {"queue_full", "deadline"}
    assert "streamscribe_refine_skipped_total" in metrics


def test_a_refine_batch_that_fails_leaves_the_finals_standing(speech):
    async def main():
        refine = LoudEngine(fail_first=1)
        async with running(gateway_config(), EchoEngine(), refine_engine=refine) as gw:
            async_messages = await stream_native(gw, speech, "?refine_deadline_ms=20000")
            _, _, metrics = await http_get(gw.port, "/metrics")
        return async_messages, metrics

    messages, metrics = asyncio.run(main())
    refined = of(messages, "transcript.refined")
    assert len(of(messages, "transcript.final")) == 2 and len(refined) == 2
    failed, ok = refined
    assert failed["skipped"] and "refine exploded" in failed["reason"] and ok["changed"]
    assert "streamscribe_engine_failures_total 1.0" in metrics


# --- translation (`translate_to`) with the real granite-ar code on a tiny random checkpoint ------


@pytest.fixture(scope="module")
def tiny_ar(tmp_path_factory):
    folder = write_tiny_ar_checkpoint(tmp_path_factory.mktemp("tiny-ar"), seed=0)
    return load_ar_engine(str(folder), EngineOptions(device="cpu", dtype="float32"))


def test_translate_to_gets_transcript_translated_from_the_granite_ar_refine_model(speech, tiny_ar):
    """The tiny model's text is gibberish: the structure is what is checked."""

    async def main():
        async with running(gateway_config(), EchoEngine(), refine_engine=tiny_ar) as gw:
            return await stream_native(gw, speech, "?translate_to=fr&refine_deadline_ms=60000")

    messages = asyncio.run(main())
    finals, translated = of(messages, "transcript.final"), of(messages, "transcript.translated")
    assert len(finals) == 2 and len(of(messages, "transcript.refined")) == 2
    assert [m["segment_id"] for m in translated] == [m["segment_id"] for m in finals]
    for final, item in zip(finals, translated, strict=True):
        assert messages.index(final) < messages.index(item)
        assert set(item) == {
            "type", "seq", "channel", "segment_id", "start_ms", "end_ms", "language", "text",
        }  # fmt: skip
        assert item["language"] == "fr" and isinstance(item["text"], str)
        assert (item["start_ms"], item["end_ms"]) == (final["start_ms"], final["end_ms"])
    assert messages[-1]["type"] == "session.closed"


def test_translate_to_the_refine_model_cannot_do_is_invalid_config_and_close_4001(tiny_ar):
    async def main():
        async with running(gateway_config(), EchoEngine(), refine_engine=tiny_ar) as gw:
            async with connect(native_url(gw, "?translate_to=xx")) as ws:
                return await read_all(ws), ws.close_code

    messages, code = asyncio.run(main())
    assert [(m["type"], m.get("code")) for m in messages] == [("error", "invalid_config")]
    assert messages[0]["message"].endswith(
        "the refine model translates into: de, en, es, fr, it, ja, pt, zh"
    )
    assert code == 4001


# --- telephony: call subscribers get the refined text as the final --------------------------


def test_twilio_call_subscribers_get_refined_finals():
    from clients.telephony import twilio_sim
    from tests.dialects.test_twilio import (
        CALL_SID,
        read_all,
        settled,
        stream_url,
        subscribe,
        until_subscribed,
    )

    (_, first, _), (_, second, _) = librivox_clips()[:2]
    quiet = np.zeros(int(1.5 * RATE), np.float32)
    call = {
        "inbound": twilio_sim.to_mulaw(np.concatenate([quiet, first, quiet]), RATE),
        "outbound": twilio_sim.to_mulaw(np.concatenate([quiet, second, quiet]), RATE),
    }

    async def main():
        async with running(gateway_config(), EchoEngine(), refine_engine=LoudEngine()) as gw:
            subscriber = await subscribe(gw.port, CALL_SID)
            await until_subscribed(gw, CALL_SID)
            stream = twilio_sim.messages(call, CALL_SID, {}, "12")
            await twilio_sim.replay(stream_url(gw), list(stream), realtime=False)
            events = await read_all(subscriber)
            await settled(gw)
            return events

    events = asyncio.run(main())
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert len(finals) == 2 and all(f["text"].isupper() for f in finals)
    assert not [e for e in events if e["type"] == "transcript.refined"]


# --- the GPU pairing's code: granite-nar primary, granite-ar refine, tiny random checkpoints --


def test_granite_nar_primary_with_granite_ar_refine_through_the_server(
    speech, tiny_engine, tiny_ar
):
    async def main():
        async with running(gateway_config(), tiny_engine, refine_engine=tiny_ar) as gw:
            return await stream_native(gw, speech, "?refine_deadline_ms=60000")

    messages = asyncio.run(main())
    finals, refined = of(messages, "transcript.final"), of(messages, "transcript.refined")
    assert finals and len(refined) == len([f for f in finals if f["words"]])
    for ref in refined:
        assert not ref.get("skipped") and isinstance(ref["text"], str)
        assert ref["latency"]["compute_ms"] >= 0
    assert messages[-1]["type"] == "session.closed"

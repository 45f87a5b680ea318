"""The refine pass in the session core and the stream protocol: async and sync modes, skipped
and failed refines, deadlines, and a session that closes only once every refine is answered."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from engine.api import Hypothesis, Word
from engine.scheduler import Outcome, Request
from streaming.core.events import (
    EngineRequest,
    FinalTranscript,
    RefinedTranscript,
    SessionClosed,
)
from streaming.core.protocol import StreamProtocol
from streaming.core.session import Session
from streaming.dialects.deepgram import DeepgramDialect
from streaming.dialects.native import NativeDialect
from streaming.ops.config import Config, SessionConfig
from tests.core.test_session import fake_words
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le


def refined_words(audio: np.ndarray) -> Hypothesis:
    """The refine model's answer: other words than the primary's."""
    plain = fake_words(audio)
    words = [Word(w.word.upper(), w.start_ms, w.end_ms, 0.95) for w in plain.words]
    text = " ".join(w.word for w in words)
    return Hypothesis(text, words=words, confidence=0.95, duration_ms=plain.duration_ms)


class Driver:
    """Answers partials and finals at once; keeps refine requests for the test to answer."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.events: list = []
        self.refines: list[EngineRequest] = []

    def run(self, outputs) -> None:
        for item in outputs:
            if not isinstance(item, EngineRequest):
                self.events.append(item)
            elif item.kind == "refine":
                self.refines.append(item)
            else:
                hyp = fake_words(item.audio)
                self.run(self.session.on_result(item, hyp, queue_ms=5, compute_ms=7))

    def answer(self, request: EngineRequest, hypothesis: Hypothesis | None, error: str = ""):
        self.run(self.session.on_result(request, hypothesis, error=error, queue_ms=3, compute_ms=4))

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return joined([audio for _, audio, _ in librivox_clips()[:2]], silence_s=1.5)


def streamed(speech, refine_mode: str = "async", refined_messages: bool = True, **options):
    session = Session(
        "s",
        SessionConfig(refine_mode=refine_mode, **options),
        refine_model=True,
        refined_messages=refined_messages,
    )
    driver = Driver(session)
    driver.run(session.start())
    for chunk in chunks(to_s16le(speech), RATE * 2 // 10):
        driver.run(session.feed_audio(chunk))
    driver.run(session.close())
    return driver


def test_async_finals_go_out_at_once_then_their_refined_text(speech):
    driver = streamed(speech)
    finals = driver.of(FinalTranscript)
    assert len(finals) == 2 and len(driver.refines) == 2
    assert not driver.of(SessionClosed)  # waits for the refined texts
    for request in driver.refines:
        assert request.deadline_ms == 3000 and request.language == "en"
        driver.answer(request, refined_words(request.audio))
    refined = driver.of(RefinedTranscript)
    assert [r.segment_id for r in refined] == [f.segment_id for f in finals]
    for final, ref in zip(finals, refined, strict=True):
        assert ref.text == final.text.upper() and ref.changed and not ref.skipped
        assert (ref.start_ms, ref.end_ms) == (final.start_ms, final.end_ms)
        assert ref.words[0].start_ms == final.words[0].start_ms  # stream time, as the final
        assert (ref.queue_ms, ref.compute_ms) == (3, 4)
    assert isinstance(driver.events[-1], SessionClosed)


def test_async_refine_that_does_not_run_is_reported_skipped_with_the_final_standing(speech):
    driver = streamed(speech)
    first, second = driver.refines
    driver.answer(first, None, error="queue_full")
    driver.answer(second, None, error="RuntimeError: boom")
    skipped = driver.of(RefinedTranscript)
    finals = driver.of(FinalTranscript)
    assert [r.reason for r in skipped] == ["queue_full", "RuntimeError: boom"]
    assert all(r.skipped and not r.changed for r in skipped)
    assert [r.text for r in skipped] == [f.text for f in finals]
    assert isinstance(driver.events[-1], SessionClosed)


def test_sync_holds_the_final_and_sends_the_refined_text_once_as_the_final(speech):
    driver = streamed(speech, refine_mode="sync")
    assert driver.of(FinalTranscript) == [] and len(driver.refines) == 2
    assert driver.session.pending_finals == 2  # held finals count for backpressure
    first, second = driver.refines
    driver.answer(first, refined_words(first.audio))
    driver.answer(second, None, error="deadline")  # falls back to the primary's text
    one, two = driver.of(FinalTranscript)
    assert one.text.isupper() and not two.text.isupper() and two.text
    assert (one.latency.queue_ms, one.latency.compute_ms) == (5 + 3, 7 + 4)
    assert driver.of(RefinedTranscript) == []
    assert isinstance(driver.events[-1], SessionClosed)


def test_dialects_without_a_refined_message_get_sync_and_no_refine_model_means_none(speech):
    assert streamed(speech, refined_messages=False).session.refine_mode == "sync"
    assert streamed(speech, refine=False).session.refine_mode is None
    plain = Session("s", SessionConfig())
    assert plain.refine_mode is None


# --- through the protocol: the deadline, and the wire --------------------------------------


def outcome(request: EngineRequest, hypothesis: Hypothesis | None, reason: str = "") -> Outcome:
    fake = Request(request.kind, ("s", request.channel, request.segment_id), None, print)
    status = "done" if hypothesis is not None else "dropped"
    return Outcome(fake, status, hypothesis, reason, queue_ms=2.0, compute_ms=3.0)


def run_protocol(
    dialect,
    speech,
    query: dict[str, str],
    config: Config | None = None,
    translations: frozenset[str] = frozenset(),
):
    """A stream through StreamProtocol with a refine model (translating into `translations`);
    engine requests answered at once except the refine model's, which are returned
    unanswered."""
    session_id = uuid.uuid4().hex  # Deepgram's request_id is a UUID
    config = config or Config()
    protocol = StreamProtocol(
        session_id,
        dialect,
        query,
        config,
        None,
        0.0,
        refine_model=True,
        translations=translations,
    )
    frames: list = []
    refines: list[EngineRequest] = []

    def perform(actions, now):
        frames.extend(actions.send)
        for request in actions.submit:
            if request.kind == "refine":
                refines.append(request)
            else:
                answer = outcome(request, fake_words(request.audio))
                perform(protocol.on_result(request, answer, now), now)

    now = 0.0
    perform(protocol.open(), now)
    for chunk in chunks(to_s16le(speech), RATE * 2 // 10):
        now += 0.1
        perform(protocol.receive_binary(chunk, now), now)
    return protocol, frames, refines, perform, now


def test_a_held_final_goes_out_unrefined_when_the_refine_deadline_passes(speech):
    query = {"refine_mode": "sync", "refine_deadline_ms": "500"}
    protocol, frames, refines, perform, now = run_protocol(NativeDialect(), speech, query)
    messages = [json.loads(f) for f in frames]
    finals = [m for m in messages if m["type"] == "transcript.final"]
    # the first utterance's refine expired while audio went on: its final went out unrefined
    assert refines and finals and finals[0]["text"] and not finals[0]["text"].isupper()
    perform(protocol.tick(now + 1.0), now + 1.0)
    late = refines[0]
    answered = protocol.on_result(late, outcome(late, refined_words(late.audio)), now + 1.0)
    assert not answered.send  # the late refined text is ignored: the final was sent
    types = [json.loads(f)["type"] for f in frames]
    assert types.count("transcript.final") == 2


def test_native_sends_transcript_refined_and_deepgram_gets_the_refined_final(speech):
    patient = {"refine_deadline_ms": "60000"}
    protocol, frames, refines, perform, now = run_protocol(NativeDialect(), speech, patient)
    for request in refines:
        perform(protocol.on_result(request, outcome(request, refined_words(request.audio))), now)
    messages = [json.loads(f) for f in frames]
    refined = [m for m in messages if m["type"] == "transcript.refined"]
    assert len(refined) == 2 and all(m["changed"] and m["text"].isupper() for m in refined)
    assert set(refined[0]) == {
        "type", "seq", "channel", "segment_id", "start_ms", "end_ms", "text", "words",
        "confidence", "latency", "changed",
    }  # fmt: skip

    # Deepgram has no such query parameter: the server's default applies
    patient_server = Config(session=SessionConfig(refine_deadline_ms=60000))
    protocol, frames, refines, perform, now = run_protocol(
        DeepgramDialect(), speech, {}, patient_server
    )
    assert not [f for f in frames if '"is_final": true' in f]  # held for refine
    for request in refines:
        perform(protocol.on_result(request, outcome(request, refined_words(request.audio))), now)
    finals = [json.loads(f) for f in frames if '"is_final": true' in f]
    texts = [m["channel"]["alternatives"][0]["transcript"] for m in finals]
    assert len(texts) == 2 and all(t.isupper() for t in texts)

"""Translation of finals (`translate_to`) in the session core and the stream protocol: asked of
the refine model after each final with words whatever the refine mode, answered or skipped as
`transcript.translated`, timed apart from the same segment's refine, refused when the refine
model cannot translate into the target, and never sent by dialects without the message."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from engine.api import Hypothesis
from streaming.core.events import (
    EngineRequest,
    FinalTranscript,
    RefinedTranscript,
    SessionClosed,
    TranslatedTranscript,
)
from streaming.core.protocol import StreamProtocol
from streaming.core.session import Session
from streaming.dialects.deepgram import DeepgramDialect
from streaming.dialects.native import NativeDialect
from streaming.ops.config import Config, ConfigError, SessionConfig, session_options
from streaming.server import Gateway
from tests.core.test_refine import Driver, outcome, refined_words
from tests.core.test_refine import run_protocol as refine_stream
from tests.core.test_session import fake_words
from tests.gateway_harness import EchoEngine
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le

GRANITE_AR = frozenset({"de", "en", "es", "fr", "it", "ja", "pt", "zh"})


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return joined([audio for _, audio, _ in librivox_clips()[:2]], silence_s=1.5)


def french(request: EngineRequest) -> Hypothesis:
    """The refine model's translation: recognisably not the primary's text."""
    return Hypothesis("bonjour " * len(fake_words(request.audio).words), confidence=0.9)


def streamed(speech, refine_model: bool = True, **options) -> Driver:
    session = Session("s", SessionConfig(**options), refine_model=refine_model)
    driver = Driver(session)
    driver.run(session.start())
    for chunk in chunks(to_s16le(speech), RATE * 2 // 10):
        driver.run(session.feed_audio(chunk))
    driver.run(session.close())
    return driver


def split(driver: Driver) -> tuple[list[EngineRequest], list[EngineRequest]]:
    """The refine model's requests so far: (refines, translations)."""
    refines = [r for r in driver.refines if r.translate_to is None]
    return refines, [r for r in driver.refines if r.translate_to is not None]


def test_each_final_is_translated_after_it_and_the_session_waits_for_every_translation(speech):
    driver = streamed(speech, translate_to="FR-fr")
    refines, translations = split(driver)
    finals = driver.of(FinalTranscript)
    assert len(finals) == 2 and len(refines) == 2 and len(translations) == 2
    for request, final in zip(translations, finals, strict=True):
        assert (request.kind, request.translate_to, request.segment_id) == (
            "refine",
            "fr",
            final.segment_id,
        )
        assert request.deadline_ms == 3000 and request.language == "en"
    for request in refines:
        driver.answer(request, refined_words(request.audio))
    assert len(driver.of(RefinedTranscript)) == 2 and not driver.of(SessionClosed)
    for request in translations:
        driver.answer(request, french(request))
    translated = driver.of(TranslatedTranscript)
    assert [t.segment_id for t in translated] == [f.segment_id for f in finals]
    for final, item in zip(finals, translated, strict=True):
        assert (item.channel, item.start_ms, item.end_ms) == (0, final.start_ms, final.end_ms)
        assert item.language == "fr" and item.text.startswith("bonjour")
        assert not item.skipped and item.reason == ""
        assert driver.events.index(final) < driver.events.index(item)
    # the refined text of a segment was not taken for its translation, nor the reverse
    assert all(r.text.isupper() for r in driver.of(RefinedTranscript))
    assert isinstance(driver.events[-1], SessionClosed)


def test_a_translation_that_does_not_run_is_reported_skipped(speech):
    driver = streamed(speech, refine=False, translate_to="de")
    refines, (first, second) = split(driver)
    assert refines == []  # translation does not need the refine pass
    driver.answer(first, None, error="queue_full")
    assert not driver.of(SessionClosed)
    driver.answer(second, None, error="RuntimeError: boom")
    skipped = driver.of(TranslatedTranscript)
    assert [(t.language, t.text, t.skipped) for t in skipped] == [("de", "", True)] * 2
    assert [t.reason for t in skipped] == ["queue_full", "RuntimeError: boom"]
    assert isinstance(driver.events[-1], SessionClosed)


def test_sync_mode_asks_for_the_translation_once_the_held_final_goes_out(speech):
    driver = streamed(speech, refine_mode="sync", translate_to="fr")
    refines, translations = split(driver)
    assert len(refines) == 2 and translations == [] and driver.of(FinalTranscript) == []
    driver.answer(refines[0], refined_words(refines[0].audio))
    _, translations = split(driver)
    (final,) = driver.of(FinalTranscript)
    assert [t.segment_id for t in translations] == [final.segment_id]
    driver.answer(refines[1], None, error="deadline")
    _, translations = split(driver)
    assert len(translations) == 2
    for request in translations:
        driver.answer(request, french(request))
    assert len(driver.of(TranslatedTranscript)) == 2
    assert isinstance(driver.events[-1], SessionClosed)


def test_no_translation_without_a_refine_model_or_a_target(speech):
    assert streamed(speech, refine_model=False, translate_to="fr").refines == []
    refines, translations = split(streamed(speech))
    assert len(refines) == 2 and translations == []


# --- refusal ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("translations", "message"),
    [
        (GRANITE_AR, "the refine model translates into: de, en, es, fr, it, ja, pt, zh"),
        (frozenset(), "the refine model cannot translate"),
        (None, "no refine model is loaded (engine.refine_model)"),
    ],
)
def test_a_target_the_refine_model_cannot_translate_into_is_refused(translations, message):
    with pytest.raises(ConfigError) as refused:
        session_options(SessionConfig(), {"translate_to": "xx"}, "query string", None, translations)
    text = str(refused.value)
    assert text.startswith("session option translate_to (from query string) = 'xx'")
    assert text.endswith(message)


def test_targets_compare_by_primary_subtag_and_empty_is_off():
    for target in ("fr-CA", "ZH", ""):
        options = session_options(SessionConfig(), {"translate_to": target}, "q", None, GRANITE_AR)
        assert options.translate_to == target
    assert session_options(SessionConfig(), {}, "q", None, None).translate_to == ""


def opened(query: dict[str, str], refine_model: bool, translations=frozenset()) -> list[dict]:
    protocol = StreamProtocol(
        "s",
        NativeDialect(),
        query,
        Config(),
        None,
        0.0,
        refine_model=refine_model,
        translations=translations,
    )
    actions = protocol.open()
    assert actions.close == (4001, "invalid_config")
    return [json.loads(frame) for frame in actions.send]


def test_the_protocol_refuses_the_query_and_session_start_with_4001():
    (error,) = opened({"translate_to": "ru"}, True, GRANITE_AR)
    assert (error["type"], error["code"]) == ("error", "invalid_config")
    assert error["message"].endswith("translates into: de, en, es, fr, it, ja, pt, zh")
    (error,) = opened({"translate_to": "fr"}, False)
    assert error["message"].endswith("no refine model is loaded (engine.refine_model)")

    protocol = StreamProtocol(
        "s", NativeDialect(), {}, Config(), None, 0.0, refine_model=True, translations=GRANITE_AR
    )
    protocol.open()
    actions = protocol.receive_text('{"type": "session.start", "translate_to": "ko"}', 0.1)
    assert actions.close == (4001, "invalid_config") and "'ko'" in actions.send[0]


# --- through the protocol: deadlines and dialects ---------------------------------------------


def run_protocol(dialect, speech, query: dict[str, str], config: Config | None = None):
    """test_refine's stream through StreamProtocol, with a refine model that translates."""
    return refine_stream(dialect, speech, query, config, translations=GRANITE_AR)


def test_a_refine_and_a_translation_of_one_segment_each_meet_their_deadline(speech):
    query = {"translate_to": "fr", "refine_deadline_ms": "500"}
    protocol, frames, waiting, perform, now = run_protocol(NativeDialect(), speech, query)
    perform(protocol.receive_text('{"type": "close"}', now), now)
    perform(protocol.tick(now + 1.0), now + 1.0)
    messages = [json.loads(f) for f in frames]
    refined = [m for m in messages if m["type"] == "transcript.refined"]
    translated = [m for m in messages if m["type"] == "transcript.translated"]
    assert len(waiting) == 4  # a refine and a translation per segment
    assert [m["segment_id"] for m in refined] == [m["segment_id"] for m in translated] == [0, 1]
    assert all(m["skipped"] and m["reason"] == "deadline" for m in refined + translated)
    assert translated[0] == {
        "type": "transcript.translated",
        "seq": translated[0]["seq"],
        "channel": 0,
        "segment_id": 0,
        "start_ms": translated[0]["start_ms"],
        "end_ms": translated[0]["end_ms"],
        "language": "fr",
        "text": "",
        "skipped": True,
        "reason": "deadline",
    }
    assert messages[-1]["type"] == "session.closed"
    late = waiting[1]
    assert not protocol.on_result(late, outcome(late, french(late)), now + 1.0).send


def test_deepgram_sends_nothing_for_a_translation(speech):
    event = TranslatedTranscript(0, 1, 0, 1000, "fr", "bonjour")
    assert DeepgramDialect().encode(event) == []
    config = Config(session=SessionConfig(translate_to="fr", refine_deadline_ms=60000))
    protocol, frames, waiting, perform, now = run_protocol(DeepgramDialect(), speech, {}, config)
    for request in list(waiting):  # the held finals' refines; translations follow the finals
        perform(protocol.on_result(request, outcome(request, refined_words(request.audio))), now)
    translations = [r for r in waiting if r.translate_to == "fr"]
    assert len(translations) == 2
    sent = len(frames)
    for request in translations:
        assert protocol.on_result(request, outcome(request, french(request)), now).send == ()
    assert len(frames) == sent and not any("bonjour" in f for f in frames)
    assert protocol.session.translations_pending == 0


def test_a_server_default_target_the_refine_model_cannot_do_stops_the_start():
    config = dataclasses.replace(Config(), session=SessionConfig(translate_to="fr"))
    gateway = Gateway(config, EchoEngine)
    gateway._load()
    assert gateway.scheduler is None and not gateway.ready
    assert gateway.engine_error.endswith(
        "session.translate_to = 'fr': no refine model is loaded (engine.refine_model)"
    )
    gateway = Gateway(config, EchoEngine, EchoEngine)
    gateway._load()
    assert gateway.engine_error.endswith("the refine model cannot translate")

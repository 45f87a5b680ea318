"""POST /v1/audio/transcriptions through the official `openai` client: every response format,
streaming, audio formats, errors, batching through the scheduler, and the real CPU model."""

from __future__ import annotations

import asyncio
import dataclasses
import html
import io
import json
import logging
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from openai import OpenAI
from openai.types.audio import Transcription, TranscriptionVerbose

from benchmarks.scoring import corpus_wer
from engine.api import Hypothesis, Word
from streaming.cli import build_parser
from streaming.core.captions import cues_from_words, to_srt, to_vtt
from streaming.server import Gateway
from tests.gateway_harness import EchoEngine, gateway_config, running
from tests.streams import RATE, librivox_clips

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


@pytest.fixture(scope="module")
def clips():
    return librivox_clips()


@pytest.fixture(scope="module")
def wav(clips) -> bytes:
    return encode(clips[0][1], "WAV")


def encode(audio: np.ndarray, fmt: str, subtype: str | None = None, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def serve(fn, engine=None, **server):
    """Run `fn(gateway)` in a thread while an in-process gateway serves (REST on a free port)."""

    async def main():
        async with running(gateway_config(http_port=0, **server), engine or EchoEngine()) as gw:
            return await asyncio.to_thread(fn, gw)

    return asyncio.run(main())


def client(gw: Gateway, key: str = "x") -> OpenAI:
    return OpenAI(
        base_url=f"http://127.0.0.1:{gw.rest.port}/v1",
        api_key=key,
        max_retries=0,
        _strict_response_validation=True,  # responses must match the client's models
    )


def transcribe(gw: Gateway, data: bytes, name: str = "clip.wav", **params):
    return client(gw).audio.transcriptions.create(model="whisper-1", file=(name, data), **params)


# --- subtitle files, checked against their formats --------------------------------------------

SRT_TIMING = re.compile(r"(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)")
VTT_TIMING = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)")


def _ms(groups: tuple[str, ...]) -> tuple[int, int]:
    h, m, s, ms, h2, m2, s2, ms2 = (int(g) for g in groups)
    return (h * 3600 + m * 60 + s) * 1000 + ms, (h2 * 3600 + m2 * 60 + s2) * 1000 + ms2


def parse_srt(text: str) -> list[tuple[int, int, list[str]]]:
    """SubRip: numbered blocks (1, 2, ...), a timing line, text lines; a blank line between
    blocks."""
    assert text == "" or text.endswith("\n")
    cue_list = []
    for number, block in enumerate(filter(None, text.strip("\n").split("\n\n")), 1):
        lines = block.split("\n")
        assert lines[0] == str(number)
        timing = SRT_TIMING.fullmatch(lines[1])
        assert timing, lines[1]
        assert lines[2:] and all(line.strip() for line in lines[2:])
        cue_list.append((*_ms(timing.groups()), lines[2:]))
    return check_cues(cue_list)


def parse_vtt(text: str) -> list[tuple[int, int, list[str]]]:
    """WebVTT: the signature line, a blank line, then cues (an optional identifier line, a timing
    line, text) split by blank lines; cue text holds no "-->" and no raw "<" or "&" outside
    escapes."""
    header, _, body = text.partition("\n")
    assert header == "WEBVTT" and (body == "" or body.startswith("\n"))
    cue_list = []
    for block in filter(None, body.strip("\n").split("\n\n")):
        lines = block.split("\n")
        if "-->" not in lines[0]:
            lines = lines[1:]  # the cue identifier
        timing = VTT_TIMING.fullmatch(lines[0])
        assert timing, lines[0]
        for line in lines[1:]:
            assert line.strip() and "-->" not in line and "<" not in line
            assert re.fullmatch(r"([^&]|&(amp|lt|gt);)*", line)
        cue_list.append((*_ms(timing.groups()), [html.unescape(line) for line in lines[1:]]))
    return check_cues(cue_list)


def check_cues(cue_list):
    """Times increase, cues never overlap, at most 2 lines of 42 characters and 7 s each."""
    previous_end = 0
    for start, end, lines in cue_list:
        assert previous_end <= start < end
        assert end - start <= 7000
        assert 1 <= len(lines) <= 2 and all(len(line) <= 42 for line in lines)
        previous_end = end
    return cue_list


# --- the endpoint --------------------------------------------------------------------------------


def test_every_response_format_through_the_official_client(wav, clips):
    duration = len(clips[0][1]) / RATE

    def run(gw):
        out = {f: transcribe(gw, wav, response_format=f) for f in FORMATS}
        out["words"] = transcribe(
            gw, wav, response_format="verbose_json", timestamp_granularities=["word", "segment"]
        )
        return out

    out = serve(run)
    as_json = out["json"]
    assert isinstance(as_json, Transcription) and as_json.text.startswith("w0 w1")
    assert as_json.usage.type == "duration" and as_json.usage.seconds == pytest.approx(duration)
    assert out["text"] == as_json.text + "\n"
    verbose = out["verbose_json"]
    assert isinstance(verbose, TranscriptionVerbose) and verbose.words is None
    assert verbose.text == as_json.text and verbose.language == "en"
    assert verbose.duration == pytest.approx(duration)
    assert [s.id for s in verbose.segments] == list(range(len(verbose.segments)))
    assert " ".join(s.text for s in verbose.segments) == as_json.text
    for segment in verbose.segments:
        assert 0 <= segment.start < segment.end <= duration
        assert segment.seek == int(segment.start * 100) and segment.temperature == 0.0
        assert segment.avg_logprob == pytest.approx(np.log(0.9), abs=1e-3)  # EchoEngine: 0.9
    words = out["words"].words
    assert [w.word for w in words] == as_json.text.split()
    assert all(a.end <= b.start for a, b in zip(words, words[1:], strict=False))
    assert out["words"].segments == verbose.segments
    srt, vtt = parse_srt(out["srt"]), parse_vtt(out["vtt"])
    assert srt == vtt and len(srt) >= 1
    assert " ".join(" ".join(lines) for _, _, lines in srt) == as_json.text
    assert srt[0][0] == 0 and round(words[-1].end * 1000) <= srt[-1][1] <= duration * 1000


def test_stream_true_sends_text_deltas_then_done(wav):
    def run(gw):
        expected = transcribe(gw, wav).text
        with transcribe(gw, wav, stream=True) as stream:
            events = list(stream)
        return expected, events

    expected, events = serve(run)
    *deltas, done = events
    assert deltas and all(e.type == "transcript.text.delta" for e in deltas)
    assert done.type == "transcript.text.done" and done.text == expected
    assert "".join(e.delta for e in deltas) == expected


@pytest.mark.parametrize(
    "name, fmt, subtype, rate",
    [
        ("clip.flac", "FLAC", None, RATE),
        ("clip.ogg", "OGG", "VORBIS", RATE),
        ("clip.wav", "WAV", "ULAW", 8000),
        ("clip.mp3", "MP3", None, 44100),
        ("clip.wav", "WAV", "FLOAT", 48000),
    ],
)
def test_audio_formats_soundfile_reads(clips, name, fmt, subtype, rate):
    audio = clips[0][1]
    resampled = np.interp(
        np.arange(int(len(audio) * rate / RATE)) * RATE / rate, np.arange(len(audio)), audio
    ).astype(np.float32)
    data = encode(resampled, fmt, subtype, rate)
    verbose = serve(lambda gw: transcribe(gw, data, name, response_format="verbose_json"))
    # EchoEngine answers one word per 300 ms: the decoded audio has the clip's duration.
    assert verbose.duration == pytest.approx(len(audio) / RATE, abs=0.06)
    assert len(verbose.text.split()) == int(verbose.duration * 1000) // 300


def test_stereo_is_mixed_down(clips):
    audio = clips[0][1]
    data = encode(np.stack([audio, audio], axis=1), "WAV")
    text = serve(lambda gw: transcribe(gw, data).text)
    assert len(text.split()) == len(audio) * 1000 // RATE // 300


def test_an_engine_without_word_times_still_gets_valid_subtitles(wav):
    class TextOnly(EchoEngine):
        def transcribe(self, segments):
            return [Hypothesis(h.text) for h in super().transcribe(segments)]

    out = serve(
        lambda gw: (transcribe(gw, wav, response_format="srt"), transcribe(gw, wav)),
        engine=TextOnly(),
    )
    srt, as_json = out
    assert " ".join(" ".join(lines) for _, _, lines in parse_srt(srt)) == as_json.text


def test_cue_builder_breaks_lines_sentences_and_pauses():
    text = (
        "Broadcast captions need short lines. They must never overlap & they must not stay "
        "on screen for too long, because viewers read them while <watching> the picture "
        "and the speaker keeps talking without any pause at all for quite a while"
    ).split()
    words = [Word(w, i * 250, i * 250 + 240, 0.9) for i, w in enumerate(text)]
    words[20:] = [Word(w.word, w.start_ms + 3000, w.end_ms + 3000, 0.9) for w in words[20:]]
    words.append(Word("Done.", 30000, 29990, 0.9))  # an engine's odd times must not break files
    built = cues_from_words(words)
    srt = parse_srt(to_srt(built))
    vtt = parse_vtt(to_vtt(built))
    assert [(s, e) for s, e, _ in srt] == [(s, e) for s, e, _ in vtt]
    assert srt[0][2] == ["Broadcast captions need short lines."]  # ends with the sentence
    texts = [" ".join(lines) for _, _, lines in srt]
    paused = next(i for i, t in enumerate(texts) if t.endswith(words[19].word))
    assert texts[paused + 1].startswith(words[20].word)  # a cue ends before the pause
    assert "&amp;" in to_vtt(built) and "&lt;watching&gt;" in to_vtt(built)
    assert " ".join(" ".join(lines) for _, _, lines in srt) == " ".join(text + ["Done."])


def test_errors_have_openai_shape_and_status(wav):
    def run(gw):
        url = f"http://127.0.0.1:{gw.rest.port}/v1/audio/transcriptions"
        raw = {
            "no_file": httpx.post(url, files={"model": (None, "whisper-1")}),
            "not_multipart": httpx.post(url, json={"model": "whisper-1"}),
            "bad_audio": httpx.post(url, files={"file": ("x.wav", b"RIFF not really audio")}),
            "bad_granularity": httpx.post(
                url, files={"file": ("a.wav", wav), "timestamp_granularities[]": (None, "char")}
            ),
            "bad_temperature": httpx.post(
                url, files={"file": ("a.wav", wav), "temperature": (None, "hot")}
            ),
            "stream_srt": httpx.post(
                url,
                files={
                    "file": ("a.wav", wav),
                    "stream": (None, "true"),
                    "response_format": (None, "srt"),
                },
            ),
        }
        with pytest.raises(openai.BadRequestError) as bad_format:
            transcribe(gw, wav, response_format="diarized_json")
        return raw, bad_format.value

    raw, bad_format = serve(run)
    for name, response in raw.items():
        assert response.status_code == 400, name
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["message"]
    assert raw["no_file"].json()["error"]["param"] == "file"
    assert raw["bad_audio"].json()["error"]["code"] == "invalid_audio"
    assert "MP3" in raw["bad_audio"].json()["error"]["message"]  # lists what is readable
    assert raw["bad_granularity"].json()["error"]["param"] == "timestamp_granularities"
    assert raw["stream_srt"].json()["error"]["param"] == "stream"
    assert bad_format.status_code == 400 and bad_format.param == "response_format"


def test_a_file_over_the_upload_limit_gets_413(wav):
    def run(gw):
        with pytest.raises(openai.APIStatusError) as err:
            transcribe(gw, wav)
        small = transcribe(gw, wav[:20000])
        return err.value, small

    err, small = serve(run, max_upload_bytes=50_000)
    assert len(wav) > 50_000 and err.status_code == 413
    assert err.code == "file_too_large" and "50000" in err.message
    assert small.text  # a file within the limit still works


def test_api_keys_are_checked_like_the_websocket_side(wav):
    def run(gw):
        with pytest.raises(openai.AuthenticationError) as err:
            client(gw, key="wrong").audio.transcriptions.create(
                model="whisper-1", file=("a.wav", wav)
            )
        ok = client(gw, key="k2").audio.transcriptions.create(
            model="whisper-1", file=("a.wav", wav)
        )
        return err.value, ok

    err, ok = serve(run, api_keys="k1,k2")
    assert err.status_code == 401 and err.code == "invalid_api_key"
    assert ok.text


def test_engine_failure_is_a_500_server_error(wav):
    def run(gw):
        with pytest.raises(openai.InternalServerError) as err:
            transcribe(gw, wav)
        return err.value

    err = serve(run, engine=EchoEngine(fail=True))
    assert err.status_code == 500 and err.body["type"] == "server_error"
    assert "engine exploded" in err.message


def test_503_with_retry_after_while_the_engine_loads(wav):
    release = threading.Event()

    def load():
        release.wait(30)
        return EchoEngine()

    async def main():
        gateway = Gateway(gateway_config(http_port=0), load)
        await gateway.start()
        url = f"http://127.0.0.1:{gateway.rest.port}/v1/audio/transcriptions"
        try:
            return await asyncio.to_thread(httpx.post, url, files={"file": ("a.wav", wav)})
        finally:
            release.set()
            await gateway.loading
            await gateway.drain()

    response = asyncio.run(main())
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert response.json()["error"] == {
        "message": "server unavailable: loading",
        "type": "server_error",
        "param": None,
        "code": "loading",
    }


def test_prompt_reaches_the_engine_as_hotwords(wav):
    seen = []

    class Recording(EchoEngine):
        def transcribe(self, segments):
            seen.extend(s.hotwords for s in segments)
            return super().transcribe(segments)

    serve(lambda gw: transcribe(gw, wav, prompt="Chapter one, LibriVox"), Recording())
    assert seen == [("Chapter one, LibriVox",)]


def test_concurrent_files_are_batched_by_the_scheduler(wav):
    engine = EchoEngine(delay_s=0.5)

    def run(gw):
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda _: transcribe(gw, wav).text, range(4)))
        return texts, list(gw.scheduler.stats.batch_sizes)

    texts, batch_sizes = serve(run, engine=engine)
    assert len(set(texts)) == 1
    assert sum(batch_sizes) == 4 and max(batch_sizes) >= 2 and engine.calls < 4


def test_http_port_setting_and_flag():
    async def main():
        async with running(gateway_config(http_port=-1), EchoEngine()) as gw:
            return gw.rest

    assert asyncio.run(main()) is None
    args = build_parser().parse_args(["serve", "--http-port", "0"])
    assert args.http_port == 0
    assert (
        "--http-port" in build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    )


def test_real_cpu_model_through_the_official_client(clips):
    pytest.importorskip("faster_whisper")
    from engine.whisper import load_engine

    chosen = clips[:3]

    def run(gw):
        with ThreadPoolExecutor(len(chosen)) as pool:
            return list(
                pool.map(
                    lambda clip: transcribe(
                        gw, encode(clip[1], "FLAC"), "clip.flac", response_format="verbose_json"
                    ),
                    chosen,
                )
            )

    results = serve(run, engine=load_engine("tiny.en"))
    wer = corpus_wer([ref for _, _, ref in chosen], [r.text for r in results])
    assert wer <= 0.2, wer
    for result in results:
        assert result.segments and result.segments[0].avg_logprob < 0


def test_language_reaches_the_engine_and_one_it_lacks_is_a_400(wav):
    class English(EchoEngine):
        languages = frozenset({"en"})
        seen: list = []

        def transcribe(self, segments):
            self.seen += [s.language for s in segments]
            return super().transcribe(segments)

    def run(gw):
        with pytest.raises(openai.BadRequestError) as refused:
            transcribe(gw, wav, language="fr")
        accepted = transcribe(gw, wav, language="en-US", response_format="verbose_json")
        transcribe(gw, wav)
        return refused.value, accepted

    engine = English()
    refused, accepted = serve(run, engine=engine)
    assert refused.status_code == 400
    error = refused.body
    assert (error["param"], error["code"]) == ("language", "invalid_value")
    assert "'fr'" in error["message"] and error["message"].endswith("languages: en")
    assert accepted.language == "en-US"
    assert engine.seen == ["en", "en"]  # the form's tag as a primary subtag, then the default


# --- with a refine (accuracy pass) model --------------------------------------------------------


class RefineEngine:
    """A refine model whose text differs from the primary's; can fail, or hold its first batch
    until `release` is set."""

    family, device = "refine-fake", "cpu"
    text = "the refined text"

    def __init__(self, fail: bool = False, languages: frozenset[str] | None = None) -> None:
        self.fail = fail
        self.languages = languages
        self.release = threading.Event()
        self.release.set()
        self.calls = 0

    def draft(self, segments):
        raise AssertionError("a refine model only ever transcribes")

    def transcribe(self, segments):
        self.calls += 1
        self.release.wait(30)
        if self.fail:
            raise RuntimeError("refine exploded")
        return [Hypothesis(self.text, confidence=0.9) for _ in segments]


def serve_refined(fn, refine: RefineEngine, engine=None, **scheduler):
    """`serve` with a refine model loaded next to the primary (EchoEngine by default)."""
    base = gateway_config(http_port=0)
    config = dataclasses.replace(
        base,
        engine=dataclasses.replace(base.engine, refine_model="refine-fake"),
        scheduler=dataclasses.replace(base.scheduler, **scheduler),
    )

    async def main():
        async with running(config, engine or EchoEngine(), refine_engine=refine) as gw:
            return await asyncio.to_thread(fn, gw)

    return asyncio.run(main())


def test_a_loaded_refine_model_gives_the_files_text(wav):
    primary, refine = EchoEngine(), RefineEngine(languages=frozenset({"en"}))

    def run(gw):
        assert gw.scheduler.refine_engine is refine
        plain = transcribe(gw, wav, response_format="text")
        verbose = transcribe(gw, wav, response_format="verbose_json", language="en")
        calls = primary.calls
        french = transcribe(gw, wav, language="fr")  # not the refine model's: the primary's
        return plain, verbose, calls, french

    plain, verbose, calls, french = serve_refined(run, refine, primary)
    assert plain == "the refined text\n" and verbose.text == "the refined text"
    assert [segment.text for segment in verbose.segments] == ["the refined text"]
    assert calls == 0 and refine.calls == 2  # the primary model never saw those two files
    assert french.text.startswith("w0 w1") and primary.calls == 1


def test_a_failed_refine_falls_back_to_the_primary_model(wav):
    primary, refine = EchoEngine(), RefineEngine(fail=True)
    text = serve_refined(lambda gw: transcribe(gw, wav).text, refine, primary)
    assert text.startswith("w0 w1") and (refine.calls, primary.calls) == (1, 1)


def test_a_full_refine_queue_falls_back_to_the_primary_model(wav):
    """The worker is held in a refine batch and the refine queue (1 place) is full: the file is
    skipped by the refine pass (queue_full) and transcribed as a final once the worker is free."""
    primary, refine = EchoEngine(), RefineEngine()
    refine.release.clear()

    def run(gw):
        from engine.api import Segment
        from engine.scheduler import Request

        scheduler = gw.scheduler
        for key in ("running", "queued"):
            segment = Segment(np.zeros(RATE, dtype=np.float32))
            scheduler.submit(Request("refine", key, segment, lambda outcome: None))
            while key == "running" and refine.calls == 0:  # the worker took it: now held
                threading.Event().wait(0.01)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(transcribe, gw, wav)
            while scheduler.stats.refine_skipped.get("queue_full", 0) == 0:
                threading.Event().wait(0.01)
            refine.release.set()
            return answer.result().text

    text = serve_refined(run, refine, primary, max_refine_queue=1)
    assert text.startswith("w0 w1") and primary.calls == 1


# --- hostile bodies, slow bodies, long audio, and what the log says about them --------------------

UPLOAD_PATH = "/v1/audio/transcriptions"
FORM = (
    b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    b"RIFFxxxx\r\n--XX--\r\n"
)


async def _raw_post(port: int, body: bytes, *, length: int | None = None, **kw) -> bytes:
    """A POST written by hand (a body shorter than announced, a client that hangs up); returns
    the response, or b"" when `hang_up` closes the socket first."""
    content_type = kw.get("content_type", "multipart/form-data; boundary=XX")
    head = (
        f"POST {UPLOAD_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + body)
    await writer.drain()
    if kw.get("hang_up"):
        writer.close()
        await asyncio.sleep(0.3)  # the server notices
        return b""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE).group(1))
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    writer.close()
    return head + body


def _status_and_error(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


@pytest.mark.parametrize(
    "content_type, body",
    [
        ("multipart/form-data", FORM),  # no boundary
        ("multipart/form-data; boundary=XX", b""),  # empty
        ("multipart/form-data; boundary=XX", FORM[:40]),  # cut inside the part's headers
        ("multipart/form-data; boundary=XX", FORM[:-10]),  # cut inside the part
        ("multipart/form-data; boundary=XX", b"garbage" * 10),
    ],
)
def test_a_malformed_multipart_body_is_a_400_not_a_500(content_type, body):
    async def main():
        async with running(gateway_config(http_port=0), EchoEngine()) as gw:
            return await _raw_post(gw.rest.port, body, content_type=content_type)

    status, error = _status_and_error(asyncio.run(main()))
    assert status == 400 and error["code"] == "invalid_form"
    assert error["type"] == "invalid_request_error" and error["message"]


def test_a_body_that_never_all_arrives_times_out_with_408():
    """5,000 bytes announced, 200 sent: a 408 after server.upload_timeout_s, not a hang."""

    async def main():
        async with running(gateway_config(http_port=0, upload_timeout_s=0.5), EchoEngine()) as gw:
            started = asyncio.get_running_loop().time()
            response = await _raw_post(gw.rest.port, FORM + b"x" * 150, length=5000)
            return response, asyncio.get_running_loop().time() - started

    response, elapsed = asyncio.run(main())
    status, error = _status_and_error(response)
    assert status == 408 and error["code"] == "upload_timeout" and elapsed < 5


def test_audio_longer_than_max_upload_s_is_a_413(wav, clips):
    def run(gw):
        with pytest.raises(openai.APIStatusError) as err:
            transcribe(gw, wav)
        return err.value, transcribe(gw, wav[:20000])

    err, short = serve(run, max_upload_s=1.0)
    assert len(clips[0][1]) > RATE and err.status_code == 413
    assert err.code == "audio_too_long" and "server.max_upload_s" in err.message
    assert short.text  # within the limit


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_decoding_stops_at_the_length_cap(clips, fmt):
    """From the header's length where it gives one, else block by block while decoding."""
    from streaming.transport.rest import ApiError, decode_upload

    data = encode(clips[0][1][: 3 * RATE], fmt)
    with pytest.raises(ApiError) as err:
        decode_upload(data, "a", max_s=1.0)
    assert (err.value.status, err.value.code) == (413, "audio_too_long")
    assert len(decode_upload(data, "a", max_s=3.0)) == 3 * RATE


def test_a_client_that_hangs_up_is_one_warning_not_an_error_traceback(caplog):
    async def main():
        async with running(gateway_config(http_port=0), EchoEngine()) as gw:
            await _raw_post(gw.rest.port, FORM[:60], length=5000, hang_up=True)

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    warnings = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is None


def test_aiohttp_server_errors_from_clients_are_downgraded():
    """aiohttp's own "Error handling request" traceback for a client error becomes one line."""
    from streaming.transport.rest import QuietServerLog

    try:
        raise ConnectionResetError("Connection lost")
    except ConnectionResetError:
        record = logging.LogRecord(
            "aiohttp.server",
            logging.ERROR,
            __file__,
            1,
            "Error handling request from %s",
            ("127.0.0.1",),
            sys.exc_info(),
        )
    assert QuietServerLog().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == (
        "Error handling request from 127.0.0.1: ConnectionResetError: Connection lost"
    )

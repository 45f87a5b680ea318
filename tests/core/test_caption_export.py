"""`streamscribe transcribe --format txt|json|srt|vtt`, in process, with a fake engine and with the
tiny Granite checkpoint; SRT and WebVTT checked by a parser written from the formats' rules.

WebVTT (W3C WebVTT, "file structure"): the file starts with "WEBVTT" (then a space or tab and
text, or the line end), a blank line; blocks are separated by blank lines; a cue is an optional
identifier line (without "-->"), a timing line "[hh:]mm:ss.ttt --> [hh:]mm:ss.ttt" (optionally
followed by settings), then text lines, none empty or containing "-->"; "&", "<" and ">" in text
are escaped. SRT (SubRip): blocks separated by blank lines, each a counter from 1, a timing line
"hh:mm:ss,ttt --> hh:mm:ss,ttt" and text lines.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re

import httpx
import numpy as np
import pytest
import soundfile as sf

from engine.api import Hypothesis, Segment, Word
from streaming.cli import main
from streaming.core.captions import cues_from_words, to_srt, to_vtt
from tests.gateway_harness import gateway_config, running
from tests.streams import joined, librivox_clips

VTT_TIME = r"(?:(\d{2,}):)?([0-5]\d):([0-5]\d)\.(\d{3})"
SRT_TIME = r"(\d{2,}):([0-5]\d):([0-5]\d),(\d{3})"
Cue = tuple[int, int, list[str]]  # start ms, end ms, text lines


def _ms(hours: str | None, minutes: str, seconds: str, millis: str) -> int:
    return ((int(hours or 0) * 60 + int(minutes)) * 60 + int(seconds)) * 1000 + int(millis)


def _blocks(text: str) -> list[list[str]]:
    assert "\r" not in text and (not text or text.endswith("\n"))
    return [block.split("\n") for block in re.split(r"\n{2,}", text.strip("\n")) if block]


def parse_vtt(text: str) -> list[Cue]:
    header, *blocks = _blocks(text)
    assert re.fullmatch(r"WEBVTT([ \t].*)?", header[0]) and len(header) == 1, header
    cues = []
    for block in blocks:
        if "-->" not in block[0]:
            block = block[1:]  # the cue identifier
        timing = re.fullmatch(rf"{VTT_TIME} --> {VTT_TIME}(?:[ \t].*)?", block[0])
        assert timing, block
        lines = block[1:]
        assert lines and all(line and "-->" not in line for line in lines), block
        assert all(not re.search(r"&(?!amp;|lt;|gt;)|<|>", line) for line in lines), block
        groups = timing.groups()
        cues.append((_ms(*groups[:4]), _ms(*groups[4:]), [html.unescape(x) for x in lines]))
    return cues


def parse_srt(text: str) -> list[Cue]:
    cues = []
    for number, block in enumerate(_blocks(text), 1):
        assert block[0] == str(number), block
        timing = re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", block[1])
        assert timing, block
        lines = block[2:]
        assert lines and all(lines), block
        groups = timing.groups()
        cues.append((_ms(*groups[:4]), _ms(*groups[4:]), lines))
    return cues


def check_file_cues(cues: list[Cue], width: int = 42) -> None:
    """Timestamps increase, no overlaps, at most two lines within the width, 1-7 s, <= 17 cps."""
    for start, end, lines in cues:
        assert 1000 <= end - start <= 7000, (start, end, lines)
        assert len(lines) <= 2 and all(len(line) <= width for line in lines), lines
        assert sum(map(len, lines)) * 1000 / (end - start) <= 17.0 + 1e-9, lines
    for (start, end, _), (next_start, _, _) in zip(cues, cues[1:], strict=False):
        assert start < next_start and end <= next_start


# --- the parser itself ----------------------------------------------------------------------


def test_parser_rejects_what_the_formats_forbid():
    good_vtt = "WEBVTT\n\n1\n00:01.000 --> 00:02.500 align:start\na &amp; b\n"
    assert parse_vtt(good_vtt) == [(1000, 2500, ["a & b"])]
    for bad in (
        "WEBVTT-ish\n\n00:01.000 --> 00:02.000\nx\n",  # header
        "WEBVTT\n\n00:01.000 -> 00:02.000\nx\n",  # arrow
        "WEBVTT\n\n00:01,000 --> 00:02.000\nx\n",  # SRT decimal comma
        "WEBVTT\n\n00:01.000 --> 00:02.000\na <b\n",  # unescaped <
    ):
        with pytest.raises(AssertionError):
            parse_vtt(bad)
    with pytest.raises(AssertionError):
        parse_srt("2\n00:00:01,000 --> 00:00:02,000\nx\n")  # counter must start at 1
    with pytest.raises(AssertionError):
        check_file_cues([(0, 1500, ["a"]), (1000, 2500, ["b"])])  # overlap


# --- the CLI with a fake engine ---------------------------------------------------------------

SPEECH = (
    "And Mr. John Dashwood had then leisure to consider how much there might be prudently in "
    "his power to do for them. He was not an ill-disposed young man, unless to be rather "
    "cold-hearted and rather selfish is to be ill-disposed. <Applause> & cheers."
)


class WordsEngine:
    """Speaks SPEECH evenly across whatever audio it is given."""

    family, device = "fake", "cpu"

    def transcribe(self, segments):
        return [self._answer(s) for s in segments]

    draft = transcribe

    @staticmethod
    def _answer(segment: Segment) -> Hypothesis:
        duration = len(segment.audio) * 1000 // segment.sample_rate
        tokens = SPEECH.split()
        step = duration // len(tokens)
        words = [Word(t, i * step, i * step + step - 40, 0.8) for i, t in enumerate(tokens)]
        return Hypothesis(SPEECH, words=words, confidence=0.8, duration_ms=duration)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr("engine.selection.load_engine", lambda **kw: WordsEngine())
    for var in [v for v in os.environ if v.startswith("STREAMSCRIBE_")]:
        monkeypatch.delenv(var)


@pytest.fixture
def wav(tmp_path):
    path = tmp_path / "talk.wav"
    sf.write(path, np.zeros(16000 * 20, dtype=np.float32), 16000, subtype="PCM_16")
    return str(path)


def words_of(cues: list[Cue]) -> list[str]:
    return " ".join(" ".join(lines) for _, _, lines in cues).split()


def test_srt_to_stdout(fake, wav, capsys):
    assert main(["transcribe", "--format", "srt", wav]) == 0
    out, err = capsys.readouterr()
    cues = parse_srt(out)
    check_file_cues(cues)
    assert words_of(cues) == SPEECH.split() and err == ""
    assert cues[0][0] == 0 and cues[-1][1] <= 20_000 + 7000


def test_vtt_to_a_file_escapes_markup(fake, wav, tmp_path, capsys):
    target = tmp_path / "talk.vtt"
    assert main(["transcribe", "--format", "vtt", "--output", str(target), wav]) == 0
    assert capsys.readouterr().out == ""
    text = target.read_text(encoding="utf-8")
    assert "&lt;Applause&gt; &amp; cheers." in text
    cues = parse_vtt(text)
    check_file_cues(cues)
    assert words_of(cues) == SPEECH.split()
    assert main(["transcribe", "--format", "srt", wav]) == 0
    assert parse_srt(capsys.readouterr().out) == cues  # the same cues in either format


def test_txt_and_json_formats_and_the_json_alias(fake, wav, tmp_path, capsys):
    assert main(["transcribe", "--format", "txt", wav]) == 0
    assert capsys.readouterr().out == SPEECH + "\n"
    assert main(["transcribe", "--format", "json", wav]) == 0
    as_format = capsys.readouterr().out
    assert main(["transcribe", "--json", wav]) == 0
    assert capsys.readouterr().out == as_format
    record = json.loads(as_format)
    assert record["file"] == wav and record["text"] == SPEECH
    target = tmp_path / "out.jsonl"
    assert main(["transcribe", "--json", "--output", str(target), wav, wav]) == 0
    assert [json.loads(line)["file"] for line in target.read_text().splitlines()] == [wav, wav]


def test_caption_formats_take_one_file(fake, wav, capsys):
    assert main(["transcribe", "--format", "vtt", wav, wav]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--format vtt takes one file" in err


def test_unreadable_file_gives_no_captions_and_exit_1(fake, tmp_path, capsys):
    assert main(["transcribe", "--format", "srt", str(tmp_path / "missing.wav")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "missing.wav" in err


def test_output_that_cannot_be_written_is_an_error(fake, wav, tmp_path, capsys):
    assert main(["transcribe", "--output", str(tmp_path / "no" / "such" / "dir.srt"), wav]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_silence_gives_an_empty_but_valid_file(monkeypatch, wav, capsys):
    class Silent(WordsEngine):
        def transcribe(self, segments):
            return [Hypothesis("") for _ in segments]

    monkeypatch.setattr("engine.selection.load_engine", lambda **kw: Silent())
    assert main(["transcribe", "--format", "vtt", wav]) == 0
    assert parse_vtt(capsys.readouterr().out) == []


# --- the CLI and the OpenAI-compatible endpoint: one cue builder and writer -----------------


def rest_captions(data: bytes, fmt: str) -> str:
    """The file's captions from POST /v1/audio/transcriptions, served with WordsEngine."""

    def post(port: int) -> str:
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/audio/transcriptions",
            files={"file": ("talk.wav", data), "response_format": (None, fmt)},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return response.text

    async def serve() -> str:
        async with running(gateway_config(), WordsEngine()) as gw:
            return await asyncio.to_thread(post, gw.rest.port)

    return asyncio.run(serve())


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_cli_and_rest_endpoint_write_the_same_captions(fmt, fake, tmp_path, capsys):
    """The same words and audio give byte-identical files, whose last cue, held for reading
    after fast speech, still ends with the 7.1 s of audio."""
    path = tmp_path / "short.wav"
    sf.write(path, np.zeros(113_600, dtype=np.float32), 16000, subtype="PCM_16")
    assert main(["transcribe", "--format", fmt, str(path)]) == 0
    from_cli = capsys.readouterr().out
    assert rest_captions(path.read_bytes(), fmt) == from_cli
    cues = parse_srt(from_cli) if fmt == "srt" else parse_vtt(from_cli)
    assert words_of(cues) == SPEECH.split() and cues[-1][1] <= 7100
    for (start, end, _), (next_start, _, _) in zip(cues, cues[1:], strict=False):
        assert start < end <= next_start


# --- the CLI with the tiny Granite checkpoint --------------------------------------------------


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_tiny_granite_checkpoint_captions(fmt, tiny_checkpoint, tiny_engine, tmp_path, capsys):
    """Random weights give junk: words of control and replacement characters, longer than 7 s,
    overlapping where the engine's windows overlap. The file must still be valid."""
    audio = joined([clip for _, clip, _ in librivox_clips()])
    path = tmp_path / "speech.wav"
    sf.write(path, audio, 16000, subtype="FLOAT")
    argv = ["transcribe", "--model", str(tiny_checkpoint), "--device", "cpu", "--format", fmt]
    assert main([*argv, str(path)]) == 0
    out = capsys.readouterr().out
    (expected,) = tiny_engine.transcribe([Segment(audio)])
    write = to_srt if fmt == "srt" else to_vtt
    assert out == write(cues_from_words(expected.words, duration_ms=expected.duration_ms))
    cues = parse_srt(out) if fmt == "srt" else parse_vtt(out)
    assert cues, "the tiny checkpoint should emit printable characters on speech"
    check_file_cues(cues)
    printable = [c for w in expected.words for c in w.word if c.isprintable() and c != " "]
    assert "".join(words_of(cues)) == "".join(printable)

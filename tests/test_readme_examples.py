"""The README's client snippets, run as written against a loopback server with a test engine.

A snippet names what a reader changes (server address, audio file) in top-level assignments;
the test rebinds exactly those names and runs the block as a script in a fresh interpreter, so
a snippet that stops working, or a README edit that drops those names, fails here.
"""

from __future__ import annotations

import ast
import asyncio
import re
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine.api import Hypothesis
from tests.gateway_harness import EchoEngine, gateway_config, running
from tests.streams import RATE, joined, librivox_clips, to_s16le

README = Path(__file__).resolve().parents[1] / "README.md"


def section(heading: str) -> str:
    """The README text under the heading that starts with `heading`, up to the next heading of
    the same or a higher level."""
    text = README.read_text(encoding="utf-8")
    level = len(heading) - len(heading.lstrip("#"))
    match = re.search(rf"^{re.escape(heading)}.*$", text, flags=re.M)
    assert match, f"README has no heading {heading!r}"
    end = re.compile(rf"^#{{1,{level}}} ", flags=re.M).search(text, match.end())
    return text[match.end() : end.start() if end else len(text)]


def python_block(heading: str) -> str:
    """The first ```python block of a README section."""
    match = re.search(r"^```python\n(.*?)^```$", section(heading), flags=re.M | re.S)
    assert match, f"no ```python block under {heading!r}"
    return match.group(1)


def rebind(code: str, **values: str) -> str:
    """`code` with the top-level assignments `NAME = ...` of `values` set to the given values."""
    tree = ast.parse(code)
    found = set()
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in values
        ):
            node.value = ast.Constant(values[node.targets[0].id])
            found.add(node.targets[0].id)
    missing = set(values) - found
    assert not missing, f"the snippet no longer assigns {sorted(missing)} at its top level"
    return ast.unparse(tree)


async def run_script(code: str, cwd: Path, timeout_s: float = 120.0) -> str:
    """Run `code` in a new interpreter (the snippets call asyncio.run themselves) and return
    its standard output; fails with its standard error when it exits non-zero."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout_s):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


class RecordingEngine(EchoEngine):
    """EchoEngine that keeps every final hypothesis it produced, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.finals: list[Hypothesis] = []

    def transcribe(self, segments):
        hypotheses = super().transcribe(segments)
        self.finals.extend(hypotheses)
        return hypotheses


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [audio for _, audio, _ in librivox_clips()[:2]]


def test_deepgram_snippet_prints_each_final(clips, tmp_path):
    """Two utterances streamed through the official SDK: the snippet prints one line per final,
    each the engine's text for that segment."""
    path = tmp_path / "speech.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(to_s16le(joined(clips)))
    engine = RecordingEngine()
    snippet = python_block("### Deepgram-compatible")

    async def main() -> str:
        async with running(gateway_config(), engine) as gw:
            code = rebind(snippet, SERVER=f"127.0.0.1:{gw.port}", AUDIO=str(path))
            return await run_script(code, tmp_path)

    printed = asyncio.run(main()).splitlines()
    texts = [h.text for h in engine.finals]
    assert len(texts) == 2 and all(texts)  # one final per utterance, each with words
    assert printed == texts


def test_openai_snippet_prints_text_and_word_times(clips, tmp_path):
    """A FLAC file through the official client: the snippet prints the engine's text, then each
    word with the engine's times in seconds."""
    path = tmp_path / "speech.flac"
    sf.write(path, clips[0], RATE, format="FLAC")
    engine = RecordingEngine()
    snippet = python_block("### OpenAI-compatible")

    async def main() -> str:
        async with running(gateway_config(http_port=0), engine) as gw:
            code = rebind(snippet, BASE_URL=f"http://127.0.0.1:{gw.rest.port}/v1", AUDIO=str(path))
            return await run_script(code, tmp_path)

    text, *word_lines = asyncio.run(main()).splitlines()
    (hypothesis,) = engine.finals
    assert hypothesis.words and text == hypothesis.text
    printed = [line.split() for line in word_lines]
    assert [p[2] for p in printed] == [w.word for w in hypothesis.words]
    for (start, end, _), word in zip(printed, hypothesis.words, strict=True):
        assert float(start) == pytest.approx(word.start_ms / 1000, abs=0.006)
        assert float(end) == pytest.approx(word.end_ms / 1000, abs=0.006)


def test_rebind_requires_the_documented_names():
    """A snippet that hard-codes its address instead of naming it fails loudly, not silently
    against the default port."""
    with pytest.raises(AssertionError, match="SERVER"):
        rebind('print("ws://127.0.0.1:8765")\n', SERVER="127.0.0.1:1")
    assert rebind('SERVER = "a"\nprint(SERVER)\n', SERVER="b") == "SERVER = 'b'\nprint(SERVER)"

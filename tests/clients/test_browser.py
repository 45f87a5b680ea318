"""The browser page (clients/web/) in headless Chromium against an in-process gateway.

The microphone is Chromium's fake capture device playing a WAV of real LibriVox speech, so the
whole path runs: getUserMedia -> AudioWorklet downsampling to 16 kHz -> WebSocket -> the real CPU
model -> finals on the page. Screenshots go to artifacts/ at the repository root.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import importlib.util
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from streaming.ops.config import SessionConfig
from tests.gateway_harness import EchoEngine, gateway_config, http_get, running
from tests.streams import RATE, joined, librivox_clips

CHROMIUM = Path("/usr/bin/chromium")
WEB = Path(__file__).resolve().parents[2] / "clients" / "web"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]
LOCAL = re.compile(r"(https?|wss?)://127\.0\.0\.1:\d+/|data:")
# Servers with roll-up captions send `caption.append`; the page builds its own otherwise.
CAPTIONS_SOURCE = (
    "(from the server)"
    if "captions_mode" in {f.name for f in dataclasses.fields(SessionConfig)}
    else "(built in the page)"
)
WORDS_JS = "id => document.getElementById(id).innerText.toLowerCase().match(/[a-z']+/g) ?? []"

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian package chromium is not installed (apt-get install chromium)",
)
needs_playwright = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None,
    reason="Python playwright is not installed (pip install -e '.[dev]')",
)


def browser_test(test):
    return needs_chromium(needs_playwright(test))


def real_model():
    pytest.importorskip("faster_whisper", reason="pip install -e '.[cpu]'")
    from engine.whisper import load_engine

    return load_engine("tiny.en")


@contextlib.asynccontextmanager
async def chromium(fake_audio: Path | None = None):
    """A page in a fresh headless Chromium whose fake microphone plays `fake_audio` (looped).
    Yields the page and a list that collects page errors and requests that leave loopback."""
    from playwright.async_api import async_playwright

    args = list(LAUNCH_ARGS)
    if fake_audio is not None:
        # Chromium reads PCM WAV for the fake device and resamples it to the device rate.
        args.append(f"--use-file-for-fake-audio-capture={fake_audio}")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.on("request", lambda r: LOCAL.match(r.url) or errors.append(f"request {r.url}"))
            page.on("websocket", lambda ws: LOCAL.match(ws.url) or errors.append(f"ws {ws.url}"))
            yield page, errors
        finally:
            await browser.close()


async def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


async def wait_for_words(page, element: str, expected: set[str], count: int, timeout_s: float):
    await page.wait_for_function(
        f"([id, expected, count]) => ({WORDS_JS})(id).filter(w => expected.includes(w)).length"
        " >= count",
        arg=[element, sorted(expected), count],
        timeout=timeout_s * 1000,
    )


async def wait_closed(page, timeout_s: float = 60) -> None:
    await page.wait_for_function(
        "document.getElementById('state').dataset.kind === 'closed'", timeout=timeout_s * 1000
    )


# Records how each non-empty volatile tail was styled, against its stable text, as it appears.
WATCH_VOLATILE = """() => {
  window.volatileSeen = [];
  const partials = document.getElementById('partials');
  new MutationObserver(() => {
    for (const tail of partials.querySelectorAll('.volatile')) {
      if (!tail.textContent) continue;
      const stable = getComputedStyle(tail.parentElement.querySelector('.stable'));
      const style = getComputedStyle(tail);
      window.volatileSeen.push([style.fontStyle, style.color, stable.fontStyle, stable.color]);
    }
  }).observe(partials, {childList: true, subtree: true, characterData: true});
}"""


async def figures(page) -> dict[str, str]:
    ids = ["audio-sent", "first-partial", "finalization", "finalization-detail", "captions"]
    ids.append("captions-source")
    return {i: await page.inner_text(f"#{i}") for i in ids}


def check_figures(shown: dict[str, str]) -> None:
    assert re.fullmatch(r"\d+\.\d s", shown["audio-sent"]) and shown["audio-sent"] != "0.0 s"
    assert re.fullmatch(r"\d+ ms", shown["first-partial"]), shown
    assert re.fullmatch(r"\d+ ms", shown["finalization"]), shown
    assert re.fullmatch(r"endpoint \d+ · queue \d+ · compute \d+", shown["finalization-detail"])
    assert shown["captions-source"] == CAPTIONS_SOURCE
    rows = shown["captions"].split("\n")
    assert 1 <= len(rows) <= 3 and all(0 < len(row) <= 32 for row in rows), rows


def write_wav(path: Path, audio: np.ndarray, rate: int = RATE) -> Path:
    sf.write(path, audio, rate, subtype="PCM_16")
    return path


# --- the page with real speech and the real CPU model ------------------------------------------


@browser_test
def test_microphone_real_speech_reaches_finals(tmp_path):
    engine = real_model()
    clips = librivox_clips()[:2]  # "and mister john dashwood had then leisure to consider ..."
    wav = write_wav(tmp_path / "speech.wav", joined([a for _, a, _ in clips], silence_s=1.0))
    expected = {"dashwood", "leisure", "consider", "prudently", "power"}

    async def main():
        async with running(gateway_config(), engine, timeout_s=120) as gw:
            async with chromium(wav) as (page, errors):
                await page.goto(f"http://127.0.0.1:{gw.port}/")
                assert (
                    await page.input_value("#server-url") == f"ws://127.0.0.1:{gw.port}/v1/stream"
                )
                await page.evaluate(WATCH_VOLATILE)
                await page.click("#start")
                await page.wait_for_selector("#partials .volatile:not(:empty)", timeout=60_000)
                await screenshot(page, "browser-partial.png")
                await wait_for_words(page, "finals", expected, 3, timeout_s=90)
                shown = await figures(page)
                seen = await page.evaluate("window.volatileSeen")
                await page.click("#stop")
                await wait_closed(page)
                state = await page.inner_text("#state")
                await screenshot(page, "browser-microphone.png")
                finals = await page.inner_text("#finals")
                return shown, seen, state, finals, errors

    shown, seen, state, finals, errors = asyncio.run(main())
    assert not errors
    check_figures(shown)
    assert re.fullmatch(r"closed: \d+\.\d s of audio, \d+ segments?", state), state
    assert "dashwood" in finals.lower()
    # The first partial of a segment is all volatile (nothing agreed yet): grey italic tails.
    assert seen, "no partial with a volatile tail was shown"
    for tail_style, tail_color, stable_style, stable_color in seen:
        assert tail_style == "italic" and stable_style == "normal" and tail_color != stable_color


@browser_test
def test_chosen_file_is_decoded_resampled_and_streamed_at_real_time(tmp_path):
    engine = real_model()
    _, clip, reference = librivox_clips()[3]  # "had he married a more a amiable woman ..."
    audio = joined([clip], silence_s=1.0)
    # A 48 kHz stereo FLAC: the page must decode, downmix and resample it to 16 kHz itself.
    stereo = np.stack([resample_poly(audio, 3, 1)] * 2, axis=1)
    path = tmp_path / "speech.flac"
    sf.write(path, stereo, 48000, subtype="PCM_16")
    expected = {"married", "amiable", "woman", "respectable"}

    async def main():
        async with running(gateway_config(), engine, timeout_s=120) as gw:
            async with chromium() as (page, errors):
                await page.goto(f"http://127.0.0.1:{gw.port}/")
                started = asyncio.get_running_loop().time()
                await page.set_input_files("#file", str(path))
                await wait_closed(page, timeout_s=90)
                elapsed = asyncio.get_running_loop().time() - started
                shown = await figures(page)
                state = await page.inner_text("#state")
                finals = await page.evaluate(WORDS_JS, "finals")
                await screenshot(page, "browser-file.png")
                return elapsed, shown, state, finals, errors

    elapsed, shown, state, finals, errors = asyncio.run(main())
    assert not errors
    check_figures(shown)
    seconds = len(audio) / RATE
    closed = re.fullmatch(r"closed: (\d+\.\d) s of audio, 1 segment", state)
    assert closed and abs(float(closed[1]) - seconds) <= 0.1, (state, reference)
    assert elapsed >= seconds - 0.5  # paced at real time, not sent at once
    assert len(expected & set(finals)) >= 3, (finals, reference)


# --- the page's code paths with the instant fake engine -----------------------------------------


@browser_test
def test_dropped_file_is_streamed(tmp_path):
    audio = joined([librivox_clips()[1][1]], silence_s=0.5)  # 4 s
    data = base64.b64encode((write_wav(tmp_path / "drop.wav", audio)).read_bytes()).decode()
    drop = """data => {
      const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
      const transfer = new DataTransfer();
      transfer.items.add(new File([bytes], 'drop.wav', {type: 'audio/wav'}));
      const zone = document.getElementById('drop');
      zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: transfer, bubbles: true}));
      zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    }"""

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with chromium() as (page, errors):
                await page.goto(f"http://127.0.0.1:{gw.port}/")
                await page.evaluate(drop, data)
                await wait_closed(page, timeout_s=30)
                return await page.inner_text("#state"), await figures(page), errors

    state, shown, errors = asyncio.run(main())
    assert not errors
    assert state == f"closed: {len(audio) / RATE:.1f} s of audio, 1 segment"
    check_figures(shown)
    assert shown["captions"].startswith("w0 w1 w2")  # the fake engine's words, in order


@browser_test
def test_the_page_resumes_a_stream_after_a_network_drop(tmp_path):
    """The page's server is reached through a loopback proxy that drops every connection
    (no close frame) while a file streams: the page resumes, and the server gets the whole
    file once, with the same finals as an uncut stream."""
    from tests.clients.test_client_resume import CuttableProxy

    audio = joined([librivox_clips()[1][1], librivox_clips()[2][1]], silence_s=0.5)
    path = write_wav(tmp_path / "speech.wav", audio)

    async def stream(page, url: str, cut=None) -> tuple[str, list[str]]:
        await page.goto(url)
        await page.set_input_files("#file", str(path))
        if cut is not None:
            await asyncio.sleep(2.5)  # mid-file (streamed at real time)
            cut()
        await wait_closed(page, timeout_s=60)
        return await page.inner_text("#state"), await page.evaluate(WORDS_JS, "finals")

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            proxy = CuttableProxy(gw.port)
            port = await proxy.start()
            async with chromium() as (page, errors):
                uncut = await stream(page, f"http://127.0.0.1:{gw.port}/")
                resumes = gw.metrics.resumes.labels("resumed")._value.get()
                cut = await stream(page, f"http://127.0.0.1:{port}/", proxy.cut)
                resumed = gw.metrics.resumes.labels("resumed")._value.get() - resumes
            proxy.close()
            return uncut, cut, resumed, errors

    uncut, cut, resumed, errors = asyncio.run(main())
    assert not errors and resumed == 1
    assert uncut[0] == cut[0] == f"closed: {len(audio) / RATE:.1f} s of audio, 2 segments"
    assert cut[1] == uncut[1] and uncut[1]  # the same finals, none lost or doubled


@browser_test
def test_api_key_is_swapped_for_a_token_sent_as_a_subprotocol():
    """With a key, the page gets a stream token from the REST port (another origin: CORS) and
    offers it as the subprotocol `token.<TOKEN>`; no key or token appears in any URL."""

    async def main():
        async with running(gateway_config(api_keys="secret"), EchoEngine()) as gw:
            rest_port = gw.rest.port
            handshakes = []
            process_request = gw.server.process_request

            def spy(connection, request):
                handshakes.append(request)
                return process_request(connection, request)

            gw.server.process_request = spy
            async with chromium() as (page, errors):
                urls = []
                page.on("request", lambda r: urls.append(r.url))
                page.on("websocket", lambda ws: urls.append(ws.url))
                await page.goto(f"http://127.0.0.1:{gw.port}/")  # the page itself needs no key
                await page.click("#start")
                await page.wait_for_function(
                    "document.getElementById('state').dataset.kind === 'error'", timeout=30_000
                )
                refused = await page.inner_text("#state")
                await page.fill("#api-key", "wrong")
                await page.click("#start")
                await page.wait_for_function(
                    "document.getElementById('state').dataset.kind === 'error'"
                    " && document.getElementById('state').innerText.includes('token')",
                    timeout=30_000,
                )
                wrong = await page.inner_text("#state")
                await page.fill("#api-key", "secret")
                await page.click("#start")
                await page.wait_for_function(
                    "document.getElementById('state').dataset.kind === 'streaming'",
                    timeout=30_000,
                )
                opened = len(gw.connections)
                await page.click("#stop")
                await wait_closed(page)
                closed = await page.inner_text("#state")
        streams = [r for r in handshakes if r.path.startswith("/v1/stream")]
        offered = [r.headers.get("Sec-WebSocket-Protocol", "") for r in streams]
        return refused, wrong, closed, opened, offered, urls, rest_port, errors

    refused, wrong, closed, opened, offered, urls, rest_port, errors = asyncio.run(main())
    assert not errors
    assert refused == "server refused the stream: 401 missing or invalid API key"
    assert wrong == "could not get a token: 401 missing or invalid API key"
    assert closed.startswith("closed: ") and opened == 1
    assert offered[0] == "" and offered[-1].startswith("token.") and "secret" not in offered[-1]
    assert f"http://127.0.0.1:{rest_port}/v1/auth/token" in urls
    assert not [u for u in urls if "secret" in u or "token=" in u or "api_key" in u]


@browser_test
def test_downsampler_pcm_and_captions_in_the_browser():
    """The page's own modules, run in Chromium; the numbers are checked here."""
    run = """async () => {
      const pcm = await import('/web/pcm.js');
      const captions = await import('/web/captions.js');
      const tone = (rate, hz, seconds) => Float32Array.from(
        {length: Math.round(rate * seconds)},
        (_, i) => 0.5 * Math.sin(2 * Math.PI * hz * i / rate));
      const down = (rate, input, blocks) => {
        const d = new pcm.Downsampler(rate);
        const out = [];
        for (let i = 0, b = 0; i < input.length; b++) {
          const size = blocks[b % blocks.length];
          out.push(...d.process(input.subarray(i, i + size)));
          i += size;
        }
        return out;
      };
      const roll = new captions.RollUp();
      roll.push('and mister john dashwood had then leisure to consider how much there might be'
        .split(' '));
      const afterTwelve = roll.text();
      roll.push(['x'.repeat(40), 'end']);
      const server = new captions.RollUp();
      for (const [text, row_break] of [['and mister', true], [' john', false], ['dashwood', true],
                                       ['had', true], ['>> then', true]]) {
        server.append({text, row_break, rows: 3});
      }
      const committed = new captions.CommittedWords();
      const seg = (id, extra) => ({channel: 0, segment_id: id, ...extra});
      return {
        speech48: down(48000, tone(48000, 1000, 0.5), [128]),
        speech48Blocks: down(48000, tone(48000, 1000, 0.5), [37, 1000, 128, 1]),
        alias48: down(48000, tone(48000, 12000, 0.5), [128]),
        speech441: down(44100, tone(44100, 1000, 0.5), [128]),
        alias441: down(44100, tone(44100, 10000, 0.5), [128]),
        pass16: down(16000, Float32Array.of(0.25, -0.5, 1), [2]),
        s16: Array.from(new Uint8Array(pcm.floatToS16(Float32Array.of(0, 1, -1, 2, -2, 0.5)))),
        frame: pcm.FRAME_SAMPLES,
        afterTwelve,
        afterLong: roll.text(),
        server: server.text(),
        committed: [
          committed.partial(seg(1, {stable_text: 'and mister', volatile_text: 'john'})),
          committed.partial(seg(1, {stable_text: 'and mister john', volatile_text: ''})),
          committed.partial(seg(2, {stable_text: 'he was', volatile_text: 'not'})),
          committed.final(seg(1, {text: 'And Mr. John Dashwood had'})),
          committed.final(seg(2, {text: 'He'})),
          committed.partial(seg(3, {stable_text: 'a more a amiable woman he might have been'})),
          committed.final(seg(3, {text: 'a more amiable woman, he might have been made still'})),
          committed.final(seg(4, {text: 'unless to be'})),
        ],
      };
    }"""

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with chromium() as (page, errors):
                await page.goto(f"http://127.0.0.1:{gw.port}/")
                return await page.evaluate(run), errors

    result, errors = asyncio.run(main())
    assert not errors

    def rms(samples) -> float:
        return float(np.sqrt(np.mean(np.square(samples[200:-200]))))

    for name, rate in (("speech48", 48000), ("speech441", 44100)):
        out = np.array(result[name])
        assert abs(len(out) - RATE / 2) <= 1, (name, len(out))
        assert rms(out) == pytest.approx(0.5 / np.sqrt(2), rel=0.02), name
        crossings = np.count_nonzero(np.diff(np.signbit(out[200:-200])))
        assert crossings / 2 / ((len(out) - 400) / RATE) == pytest.approx(1000, rel=0.02), name
        # A tone above 8 kHz would fold back into the speech band without the low-pass.
        assert rms(result[name.replace("speech", "alias")]) < 0.01 * 0.5 / np.sqrt(2), rate
    np.testing.assert_allclose(result["speech48Blocks"], result["speech48"], atol=1e-6)
    np.testing.assert_allclose(result["pass16"], [0.25, -0.5, 1.0], atol=1e-7)
    assert bytes(result["s16"]) == struct.pack("<6h", 0, 32767, -32767, 32767, -32767, 16384)
    assert result["frame"] == 1600
    assert result["afterTwelve"].split("\n") == [
        "and mister john dashwood had",
        "then leisure to consider how",
        "much there might be",
    ]
    assert result["afterLong"].split("\n") == ["much there might be", "x" * 32, "xxxxxxxx end"]
    assert result["server"].split("\n") == ["dashwood", "had", ">> then"]
    assert result["committed"] == [
        ["and", "mister"],
        ["john"],
        ["he", "was"],
        ["Dashwood", "had"],  # "Mr." is the "mister" already shown
        [],
        "a more a amiable woman he might have been".split(),
        ["made", "still"],  # the word the final drops does not repeat the ones after it
        ["unless", "to", "be"],
    ]


# --- static serving --------------------------------------------------------------------------


def test_page_and_assets_are_served_with_types_and_no_traversal():
    async def main():
        async with running(gateway_config(api_keys="secret"), EchoEngine()) as gw:
            paths = ["/", "/web/app.js", "/web/worklet.js", "/web/style.css", "/web/index.html"]
            found = {p: await http_get(gw.port, p) for p in paths}
            bad = [
                "/web/nope.js",
                "/web/",
                "/web/../streaming/server.py",
                "/web/%2e%2e/%2e%2e/streaming/server.py",
                "/web/..%2fapp.js",
                "/web/.hidden.js",
                "/web/web/app.js",
                "/index.html",
            ]
            missing = {p: await http_get(gw.port, p) for p in bad}
        return found, missing

    found, missing = asyncio.run(main())
    types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
    for path, (status, headers, _) in found.items():
        suffix = Path(path).suffix or ".html"
        assert status == 200 and headers["Content-Type"].startswith(types[suffix]), path
        assert headers["Cache-Control"] == "no-cache"
    assert found["/"][2] == (WEB / "index.html").read_text()
    assert found["/web/app.js"][2] == (WEB / "app.js").read_text()
    for path, (status, _, _) in missing.items():
        assert status == 404, path


def test_page_needs_nothing_from_the_network():
    for file in WEB.iterdir():
        text = file.read_text()
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import", text), file.name

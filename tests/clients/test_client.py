"""The Python client and the `stream` command against an in-process gateway over loopback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import signal
import socket
import threading
import time

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.client import (
    ClientError,
    ConnectionFailed,
    ConnectionLost,
    ServerUnavailable,
    SessionError,
    StreamscribeClient,
    read_pcm,
    session_url,
    stream_file,
    stream_pcm,
)
from clients.stream_cli import CLEAR_LINE, RESET, VOLATILE_STYLE, TextPrinter, add_stream_command
from streaming.core.audiofile import AudioFileError
from tests.gateway_harness import EchoEngine, gateway_config, running
from tests.streams import LIBRIVOX, RATE, chunks, joined, librivox_clips, to_s16le

SHORT_CLIP = LIBRIVOX / "sense_and_sensibility_01_austen_64kb-0880.wav"  # 2.99 s
ECHO_TEXT = re.compile(r"^w0( w\d+)*$")  # what EchoEngine says


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    return [audio for _, audio, _ in librivox_clips()[:2]]


@pytest.fixture(scope="module")
def short_clip():
    if not SHORT_CLIP.exists():
        pytest.skip("Debian package pocketsphinx-testdata is not installed")
    return SHORT_CLIP


@pytest.fixture
def two_clips_wav(speech, tmp_path):
    path = tmp_path / "two.wav"
    sf.write(path, joined(speech, silence_s=1.5), RATE, subtype="PCM_16")
    return path


def url(gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}/v1/stream"


def kinds(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- library ------------------------------------------------------------------------------


def test_connect_gives_session_id_and_effective_config():
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            options = dict(interim_results=False, hangover_ms=800, hotwords=["Elinor", "Dashwood"])
            async with StreamscribeClient.connect(
                url(gw), encoding="mulaw", sample_rate=8000, **options
            ) as client:
                session_id, config = client.session_id, client.config
                bytes_per_second = client.bytes_per_second
                closed = await client.close()
            events = [e async for e in client.events()]
            plain = await StreamscribeClient.connect(f"ws://127.0.0.1:{gw.port}")  # no path
            plain_config = plain.config
            await plain.close()
        return session_id, config, bytes_per_second, closed, events, plain_config

    session_id, config, bytes_per_second, closed, events, plain_config = asyncio.run(main())
    assert re.fullmatch(r"[0-9a-f]{32}", session_id)
    assert (config["encoding"], config["sample_rate"], config["channels"]) == ("mulaw", 8000, 1)
    assert config["interim_results"] is False and config["hangover_ms"] == 800
    assert bytes_per_second == 8000
    assert kinds(events) == ["session.started", "session.closed"]
    assert events[0]["session_id"] == session_id and events[-1] == closed
    assert closed["audio_ms"] == 0 and closed["reason"] == "client"
    assert plain_config["encoding"] == "pcm_s16le" and plain_config["sample_rate"] == 16000


def test_stream_file_in_real_time_gives_events_in_order(short_clip):
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            started = time.monotonic()
            events = [e async for e in stream_file(url(gw), short_clip, realtime=True)]
            return events, time.monotonic() - started

    events, elapsed = asyncio.run(main())
    order = kinds(events)
    assert order[0] == "session.started" and order[-1] == "session.closed"
    first_partial = order.index("transcript.partial")
    assert order.index("speech.started") < first_partial < order.index("transcript.final")
    assert order.count("transcript.final") == 1
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    partials = [e for e in events if e["type"] == "transcript.partial"]
    assert all(p["stable_text"] or p["volatile_text"] for p in partials)
    final = events[order.index("transcript.final")]
    assert ECHO_TEXT.match(final["text"]) and final["words"]
    assert events[-1]["audio_ms"] == 2990
    assert 2.8 <= elapsed < 8  # paced like a live source, not sent all at once


def test_close_returns_after_session_closed_and_concurrent_readers_lose_nothing(speech):
    async def main():
        async with running(gateway_config(), EchoEngine(delay_s=0.02)) as gw:
            client = await StreamscribeClient.connect(url(gw))
            seen: list[dict] = []

            async def read():
                async for event in client.events():
                    seen.append(event)

            reader = asyncio.create_task(read())
            for chunk in chunks(to_s16le(joined(speech)), RATE * 2 // 10):
                await client.send_audio(chunk)
                await asyncio.sleep(0)
            closed = await client.close()
            with pytest.raises(ClientError, match="closing"):
                await client.send_audio(b"\x00\x00")
            await asyncio.wait_for(reader, 10)
            return closed, seen

    closed, seen = asyncio.run(main())
    assert seen[-1] == closed and closed["type"] == "session.closed"
    # Every message the server numbered arrived, in order, and none after session.closed.
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
    assert kinds(seen).count("transcript.final") == 2 and closed["segments"] == 2


def test_finalize_update_and_keepalive_keep_the_session(speech):
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            async with StreamscribeClient.connect(url(gw)) as client:
                events = client.events()
                for chunk in chunks(to_s16le(speech[0][: RATE * 2]), RATE * 2 // 10):
                    await client.send_audio(chunk)  # mid-utterance
                await client.finalize()
                finals = []
                async for event in events:
                    if event["type"] == "transcript.final":
                        finals.append(event)
                        break
                await client.keepalive()
                await client.update(interim_results=False)
                await client.update(sample_rate=8000)  # fixed once the stream runs
                error = await anext(e async for e in events if e["type"] == "error")
                closed = await client.close()
        return finals, error, closed

    finals, error, closed = asyncio.run(main())
    assert finals[0]["from_finalize"] is True and ECHO_TEXT.match(finals[0]["text"])
    assert error["code"] == "invalid_update" and "sample_rate" in error["message"]
    assert closed["reason"] == "client" and closed["segments"] == 1


def test_session_cap_raises_server_unavailable_with_retry_after():
    async def main():
        async with running(gateway_config(max_sessions=1), EchoEngine()) as gw:
            async with StreamscribeClient.connect(url(gw)):
                with pytest.raises(ServerUnavailable) as refused:
                    await StreamscribeClient.connect(url(gw))
        return refused.value

    refused = asyncio.run(main())
    assert isinstance(refused, ConnectionFailed)
    assert refused.status == 503 and refused.retry_after == 5.0
    assert "HTTP 503" in str(refused) and "capacity" in str(refused)


def test_invalid_option_raises_session_error_with_the_server_code():
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            with pytest.raises(SessionError) as failed:
                await StreamscribeClient.connect(url(gw), vad_frame_ms=15)
        return failed.value

    error = asyncio.run(main())
    assert error.code == "invalid_config" and error.close_code == 4001
    assert "vad_frame_ms" in error.message and "invalid_config" in str(error)


def test_api_key_is_sent_as_bearer_and_a_refusal_is_not_unavailable():
    async def main():
        async with running(gateway_config(api_keys="k1,k2"), EchoEngine()) as gw:
            async with StreamscribeClient.connect(url(gw), api_key="k2") as client:
                session_id = client.session_id
            with pytest.raises(ConnectionFailed) as refused:
                await StreamscribeClient.connect(url(gw), api_key="wrong")
        return session_id, refused.value

    session_id, refused = asyncio.run(main())
    assert session_id and refused.status == 401 and not isinstance(refused, ServerUnavailable)


def test_a_dropped_connection_raises_connection_lost_and_a_drain_ends_cleanly(speech):
    async def main():
        # A short idle timeout bounds the drain: a connection idle in recv() notices the drain
        # only when that times out (server behaviour, reported separately).
        async with running(gateway_config(idle_timeout_s=2.0), EchoEngine()) as gw:
            client = await StreamscribeClient.connect(url(gw), reconnect=0)  # no resume
            await client.send_audio(to_s16le(speech[0][:RATE]))
            next(iter(gw.connections)).ws.transport.abort()
            with pytest.raises(ConnectionLost) as lost:
                async for _ in client.events():
                    pass
            with pytest.raises(ConnectionLost):
                await client.send_audio(b"\x00\x00")

            client = await StreamscribeClient.connect(url(gw))
            for chunk in chunks(to_s16le(speech[0][: RATE * 2]), RATE * 2 // 10):
                await client.send_audio(chunk)
            drain = asyncio.create_task(gw.drain())
            drained = [e async for e in client.events()]
            await drain
            return lost.value, drained

    lost, drained = asyncio.run(main())
    assert lost.close_code == 1006 and "dropped" in str(lost)
    assert drained[-1]["type"] == "session.closed" and drained[-1]["reason"] == "shutdown"
    assert "transcript.final" in kinds(drained)


def test_nothing_listening_is_a_connection_failure():
    async def main():
        with pytest.raises(ConnectionFailed) as failed:
            await StreamscribeClient.connect(f"ws://127.0.0.1:{closed_port()}", open_timeout=5)
        return failed.value

    failed = asyncio.run(main())
    assert failed.status is None and "cannot connect" in str(failed)


def test_a_failing_audio_source_hangs_up_and_raises(speech):
    async def source():
        yield to_s16le(speech[0][:RATE])
        raise OSError("microphone unplugged")

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            events = []
            with pytest.raises(OSError, match="unplugged"):
                async for event in stream_pcm(url(gw), source()):
                    events.append(event)
            for _ in range(100):
                if not gw.connections:
                    break
                await asyncio.sleep(0.02)
            return events, len(gw.connections)

    events, connections = asyncio.run(main())
    assert events[0]["type"] == "session.started" and connections == 0


def test_session_url_spells_options_like_the_protocol():
    built = session_url(
        "ws://h:1?api_key=x",
        {"interim_results": False, "hotwords": ["a", "b c"], "language": None, "channels": 2},
    )
    assert built == "ws://h:1/v1/stream?api_key=x&interim_results=false&hotwords=a%2Cb+c&channels=2"
    assert session_url("wss://h/custom/path", {"x": True}) == "wss://h/custom/path?x=true"


def test_read_pcm_keeps_accepted_rates_and_converts_the_rest(tmp_path):
    t = np.arange(11025) / 11025
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), -0.25 * np.ones_like(t)], axis=1)
    sf.write(tmp_path / "odd.wav", stereo, 11025, subtype="PCM_16")
    sf.write(tmp_path / "quad.flac", np.full((800, 4), 0.5) * [1, 1, 0, 0], 8000)
    sf.write(tmp_path / "loud.wav", np.array([2.0, -2.0, 0.5]), 44100, subtype="FLOAT")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")

    pcm, rate, channels = read_pcm(tmp_path / "odd.wav")
    samples = np.frombuffer(pcm, "<i2").reshape(-1, 2)
    assert (rate, channels) == (16000, 2) and abs(len(samples) - 16000) <= 1
    assert abs(samples[100:-100, 1].mean() / 32767 + 0.25) < 0.01  # channel order kept
    pcm, rate, channels = read_pcm(tmp_path / "quad.flac")
    assert (rate, channels) == (8000, 1)
    assert np.all(np.abs(np.frombuffer(pcm, "<i2") - 8192) <= 2)  # four channels averaged
    pcm, rate, _ = read_pcm(tmp_path / "loud.wav")
    assert rate == 44100 and np.frombuffer(pcm, "<i2").tolist() == [32767, -32767, 16384]
    with pytest.raises(AudioFileError, match="no such file"):
        read_pcm(tmp_path / "missing.wav")
    with pytest.raises(AudioFileError, match="cannot read audio"):
        read_pcm(tmp_path / "junk.wav")


# --- the stream command -------------------------------------------------------------------


@contextlib.contextmanager
def serving(engine):
    """A gateway with `engine` on its own thread and loop; yields its stream URL."""
    started = threading.Event()
    state: dict = {}

    async def serve():
        async with running(gateway_config(), engine) as gw:
            state.update(port=gw.port, loop=asyncio.get_running_loop(), stop=asyncio.Event())
            started.set()
            await state["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30), "gateway did not start"
    try:
        yield f"ws://127.0.0.1:{state['port']}/v1/stream"
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


@pytest.fixture(scope="module")
def server_url():
    """A gateway on its own thread and loop, since the command runs its own `asyncio.run`."""
    with serving(EchoEngine()) as stream_url:
        yield stream_url


@pytest.fixture
def stream_command(monkeypatch):
    """Run `stream ARGS` through a parser built with add_stream_command."""
    monkeypatch.delenv("STREAMSCRIBE_API_KEY", raising=False)

    def run(*argv: str) -> int:
        parser = argparse.ArgumentParser(prog="streamscribe")
        add_stream_command(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["stream", *argv])
        return args.run(args)

    return run


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_stream_command_json_prints_every_message(
    stream_command, server_url, two_clips_wav, capsys
):
    status = stream_command(str(two_clips_wav), "--url", server_url, "--json", "--frame-ms", "40")
    out, err = capsys.readouterr()
    events = json_lines(out)
    assert status == 0 and err == ""
    assert events[0]["type"] == "session.started" and events[-1]["type"] == "session.closed"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert kinds(events).count("transcript.final") == 2


def test_stream_command_text_prints_finals_one_per_line(
    stream_command, server_url, two_clips_wav, capsys
):
    status = stream_command(str(two_clips_wav), "--url", server_url)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert status == 0 and err == ""
    assert len(lines) == 2 and all(ECHO_TEXT.match(line) for line in lines)
    assert "\r" not in out and "\x1b" not in out  # not a terminal: no live line, no styles


def test_stream_command_reads_raw_pcm_from_stdin(
    stream_command, server_url, speech, monkeypatch, capsys
):
    audio = joined(speech[:1], silence_s=1.0)[::2]  # 8 kHz, plenty for the echo engine
    stdin = io.TextIOWrapper(io.BytesIO(audio.astype("<f4").tobytes()))
    monkeypatch.setattr("sys.stdin", stdin)
    status = stream_command(
        "-", "--url", server_url, "--json", "--encoding", "pcm_f32le", "--sample-rate", "8000"
    )
    events = json_lines(capsys.readouterr().out)
    config = events[0]["config"]
    assert status == 0
    assert (config["encoding"], config["sample_rate"], config["channels"]) == ("pcm_f32le", 8000, 1)
    assert kinds(events).count("transcript.final") == 1
    assert abs(events[-1]["audio_ms"] - 1000 * len(audio) / 8000) <= 1


def test_stream_command_stereo_file_prefixes_finals_with_the_channel(
    stream_command, server_url, speech, tmp_path, capsys
):
    gap = RATE
    first, second = speech
    n = 3 * gap + len(first) + len(second)
    stereo = 1e-3 * np.random.default_rng(1).standard_normal((n, 2))
    stereo[gap : gap + len(first), 0] = first
    stereo[2 * gap + len(first) : 2 * gap + len(first) + len(second), 1] = second
    sf.write(tmp_path / "call.wav", stereo, RATE, subtype="PCM_16")

    status = stream_command(str(tmp_path / "call.wav"), "--url", server_url)
    lines = capsys.readouterr().out.splitlines()
    assert status == 0 and [line[:4] for line in lines] == ["[0] ", "[1] "]
    assert all(ECHO_TEXT.match(line[4:]) for line in lines)


@pytest.mark.parametrize(
    "source, argv, status, message",
    [
        ("clip", ["-o", "vad_frame_ms=15"], 1, "session error: invalid_config: vad_frame_ms"),
        ("clip", ["--sample-rate", "8000"], 2, "only for raw stdin"),
        ("clip", ["-o", "sample_rate=8000"], 2, "use --encoding, --sample-rate"),
        ("clip", ["--url", "{closed}"], 2, r"connect to ws://127\.0\.0\.1:\d+: Connection refused"),
        ("/no/such.wav", [], 1, "no such file"),
        ("-", ["--sample-rate", "11025"], 2, "unsupported sample_rate 11025; allowed: 8000,"),
        ("-", ["--encoding", "mp3"], 2, "unsupported encoding 'mp3'"),
    ],
)
def test_stream_command_errors_are_one_line_with_exit_status(
    stream_command, server_url, short_clip, source, argv, status, message, monkeypatch, capsys
):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\x00" * 3200)))
    closed = f"ws://127.0.0.1:{closed_port()}"
    argv = ["--url", server_url, *(a.format(closed=closed) for a in argv)]
    assert stream_command(str(short_clip) if source == "clip" else source, *argv) == status
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_stream_command_refuses_a_terminal_as_raw_stdin(stream_command, monkeypatch, capsys):
    class Terminal(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal(io.BytesIO()))
    assert stream_command("-") == 2
    assert "stdin is a terminal" in capsys.readouterr().err


def test_ctrl_c_stops_the_audio_flushes_and_exits_130(stream_command, server_url, capsys):
    long_clip = LIBRIVOX / "sense_and_sensibility_01_austen_64kb-0870.wav"  # 7.1 s
    if not long_clip.exists():
        pytest.skip("Debian package pocketsphinx-testdata is not installed")
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        status = stream_command(str(long_clip), "--url", server_url, "--json", "--realtime")
    finally:
        timer.cancel()
    elapsed = time.monotonic() - started
    events = json_lines(capsys.readouterr().out)
    assert status == 130 and elapsed < 5
    assert events[-1]["type"] == "session.closed" and events[-1]["audio_ms"] < 2500
    assert events[-2]["type"] == "transcript.final" and events[-2]["reason"] == "flush"


# --- live terminal rendering ----------------------------------------------------------------


def test_live_line_shows_the_volatile_tail_styled_and_finals_on_their_own_lines():
    out = io.StringIO()
    show = TextPrinter(out, live=True, color=True, width=lambda: 30)
    show({"type": "session.started", "config": {"channels": 2}})
    show({"type": "transcript.partial", "channel": 0, "stable_text": "hi", "volatile_text": "th"})
    assert out.getvalue() == f"{CLEAR_LINE}[0] hi {VOLATILE_STYLE}th{RESET}"
    show({"type": "transcript.partial", "channel": 1, "stable_text": "yes", "volatile_text": ""})
    assert out.getvalue().endswith(f"{CLEAR_LINE}[0] hi {VOLATILE_STYLE}th{RESET}  [1] yes")
    show({"type": "transcript.final", "channel": 0, "text": "hi there"})
    assert out.getvalue().endswith(f"{CLEAR_LINE}[0] hi there\n{CLEAR_LINE}[1] yes")
    long = " ".join(f"word{i}" for i in range(20))
    show({"type": "transcript.partial", "channel": 1, "stable_text": long, "volatile_text": "x"})
    line = out.getvalue().rsplit(CLEAR_LINE, 1)[1]
    visible = line.replace(VOLATILE_STYLE, "").replace(RESET, "")
    assert len(visible) <= 29 and visible.endswith("word18 word19 x")  # the newest words
    assert visible.startswith("…word") and set(visible[1:].split()) <= set(long.split()) | {"x"}
    show.finish()
    assert out.getvalue().endswith(CLEAR_LINE)


@settings(max_examples=200, deadline=None)
@given(
    words=st.lists(st.text(alphabet="abcdefghij", min_size=1, max_size=12), min_size=1),
    volatile=st.lists(st.text(alphabet="xyz", min_size=1, max_size=8), max_size=4),
    width=st.integers(min_value=16, max_value=100),
)
def test_live_line_keeps_whole_words_within_the_width(words, volatile, width):
    out = io.StringIO()
    show = TextPrinter(out, live=True, color=True, width=lambda: width)
    show({"type": "session.started", "config": {"channels": 1}})
    stable, tail = " ".join(words), " ".join(volatile)
    show({"type": "transcript.partial", "channel": 0, "stable_text": stable, "volatile_text": tail})
    line = out.getvalue().rsplit(CLEAR_LINE, 1)[1]
    visible = line.replace(VOLATILE_STYLE, "").replace(RESET, "")
    full = f"{stable} {tail}" if tail else stable
    assert len(visible) <= width - 1
    if visible == full:
        return
    shown = visible.removeprefix("…")
    assert visible.startswith("…") and full.endswith(shown)
    longest = max(len(word) for word in full.split())
    if longest < width - 2:  # a word wider than the line is cut; otherwise only whole words
        assert full[len(full) - len(shown) - 1] == " "


def test_live_line_without_color_is_plain_text():
    out = io.StringIO()
    show = TextPrinter(out, live=True, color=False, width=lambda: 80)
    show({"type": "session.started", "config": {"channels": 1}})
    show({"type": "transcript.partial", "channel": 0, "stable_text": "a b", "volatile_text": "c"})
    assert out.getvalue() == f"{CLEAR_LINE}a b c"


class DeafEngine(EchoEngine):
    """Hears nothing it can spell: every hypothesis is empty."""

    def _answer(self, segments):
        from engine.api import Hypothesis

        return [Hypothesis(text="", words=[], confidence=0.0, duration_ms=0) for _ in segments]


def test_stream_command_points_at_the_raw_format_when_loud_audio_gives_no_words(
    stream_command, speech, monkeypatch, capsys
):
    audio = joined(speech[:1], silence_s=1.0)
    with serving(DeafEngine()) as deaf_url:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(to_s16le(audio))))
        status = stream_command("-", "--url", deaf_url, "--sample-rate", "8000")
        err = capsys.readouterr().err
        assert status == 0
        assert re.search(r"no words were recognised in \d+\.\d s of audio", err)
        assert "dBFS" in err and "pcm_s16le at 8000 Hz" in err and "--sample-rate" in err
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(bytes(32000))))
        assert stream_command("-", "--url", deaf_url) == 0
        quiet = capsys.readouterr().err  # silence: said, without blaming the format
        assert "no words were recognised" in quiet and "--sample-rate" not in quiet


def test_stream_command_says_nothing_extra_when_words_come_back(
    stream_command, server_url, speech, monkeypatch, capsys
):
    audio = joined(speech[:1], silence_s=1.0)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(to_s16le(audio))))
    assert stream_command("-", "--url", server_url) == 0
    out, err = capsys.readouterr()
    assert out and err == ""

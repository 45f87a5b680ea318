"""Tokens and per-key limits on a real gateway over loopback: minting on the REST port, each way
of presenting a token, refusals with their reasons before the upgrade, stream and audio limits
at the handshake, mid-stream and on uploads, and tokens kept out of the logs."""

from __future__ import annotations

import asyncio
import io
import json
import time

import aiohttp
import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streaming.ops.config import ConfigError
from streaming.server import Gateway
from tests.clients.test_cli_command import streamscribe
from tests.gateway_harness import (
    EchoEngine,
    debug_logs,
    gateway_config,
    http_get,
    read_all,
    running,
)
from tests.streams import RATE, chunks, to_s16le

KEY = "k1-secret"
NOISE = (1e-3 * np.random.default_rng(0).standard_normal(3 * RATE)).astype(np.float32)


async def mint(gw, body: dict | None = None, authorization: str = f"Bearer {KEY}", query=""):
    """POST /v1/auth/token: (status, headers, JSON body)."""
    url = f"http://127.0.0.1:{gw.rest.port}/v1/auth/token{query}"
    headers = {"Authorization": authorization} if authorization else {}
    async with aiohttp.ClientSession() as session:
        data = None if body is None else json.dumps(body)
        async with session.post(url, data=data, headers=headers) as response:
            return response.status, dict(response.headers), await response.json()


async def token_for(gw, **body) -> str:
    status, _, answer = await mint(gw, body)
    assert status == 200, answer
    return answer["token"]


async def refused(uri: str, **options):
    """The HTTP response of a handshake that must be refused."""
    with pytest.raises(InvalidStatus) as failure:
        async with connect(uri, **options):
            pass
    return failure.value.response


async def upload(gw, query: str = "", seconds: float = 2.0, headers=None):
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(seconds * RATE), dtype=np.float32), RATE, format="WAV")
    form = aiohttp.FormData()
    form.add_field("file", buffer.getvalue(), filename="a.wav")
    url = f"http://127.0.0.1:{gw.rest.port}/v1/audio/transcriptions{query}"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=form, headers=headers) as response:
            return response.status, dict(response.headers), await response.text()


def stream_url(gw, query: str = "") -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/stream{query}"


def test_a_minted_token_streams_as_header_query_and_subprotocol():
    async def main():
        async with running(gateway_config(api_keys=KEY), EchoEngine()) as gw:
            status, headers, answer = await mint(gw, {"ttl_s": 120, "scopes": ["stream"]})
            token = answer["token"]
            opened = []
            forms = [
                ("", {"additional_headers": {"Authorization": f"Bearer {token}"}}),
                (f"?token={token}", {}),
                ("", {"subprotocols": [f"token.{token}"]}),
            ]
            for query, options in forms:
                async with connect(stream_url(gw, query), **options) as ws:
                    opened.append((json.loads(await ws.recv())["type"], ws.subprotocol))
            return status, headers, answer, opened, time.time()

    status, headers, answer, opened, now = asyncio.run(main())
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    assert answer["expires_in"] == 120 and abs(answer["expires_at"] - now - 120) <= 3
    assert answer["scopes"] == ["stream"] and answer["max_streams"] is None
    token = answer["token"]
    assert opened == [
        ("session.started", None),
        ("session.started", None),
        ("session.started", f"token.{token}"),  # the exact subprotocol is selected
    ]


def test_token_requests_are_validated_and_answer_cors_preflights():
    async def main():
        async with running(gateway_config(api_keys=KEY, token_max_ttl_s=900), EchoEngine()) as gw:
            token = await token_for(gw)
            answers = {
                "default": await mint(gw),
                "query key": await mint(gw, authorization="", query=f"?api_key={KEY}"),
                "no key": await mint(gw, authorization=""),
                "wrong key": await mint(gw, authorization="Bearer nope"),
                "token": await mint(gw, authorization=f"Bearer {token}"),
                "long ttl": await mint(gw, {"ttl_s": 901}),
                "bad scope": await mint(gw, {"scopes": ["admin"]}),
                "bad streams": await mint(gw, {"max_streams": 0}),
                "unknown": await mint(gw, {"ttl": 5}),
            }
            async with aiohttp.ClientSession() as session:
                preflight_headers = {
                    "Origin": f"http://127.0.0.1:{gw.port}",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type",
                }
                url = f"http://127.0.0.1:{gw.rest.port}/v1/auth/token"
                async with session.options(url, headers=preflight_headers) as response:
                    preflight = response.status, dict(response.headers)
        async with running(gateway_config(), EchoEngine()) as gw:
            off = await mint(gw)
        return answers, preflight, off

    answers, preflight, off = asyncio.run(main())
    status, _, default = answers["default"]
    assert status == 200 and default["expires_in"] == 600
    assert default["scopes"] == ["calls", "captions", "metrics", "stream", "transcribe"]
    assert answers["query key"][0] == 200
    for name, reason in [
        ("no key", "missing or invalid API key"),
        ("wrong key", "missing or invalid API key"),
        ("token", "a token cannot mint tokens: use an API key"),
    ]:
        status, headers, body = answers[name]
        assert status == 401 and body["error"]["message"] == reason, name
        assert headers["Access-Control-Allow-Origin"] == "*"  # the page can read why
    params = {"long ttl": "ttl_s", "bad scope": "scopes", "bad streams": "max_streams"}
    for name, param in {**params, "unknown": "ttl"}.items():
        status, _, body = answers[name]
        assert status == 400 and body["error"]["param"] == param, (name, body)
        assert body["error"]["code"] == "invalid_value"
    assert "from 1 to 900 (server.token_max_ttl_s)" in answers["long ttl"][2]["error"]["message"]
    status, headers = preflight
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    assert set(headers["Access-Control-Allow-Headers"].split(", ")) == {
        "Authorization",
        "Content-Type",
    }
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert off[0] == 400 and off[2]["error"]["code"] == "auth_disabled"
    assert "server.api_keys" in off[2]["error"]["message"]


def test_expired_forged_and_out_of_scope_tokens_get_401_with_the_reason():
    async def main():
        async with running(gateway_config(api_keys=KEY), EchoEngine()) as gw:
            signer = gw.access.signer
            kid = signer.key_id(KEY)
            expired = signer.issue(kid, 10, time.time() - 100)[0]
            metrics_only = await token_for(gw, scopes=["metrics"])
            body, signature = (await token_for(gw)).split(".")
            forged = f"{body}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"
            out = {
                "expired": await refused(stream_url(gw), subprotocols=[f"token.{expired}"]),
                "forged": await refused(stream_url(gw, f"?token={forged}")),
                "scope": await refused(
                    stream_url(gw), additional_headers={"Authorization": f"Bearer {metrics_only}"}
                ),
                "garbled": await refused(stream_url(gw), subprotocols=["token.x"]),
            }
            calls = await refused(
                f"ws://127.0.0.1:{gw.port}/v1/calls/c1/events?token={metrics_only}"
            )
            metrics = await http_get(gw.port, f"/metrics?token={metrics_only}")
            captions = await http_get(gw.port, f"/v1/sessions/s/captions.vtt?token={metrics_only}")
            upload_scope = await upload(gw, f"?token={metrics_only}")
            transcribe = await token_for(gw, scopes=["transcribe"])
            uploaded = await upload(gw, headers={"Authorization": f"Bearer {transcribe}"})
        return out, calls, metrics, captions, upload_scope, uploaded

    out, calls, metrics, captions, upload_scope, uploaded = asyncio.run(main())
    reasons = {name: (r.status_code, r.body.decode().strip()) for name, r in out.items()}
    assert reasons == {
        "expired": (401, "token expired"),
        "forged": (401, "token signature invalid"),
        "scope": (401, "token not valid for stream"),
        "garbled": (401, "token malformed"),
    }
    assert out["expired"].headers["Content-Type"].startswith("text/plain")
    assert (calls.status_code, calls.body) == (401, b"token not valid for calls\n")
    assert metrics[0] == 200 and "streamscribe_rejections_total" in metrics[2]
    assert captions[:1] == (401,) and captions[2] == "token not valid for captions\n"
    assert upload_scope[0] == 401 and "token not valid for transcribe" in upload_scope[2]
    assert uploaded[0] == 200


def test_stream_limit_is_429_with_retry_after_before_the_upgrade():
    async def main():
        config = gateway_config(api_keys=KEY, key_limits=f"{KEY}:2:0")
        async with running(config, EchoEngine()) as gw:
            token = await token_for(gw)
            # A plain GET of a stream route (the browser page's probe after a failed
            # handshake) passes the checks, then its connection ends: its slot comes back.
            probe = await http_get(gw.port, f"/v1/stream?token={token}")
            # Six handshakes at once for two slots: exactly two get in.
            attempts = [connect(stream_url(gw, f"?token={token}")) for _ in range(6)]
            results = await asyncio.gather(*attempts, return_exceptions=True)
            opened = [r for r in results if not isinstance(r, Exception)]
            statuses = sorted(r.response.status_code for r in results if isinstance(r, Exception))
            over = next(r for r in results if isinstance(r, InvalidStatus)).response
            for ws in opened:
                await ws.close()
            async with asyncio.timeout(10):  # the slots come back with the connections
                while gw.limits.open:
                    await asyncio.sleep(0.01)
            capped = await token_for(gw, max_streams=1)
            async with connect(stream_url(gw, f"?token={capped}")) as ws:
                await ws.recv()
                second = await refused(stream_url(gw, f"?token={capped}"))
                # The key itself is held to its own limit only: 1 of its 2 slots is taken.
                async with connect(stream_url(gw, f"?api_key={KEY}")) as by_key_ws:
                    by_key = json.loads(await by_key_ws.recv())["type"]
            metrics = (await http_get(gw.port, f"/metrics?api_key={KEY}"))[2]
            return probe[0], len(opened), statuses, over, second, by_key, metrics

    probe, opened, statuses, over, second, by_key, metrics = asyncio.run(main())
    assert probe == 426  # Upgrade Required
    assert opened == 2 and statuses == [429] * 4
    assert over.headers["Retry-After"] == "5"
    assert over.body == b"too many streams for this key: 2 open, at most 2\n"
    assert second.status_code == 429 and b"1 open, at most 1" in second.body
    assert by_key == "session.started"
    assert 'streamscribe_rejections_total{reason="key_limit"} 5.0' in metrics


def test_audio_allowance_ends_the_stream_then_refuses_until_midnight():
    async def main():
        config = gateway_config(api_keys=KEY, key_limits="*:0:0.0003")  # 1.08 s a day
        async with running(config, EchoEngine()) as gw:
            token = await token_for(gw, scopes=["stream", "transcribe"])
            async with connect(stream_url(gw), subprotocols=[f"token.{token}"]) as ws:
                for chunk in chunks(to_s16le(NOISE), RATE * 2 // 10):
                    await ws.send(chunk)
                    await asyncio.sleep(0.02)
                messages = await read_all(ws)
                close_code = ws.close_code
            after = await refused(stream_url(gw, f"?token={token}"))
            upload_after = await upload(gw, f"?token={token}")
        return messages, close_code, after, upload_after, time.time()

    messages, close_code, after, upload_after, now = asyncio.run(main())
    errors = [m for m in messages if m["type"] == "error"]
    assert errors and errors[-1]["code"] == "quota_exceeded", messages
    assert "0.0003 h per day" in errors[-1]["message"]
    assert close_code == 1008
    to_midnight = 86400 - now % 86400
    assert after.status_code == 429
    assert abs(int(after.headers["Retry-After"]) - to_midnight) <= 5
    assert b"audio allowance of this key is spent" in after.body
    status, headers, body = upload_after
    assert status == 429 and json.loads(body)["error"]["code"] == "quota_exceeded"
    assert abs(int(headers["Retry-After"]) - to_midnight) <= 5


def test_uploads_count_toward_the_daily_audio():
    async def main():
        config = gateway_config(api_keys=KEY, key_limits=f"{KEY}:1:0.0003")
        async with running(config, EchoEngine()) as gw:
            first = await upload(gw, f"?api_key={KEY}", seconds=2.0)  # under: taken, counted
            second = await upload(gw, f"?api_key={KEY}", seconds=0.5)
            stream = await refused(stream_url(gw, f"?api_key={KEY}"))
        return first, second, stream

    first, second, stream = asyncio.run(main())
    assert first[0] == 200
    assert second[0] == 429 and int(second[1]["Retry-After"]) > 0
    assert stream.status_code == 429


def test_client_config_is_open_and_tells_the_rest_port():
    async def main():
        async with running(gateway_config(api_keys=KEY), EchoEngine()) as gw:
            keyed = await http_get(gw.port, "/v1/client-config"), gw.rest.port
        async with running(gateway_config(http_port=-1), EchoEngine()) as gw:
            bare = await http_get(gw.port, "/v1/client-config")
        return keyed, bare

    ((status, headers, body), rest_port), bare = asyncio.run(main())
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert json.loads(body) == {"rest_port": rest_port, "auth": True}
    assert json.loads(bare[2]) == {"rest_port": None, "auth": False}


def test_tokens_never_reach_the_debug_logs(monkeypatch):
    async def main():
        async with running(gateway_config(api_keys=KEY), EchoEngine()) as gw:
            token = await token_for(gw)
            async with connect(stream_url(gw, f"?token={token}")) as ws:
                await ws.recv()
            async with connect(stream_url(gw), subprotocols=[f"token.{token}"]) as ws:
                await ws.recv()
            await upload(gw, f"?token={token}")
        return token

    with debug_logs(monkeypatch) as stderr:
        token = asyncio.run(main())
    logged = stderr.getvalue()
    assert "GET /v1/stream" in logged and "Sec-WebSocket-Protocol" in logged
    assert token.split(".")[1] not in logged and KEY not in logged


def test_an_unusable_secret_file_stops_start_up_with_one_line(tmp_path):
    missing = tmp_path / "missing-secret"
    with pytest.raises(ConfigError, match="cannot read server.token_secret_file"):
        Gateway(gateway_config(token_secret_file=str(missing)), EchoEngine)
    env = {"STREAMSCRIBE_SERVER__TOKEN_SECRET_FILE": str(missing)}
    done = streamscribe("serve", "--model", "noop", "--port", "0", "--http-port", "-1", env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"streamscribe: error: cannot read server.token_secret_file {missing}: "
        "No such file or directory"
    ]


def test_a_shared_secret_file_makes_tokens_valid_on_another_server(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("shared-between-servers\n")

    async def main():
        config = gateway_config(api_keys=KEY, token_secret_file=str(secret))
        async with running(config, EchoEngine()) as first:
            token = await token_for(first)
        async with running(config, EchoEngine()) as second:
            async with connect(stream_url(second, f"?token={token}")) as ws:
                return json.loads(await ws.recv())["type"]

    assert asyncio.run(main()) == "session.started"

"""The WebSocket server on websockets' sans-I/O protocol, against the real websockets client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import pytest
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response

from streaming.transport.wsserver import QUEUE_HIGH, WebSocketServer


def plain(status: int, body: str) -> Response:
    headers = Headers([("Content-Type", "text/plain"), ("Connection", "close")])
    return Response(status, "OK" if status == 200 else "Nope", headers, body.encode())


async def started(handler, **options) -> tuple[WebSocketServer, str]:
    def process_request(connection, request):
        if request.path == "/healthz":
            return plain(200, "ok\n")
        if request.path == "/refused":
            return plain(503, "busy\n")
        return None

    server = await WebSocketServer(handler, process_request=process_request, **options).start(
        "127.0.0.1", 0
    )
    return server, f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def stop(server: WebSocketServer) -> None:
    server.close()
    await server.wait_closed()


def test_messages_go_both_ways_whole_fragmented_text_and_binary():
    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async def main():
        server, url = await started(echo)
        try:
            async with connect(url + "/v1/stream") as client:
                await client.send("héllo")
                await client.send(b"\x00\x01" * 5000)
                await client.send(["frag", "mented"])  # one message in three frames
                await client.send([b"ab", b"cd"])
                return [await client.recv() for _ in range(4)]
        finally:
            await stop(server)

    assert asyncio.run(main()) == ["héllo", b"\x00\x01" * 5000, "fragmented", b"abcd"]


def test_plain_http_answers_and_refusals_come_from_process_request():
    async def main():
        server, url = await started(lambda ws: asyncio.sleep(0))
        try:
            host, port = url.removeprefix("ws://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await reader.read()
            writer.close()
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url + "/refused"):
                    pass
            return answer, refused.value.response.status_code
        finally:
            await stop(server)

    answer, status = asyncio.run(main())
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok\n") and status == 503


def test_take_frame_gets_single_frame_binary_messages_first_and_may_decline():
    taken: list[bytes] = []

    async def handler(ws):
        ws.take_frame = lambda data: data != b"leave" and not taken.append(data)
        assert await ws.recv() == "text goes to recv"
        assert await ws.recv() == b"leave"
        await ws.send("done")

    async def main():
        server, url = await started(handler)
        try:
            async with connect(url) as client:
                await asyncio.sleep(0.05)  # the handler has set take_frame
                for message in (b"a", b"b", "text goes to recv", b"leave"):
                    await client.send(message)
                return await client.recv()
        finally:
            await stop(server)

    assert asyncio.run(main()) == "done" and taken == [b"a", b"b"]


def test_close_codes_reach_the_client_and_a_slow_reader_pauses_the_socket():
    seen = {}

    async def handler(ws):
        await asyncio.sleep(0.5)  # read nothing while the client sends
        seen["queued"] = len(ws.messages)
        seen["paused"] = ws.reading_paused
        await ws.close(4001, "invalid_config")

    async def main():
        server, url = await started(handler)
        try:
            async with connect(url) as client:
                with contextlib.suppress(ConnectionClosed):
                    for _ in range(500):
                        await client.send(os.urandom(3200))  # incompressible: many reads
                await client.wait_closed()
                return client.close_code, client.close_reason
        finally:
            await stop(server)

    code, reason = asyncio.run(main())
    assert (code, reason) == (4001, "invalid_config")
    assert seen["paused"] and QUEUE_HIGH <= seen["queued"] < 500


def test_a_peer_that_never_answers_pings_is_cut():
    async def handler(ws):
        await ws.wait_closed()

    async def main():
        server, url = await started(handler, ping_interval=0.1, ping_timeout=0.2)
        try:
            host, port = url.removeprefix("ws://").split(":")
            sock = socket.create_connection((host, int(port)))
            sock.sendall(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            received = b""
            while True:  # read the handshake and the pings, answer none, until cut
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
                if not chunk:
                    break
                received += chunk
            sock.close()
            return received
        finally:
            await stop(server)

    received = asyncio.run(main())
    assert received.startswith(b"HTTP/1.1 101") and b"\x89" in received  # a ping frame came


def test_recv_after_the_peers_close_frame_raises_connection_closed_before_the_link_goes():
    seen = {}

    async def handler(ws):
        try:
            await ws.recv()
        except ConnectionClosed as closed:  # not websockets' "connection isn't closed yet"
            seen["code"] = closed.rcvd.code

    async def main():
        server, url = await started(handler, ping_interval=None)
        try:
            host, port = url.removeprefix("ws://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            await reader.readuntil(b"\r\n\r\n")
            mask = b"\x01\x02\x03\x04"
            payload = (1000).to_bytes(2, "big")
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            writer.write(b"\x88\x82" + mask + masked)  # a close frame; the TCP link stays up
            async with asyncio.timeout(5):
                while "code" not in seen:
                    await asyncio.sleep(0.01)
            writer.close()
        finally:
            await stop(server)

    asyncio.run(main())
    assert seen["code"] == 1000

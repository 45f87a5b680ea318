"""The Python client resumes a session by itself when the network drops it: a loopback TCP
proxy between client and server is cut mid-stream (no close frame, as when a route fails)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from clients.client import stream_pcm
from tests.gateway_harness import EchoEngine, gateway_config, running
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le

FRAME = RATE * 2 // 10  # 100 ms


class CuttableProxy:
    """Forwards loopback TCP connections to `port`; `cut()` drops the open ones abruptly."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.transports: list[asyncio.Transport] = []
        self.accepted = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _pipe(self, client_r, client_w) -> None:
        self.accepted += 1
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        self.transports += [client_w.transport, server_w.transport]

        async def copy(reader, writer):
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.transport.abort()

        await asyncio.gather(copy(client_r, server_w), copy(server_r, client_w))

    def cut(self) -> None:
        for transport in self.transports:
            transport.abort()
        self.transports.clear()

    def close(self) -> None:
        self.cut()
        self.server.close()


@pytest.fixture(scope="module")
def pcm() -> bytes:
    return to_s16le(joined([audio for _, audio, _ in librivox_clips()[:3]]))


async def frames(data: bytes, pace: float, cut=None, cut_after: int = 0):
    for index, chunk in enumerate(chunks(data, FRAME)):
        if cut is not None and index == cut_after:
            cut()
        yield chunk
        await asyncio.sleep(0.1 / pace)


def finals(messages):
    return [
        (m["segment_id"], m["start_ms"], m["end_ms"], m["text"])
        for m in messages
        if m["type"] == "transcript.final"
    ]


@pytest.mark.parametrize("cuts", [1, 2])
def test_the_client_resumes_after_drops_and_loses_nothing(pcm, cuts):
    async def main():
        async with running(gateway_config(), EchoEngine(delay_s=0.02)) as gw:
            direct = f"ws://127.0.0.1:{gw.port}/v1/stream"
            reference = [m async for m in stream_pcm(direct, frames(pcm, 10))]
            proxy = CuttableProxy(gw.port)
            url = f"ws://127.0.0.1:{await proxy.start()}/v1/stream"
            total = len(pcm) // FRAME

            async def cut_twice():  # frames() cuts once; a second drop later, mid-resend too
                if cuts == 2:
                    await asyncio.sleep(1.2)
                    proxy.cut()

            second = asyncio.create_task(cut_twice())
            got = [m async for m in stream_pcm(url, frames(pcm, 10, proxy.cut, total // 3))]
            await second
            proxy.close()
            return reference, got, proxy.accepted

    reference, got, accepted = asyncio.run(main())
    kinds = [m["type"] for m in got]
    assert kinds.count("session.resumed") >= 1 and accepted >= 2
    seqs = [m["seq"] for m in got]
    assert seqs == list(range(1, len(got) + 1))  # each message once, in order, none missing
    assert finals(got) == finals(reference)
    assert got[-1]["type"] == "session.closed" and got[-1]["reason"] == "client"
    assert got[-1]["audio_ms"] == reference[-1]["audio_ms"]


def test_without_reconnect_a_drop_ends_the_stream(pcm):
    from clients.client import ConnectionLost

    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            proxy = CuttableProxy(gw.port)
            url = f"ws://127.0.0.1:{await proxy.start()}/v1/stream"
            try:
                async for _ in stream_pcm(url, frames(pcm, 10, proxy.cut, 5), reconnect=0):
                    pass
            except ConnectionLost as err:
                return err, proxy.accepted
            finally:
                proxy.close()
            return None, proxy.accepted

    err, accepted = asyncio.run(main())
    assert err is not None and accepted == 1

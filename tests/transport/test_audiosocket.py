"""Asterisk AudioSocket over TCP (server.audiosocket_port): packet parsing, calls replayed by the
simulator through the same Connection and session core, transcripts to the call's subscribers,
bad input."""

from __future__ import annotations

import asyncio
import socket
import uuid

import numpy as np
import pytest

from clients.telephony import audiosocket_sim
from streaming.core.events import ErrorEvent
from streaming.dialects.audiosocket import AudioSocketDialect, packet
from streaming.dialects.base import Audio, Close, Configure, KeepAlive, Reject
from tests.gateway_harness import EchoEngine, gateway_config, read_all, running, subscribe
from tests.streams import RATE, librivox_clips

CALL = uuid.UUID("4f1f1f6e-9f6a-4c1e-8d5e-2d1b9d6c7a10")


def test_packets_split_anywhere_become_session_commands():
    stream = b"".join(
        [
            packet(0x01, CALL.bytes),
            packet(0x10, b"\x01\x00" * 160),
            packet(0x03, b"5"),
            packet(0x10, b"\x02\x00" * 3),
            packet(0x00),
            packet(0x10, b"after hang-up"),
        ]
    )
    dialect = AudioSocketDialect()
    commands = []
    for i in range(0, len(stream), 7):  # 7-byte reads split headers and payloads
        commands += dialect.on_binary(stream[i : i + 7])
        if commands and isinstance(commands[-1], Close):
            break
    assert commands == [
        Configure({}),
        Audio(b"\x01\x00" * 160),
        KeepAlive(),
        Audio(b"\x02\x00" * 3),
        Close(),
    ]
    assert dialect.call_id == str(CALL) and dialect.channel_labels == ("inbound",)
    assert dialect.opening({}).options == {
        "encoding": "pcm_s16le",
        "sample_rate": 8000,
        "channels": 1,
    }


@pytest.mark.parametrize(
    "packets, code, fatal",
    [
        ([packet(0x10, b"\x00\x00")], "invalid_sequence", True),  # audio before the UUID
        ([packet(0x01, b"short")], "bad_uuid", True),
        ([packet(0x01, CALL.bytes), packet(0x12, b"\x00" * 640)], "unsupported_encoding", True),
        ([packet(0x01, CALL.bytes), packet(0x42, b"??")], "unknown_type", False),
        ([packet(0x01, CALL.bytes), packet(0x01, CALL.bytes)], "invalid_sequence", False),
        ([packet(0x01, CALL.bytes), packet(0xFF, b"\x02")], "peer_error", False),
    ],
)
def test_bad_packets(packets, code, fatal):
    commands = AudioSocketDialect().on_binary(b"".join(packets))
    reject = commands[-1]
    assert isinstance(reject, Reject) and reject.code == code
    assert (reject.close_code is not None) is fatal


def test_asterisk_reporting_the_caller_hung_up_ends_the_call():
    dialect = AudioSocketDialect()
    commands = dialect.on_binary(packet(0x01, CALL.bytes) + packet(0xFF, b"\x01"))
    assert commands == [Configure({}), Close()]


def test_only_fatal_errors_are_sent_back_to_asterisk():
    dialect = AudioSocketDialect()
    assert dialect.encode(ErrorEvent("unknown_type", "ignored")) == []
    assert dialect.encode(ErrorEvent("bad_uuid", "no", fatal=True)) == [packet(0xFF, b"bad_uuid")]


# --- over loopback ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def call_slin() -> bytes:
    (_, speech, _), (_, more, _) = librivox_clips()[:2]
    quiet = np.zeros(RATE, np.float32)
    return audiosocket_sim.to_slin(np.concatenate([quiet, speech, quiet, more, quiet]), RATE)


def test_audiosocket_is_off_by_default():
    async def main():
        async with running(gateway_config(), EchoEngine()) as gw:
            return gw.audiosocket

    assert asyncio.run(main()) is None


def test_calls_reach_subscribers_and_bad_calls_affect_no_other(call_slin):
    port = free_port()
    other = uuid.uuid4()

    async def main():
        async with running(gateway_config(audiosocket_port=port), EchoEngine()) as gw:
            good_subscriber = await subscribe(gw, str(CALL))
            eof_subscriber = await subscribe(gw, str(other))
            good = asyncio.create_task(
                audiosocket_sim.replay(
                    "127.0.0.1", port, audiosocket_sim.call_packets(CALL, call_slin)
                )
            )
            # Asterisk closing the socket without a hang-up packet is a hang-up too.
            eof = asyncio.create_task(
                audiosocket_sim.replay(
                    "127.0.0.1",
                    port,
                    audiosocket_sim.call_packets(other, call_slin[: len(call_slin) // 2], False),
                )
            )
            early_audio = await audiosocket_sim.replay(
                "127.0.0.1", port, [packet(0x10, b"\x00" * 320), packet(0x01, CALL.bytes)]
            )
            wide = await audiosocket_sim.replay(
                "127.0.0.1", port, [packet(0x01, uuid.uuid4().bytes), packet(0x12, b"\0" * 640)]
            )
            answers = await asyncio.gather(good, eof)
            events = await read_all(good_subscriber), await read_all(eof_subscriber)
            async with asyncio.timeout(10):
                while gw.connections or gw.calls.calls:
                    await asyncio.sleep(0.01)
            return early_audio, wide, answers, events, gw.metrics.render().decode()

    early_audio, wide, answers, (good, eof), metrics = asyncio.run(main())
    assert early_audio == packet(0xFF, b"invalid_sequence")
    assert wide == packet(0xFF, b"unsupported_encoding")
    assert answers == [b"", b""]  # nothing is sent to a good call
    finals = [e for e in good if e["type"] == "transcript.final"]
    assert [f["channel"] for f in finals] == ["inbound", "inbound"]
    assert {e["call_id"] for e in good} == {str(CALL)} and good[-1]["type"] == "session.closed"
    assert good[0]["config"]["sample_rate"] == 8000
    assert [e["type"] for e in eof if e["type"] == "transcript.final"]
    assert eof[-1]["type"] == "session.closed"
    assert 'streamscribe_sessions_total{dialect="audiosocket"} 4.0' in metrics


def test_calls_are_refused_while_the_server_is_full():
    port = free_port()

    async def main():
        config = gateway_config(audiosocket_port=port, max_sessions=1)
        async with running(config, EchoEngine()) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(packet(0x01, CALL.bytes))
            while not gw.connections:
                await asyncio.sleep(0.01)
            refused = await audiosocket_sim.replay(
                "127.0.0.1", port, [packet(0x01, uuid.uuid4().bytes)]
            )
            writer.write(packet(0x00))
            await reader.read()
            writer.close()
            return refused

    assert asyncio.run(main()) == packet(0xFF, b"capacity")


def test_a_peer_that_ends_its_side_mid_packet_gets_our_end_too():
    """Bytes of a packet cut short, then the peer's end of stream (half-close): the server
    ends the call and closes its side as well, rather than leave the peer waiting for good."""

    async def main():
        port = free_port()
        async with running(gateway_config(audiosocket_port=port), EchoEngine()) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x10\x00\x10" + b"\x01" * 7)  # a UUID packet missing 9 bytes
            await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(5):
                rest = await reader.read()
            writer.close()
            return rest, len(gw.connections)

    rest, left = asyncio.run(main())
    assert rest == b"" and left == 0

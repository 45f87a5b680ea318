"""The client library and the `stream` command import without the server, the models or scipy,
and the wire constants the client spells out agree with the server's."""

import subprocess
import sys

from clients import client
from engine.api import TARGET_SAMPLE_RATE
from streaming.core.audio import ENCODINGS, SAMPLE_RATES

HEAVY = ("torch", "engine", "streaming", "scipy")


def test_importing_the_client_loads_no_server_module():
    code = (
        "import clients.client, clients.stream_cli, sys\n"
        f"print(sorted({{m for m in sys.modules if m.partition('.')[0] in {HEAVY!r}}}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


def test_the_client_constants_match_the_server():
    assert client.BYTES_PER_SAMPLE == ENCODINGS
    assert client.SAMPLE_RATES == SAMPLE_RATES
    assert client.MODEL_SAMPLE_RATE == TARGET_SAMPLE_RATE

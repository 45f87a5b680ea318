"""deploy/nginx/streamscribe.conf read as text against the server's own routes and limits (no
nginx needed; test_nginx.py runs the real one): which upstream each route reaches, the WebSocket
upgrade, timeouts longer than the server's idle timeout, the upload limit, least_conn."""

from __future__ import annotations

import re

import pytest

from streaming.ops.config import load_config
from streaming.server import ROUTES
from streaming.transport.calls import CALL_PATH
from streaming.transport.rest import FORM_OVERHEAD
from tests.deploy.nginxrun import SHIPPED

TEXT = SHIPPED.read_text()
DEFAULTS = load_config(env={}).server
DURATION = {"s": 1, "m": 60, "h": 3600}


def blocks(kind: str) -> dict[str, str]:
    """`kind ARG { ... }` blocks (no nested braces inside) by their argument."""
    found = re.findall(rf"^\s*{kind}\s+(.+?)\s*\{{(.*?)^\s*\}}", TEXT, re.M | re.S)
    return dict(found)


LOCATIONS = blocks("location")
UPSTREAMS = blocks("upstream")


def location_for(path: str) -> str:
    """nginx's choice for `path`: an exact match, else the first matching regex location, else
    the longest matching prefix (no ^~ locations here)."""
    if f"= {path}" in LOCATIONS:
        return f"= {path}"
    for spec in LOCATIONS:
        if spec.startswith("~ ") and re.search(spec[2:], path):
            return spec
    prefixes = [s for s in LOCATIONS if not s.startswith(("~", "=", "@")) and path.startswith(s)]
    return max(prefixes, key=len)


def directive(body: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]+);", body, re.M)


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)([smh]?)", value).groups()
    return int(number) * DURATION.get(unit or "s", 1)


WEBSOCKET_PATHS = [*ROUTES, "/v1/calls/CA0123/events"]


def test_the_call_events_example_is_a_real_call_path():
    assert CALL_PATH.fullmatch("/v1/calls/CA0123/events")


@pytest.mark.parametrize("path", WEBSOCKET_PATHS)
def test_every_websocket_route_is_upgraded_unbuffered_with_long_timeouts(path):
    spec = location_for(path)
    body = LOCATIONS[spec]
    assert directive(body, "proxy_pass") == ["http://streamscribe_streams"]
    assert directive(body, "proxy_buffering") == ["off"]
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        (value,) = directive(body, name)
        assert seconds(value) > DEFAULTS.idle_timeout_s
    # Upgrade headers are set once for the server block, and no location overrides them (a
    # location with its own proxy_set_header would inherit none of the server's).
    assert not directive(body, "proxy_set_header")
    server_headers = directive(TEXT, "proxy_set_header")
    assert "Upgrade           $http_upgrade" in server_headers
    assert "Connection        $connection_upgrade" in server_headers
    assert "proxy_http_version 1.1;" in TEXT
    assert re.search(r"map \$http_upgrade \$connection_upgrade \{[^}]*default upgrade;", TEXT)


@pytest.mark.parametrize(
    "path, upstream",
    [
        ("/v1/audio/transcriptions", "streamscribe_rest"),
        ("/v1/auth/token", "streamscribe_rest"),
        ("/healthz", "streamscribe_streams"),
        ("/readyz", "streamscribe_streams"),
        ("/metrics", "streamscribe_streams"),
        ("/", "streamscribe_streams"),
        ("/web/app.js", "streamscribe_streams"),
        ("/v1/client-config", "streamscribe_streams"),
        ("/v1/sessions/abc/captions.vtt", "streamscribe_streams"),
    ],
)
def test_each_route_reaches_its_port(path, upstream):
    assert directive(LOCATIONS[location_for(path)], "proxy_pass") == [f"http://{upstream}"]


def test_no_location_overrides_the_server_headers():
    for spec, body in LOCATIONS.items():
        assert not directive(body, "proxy_set_header"), spec


def test_upload_limit_is_the_servers():
    """The server takes a file of max_upload_bytes in a body FORM_OVERHEAD larger."""
    (limit,) = directive(TEXT, "client_max_body_size")
    assert int(limit) == DEFAULTS.max_upload_bytes + FORM_OVERHEAD
    assert f"limit of {DEFAULTS.max_upload_bytes} bytes" in LOCATIONS["@too_large"]


def test_least_conn_and_a_shared_zone_in_every_upstream():
    assert set(UPSTREAMS) == {"streamscribe_streams", "streamscribe_rest"}
    for name, body in UPSTREAMS.items():
        assert re.search(r"^\s*least_conn;", body, re.M)
        assert directive(body, "zone")[0].split()[0] == name


def test_a_stopped_or_draining_instance_is_skipped():
    (retry,) = directive(TEXT, "proxy_next_upstream")
    assert set(retry.split()) >= {"error", "timeout", "http_503"}


def test_tls_termination_and_a_redirect_from_plain_http():
    assert re.search(r"^\s*listen\s+443\s+ssl;", TEXT, re.M)
    assert directive(TEXT, "ssl_certificate") and directive(TEXT, "ssl_certificate_key")
    assert "return 301 https://$host$request_uri;" in TEXT

"""deploy/compose.yaml read with PyYAML: the three services, their health checks and start
order, what reaches the server (its settings are loaded by the server's own loader), and what
ties it to the image and to nginx's configuration. (Compose itself is not run here.)"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.files import DEPLOY, IMAGE_CONFIG, REPO, parse_dockerfile, server_settings

COMPOSE = DEPLOY / "compose.yaml"


@pytest.fixture(scope="module")
def services() -> dict:
    compose = yaml.safe_load(COMPOSE.read_text())
    return compose["services"]


def substituted(value: str) -> str:
    """A compose value with ${VAR:-default} as its default and ${VAR:?message} as a sample."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{\w+:\?[^}]*\}", "sample-key", value)


def test_server_nginx_and_redis(services):
    assert set(services) == {"streamscribe", "nginx", "redis"}


def test_the_server_is_built_from_the_cpu_dockerfile_with_the_images_health_check(services):
    server = services["streamscribe"]
    context = (COMPOSE.parent / server["build"]["context"]).resolve()
    assert context == REPO
    dockerfile = context / server["build"]["dockerfile"]
    assert dockerfile == DEPLOY / "Dockerfile.cpu"
    (image_check,) = parse_dockerfile(dockerfile).stages[-1].all("HEALTHCHECK")
    test = server["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:] == image_check.exec_form()
    assert any("/healthz" in part for part in test)


def test_health_checks_and_start_order(services):
    """Redis is healthy before the server starts, the server before nginx (whose upstream names
    must resolve when it starts)."""
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["streamscribe"]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert services["nginx"]["depends_on"] == {"streamscribe": {"condition": "service_healthy"}}


def test_the_server_gets_redis_and_valid_settings(services):
    environment = services["streamscribe"]["environment"]
    assert environment["STREAMSCRIBE_SERVER__REDIS_URL"] == "redis://redis:6379/0"
    env = {k: substituted(str(v)) for k, v in environment.items()}
    settings = server_settings(IMAGE_CONFIG, env)  # unknown names or bad values raise here
    assert settings.server.redis_url == "redis://redis:6379/0"
    assert settings.server.api_keys == "sample-key"
    assert "${STREAMSCRIBE_API_KEYS:?" in environment["STREAMSCRIBE_SERVER__API_KEYS"]


def test_only_nginx_publishes_ports_and_the_server_has_time_to_drain(services):
    settings = server_settings(IMAGE_CONFIG)
    assert "ports" not in services["streamscribe"] and "ports" not in services["redis"]
    assert {str(settings.server.port), str(settings.server.http_port)} <= set(
        map(str, services["streamscribe"]["expose"])
    )
    assert "443:443" in services["nginx"]["ports"]
    grace = re.fullmatch(r"(\d+)s", services["streamscribe"]["stop_grace_period"])
    assert int(grace.group(1)) > settings.server.drain_grace_s


def test_nginx_mounts_the_shipped_configuration_whose_upstreams_name_the_service(services):
    mounts = [m.split(":") for m in services["nginx"]["volumes"]]
    sources = {target: (COMPOSE.parent / source).resolve() for source, target, *_ in mounts}
    conf = sources["/etc/nginx/conf.d/default.conf"]
    assert conf == DEPLOY / "nginx" / "streamscribe.conf"
    text = conf.read_text()
    settings = server_settings(IMAGE_CONFIG)
    upstreams = dict(re.findall(r"upstream\s+(\w+)\s*\{[^}]*?^\s*server\s+(\S+)", text, re.M))
    assert upstreams == {
        "streamscribe_streams": f"streamscribe:{settings.server.port}",
        "streamscribe_rest": f"streamscribe:{settings.server.http_port}",
    }
    certs = sources["/etc/nginx/certs"]
    for path in re.findall(r"ssl_certificate(?:_key)?\s+(\S+);", text):
        assert path.startswith("/etc/nginx/certs/")
    assert certs.is_dir()

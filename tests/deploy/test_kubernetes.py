"""deploy/kubernetes: every manifest validated against the Kubernetes JSON schemas (strict: an
unknown or misspelt field fails) by `kubernetes-validate`, whose schemas ship inside the package,
with every network connection refused while it runs; the ServiceMonitor (a Prometheus operator
CRD, in no Kubernetes schema) by its documented shape. Then what ties the manifests to the
server: ports, probes, the drain, the GPU, the metric the autoscaler reads, the Secret."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from streaming.ops.metrics import Metrics
from tests.deploy.files import DEPLOY, server_settings

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is a dev dependency: pip install -e '.[dev]'"
)

FOLDER = DEPLOY / "kubernetes"
# The oldest Kubernetes these manifests are meant for, and the newest schemas the package has.
VERSIONS = ("1.30", kubernetes_validate.latest_version())
SECRET = "streamscribe-secrets"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def kustomization() -> dict:
    (only,) = documents(FOLDER / "kustomization.yaml")
    return only


@pytest.fixture(scope="module")
def resources(kustomization) -> dict[str, dict]:
    """Every resource the kustomization lists, by kind (one of each here)."""
    found: dict[str, dict] = {}
    for name in kustomization["resources"]:
        for document in documents(FOLDER / name):
            assert document["kind"] not in found, document["kind"]
            found[document["kind"]] = document
    return found


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network use during validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_kustomization_lists_every_manifest_of_the_folder(kustomization):
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in FOLDER.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk and len(set(listed)) == len(listed)
    images = {i["name"] for i in kustomization["images"]}
    containers = [c["image"] for c in pod_spec(resources_of(listed))["containers"]]
    assert set(containers) <= images


def resources_of(names: list[str]) -> dict[str, dict]:
    return {d["kind"]: d for n in names for d in documents(FOLDER / n)}


def pod_spec(resources: dict[str, dict]) -> dict:
    return resources["Deployment"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_match_the_kubernetes_schemas_offline(resources, version, offline):
    checked = []
    for kind, resource in resources.items():
        if kind == "ServiceMonitor":
            continue  # a CRD: no Kubernetes schema (test below)
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path)
            pytest.fail(f"{kind} against {version}: {where}: {err.message}")
        checked.append(kind)
    assert sorted(checked) == [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service",
    ]  # fmt: skip


def test_the_validator_catches_a_misspelt_field(resources, offline):
    """The strict schemas are really applied: a typo deep in the pod spec fails."""
    broken = yaml.safe_load(yaml.safe_dump(resources["Deployment"]))
    pod_spec({"Deployment": broken})["terminationGracePeriodSecond"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_the_service_monitor_has_the_operators_shape(resources):
    """monitoring.coreos.com/v1 ServiceMonitor: a label selector, endpoints naming a Service
    port, the metrics path, and the API key from the Secret (SafeAuthorization: type and a
    Secret key reference), as /metrics needs it when server.api_keys is set."""
    monitor = resources["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert monitor["spec"]["selector"]["matchLabels"] == resources["Service"]["metadata"]["labels"]
    service_ports = {p["name"] for p in resources["Service"]["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "authorization"}
    assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    assert endpoint["interval"].endswith("s") and int(endpoint["interval"][:-1]) > 0
    auth = endpoint["authorization"]
    assert auth["type"] == "Bearer"
    assert auth["credentials"]["name"] == SECRET and set(auth["credentials"]) == {"name", "key"}


@pytest.fixture(scope="module")
def settings(resources, tmp_path_factory):
    """The server's effective settings from the ConfigMap's config.yaml, loaded by the server's
    own loader (an unknown key or bad value fails here)."""
    path = tmp_path_factory.mktemp("configmap") / "config.yaml"
    path.write_text(resources["ConfigMap"]["data"]["config.yaml"])
    return server_settings(path)


def test_the_container_serves_the_configmap_on_the_services_ports(resources, settings):
    pod = pod_spec(resources)
    (container,) = pod["containers"]
    assert container["command"] == [
        "streamscribe", "serve", "--host", "0.0.0.0", "--config", "/etc/streamscribe/config.yaml",
    ]  # fmt: skip
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["config"] == "/etc/streamscribe"
    assert volumes["config"]["configMap"]["name"] == resources["ConfigMap"]["metadata"]["name"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"ws": settings.server.port, "rest": settings.server.http_port}
    service = {p["name"]: p["targetPort"] for p in resources["Service"]["spec"]["ports"]}
    assert service == {"ws": "ws", "rest": "rest"}
    labels = resources["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert resources["Service"]["spec"]["selector"].items() <= labels
    assert resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels
    assert resources["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels


def test_probes_readiness_on_readyz_liveness_on_healthz(resources):
    (container,) = pod_spec(resources)["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ws"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ws"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_the_grace_period_covers_prestop_and_the_drain(resources, settings):
    pod = pod_spec(resources)
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.server.drain_grace_s


def test_one_gpu_per_pod(resources, settings):
    (container,) = pod_spec(resources)["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert settings.engine.device == "cuda"


def test_the_autoscaler_reads_the_servers_open_streams_gauge(resources):
    hpa = resources["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "streamscribe")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    served = {m.name for m in Metrics().registry.collect()}
    assert name == "streamscribe_sessions_active" and name in served
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 0 < float(metric["pods"]["target"]["averageValue"])
    assert hpa["spec"]["minReplicas"] >= 2  # the PodDisruptionBudget lets one go at a time


def test_secrets_come_from_one_secret_that_is_not_committed(resources, settings):
    (container,) = pod_spec(resources)["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert refs["STREAMSCRIBE_SERVER__API_KEYS"] == {"name": SECRET, "key": "api-keys"}
    volumes = {v["name"]: v for v in pod_spec(resources)["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == SECRET
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (item,) = volumes["secrets"]["secret"]["items"]
    assert settings.server.token_secret_file == f"{mounts['secrets']}/{item['path']}"
    assert "Secret" not in resources  # created by hand (README), no key in the repository

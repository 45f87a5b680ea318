"""deploy/Dockerfile.cpu and deploy/Dockerfile.cuda, read as Docker reads them: stages, the
README's install steps, an unprivileged user, the ports, the health check and the command. The
package they install is built here from exactly the files the build context holds (.dockerignore)
and served from outside the repository, with the image's config file and health check. Images
are built only where a Docker daemon answers (`docker info`); elsewhere that test is skipped."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.deploy.files import (
    DEPLOY,
    IMAGE_CONFIG,
    REPO,
    Dockerfile,
    dockerignore_rules,
    in_context,
    parse_dockerfile,
    resolve,
    server_settings,
)

IMAGES = {"cpu": DEPLOY / "Dockerfile.cpu", "cuda": DEPLOY / "Dockerfile.cuda"}
CONFIG_IN_IMAGE = "/etc/streamscribe/config.yaml"


@pytest.fixture(scope="module", params=sorted(IMAGES))
def image(request) -> tuple[str, Dockerfile]:
    return request.param, parse_dockerfile(IMAGES[request.param])


def healthcheck_command(dockerfile: Dockerfile) -> list[str]:
    (check,) = dockerfile.stages[-1].all("HEALTHCHECK")
    command = check.exec_form()  # the array after CMD
    assert " CMD [" in f" {check.args}" and command, check.args
    return command


def test_multi_stage_the_runtime_copies_only_the_built_environment(image):
    _, dockerfile = image
    build, runtime = dockerfile.stages[0], dockerfile.stages[-1]
    assert len(dockerfile.stages) >= 2 and build.name
    assert resolve(build.base, dockerfile.args) == resolve(runtime.base, dockerfile.args)
    copies = runtime.all("COPY")
    assert f"--from={build.name} /opt/venv /opt/venv" in [c.args for c in copies]
    # No sources, no compiler, no pip install in the runtime stage: the venv is complete.
    assert not any("pip install" in r.args for r in runtime.all("RUN"))


def test_the_build_stage_follows_the_readme_install_steps(image):
    """A venv (`python3 -m venv`), torch pinned as in the README and installed first, then the
    project with extras that pyproject.toml defines (`cpu` for the CPU image)."""
    kind, dockerfile = image
    readme = (REPO / "README.md").read_text()
    pinned = re.search(r"pip install (torch==[\d.]+)", readme).group(1)
    build = dockerfile.stages[0]
    assert any(a.args == f"TORCH_SPEC={pinned}" for a in build.all("ARG"))
    steps = " && ".join(r.args for r in build.all("RUN"))
    assert "python3 -m venv /opt/venv" in steps
    torch_at = steps.index('"$TORCH_SPEC"')
    (project,) = re.findall(r"pip install '\.\[([a-z,]+)\]'", steps)
    assert torch_at < steps.index("pip install '.[")
    defined = pyproject_extras()
    extras = project.split(",")
    assert set(extras) <= set(defined), f"extras {extras} not all in pyproject {sorted(defined)}"
    assert ("cpu" in extras) == (kind == "cpu")


def pyproject_extras() -> set[str]:
    """The names in pyproject.toml's [project.optional-dependencies] (no tomllib on 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    table = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*=", table.group(1), re.M))


def test_the_runtime_runs_as_an_unprivileged_user(image):
    _, dockerfile = image
    runtime = dockerfile.stages[-1]
    users = runtime.all("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0") and user.isdigit()  # numeric: runAsNonRoot can check it
    created = " ".join(r.args for r in runtime.all("RUN"))
    assert f"--uid {user}" in created
    assert runtime.instructions.index(users[-1]) > max(
        runtime.instructions.index(i) for i in runtime.all("RUN")
    )


def test_ports_health_check_and_command_agree_with_the_config_file(image):
    _, dockerfile = image
    runtime = dockerfile.stages[-1]
    settings = server_settings(IMAGE_CONFIG)
    exposed = {int(p) for e in runtime.all("EXPOSE") for p in e.args.split()}
    assert exposed == {settings.server.port, settings.server.http_port}
    check = " ".join(healthcheck_command(dockerfile))
    assert f"http://127.0.0.1:{settings.server.port}/healthz" in check
    (cmd,) = runtime.all("CMD")
    assert cmd.exec_form() == [
        "streamscribe", "serve", "--host", "0.0.0.0", "--config", CONFIG_IN_IMAGE,
    ]  # fmt: skip
    assert f"deploy/streamscribe.yaml {CONFIG_IN_IMAGE}" in [c.args for c in runtime.all("COPY")]
    # SIGTERM drains: the server's signal, and the config file is one the server accepts.
    assert [s.args for s in runtime.all("STOPSIGNAL")] == ["SIGTERM"]


def test_every_file_the_images_copy_is_in_the_build_context(image):
    _, dockerfile = image
    rules = dockerignore_rules()
    for stage in dockerfile.stages:
        for copy in stage.all("COPY"):
            if copy.args.startswith("--from"):
                continue
            *sources, _ = shlex.split(copy.args)
            for source in sources:
                assert (REPO / source).exists(), source
                assert in_context(source, rules), f"{source} is left out by .dockerignore"
    assert not in_context(".venv/bin/python", rules) and not in_context("tests/x.py", rules)
    assert not in_context("streaming/__pycache__/x.pyc", rules)


def context_copy(folder: Path) -> Path:
    """The files Dockerfile.cpu copies into its build stage, as the build context holds them."""
    rules = dockerignore_rules()
    build = parse_dockerfile(IMAGES["cpu"]).stages[0]
    for copy in build.all("COPY"):
        *sources, _ = shlex.split(copy.args)
        for source in sources:
            path = REPO / source
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for file in files:
                relative = file.relative_to(REPO).as_posix()
                if in_context(relative, rules):
                    (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, folder / relative)
    return folder


def test_the_installed_package_serves_outside_the_repository_with_the_image_config(tmp_path):
    """What the build stage's `pip install .` makes of the build context (a wheel, not an
    editable install) holds everything `serve` needs: from another folder, with the image's
    config file, it serves, and the image's health check passes against it."""
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build the package offline")
    source = context_copy(tmp_path / "context")
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "run"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels),
         str(source)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = wheels.glob("streamscribe-*.whl")
    subprocess.run(
        [*pip, "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSCRIBE_")}
    env["PYTHONPATH"] = str(target)
    where = subprocess.run(
        [sys.executable, "-c", "import streaming, clients; print(streaming.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert where.stdout.startswith(str(target)), where  # the installed copy, not the repository
    proc = subprocess.Popen(
        [sys.executable, "-m", "streaming", "serve", "--model", "noop", "--config",
         str(IMAGE_CONFIG), "--host", "127.0.0.1", "--port", "0", "--http-port", "0"],
        cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = ready_port(proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        check = healthcheck_command(parse_dockerfile(IMAGES["cpu"]))
        check = [part.replace(":8765/", f":{port}/") for part in check]
        assert check[0] == "python"
        alive = subprocess.run([sys.executable, *check[1:]], timeout=30, capture_output=True)
        assert alive.returncode == 0, alive.stderr
    finally:
        proc.terminate()
        proc.wait(30)
    gone = subprocess.run([sys.executable, *check[1:]], timeout=30, capture_output=True)
    assert gone.returncode != 0  # the check fails once nothing answers


def ready_port(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """The streams port from `serve`'s ready summary (bounded: a thread reads the pipe)."""
    import queue
    import threading

    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        found = re.search(r"streams\s+ws://127\.0\.0\.1:(\d+)/", line)
        if found:
            return int(found.group(1))
    proc.kill()
    raise AssertionError(f"no ready summary: {seen} {proc.stderr.read()[-2000:]}")


def docker_daemon() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not docker_daemon(), reason="no running Docker daemon: no image is built")
def test_the_cpu_image_builds_and_runs_as_its_user():
    """Only where `docker info` answers (and the base image and packages can be fetched)."""
    tag = "streamscribe-test:cpu"
    built = subprocess.run(
        ["docker", "build", "-f", str(IMAGES["cpu"]), "-t", tag, str(REPO)],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-4000:]
    user = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert user.stdout.strip() == "10001"

"""deploy/nginx/streamscribe.conf made runnable on loopback, and Debian's nginx run on it.

The derived configuration keeps every proxy rule of the shipped file; only what names this
machine changes: the listen ports (free loopback ports), the certificate paths (a self-signed pair
made by `openssl` in a temporary folder) and the upstream servers (nginx resolves their names when
it loads, and the shipped `streamscribe` exists only inside compose). The wrapper around it gives
nginx its pid, log and temporary files in the same folder, so it runs without touching /etc or
/var."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "deploy" / "nginx" / "streamscribe.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
)
UPSTREAM = re.compile(r"(upstream\s+(\w+)\s*\{)(.*?)(\n\})", re.S)
ACTIVE_SERVER = re.compile(r"^(\s*)server\s+(\S+)(.*?;)[^\n]*$", re.M)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def self_signed_pair(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, valid one day, and its key (EC P-256)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def _once(pattern: str, replacement: str, text: str) -> str:
    """`text` with the single match of `pattern` replaced; the shipped file must have it."""
    changed, count = re.subn(pattern, replacement, text, flags=re.M)
    assert count == 1, f"{SHIPPED.name}: expected one {pattern!r}, found {count}"
    return changed


def derive(
    cert: Path, key: str | Path, https_port: int, http_port: int, upstreams: dict[str, list[str]]
) -> str:
    """The shipped file on this machine: `upstreams` maps each upstream's name to its servers
    (host:port); each keeps the parameters of the shipped file's active server line."""
    text = SHIPPED.read_text()
    text = _once(r"^(\s*)listen\s+443\s+ssl;", rf"\1listen 127.0.0.1:{https_port} ssl;", text)
    text = _once(r"^(\s*)listen\s+80;", rf"\1listen 127.0.0.1:{http_port};", text)
    text = _once(r"^(\s*ssl_certificate)\s+\S+;", rf"\1 {cert};", text)
    text = _once(r"^(\s*ssl_certificate_key)\s+\S+;", rf"\1 {key};", text)

    def servers(block: re.Match) -> str:
        name, body = block.group(2), block.group(3)
        active = ACTIVE_SERVER.findall(body)
        assert len(active) == 1, f"upstream {name}: expected one active server line"
        indent, _, params = active[0]
        body = ACTIVE_SERVER.sub("", body).rstrip()
        body += "".join(f"\n{indent}server {where}{params}" for where in upstreams.pop(name))
        return block.group(1) + body + block.group(4)

    text = UPSTREAM.sub(servers, text)
    assert not upstreams, f"no such upstream in {SHIPPED.name}: {sorted(upstreams)}"
    return text


def main_conf(folder: Path, site: str) -> Path:
    """nginx.conf in `folder`: the derived site inside http {}, every file nginx writes in
    `folder`. As root, workers would switch to `nobody`, who cannot write there: `user root`.
    access.log names the instance each request went to (`upstreams` reads it)."""
    (folder / "site.conf").write_text(site)
    temp = "\n".join(
        f"    {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = folder / "nginx.conf"
    conf.write_text(
        f"{user}daemon off;\nworker_processes 2;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'} info;\n"
        "events { worker_connections 1024; }\n"
        "http {\n    log_format upstream '$status \"$request\" upstream=$upstream_addr';\n"
        f"    access_log {folder / 'access.log'} upstream;\n{temp}\n"
        f"    include {folder / 'site.conf'};\n}}\n"
    )
    return conf


def check(conf: Path) -> subprocess.CompletedProcess:
    """`nginx -t` on `conf`."""
    return subprocess.run(
        [
            NGINX,
            "-t",
            "-p",
            str(conf.parent),
            "-e",
            str(conf.parent / "error.log"),
            "-c",
            str(conf),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


@dataclass
class Nginx:
    proc: subprocess.Popen
    folder: Path

    def log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def upstreams(self, path: str) -> list[str]:
        """host:port of the server that answered each finished request for `path` (the last
        one tried), in the order they finished; nginx logs a WebSocket once it has closed."""
        log = self.folder / "access.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return [
            line.rsplit("upstream=", 1)[1].split(", ")[-1]
            for line in lines
            if f" {path} HTTP/" in line and "upstream=" in line
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown: open streams are cut
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start(conf: Path, port: int, timeout_s: float = 15.0) -> Nginx:
    """nginx in the foreground on `conf`; returns once `port` accepts connections."""
    folder = conf.parent
    proc = subprocess.Popen(
        [NGINX, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    nginx = Nginx(proc, folder)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited with {proc.returncode}: {nginx.log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return nginx
        except OSError:
            time.sleep(0.05)
    nginx.stop()
    raise AssertionError(f"nginx did not listen on {port} within {timeout_s} s: {nginx.log()}")

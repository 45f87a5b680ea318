"""Reading the deployment files: Dockerfile instructions and stages, .dockerignore rules, the
settings the images and manifests give the server."""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from streaming.ops.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
IMAGE_CONFIG = DEPLOY / "streamscribe.yaml"


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the (joined) line
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array form (CMD ["a", "b"]), else None."""
        text = self.args
        if text.startswith("--"):  # HEALTHCHECK options before CMD
            text = text.split(" CMD ", 1)[1] if " CMD " in text else text
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: list[Stage]


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with their continuation lines joined and comments dropped, split into stages
    at each FROM."""
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        logical.append((start, pending + stripped))
        pending = ""
    assert not pending, f"{path.name}: the last instruction ends with a backslash"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, rest = text.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}:{number}: {keyword} before the first FROM"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, rest, number))
    return Dockerfile(args, stages)


def resolve(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def dockerignore_rules() -> list[tuple[bool, str]]:
    """(exclude?, pattern) in order; the last rule that matches a path decides, as in Docker."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((not negated, line.lstrip("!").rstrip("/")))
    return rules


def in_context(relative: str, rules: list[tuple[bool, str]]) -> bool:
    """Whether `relative` (a path in the repository) is sent to `docker build`: a rule matches
    the path or any folder above it; `**/` matches any number of folders."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exclude, pattern in rules:
        variants = [pattern]
        if pattern.startswith("**/"):
            variants.append(pattern[3:])
            variants += ["*/" * depth + pattern[3:] for depth in range(1, len(parts))]
        if any(fnmatch.fnmatchcase(p, v) for p in prefixes for v in variants):
            excluded = exclude
    return not excluded


def server_settings(path: Path, env: dict[str, str] | None = None) -> Config:
    """The effective settings of `streamscribe serve --config path` under `env` alone."""
    return load_config(path, env=env or {})

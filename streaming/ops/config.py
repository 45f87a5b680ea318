"""Typed settings: dataclass defaults < YAML file < STREAMSCRIBE_* environment < flags.

Each setting is declared once, as a field of a frozen section dataclass with its limits in the
field metadata (see `setting`), so one generic loader validates every section and every error
names the dotted key, the bad value and where that value came from. A new section is one
dataclass plus one field of `Config` (and its block in config.yaml).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

import yaml

from engine.api import DEFAULT_OPTIONS, primary_language
from engine.scheduler import SchedulerConfig
from streaming.core.vad import SegmenterConfig

ENV_PREFIX = "STREAMSCRIBE_"
CONFIG_ENV = "STREAMSCRIBE_CONFIG"
DEFAULT_SOURCE = "default"
OVERRIDE_SOURCE = "command line"


class ConfigError(ValueError):
    """A setting is unknown or invalid; the message says which, where from, and what is valid."""


def setting(
    default: Any,
    *,
    choices: tuple[str, ...] | None = None,
    pattern: str | None = None,
    expect: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    allowed: tuple[Any, ...] | None = None,
    below: str | None = None,
    paired: str | None = None,
    counts: bool = False,
) -> Any:
    """A section field whose limits live next to its default, for the generic validator.

    `choices` match case-insensitively; `pattern` must match the whole value and `expect` says in
    words what it accepts; `ge`/`gt`/`le` bound numbers; `allowed` lists the only valid numbers;
    `below` names a field of the same section that this value must stay under; `paired` one that
    must be set (non-empty) exactly when this one is; `counts`: a text setting that may be
    written as a plain number too.
    """
    limits = {
        "choices": choices,
        "pattern": pattern,
        "expect": expect,
        "ge": ge,
        "gt": gt,
        "le": le,
        "allowed": allowed,
        "below": below,
        "paired": paired,
        "counts": counts or None,
    }
    return dataclasses.field(
        default=default, metadata={k: v for k, v in limits.items() if v is not None}
    )


@dataclass(frozen=True)
class EngineConfig:
    """Which model to load and how to feed it (the keywords of engine.selection.load_engine);
    the loading options' defaults are engine.api.EngineOptions'."""

    model: str = "auto"
    granite_nar_model: str = "ibm-granite/granite-speech-4.1-2b-nar"
    granite_ar_model: str = "ibm-granite/granite-speech-4.1-2b"
    whisper_model: str = "tiny.en"
    device: str = setting(
        DEFAULT_OPTIONS.device,
        pattern=r"(auto|cpu|cuda(:\d+)?)(,(auto|cpu|cuda(:\d+)?))*",
        expect="auto, cpu, cuda or cuda:N, or several comma-separated (one engine process each)",
    )
    dtype: str = setting(DEFAULT_OPTIONS.dtype, choices=("auto", "float32", "bfloat16", "float16"))
    max_batch: int = setting(DEFAULT_OPTIONS.max_batch, ge=1)
    window_s: float = setting(DEFAULT_OPTIONS.window_s, gt=0)
    window_overlap_s: float = setting(DEFAULT_OPTIONS.window_overlap_s, ge=0, below="window_s")
    hub_timeout_s: float = setting(DEFAULT_OPTIONS.hub_timeout_s, gt=0)
    ctc_confidence_skip: float = setting(DEFAULT_OPTIONS.ctc_confidence_skip, ge=0, le=1)
    compile: bool = DEFAULT_OPTIONS.compile
    refine_model: str = "none"

    @property
    def refine(self) -> str | None:
        """The refine (accuracy pass) model asked for; None when `refine_model` is none/empty."""
        name = self.refine_model.strip()
        return None if name.lower() in ("", "none") else name

    def load_keywords(self, model: str | None = None) -> dict[str, Any]:
        """The keywords of engine.selection.load_engine: this section without `refine_model`
        (not a loading option), and `model` in place of `engine.model` when given, so the refine
        model loads with the primary's device, dtype and sources."""
        keywords = dataclasses.asdict(self)
        del keywords["refine_model"]
        if model is not None:
            keywords["model"] = model
        return keywords


@dataclass(frozen=True)
class ServerConfig:
    """The WebSocket gateway: address, capacity and limits per connection."""

    host: str = "127.0.0.1"
    port: int = setting(8765, ge=0, le=65535)
    max_sessions: int = setting(200, ge=1)
    max_frame_bytes: int = setting(1048576, ge=1024)
    idle_timeout_s: float = setting(30.0, gt=0)
    max_session_s: float = setting(14400.0, gt=0)
    drain_grace_s: float = setting(30.0, ge=0)
    max_pending_finals: int = setting(8, ge=1)
    status_lag_ms: float = setting(1000.0, gt=0)
    api_keys: str = setting(
        "",
        pattern=r"(?s)|.*[^\s,].*",
        expect="empty (no authentication) or comma-separated keys, at least one not blank",
    )
    call_subscriber_hold_s: float = setting(30.0, gt=0)
    webhook_url: str = setting(
        "", pattern=r"(https?://\S+)?", expect="empty (off) or an http:// or https:// URL"
    )
    webhook_retries: int = setting(3, ge=0)
    audiosocket_port: int = setting(0, ge=0, le=65535)
    audiosocket_host: str = "127.0.0.1"
    http_port: int = setting(8766, ge=-1, le=65535)
    max_upload_bytes: int = setting(26214400, ge=1024)
    max_upload_s: float = setting(3600.0, gt=0)
    upload_timeout_s: float = setting(60.0, gt=0)
    caption_sessions: int = setting(100, ge=1)
    caption_cues: int = setting(100000, ge=1)
    event_loop: str = setting("auto", choices=("auto", "uvloop", "asyncio"))
    # TLS on the WebSocket/HTTP port and the REST port (PEM files; both empty: plain). SIGHUP
    # reloads them.
    tls_cert: str = setting("", paired="tls_key")
    tls_key: str = setting("", paired="tls_cert")
    # Short-lived signed tokens (POST /v1/auth/token): the HMAC secret, given inline or as a file
    # (empty both: a random secret per process, so tokens end with it), and the longest ttl_s.
    token_secret: str = ""
    token_secret_file: str = ""
    token_max_ttl_s: float = setting(3600.0, gt=0, le=86400)
    # Proxies (nginx) whose X-Forwarded-For names the client, for the bad-key throttle:
    # comma-separated addresses or networks; empty: the TCP peer is the client.
    trusted_proxies: str = setting(
        "",
        pattern=r"[0-9A-Fa-f:.,/\s]*",
        expect="empty or comma-separated IP addresses or networks, e.g. 10.0.0.0/8",
    )
    # Per-key limits: "KEY:STREAMS:HOURS" items, comma-separated; KEY `*` applies to every key
    # without its own item; 0 = unlimited (concurrent streams; audio hours per UTC day).
    key_limits: str = setting(
        "",
        pattern=r"\s*|[^:,\s]+:\d+:\d+(\.\d+)?(\s*,\s*[^:,\s]+:\d+:\d+(\.\d+)?)*\s*",
        expect='empty (no limits) or "KEY:STREAMS:HOURS" items, comma-separated, e.g. "*:4:10"',
    )
    # Session resume (native protocol): how long a stream outlives an abrupt disconnect (0 = off),
    # and how many of its events are kept for a reconnecting client.
    resume_window_s: float = setting(30.0, ge=0, le=3600)
    resume_buffer_events: int = setting(500, ge=10)
    # Gateway processes accepting on the same ports (SO_REUSEPORT), sharing one engine process
    # per device: a number, or `auto` (one per CPU core).
    workers: str = setting(
        "1", pattern=r"auto|[1-9][0-9]{0,2}", expect="auto or 1 to 999", counts=True
    )
    # Call events and caption exports across processes and machines through Redis pub/sub
    # (redis://HOST:PORT/DB); empty: within this process only.
    redis_url: str = setting(
        "", pattern=r"(rediss?://\S+)?", expect="empty (in-process) or a redis:// URL"
    )


# The segmenter's defaults are the session's: declared once, with their reasons, in vad.py.
_SEGMENTER = SegmenterConfig()


@dataclass(frozen=True)
class SessionConfig:
    """Defaults of every stream; a client may override them per session."""

    encoding: str = setting("pcm_s16le", choices=("pcm_s16le", "pcm_f32le", "mulaw", "alaw"))
    sample_rate: int = setting(16000, allowed=(8000, 16000, 22050, 24000, 32000, 44100, 48000))
    channels: int = setting(1, allowed=(1, 2))
    language: str = "en"
    interim_results: bool = True
    partial_interval_ms: int = setting(400, ge=100)
    partial_window_ms: int = setting(1000, ge=0)
    vad_frame_ms: int = setting(_SEGMENTER.frame_ms, allowed=(10, 20, 30))
    vad_aggressiveness: int = setting(_SEGMENTER.aggressiveness, allowed=(0, 1, 2, 3))
    speech_pad_ms: int = setting(_SEGMENTER.speech_pad_ms, ge=0, le=2000)
    hangover_ms: int = setting(_SEGMENTER.hangover_ms, ge=100, le=5000)
    min_segment_ms: int = setting(_SEGMENTER.min_segment_ms, ge=0)
    max_segment_ms: int = setting(_SEGMENTER.max_segment_ms, ge=1000, le=60000)
    energy_gate_dbfs: float = setting(_SEGMENTER.energy_gate_dbfs, le=0)
    stable_agreement: int = setting(3, ge=1)
    stable_settle_ms: int = setting(1200, ge=0)
    captions_mode: str = setting("off", choices=("off", "rollup", "popon"))
    captions_preset: int = setting(42, allowed=(32, 37, 42))
    captions_rows: int = setting(2, allowed=(2, 3))
    captions_hold_back_words: int = setting(1, ge=0, le=10)
    timecode_origin_ms: int = setting(0, ge=0)
    refine: bool = True
    refine_mode: str = setting("async", choices=("async", "sync"))
    refine_deadline_ms: int = setting(3000, ge=100, le=60000)
    translate_to: str = ""


@dataclass(frozen=True)
class LoggingConfig:
    """How much the process logs and in which shape (quiet JSON lines unless asked otherwise)."""

    level: str = setting("warning", choices=("debug", "info", "warning", "error"))
    format: str = setting("json", choices=("json", "text"))


@dataclass(frozen=True)
class Config:
    """All settings, one attribute per section. The scheduler's section is the engine's own
    SchedulerConfig (its limits in the same field metadata), so the engine stays free of this
    loader; its batch size is `engine.max_batch`, which the model is loaded with too."""

    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    session: SessionConfig = dataclasses.field(default_factory=SessionConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dicts, e.g. for printing the effective configuration as YAML."""
        return dataclasses.asdict(self)


def parse_bool(text: str) -> bool:
    """The one boolean spelling used everywhere: true/false in any case, or 1/0."""
    lowered = text.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise ValueError(f"expected true or false (or 1/0), got {text!r}")


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Build the effective Config; raise ConfigError on any unknown or invalid setting.

    `path` defaults to $STREAMSCRIBE_CONFIG (no file when unset); `env` defaults to os.environ;
    `overrides` maps dotted keys ("engine.model") to values, and None values are ignored.
    """
    env = os.environ if env is None else env
    sections = get_type_hints(Config)
    chosen: dict[str, dict[str, tuple[Any, str]]] = {
        name: {f.name: (f.default, DEFAULT_SOURCE) for f in dataclasses.fields(cls)}
        for name, cls in sections.items()
    }
    file = path if path is not None else env.get(CONFIG_ENV) or None
    layers = []
    if file is not None:
        layers.append(_file_layer(file, sections))
    layers.append(_env_layer(env, sections))
    layers.append(
        [
            (key, value, OVERRIDE_SOURCE)
            for key, value in (overrides or {}).items()
            if value is not None
        ]
    )
    for layer in layers:
        for key, raw, source in layer:
            section, name = _resolve(key, source, sections)
            field = next(f for f in dataclasses.fields(sections[section]) if f.name == name)
            hint = get_type_hints(sections[section])[name]
            chosen[section][name] = (_convert(key, raw, hint, field.metadata, source), source)
    return Config(**{name: _build(name, cls, chosen[name]) for name, cls in sections.items()})


def override_section(section: str, base: Any, values: Mapping[str, object], source: str) -> Any:
    """`base` (a section instance) with `values` applied, validated like the config file; used
    for per-session options sent by clients. Raises ConfigError naming the bad key."""
    cls = type(base)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    chosen = {name: (getattr(base, name), DEFAULT_SOURCE) for name in fields}
    for name, raw in values.items():
        if name not in fields:
            raise ConfigError(
                f"unknown option {name!r} (from {source}); valid options: "
                f"{', '.join(fields)}{_suggest(name, fields)}"
            )
        chosen[name] = (_convert(name, raw, hints[name], fields[name].metadata, source), source)
    return _build(section, cls, chosen)


def session_options(
    base: SessionConfig,
    values: Mapping[str, object],
    source: str,
    languages: frozenset[str] | None,
    translations: frozenset[str] | None = None,
) -> SessionConfig:
    """A client's session options over `base`, validated like the config file and, when they
    name a `language`, against the loaded model's `languages` (None: any), and a `translate_to`
    against the refine model's `translations` (None: no refine model). Raises ConfigError."""
    options = override_section("session", base, values, source)
    if "language" in values:
        check_language(options.language, languages, f"session option language (from {source})")
    if "translate_to" in values:
        what = f"session option translate_to (from {source})"
        check_translation(options.translate_to, translations, what)
    return options


def check_language(language: str, languages: frozenset[str] | None, what: str) -> None:
    """Refuse a language the model cannot transcribe: it would write the speech out in one it
    knows, wrong without a word of warning. Tags compare by primary subtag (`en-US` is `en`);
    empty leaves the language to the model."""
    if not language or languages is None or primary_language(language) in languages:
        return
    raise ConfigError(
        f"{what} = {language!r}: the loaded model does not transcribe it; "
        f"its languages: {', '.join(sorted(languages))}"
    )


def check_translation(target: str, translations: frozenset[str] | None, what: str) -> None:
    """Refuse a translation target the refine model cannot write (`translations`; None: no
    refine model is loaded), naming what it can do: a session would otherwise wait for
    translations that never come. Empty asks for none."""
    if not target:
        return
    if translations is None:
        raise ConfigError(f"{what} = {target!r}: no refine model is loaded (engine.refine_model)")
    if primary_language(target) in translations:
        return
    can = (
        f"translates into: {', '.join(sorted(translations))}"
        if translations
        else "cannot translate"
    )
    raise ConfigError(f"{what} = {target!r}: the refine model {can}")


def _file_layer(
    path: str | os.PathLike[str], sections: Mapping[str, type]
) -> list[tuple[str, object, str]]:
    source = f"file {os.fspath(path)}"
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)} not found") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {os.fspath(path)}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {os.fspath(path)} is not valid YAML{_where(exc)}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {data!r}")
    entries = []
    for section, values in data.items():
        if section not in sections:
            _resolve(str(section), source, sections)  # raises, naming the valid sections
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(
                f"{section} (from {source}): expected a mapping of settings, got {values!r}"
            )
        entries += [(f"{section}.{key}", value, source) for key, value in values.items()]
    return entries


def _where(exc: yaml.YAMLError) -> str:
    """Line, column and problem of a YAML error on one line (PyYAML's own text spans several)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f": {exc}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {getattr(exc, 'problem', exc)}"


def _env_layer(env: Mapping[str, str], sections: Mapping[str, type]) -> list[tuple[str, str, str]]:
    entries = []
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        rest = var[len(ENV_PREFIX) :]
        if "__" in rest:
            section, key = rest.split("__", 1)
            entries.append(
                (f"{section.lower()}.{key.lower()}", value, f"environment variable {var}")
            )
            continue
        # STREAMSCRIBE_ENGINE_MODEL is a near-certain typo; other STREAMSCRIBE_* names are not ours.
        for section in sections:
            if rest.upper().startswith(section.upper() + "_"):
                fixed = f"{ENV_PREFIX}{section.upper()}__{rest[len(section) + 1 :]}"
                raise ConfigError(
                    f"environment variable {var} is not a setting: section and key "
                    f"are separated by two underscores (did you mean {fixed}?)"
                )
    return entries


def _resolve(key: str, source: str, sections: Mapping[str, type]) -> tuple[str, str]:
    section, _, name = key.partition(".")
    if section not in sections:
        raise ConfigError(
            f"unknown setting {key} (from {source}): there is no section {section!r}; "
            f"valid sections: {', '.join(sections)}{_suggest(section, sections)}"
        )
    names = [f.name for f in dataclasses.fields(sections[section])]
    if name not in names:
        raise ConfigError(
            f"unknown setting {key} (from {source}); valid keys in {section}: "
            f"{', '.join(names)}{_suggest(name, names, prefix=f'{section}.')}"
        )
    return section, name


def _suggest(word: str, options: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _convert(key: str, raw: object, hint: type, limits: Mapping[str, Any], source: str) -> Any:
    """Turn a raw value (typed from YAML/code, or text from env/flags) into a checked one."""
    try:
        if limits.get("counts") and isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)  # a number or a word (`workers: 4`, `workers: auto`)
        value = _coerce(raw, hint)
        return _check(value, limits)
    except ValueError:
        raise ConfigError(
            f"{key} = {raw!r} (from {source}): expected {_describe(hint, limits)}"
        ) from None


def _coerce(raw: object, hint: type) -> Any:
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        if isinstance(raw, str):
            return parse_bool(raw)
    elif hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            return int(raw.strip())
    elif hint is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif isinstance(raw, str):
            value = float(raw.strip())
        else:
            raise ValueError(raw)
        if math.isfinite(value):
            return value
    elif hint is str and isinstance(raw, str):
        return raw
    raise ValueError(raw)


def _check(value: Any, limits: Mapping[str, Any]) -> Any:
    if "choices" in limits:
        canonical = {choice.lower(): choice for choice in limits["choices"]}
        if value.lower() not in canonical:
            raise ValueError(value)
        value = canonical[value.lower()]
    if "pattern" in limits and not re.fullmatch(limits["pattern"], value):
        raise ValueError(value)
    if "ge" in limits and not value >= limits["ge"]:
        raise ValueError(value)
    if "gt" in limits and not value > limits["gt"]:
        raise ValueError(value)
    if "le" in limits and not value <= limits["le"]:
        raise ValueError(value)
    if "allowed" in limits and value not in limits["allowed"]:
        raise ValueError(value)
    return value


def _describe(hint: type, limits: Mapping[str, Any]) -> str:
    if "choices" in limits:
        return "one of " + ", ".join(limits["choices"])
    if "allowed" in limits:
        return "one of " + ", ".join(str(v) for v in limits["allowed"])
    if "expect" in limits:
        return limits["expect"]
    kind = {bool: "true or false (or 1/0)", int: "an integer", float: "a number", str: "a string"}[
        hint
    ]
    bounds = [
        f">= {limits['ge']}" if "ge" in limits else "",
        f"> {limits['gt']}" if "gt" in limits else "",
        f"<= {limits['le']}" if "le" in limits else "",
    ]
    return " ".join([kind, *filter(None, bounds)])


def _build(section: str, cls: type, chosen: Mapping[str, tuple[Any, str]]) -> Any:
    """Check limits between fields of one section, then construct it."""
    for field in dataclasses.fields(cls):
        partner = field.metadata.get("paired")
        if partner is not None and bool(chosen[field.name][0]) != bool(chosen[partner][0]):
            given, missing = (
                (field.name, partner) if chosen[field.name][0] else (partner, field.name)
            )
            raise ConfigError(
                f"{section}.{given} (from {chosen[given][1]}) and {section}.{missing} go "
                f"together: set both (TLS) or neither (plain)"
            )
        other = field.metadata.get("below")
        if other is None:
            continue
        (value, source), (limit, limit_source) = chosen[field.name], chosen[other]
        if not value < limit:
            raise ConfigError(
                f"{section}.{field.name} = {value!r} (from {source}) must be below "
                f"{section}.{other} = {limit!r} (from {limit_source})"
            )
    return cls(**{name: value for name, (value, _) in chosen.items()})

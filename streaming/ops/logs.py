"""Process-wide logging: one stderr handler, JSON lines for machines or plain lines for people.

Structured fields travel in `extra` (`log.info("engine loaded", extra={"device": "cpu"})`) and
come out as JSON keys or `key=value` pairs, so log lines stay greppable and parseable.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

from streaming.ops.config import LoggingConfig

# API keys and tokens as libraries may log them at debug level (websockets logs every request
# line and header, its answer's too): `?api_key=KEY`, `?token=TOKEN` (and any other `*token=`
# parameter, such as a resume token), `Authorization: Bearer KEY`, `Sec-WebSocket-Protocol:
# token, KEY` and `Sec-WebSocket-Protocol: token.TOKEN`.
_SECRETS = re.compile(
    r"(?i)(api_key=|token=)[^&\s'\"]*|(authorization:\s*)[^\r\n'\"]*"
    r"|(sec-websocket-protocol:\s*(?:token|bearer)\s*,\s*)[^\r\n'\",]*"
    r"|(sec-websocket-protocol:[^\r\n'\"]*?\btoken\.)[^\r\n'\",\s]*"
)

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time, so later redirection is respected."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


class _Redact(logging.Filter):
    """Keys must never reach the logs, whichever logger writes them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRETS.sub(lambda m: next(g for g in m.groups() if g) + "<redacted>", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, tz=timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, f"{record.name}:", record.getMessage()]
        parts += [f"{key}={value}" for key, value in _extras(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def setup_logging(cfg: LoggingConfig) -> None:
    """Route all logging to one stderr handler in the configured format and level.

    Calling it again replaces the handler it installed before; handlers added by others (such as
    a test harness) are left alone.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.addFilter(_Redact())
    handler.setFormatter(_JsonFormatter() if cfg.format == "json" else _TextFormatter())
    root.addHandler(handler)
    root.setLevel(cfg.level.upper())

"""Short-lived signed tokens, so that a browser (or any client that must not hold the API key)
connects with a credential that ends on its own and opens only what it was minted for.

A token is `PAYLOAD.SIGNATURE`: PAYLOAD is base64url (no padding) of a JSON object, SIGNATURE
base64url of HMAC-SHA256(secret, PAYLOAD as sent). Both parts use only `A-Z a-z 0-9 - _`, so a
token is a valid HTTP token and fits a WebSocket subprotocol (`token.<TOKEN>`). The payload:

- `kid`: the identity of the API key that minted it, a keyed digest (HMAC of the key with the
  same secret), never the key: the key's limits apply to its tokens, and a token does not let
  anyone test guesses of the key offline;
- `exp`: expiry, unix seconds (valid while now < exp);
- `scopes` (optional, absent = every endpoint): names from SCOPES;
- `max_streams` (optional): a cap on the key's concurrent streams for streams opened with it.

Only the standard library: hmac, hashlib, base64, json. The secret comes from
`server.token_secret`, else the file `server.token_secret_file`, else 32 random bytes per process
(tokens then end with the process).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass

from streaming.ops.config import ConfigError

# The endpoint families a token may be limited to.
SCOPES = ("stream", "transcribe", "calls", "captions", "metrics")
STREAM, TRANSCRIBE, CALLS, CAPTIONS, METRICS = SCOPES
MAX_TOKEN_CHARS = 2048  # longer is refused before any hashing
SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
KEY_ID_BYTES = 16
RANDOM_SECRET_BYTES = 32


class TokenError(Exception):
    """A token that is refused; the message is the reason sent to the client."""


class TokenSecretError(ConfigError):
    """`server.token_secret_file` cannot be used: start-up stops with this one line (a
    ConfigError, which the command line reports as it reports every bad setting)."""


@dataclass(frozen=True)
class Token:
    """What a verified token says."""

    key_id: str
    expires_at: int
    scopes: frozenset[str] | None = None  # None: every endpoint
    max_streams: int | None = None

    def allows(self, scope: str) -> bool:
        return self.scopes is None or scope in self.scopes


def load_secret(secret: str, secret_file: str) -> bytes:
    """The HMAC secret: `secret`, else the contents of `secret_file` (surrounding whitespace
    ignored), else random bytes for this process. A file that is missing, unreadable or empty
    raises TokenSecretError: a server that was told to share a secret must not start with
    another one."""
    if secret:
        return secret.encode()
    if not secret_file:
        return os.urandom(RANDOM_SECRET_BYTES)
    try:
        with open(secret_file, "rb") as file:
            data = file.read().strip()
    except OSError as err:
        raise TokenSecretError(
            f"cannot read server.token_secret_file {secret_file}: {err.strerror or err}"
        ) from None
    if not data:
        raise TokenSecretError(f"server.token_secret_file {secret_file} is empty")
    return data


def check_scopes(scopes: Collection[str]) -> frozenset[str]:
    """`scopes` as a set; ValueError naming the first unknown one, or for none at all."""
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; expected some of {', '.join(SCOPES)}")
    if not scopes:
        raise ValueError(f"scopes must name at least one of {', '.join(SCOPES)} (or be left out)")
    return frozenset(scopes)


class Signer:
    """Mints and verifies the tokens of one server (one secret)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def key_id(self, key: str) -> str:
        """The identity of an API key in tokens and limits: stable for this secret, and
        useless for testing guesses of the key without it."""
        digest = hmac.new(self.secret, b"key-id\0" + key.encode(), hashlib.sha256).digest()
        return _b64(digest[:KEY_ID_BYTES])

    def issue(
        self,
        key_id: str,
        ttl_s: int,
        now: float,
        scopes: Collection[str] | None = None,
        max_streams: int | None = None,
    ) -> tuple[str, Token]:
        """A token for the key of `key_id` (`key_id(key)`), valid for `ttl_s` whole seconds
        from `now` (unix seconds, rounded down)."""
        token = Token(
            key_id=key_id,
            expires_at=int(now) + int(ttl_s),
            scopes=None if scopes is None else check_scopes(scopes),
            max_streams=max_streams,
        )
        payload: dict[str, object] = {"kid": token.key_id, "exp": token.expires_at}
        if token.scopes is not None:
            payload["scopes"] = sorted(token.scopes)
        if max_streams is not None:
            payload["max_streams"] = max_streams
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{self._sign(body)}", token

    def verify(self, text: str, now: float, scope: str | None = None) -> Token:
        """The token's content if `text` is a token signed with this secret, unexpired at `now`
        and valid for `scope` (None: any); else TokenError with the reason. The signature is
        checked first, in constant time, so nothing of an unsigned payload is trusted."""
        if len(text) > MAX_TOKEN_CHARS or not SHAPE.fullmatch(text):
            raise TokenError("token malformed")
        body, signature = text.split(".")
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            raise TokenError("token signature invalid")
        token = _parse(body)
        if now >= token.expires_at:
            raise TokenError("token expired")
        if scope is not None and not token.allows(scope):
            raise TokenError(f"token not valid for {scope}")
        return token

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self.secret, body.encode(), hashlib.sha256).digest())


def looks_like_token(text: str) -> bool:
    """Whether `text` has a token's shape (a credential from a form that also takes keys)."""
    return len(text) <= MAX_TOKEN_CHARS and SHAPE.fullmatch(text) is not None


def _parse(body: str) -> Token:
    """The signed payload; a well-signed but unreadable one (another version) is malformed."""
    try:
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError):
        raise TokenError("token malformed") from None
    if not isinstance(payload, dict):
        raise TokenError("token malformed")
    kid, exp = payload.get("kid"), payload.get("exp")
    scopes, max_streams = payload.get("scopes"), payload.get("max_streams")
    valid = (
        isinstance(kid, str)
        and _is_int(exp)
        and (scopes is None or (isinstance(scopes, list) and set(scopes) <= set(SCOPES)))
        and (max_streams is None or (_is_int(max_streams) and max_streams >= 1))
    )
    if not valid:
        raise TokenError("token malformed")
    return Token(kid, exp, None if scopes is None else frozenset(scopes), max_streams)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

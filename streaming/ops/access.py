"""Who a request is, for both ports: an API key or a token signed by this server, read the same
way on every endpoint, so that a token works wherever a key does and a bad one of either is
throttled alike (the keys and their throttle: streaming/ops/auth.py; tokens: tokens.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

from streaming.ops import auth
from streaming.ops.tokens import Signer, TokenError, looks_like_token

TOKEN_SUBPROTOCOL = "token."  # new WebSocket(url, ["token." + TOKEN]): one value, echoed back
TOKEN_QUERY = "token"  # ?token=TOKEN
INVALID_KEY = "missing or invalid API key"
THROTTLED = "too many invalid API keys"


@dataclass(frozen=True)
class Credential:
    """What a request offers: `token_only` for the forms that carry nothing but a token."""

    value: str
    token_only: bool = False


@dataclass(frozen=True)
class Principal:
    """Who is let in: the key's identity (None when authentication is off), and a token's
    `max_streams` when it came with a token."""

    key_id: str | None
    max_streams: int | None = None
    token: bool = False


@dataclass(frozen=True)
class Denial:
    """A refused request: 401 with the reason, or 429 + Retry-After while throttled."""

    status: int
    reason: str
    retry_after: int | None = None


def offered(authorization: str, subprotocols: Sequence[str], query: str) -> Credential | None:
    """The credential of a request: `Authorization: Bearer X` (or `Token X`), the subprotocol
    `token.TOKEN`, the subprotocols `token, X` (or `bearer, X`), `?token=TOKEN`, else
    `?api_key=X`; X may be a key or a token."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() in auth.AUTH_SCHEMES and value.strip():
        return Credential(value.strip())
    for name in subprotocols:
        if name.startswith(TOKEN_SUBPROTOCOL):
            return Credential(name[len(TOKEN_SUBPROTOCOL) :], token_only=True)
    if len(subprotocols) == 2 and subprotocols[0].lower() in auth.AUTH_SUBPROTOCOLS:
        return Credential(subprotocols[1])
    params = dict(parse_qsl(query))
    if TOKEN_QUERY in params:
        return Credential(params[TOKEN_QUERY], token_only=True)
    return Credential(params["api_key"]) if "api_key" in params else None


def token_subprotocol(offered_names: Sequence[str]) -> str | None:
    """The `token.TOKEN` subprotocol among those a client offered, which the server must
    select in its answer (a browser drops a connection whose server selects none)."""
    return next((n for n in offered_names if n.startswith(TOKEN_SUBPROTOCOL)), None)


class Access:
    """The API keys and token signer of one server, with the keys' bad-credential throttle."""

    def __init__(self, guard: auth.Guard, signer: Signer) -> None:
        self.guard = guard
        self.signer = signer
        self.key_ids = {signer.key_id(key): key for key in guard.keys}

    @property
    def enabled(self) -> bool:
        return bool(self.guard.keys)

    def check(
        self,
        credential: Credential | None,
        client: str,
        now: float,
        wall: float,
        scope: str | None,
        tokens: bool = True,
    ) -> Principal | Denial:
        """Let the request in (its Principal) or refuse it. `now` is the throttle's clock,
        `wall` unix time for expiry; `scope` the endpoint family (tokens.SCOPES; None: any);
        `tokens` False: only a key will do (minting tokens)."""
        if not self.enabled:
            return Principal(None)
        throttle = self.guard.throttle
        retry = throttle.retry_after(client, now)
        if retry is not None:
            return Denial(429, THROTTLED, retry)
        denial = self._decide(credential, wall, scope, tokens)
        if isinstance(denial, Denial):
            throttle.failed(client, now)
        return denial

    def _decide(
        self, credential: Credential | None, wall: float, scope: str | None, tokens: bool
    ) -> Principal | Denial:
        if credential is None:
            return Denial(401, INVALID_KEY)
        value = credential.value
        if not credential.token_only and auth.key_ok(value, self.guard.keys):
            return Principal(self.signer.key_id(value))
        if not credential.token_only and not looks_like_token(value):
            return Denial(401, INVALID_KEY)
        if not tokens:
            return Denial(401, "a token cannot mint tokens: use an API key")
        try:
            token = self.signer.verify(value, wall, scope)
        except TokenError as err:
            return Denial(401, str(err))
        if token.key_id not in self.key_ids:  # signed with a shared secret, for a removed key
            return Denial(401, "token's API key is no longer accepted")
        return Principal(token.key_id, token.max_streams, token=True)

"""TLS for the WebSocket/HTTP port and the REST port: one server context, reloadable in place.

`server.tls_cert` / `server.tls_key` name PEM files. The context is built once, before any port
opens, and shared by both listeners; SIGHUP loads the pair again into the same context, so new
handshakes present the new certificate while open streams keep theirs."""

from __future__ import annotations

import logging
import ssl

log = logging.getLogger("streaming.tls")


class TlsError(Exception):
    """The certificate pair cannot be used; the message is one line naming the files."""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context holding the pair; TlsError when it is missing, unreadable or mismatched."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, cert, key)
    return context


def reload(context: ssl.SSLContext, cert: str, key: str) -> bool:
    """Load the pair again into `context` (new connections get it). A failure logs one warning
    and keeps the pair loaded before; returns whether the new pair is in use."""
    try:
        # A load that fails half-way may leave a context with the new certificate and no key:
        # check the pair in a scratch context first, so a bad pair never touches the live one.
        _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)
        _load(context, cert, key)
    except TlsError as err:
        log.warning("TLS reload failed, kept the previous certificate", extra={"error": str(err)})
        return False
    log.info("TLS certificate reloaded", extra={"cert": cert})
    return True


def _load(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except OSError as err:  # ssl.SSLError is an OSError too
        reason = err.strerror or getattr(err, "reason", None) or str(err)
        if isinstance(err, ssl.SSLError):
            reason = _ssl_reason(err)
        raise TlsError(f"cannot use TLS certificate {cert} with key {key}: {reason}") from None


def _ssl_reason(err: ssl.SSLError) -> str:
    reason = (err.reason or "").replace("_", " ").lower()
    if reason == "key values mismatch":
        return "the key does not belong to the certificate"
    return reason or str(err)

"""OpenAI-compatible file transcription: `POST /v1/audio/transcriptions` (a multipart upload).

The `websockets` server cannot read request bodies, so this endpoint runs on aiohttp in the same
process and event loop, on its own port (`server.http_port`), started and stopped by the Gateway.
It never calls the model: an upload is decoded and resampled here, then submitted as ONE final
request to the gateway's scheduler, so files batch with the finals of live streams (the engine
cuts long audio into windows itself). When a refine (accuracy) model is loaded, a file is not
latency-bound, so it goes as a refine request without a deadline, and as a final only when the
refine pass skips or fails it. Response formats json, text, verbose_json (segments and
words), srt and vtt (the pop-on cues and writers of streaming/core/captions.py, as the CLI writes
them); `stream=true` answers with server-sent events. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`. A body is read within
`server.upload_timeout_s` (408 beyond) and decoded up to `server.max_upload_s` of audio (413).

`POST /v1/auth/token` mints short-lived tokens (streaming/ops/tokens.py) for the API key it is
called with; it answers CORS preflights, as the browser page is served from the main port.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import ssl
import time
import uuid
import zlib
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger

from engine.api import (
    TARGET_SAMPLE_RATE,
    Engine,
    Hypothesis,
    Segment,
    Word,
    engine_languages,
    primary_language,
)
from engine.audio import resample
from engine.scheduler import Kind, Outcome, Request
from streaming.core.captions import cues_from_words, to_srt, to_vtt
from streaming.ops import auth, tokens
from streaming.ops.access import Denial, Principal, offered
from streaming.ops.admission import RETRY_AFTER_S, refusal
from streaming.ops.config import ConfigError, ServerConfig, check_language, parse_bool

if TYPE_CHECKING:
    from streaming.server import Gateway

log = logging.getLogger("streaming.transport.rest")

PATH = "/v1/audio/transcriptions"
TOKEN_PATH = "/v1/auth/token"
TOKEN_TTL_S = 600  # a token's lifetime when the request names none (at most token_max_ttl_s)
TOKEN_BODY_LIMIT = 4096
TOKEN_FIELDS = ("ttl_s", "scopes", "max_streams")
CORS = {  # the page (main port) asks the REST port (another origin) with its key in a header
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}
FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
STREAM_FORMATS = ("json", "text")
GRANULARITIES = ("word", "segment")
FIELD_LIMIT = 64 * 1024  # largest text field of the form
FORM_OVERHEAD = 64 * 1024  # room for part headers and text fields next to the file
SENTENCE_END = (".", "?", "!", "…")
# verbose_json segments: a new one after a sentence, a pause, or 30 s (Whisper's window).
SEGMENT_PAUSE_MS, SEGMENT_MAX_MS = 1000, 30000
SUBTITLES = {"srt": (to_srt, "text/plain"), "vtt": (to_vtt, "text/vtt")}  # writer, content type
DECODE_BLOCK = 1 << 16  # frames decoded at a time, so decoding stops soon past the length cap
UNKNOWN_FRAMES = (1 << 63) - 1  # libsndfile's frame count when the header does not give it


class ApiError(Exception):
    """A request that gets an OpenAI-style error body instead of a transcription."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        retry_after: int = RETRY_AFTER_S,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # the Retry-After of a 503 or 429
        self.status, self.message, self.code, self.param, self.kind = (
            status,
            message,
            code,
            param,
            kind,
        )

    def response(self) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }
        retry = self.status in (429, 503)
        headers = {"Retry-After": str(self.retry_after)} if retry else None
        response = web.json_response(body, status=self.status, headers=headers)
        if self.status == 408:  # the rest of the body may never come: the connection ends
            response.force_close()
        return response


class QuietServerLog(logging.Filter):
    """aiohttp logs a client that goes away, or a body it cannot parse, as a traceback at
    ERROR ("Error handling request"); the operator needs one warning line, not a server bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ConnectionError | HttpProcessingError | asyncio.CancelledError):
            record.msg, record.args = f"{record.getMessage()}: {type(error).__name__}: {error}", ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


@dataclass(frozen=True)
class TokenOptions:
    """The validated body of a token request."""

    ttl_s: int
    scopes: frozenset[str] | None = None  # None: every endpoint
    max_streams: int | None = None


@dataclass(frozen=True)
class Form:
    """The validated fields of one upload."""

    audio: bytes
    filename: str
    response_format: str = "json"
    language: str = ""
    prompt: str = ""
    granularities: tuple[str, ...] = ("segment",)
    stream: bool = False


class RestServer:
    """The aiohttp side of a Gateway: one route, sharing the gateway's scheduler and API keys."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.runner: web.AppRunner | None = None

    async def start(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        if not any(isinstance(f, QuietServerLog) for f in server_logger.filters):
            server_logger.addFilter(QuietServerLog())
        app = web.Application()
        app.router.add_post(PATH, self.transcribe)
        app.router.add_post(TOKEN_PATH, self.issue_token)
        app.router.add_route("OPTIONS", TOKEN_PATH, self.preflight)
        self.runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=self.gateway.config.server.drain_grace_s
        )
        await self.runner.setup()
        site = web.TCPSite(
            self.runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port or None
        )
        await site.start()

    @property
    def port(self) -> int:
        return self.runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish (up to `drain_grace_s`), then close."""
        await self.runner.cleanup()

    async def transcribe(self, request: web.Request) -> web.StreamResponse:
        gateway = self.gateway
        server = gateway.config.server
        try:
            principal = self._authorize(request, tokens.TRANSCRIBE)
            self._check_ready()
            self._check_allowance(principal)
            form = await read_form(request, server.max_upload_bytes, server.upload_timeout_s)
            language = self._language(form)
            audio = await asyncio.to_thread(
                decode_upload, form.audio, form.filename, server.max_upload_s
            )
            hotwords = (form.prompt,) if form.prompt.strip() else ()
            hypothesis = await self._submit(audio, hotwords, language)
        except ApiError as err:
            gateway.metrics.errors.labels(err.code).inc()
            return err.response()
        duration_s = len(audio) / TARGET_SAMPLE_RATE
        gateway.metrics.audio_seconds.inc(duration_s)
        if principal.key_id is not None:  # toward the key's audio of the day
            gateway.limits.charge(principal.key_id, duration_s * 1000)
        log.info(
            "file transcribed",
            extra={"duration_s": round(duration_s, 3), "format": form.response_format},
        )
        if form.stream:
            return await stream_events(request, hypothesis.text)
        return render(form, hypothesis, len(audio), language)

    async def issue_token(self, request: web.Request) -> web.Response:
        """`POST /v1/auth/token` with an API key (never a token): a signed token for it, body
        (optional) `{"ttl_s", "scopes", "max_streams"}`. Without server.api_keys, 400: there is
        nothing to stand in for."""
        gateway = self.gateway
        try:
            if not gateway.access.enabled:
                raise ApiError(
                    400,
                    "tokens need API keys (server.api_keys): authentication is off, so every "
                    "endpoint is open without a credential",
                    code="auth_disabled",
                )
            principal = self._authorize(request, None, allow_tokens=False)
            options = await read_token_options(request, gateway.config.server)
        except ApiError as err:
            gateway.metrics.errors.labels(err.code).inc()
            return _with_cors(err.response())
        now = time.time()
        token, content = gateway.access.signer.issue(
            principal.key_id, options.ttl_s, now, options.scopes, options.max_streams
        )
        body = {
            "token": token,
            "expires_at": content.expires_at,
            "expires_in": options.ttl_s,
            "scopes": sorted(content.scopes or tokens.SCOPES),
            "max_streams": content.max_streams,
        }
        return _with_cors(web.json_response(body, headers={"Cache-Control": "no-store"}))

    async def preflight(self, request: web.Request) -> web.Response:
        """The CORS preflight of a token request from another origin (the browser page)."""
        return web.Response(status=204, headers=CORS)

    def _authorize(
        self, request: web.Request, scope: str | None, allow_tokens: bool = True
    ) -> Principal:
        """The main port's rule (streaming/ops/access.py): a key or token in the header, or
        `?api_key=` / `?token=`; 429 once the address sent too many bad ones."""
        credential = offered(request.headers.get("Authorization", ""), (), request.query_string)
        now = asyncio.get_running_loop().time()
        client = auth.client_address(
            request.remote or "",
            request.headers.get("X-Forwarded-For", ""),
            self.gateway.trusted_proxies,
        )
        verdict = self.gateway.access.check(
            credential, client, now, time.time(), scope, allow_tokens
        )
        if not isinstance(verdict, Denial):
            return verdict
        self.gateway.metrics.rejections.labels("auth").inc()
        if verdict.retry_after is None:
            raise ApiError(401, verdict.reason, code="invalid_api_key")
        raise ApiError(
            429,
            verdict.reason,
            code="rate_limit_exceeded",
            retry_after=verdict.retry_after,
        )

    def _check_allowance(self, principal: Principal) -> None:
        """429 until the next UTC midnight once the key's audio of the day is spent."""
        if principal.key_id is None:
            return
        refusal = self.gateway.limits.spent(principal.key_id)
        if refusal is None:
            return
        self.gateway.metrics.rejections.labels("key_limit").inc()
        raise ApiError(
            429,
            refusal.reason,
            code="quota_exceeded",
            kind="insufficient_quota",
            retry_after=refusal.retry_after,
        )

    def _check_ready(self) -> None:
        gateway = self.gateway
        reason = refusal(  # an upload is no stream: server.max_sessions does not count it
            loaded=gateway.scheduler is not None,
            draining=gateway.draining,
            failed=bool(gateway.engine_error),
        )
        if reason is None:
            return
        gateway.metrics.rejections.labels(reason).inc()
        message = gateway.engine_error or f"server unavailable: {reason}"
        raise ApiError(503, message, code=reason, kind="server_error")

    def _language(self, form: Form) -> str:
        """The upload's language, else the server's default (checked when the model loaded);
        one the model cannot transcribe is refused rather than turned into wrong text."""
        if not form.language:
            return self.gateway.config.session.language
        languages = engine_languages(self.gateway.scheduler.engine)
        try:
            check_language(form.language, languages, "language")
        except ConfigError as err:
            raise ApiError(400, str(err), param="language", code="invalid_value") from None
        return form.language

    async def _submit(
        self, audio: np.ndarray, hotwords: tuple[str, ...], language: str
    ) -> Hypothesis:
        """The refine model's text when one is loaded and it transcribes the language, else (or
        when the refine pass skips or fails the file) one final request's."""
        segment = Segment(audio, hotwords=hotwords, language=primary_language(language) or None)
        key = ("openai_rest", uuid.uuid4().hex)
        refine = self.gateway.scheduler.refine_engine
        if refine is not None and _transcribes(refine, language):
            outcome = await self._request("refine", key, segment)
            if outcome.hypothesis is not None:
                return outcome.hypothesis
            log.info(
                "refine pass did not transcribe the file; using the primary model",
                extra={"status": outcome.status, "reason": outcome.reason},
            )
        outcome = await self._request("final", key, segment)
        if outcome.hypothesis is None:
            raise ApiError(
                500,
                f"the audio could not be transcribed: {outcome.reason or outcome.status}",
                code="engine_error",
                kind="server_error",
            )
        return outcome.hypothesis

    async def _request(self, kind: Kind, key: Hashable, segment: Segment) -> Outcome:
        """Submit one request (a refine one without a deadline: files are not latency-bound)
        and wait for its outcome, which comes back on the scheduler's thread."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()

        def done(outcome: Outcome) -> None:  # on the scheduler's thread
            loop.call_soon_threadsafe(_settle, future, outcome)

        self.gateway.scheduler.submit(Request(kind, key, segment, done, deadline=None))
        return await future


def _transcribes(engine: Engine, language: str) -> bool:
    """Whether the engine takes the language (empty: the model decides)."""
    languages = engine_languages(engine)
    return not language or languages is None or primary_language(language) in languages


def _settle(future: asyncio.Future, outcome: Outcome) -> None:
    if not future.done():  # the client may have gone away
        future.set_result(outcome)


def _with_cors(response: web.Response) -> web.Response:
    response.headers.update(CORS)
    return response


# --- reading a token request -------------------------------------------------------------------


async def read_token_options(request: web.Request, server: ServerConfig) -> TokenOptions:
    """The token request's JSON body (empty: the defaults), read within upload_timeout_s."""
    if request.content_length is not None and request.content_length > TOKEN_BODY_LIMIT:
        raise ApiError(413, f"the body is over {TOKEN_BODY_LIMIT} bytes", code="body_too_large")
    raw = b""
    try:
        async with asyncio.timeout(server.upload_timeout_s):
            while len(raw) <= TOKEN_BODY_LIMIT:
                chunk = await request.content.read(TOKEN_BODY_LIMIT + 1 - len(raw))
                if not chunk:
                    break
                raw += chunk
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {server.upload_timeout_s:g} s "
            "(server.upload_timeout_s)",
            code="upload_timeout",
        ) from None
    except ConnectionError:
        raise ApiError(400, "the request was cut short", code="invalid_json") from None
    if len(raw) > TOKEN_BODY_LIMIT:
        raise ApiError(413, f"the body is over {TOKEN_BODY_LIMIT} bytes", code="body_too_large")
    return token_options(raw, server.token_max_ttl_s)


def token_options(raw: bytes, max_ttl_s: float) -> TokenOptions:
    """Validate a token request body: JSON object with `ttl_s` (whole seconds, 1 up to
    server.token_max_ttl_s), `scopes` (names of tokens.SCOPES), `max_streams` (>= 1)."""
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - set(TOKEN_FIELDS))
    if unknown:
        raise ApiError(
            400,
            f"unknown field {unknown[0]!r}; expected some of {', '.join(TOKEN_FIELDS)}",
            param=unknown[0],
            code="invalid_value",
        )
    max_ttl = math.floor(max_ttl_s)
    ttl = body.get("ttl_s", min(TOKEN_TTL_S, max_ttl))
    if not _whole(ttl) or not 1 <= ttl <= max_ttl:
        raise ApiError(
            400,
            f"ttl_s must be whole seconds from 1 to {max_ttl} (server.token_max_ttl_s), "
            f"got {json.dumps(ttl)}",
            param="ttl_s",
            code="invalid_value",
        )
    scopes = body.get("scopes")
    if scopes is not None:
        try:
            if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
                raise ValueError(f"scopes must be a list of names of {', '.join(tokens.SCOPES)}")
            scopes = tokens.check_scopes(scopes)
        except ValueError as err:
            raise ApiError(400, str(err), param="scopes", code="invalid_value") from None
    max_streams = body.get("max_streams")
    if max_streams is not None and (not _whole(max_streams) or max_streams < 1):
        raise ApiError(
            400,
            f"max_streams must be a whole number of at least 1, got {json.dumps(max_streams)}",
            param="max_streams",
            code="invalid_value",
        )
    return TokenOptions(int(ttl), scopes, None if max_streams is None else int(max_streams))


def _whole(value: object) -> bool:
    """A JSON number with no fraction (600 or 600.0), not a boolean."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value == int(value)


# --- reading the upload ----------------------------------------------------------------------


async def read_form(request: web.Request, max_bytes: int, timeout_s: float) -> Form:
    """Read the multipart form, refusing a file over `max_bytes` as soon as it is seen, and a
    body that has not all come within `timeout_s` (a client announcing more than it sends)."""
    if request.content_type != "multipart/form-data":
        raise ApiError(
            400,
            f"expected a multipart/form-data body, got {request.content_type!r}",
            code="invalid_content_type",
        )
    if request.content_length is not None and request.content_length > max_bytes + FORM_OVERHEAD:
        raise _too_large(max_bytes)
    try:
        async with asyncio.timeout(timeout_s):
            audio, filename, fields = await _read_parts(request, max_bytes)
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout_s:g} s (server.upload_timeout_s)",
            code="upload_timeout",
        ) from None
    except (ValueError, HttpProcessingError) as err:  # aiohttp: no boundary, an empty or cut
        # body, a malformed part (a part cut inside its headers is an InvalidHeader)
        raise ApiError(400, f"malformed multipart body: {err}", code="invalid_form") from None
    except ConnectionError as err:
        log.warning("client went away during an upload: %s", err)
        raise ApiError(400, "the upload was cut short", code="invalid_form") from None
    if not audio:
        raise ApiError(
            400,
            "you must provide a non-empty audio file in the 'file' field",
            param="file",
            code="missing_file",
        )
    return _validate(audio, filename, fields)


async def _read_parts(
    request: web.Request, max_bytes: int
) -> tuple[bytes | None, str, dict[str, list[str]]]:
    """The file's bytes and name, and the text fields by name."""
    fields: dict[str, list[str]] = {}
    audio, filename = None, ""
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "nested multipart bodies are not supported", code="invalid_form")
        if part.name == "file":
            audio = await _read_part(part, max_bytes, _too_large(max_bytes))
            filename = part.filename or "file"
            continue
        name = (part.name or "").removesuffix("[]")
        data = await _read_part(
            part,
            FIELD_LIMIT,
            ApiError(400, f"form field {name!r} is too long", code="invalid_form"),
        )
        fields.setdefault(name, []).append(data.decode("utf-8", errors="replace"))
    return audio, filename, fields


async def _read_part(part: BodyPartReader, limit: int, too_big: ApiError) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk(1 << 16):
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"the file is larger than the server's limit of {max_bytes} bytes "
        "(server.max_upload_bytes)",
        param="file",
        code="file_too_large",
    )


def _validate(audio: bytes, filename: str, fields: dict[str, list[str]]) -> Form:
    def one(name: str, default: str = "") -> str:
        return fields[name][-1].strip() if fields.get(name) else default

    response_format = one("response_format", "json")
    if response_format not in FORMATS:
        raise ApiError(
            400,
            f"response_format {response_format!r} is not supported; "
            f"expected one of {', '.join(FORMATS)}",
            param="response_format",
            code="invalid_value",
        )
    try:
        stream = parse_bool(one("stream", "false"))
    except ValueError as err:
        raise ApiError(400, f"stream: {err}", param="stream", code="invalid_value") from None
    if stream and response_format not in STREAM_FORMATS:
        raise ApiError(
            400,
            f"stream=true works with response_format json or text, not {response_format}",
            param="stream",
            code="invalid_value",
        )
    granularities = tuple(g.strip() for g in fields.get("timestamp_granularities", ["segment"]))
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown:
        raise ApiError(
            400,
            f"timestamp_granularities {unknown[0]!r} is not supported; expected word or segment",
            param="timestamp_granularities",
            code="invalid_value",
        )
    temperature = one("temperature", "0")
    try:
        valid = 0.0 <= float(temperature) <= 1.0
    except ValueError:
        valid = False
    if not valid:
        raise ApiError(
            400,
            f"temperature {temperature!r} must be a number from 0 to 1",
            param="temperature",
            code="invalid_value",
        )
    return Form(
        audio=audio,
        filename=filename,
        response_format=response_format,
        language=one("language"),
        prompt=one("prompt"),
        granularities=granularities,
        stream=stream,
    )


def decode_upload(data: bytes, filename: str, max_s: float) -> np.ndarray:
    """Any format libsndfile reads, mixed to mono and resampled to 16 kHz float32; audio
    longer than `max_s` is refused from the header's length, else once decoding passes it (a
    compressed file of a few MB can hold days of audio)."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as file:
            rate, limit = file.samplerate, math.floor(max_s * file.samplerate)
            if limit < file.frames < UNKNOWN_FRAMES:
                raise _too_long(max_s)
            blocks, frames = [], 0
            for block in file.blocks(DECODE_BLOCK, dtype="float32", always_2d=True):
                frames += len(block)
                if frames > limit:
                    raise _too_long(max_s)
                blocks.append(block)
        if not blocks:
            raise ValueError("no audio samples")
        samples = np.concatenate(blocks)
        mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1)
        return resample(mono, int(rate), TARGET_SAMPLE_RATE)
    except (sf.SoundFileError, RuntimeError, ValueError) as err:
        reason = " ".join((getattr(err, "error_string", "") or str(err)).split())
        # RAW needs its format spelled out, so an upload can never be read as RAW.
        supported = ", ".join(sorted(set(sf.available_formats()) - {"RAW"}))
        raise ApiError(
            400,
            f"could not decode {filename!r} as audio ({reason}); supported formats: {supported}",
            param="file",
            code="invalid_audio",
        ) from None


def _too_long(max_s: float) -> ApiError:
    return ApiError(
        413,
        f"the audio is longer than the server's limit of {max_s:g} s (server.max_upload_s)",
        param="file",
        code="audio_too_long",
    )


# --- answering ---------------------------------------------------------------------------------


def render(form: Form, hyp: Hypothesis, samples: int, language: str) -> web.Response:
    """The non-streamed answer in the requested response_format, for `samples` of 16 kHz audio."""
    duration_s = samples / TARGET_SAMPLE_RATE
    duration_ms = samples * 1000 // TARGET_SAMPLE_RATE  # whole ms, so no cue ends past the audio
    usage = {"type": "duration", "seconds": round(duration_s, 3)}
    if form.response_format == "json":
        return web.json_response({"text": hyp.text, "usage": usage})
    if form.response_format == "text":
        return web.Response(text=hyp.text + "\n", content_type="text/plain")
    words = timed_words(hyp, duration_ms)
    if form.response_format in SUBTITLES:
        write, content_type = SUBTITLES[form.response_format]
        cues = cues_from_words(words, duration_ms=duration_ms)
        return web.Response(text=write(cues), content_type=content_type)
    body: dict = {
        "task": "transcribe",
        "language": language,
        "duration": round(duration_s, 3),
        "text": hyp.text,
    }
    if "segment" in form.granularities:
        groups = _groups(words)
        body["segments"] = [_segment(i, group) for i, group in enumerate(groups)]
    if "word" in form.granularities:
        body["words"] = [
            {"word": w.word, "start": w.start_ms / 1000, "end": w.end_ms / 1000} for w in words
        ]
    body["usage"] = usage
    return web.json_response(body)


async def stream_events(request: web.Request, text: str) -> web.StreamResponse:
    """`stream=true`: the text as one `transcript.text.delta` per word, then
    `transcript.text.done`; the deltas concatenate to the done event's text."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    tokens = text.split()
    for i, token in enumerate(tokens):
        delta = token if i == 0 else " " + token
        await response.write(_sse({"type": "transcript.text.delta", "delta": delta}))
    await response.write(_sse({"type": "transcript.text.done", "text": " ".join(tokens)}))
    await response.write_eof()
    return response


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def timed_words(hyp: Hypothesis, duration_ms: int) -> list[Word]:
    """The hypothesis' words, one token each; when the engine gave no word times, the text's
    words spread over the audio in proportion to their length (approximate times)."""
    words = [
        Word(" ".join(w.word.split()), w.start_ms, w.end_ms, w.confidence)
        for w in hyp.words
        if w.word.strip()
    ]
    if words or not hyp.text.strip():
        return words
    tokens = hyp.text.split()
    total = sum(len(t) for t in tokens)
    spread, at = [], 0
    for token in tokens:
        end = at + round(duration_ms * len(token) / total)
        spread.append(Word(token, at, max(end, at), hyp.confidence))
        at = end
    return spread


def _groups(words: list[Word]) -> list[list[Word]]:
    """Consecutive words in verbose_json segments that end after a sentence, before a pause of
    `SEGMENT_PAUSE_MS`, and within `SEGMENT_MAX_MS`."""
    groups: list[list[Word]] = []
    for word in words:
        group = groups[-1] if groups else None
        if (
            group
            and not group[-1].word.endswith(SENTENCE_END)
            and word.start_ms - group[-1].end_ms < SEGMENT_PAUSE_MS
            and word.end_ms - group[0].start_ms <= SEGMENT_MAX_MS
        ):
            group.append(word)
        else:
            groups.append([word])
    return groups


def _segment(index: int, words: list[Word]) -> dict:
    """A verbose_json segment. `avg_logprob` is the mean log of the word confidences; the model
    is decoded without sampling (`temperature` 0); `no_speech_prob` is not estimated (0) and
    token ids are not split by segment (`tokens` is empty); `seek` is the start in 10 ms frames."""
    text = " ".join(w.word for w in words)
    raw = text.encode()
    return {
        "id": index,
        "seek": words[0].start_ms // 10,
        "start": words[0].start_ms / 1000,
        "end": words[-1].end_ms / 1000,
        "text": text,
        "tokens": [],
        "temperature": 0.0,
        "avg_logprob": round(sum(math.log(max(w.confidence, 1e-6)) for w in words) / len(words), 4),
        "compression_ratio": round(len(raw) / len(zlib.compress(raw)), 4),
        "no_speech_prob": 0.0,
    }

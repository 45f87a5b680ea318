"""The `streamscribe` command: serve, stream, transcribe files, list models, print the
configuration, run benchmarks.

Exit status, one rule for every verb: 0 success; 1 the input failed (a file could not be read,
or a stream's session ended with an error or early); 2 bad usage, configuration, model or
device, or no connection or port; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, TextIO

import yaml
from tqdm import tqdm

from clients.stream_cli import add_stream_command
from engine.api import Engine, Hypothesis, ModelLoadError, Segment
from streaming.bench_cli import add_bench_command
from streaming.core.captions import cues_from_words, to_srt, to_vtt
from streaming.ops.config import Config, ConfigError, load_config
from streaming.ops.logs import setup_logging

if TYPE_CHECKING:
    from engine.selection import ModelChoice
    from streaming.server import Gateway

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_UNREADABLE = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

FORMATS = ("txt", "json", "srt", "vtt")
CAPTION_FORMATS = {"srt": to_srt, "vtt": to_vtt}

# A batch keeps files in the order given: each is read audio, or the reason it could not be read.
Batch = list[tuple[str, "Segment | str"]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamscribe", description="Real-time speech-to-text: server and tools."
    )
    parser.add_argument("--version", action="version", version=f"streamscribe {_version()}")
    _add_global_options(parser, argparse.SUPPRESS)
    # Global options also work after the verb (`serve --config x.yaml`): each verb's parser has
    # them too, defaulting to "not given" so the value given before the verb survives.
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = functools.partial(commands.add_parser, parents=[common])

    transcribe = add_parser(
        "transcribe",
        help="transcribe audio files (WAV, FLAC, OGG/Opus, MP3, AIFF; M4A, MP4, WebM with PyAV)",
    )
    transcribe.add_argument("files", nargs="+", metavar="FILE", help="audio files to transcribe")
    transcribe.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        help="auto, granite-nar, whisper, a folder or a hub id (engine.model)",
    )
    transcribe.add_argument("--device", help="auto, cpu, cuda or cuda:N (engine.device)")
    transcribe.add_argument(
        "--refine-model",
        metavar="M",
        help="transcribe with this (accuracy) model instead, loading only it; none: off "
        "(engine.refine_model)",
    )
    transcribe.add_argument(
        "--batch", type=int, metavar="N", help="most files per engine call (engine.max_batch)"
    )
    transcribe.add_argument(
        "--language",
        metavar="CODE",
        help="spoken language, one the model transcribes, e.g. en (session.language; empty: "
        "the model decides)",
    )
    transcribe.add_argument(
        "--format",
        choices=FORMATS,
        default="txt",
        help="txt: the text; json: one object per file with words and times; srt or vtt: "
        "captions of one file",
    )
    transcribe.add_argument(
        "--json", action="store_const", const="json", dest="format", help="--format json"
    )
    transcribe.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    transcribe.add_argument(
        "--progress", action="store_true", help="show a progress bar even when not on a terminal"
    )
    transcribe.set_defaults(run=_transcribe)

    models = add_parser(
        "models", help="list the model families: installed?, default source, device"
    )
    models.add_argument("--device", help="auto, cpu, cuda or cuda:N (engine.device)")
    models.add_argument("--json", action="store_true", help="one JSON object per family")
    models.set_defaults(run=_list_models)

    serve = add_parser(
        "serve", help="run the streaming server (WebSocket /v1/stream, /healthz, /metrics)"
    )
    serve.add_argument("--host", help="address to listen on (server.host)")
    serve.add_argument(
        "--workers",
        metavar="N",
        help="gateway processes sharing the ports and one engine process: a number or auto "
        "(server.workers; default 1)",
    )
    serve.add_argument("--port", type=int, help="port to listen on (server.port)")
    serve.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help="port of POST /v1/audio/transcriptions; 0 picks a free one, -1 turns it off "
        "(server.http_port)",
    )
    serve.add_argument(
        "--model", metavar="PATH_OR_ID", help="auto, a family, a folder or a hub id (engine.model)"
    )
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N (engine.device)")
    serve.add_argument(
        "--refine-model",
        metavar="M",
        help="second model that re-transcribes each final at the lowest priority, as --model "
        "takes; none: off (engine.refine_model)",
    )
    serve.add_argument(
        "--batch", type=int, metavar="N", help="most requests per engine call (engine.max_batch)"
    )
    serve.set_defaults(run=_serve)

    # Clients of a server or of the benchmarks: they take their settings from their own flags.
    add_stream_command(commands)
    add_bench_command(commands)

    config = add_parser("config", help="print the effective configuration as YAML")
    config.set_defaults(run=_print_config)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help="YAML settings file (default: $STREAMSCRIBE_CONFIG)",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        default=default,
        help="debug, info, warning or error (logging.level)",
    )


def _version() -> str:
    try:
        return importlib.metadata.version("streamscribe")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of `python -m streaming`."""
    args = build_parser().parse_args(argv)
    for name in ("config", "log_level"):  # given neither before nor after the verb
        if not hasattr(args, name):
            setattr(args, name, None)
    if args.command in ("stream", "bench") and (args.config or args.log_level):
        print(
            f"streamscribe: error: --config and --log-level set the server's settings; "
            f"`{args.command}` takes its own flags (see streamscribe {args.command} --help)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    try:
        return args.run(args)
    except (ConfigError, ModelLoadError) as exc:
        print(f"streamscribe: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _configure(args: argparse.Namespace, overrides: Mapping[str, object]) -> Config:
    cfg = load_config(args.config, overrides={"logging.level": args.log_level, **overrides})
    setup_logging(cfg.logging)
    return cfg


def _print_config(args: argparse.Namespace) -> int:
    cfg = _configure(args, {})
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (then drain); a model that cannot load stops the process.

    Humans get plain lines on stdout (what loads, then the URLs once it is ready); the JSON logs
    on stderr stay quiet at the default level, so a start-up failure is one line."""
    from engine import selection
    from streaming import server, supervisor
    from streaming.ops import tls
    from streaming.transport import eventloop

    cfg = _configure(
        args,
        {
            "server.host": args.host,
            "server.port": args.port,
            "server.http_port": args.http_port,
            "engine.model": args.model,
            "engine.device": args.device,
            "engine.max_batch": args.batch,
            "engine.refine_model": args.refine_model,
            "server.workers": args.workers,
        },
    )
    devices = cfg.engine.device.split(",")  # several: one engine process each
    choice = _checked_choice(cfg, cfg.engine.model)
    refine = cfg.engine.refine
    refine_choice = None
    if refine is not None:  # a refine model that cannot load must stop us before the port opens
        try:
            refine_choice = _checked_choice(cfg, refine)
        except ModelLoadError as err:
            raise ModelLoadError(f"cannot load refine model {refine!r}: {err}") from err

    tls_context = None
    if cfg.server.tls_cert:  # a bad pair stops us before the model loads and the port opens
        try:
            tls_context = tls.server_context(cfg.server.tls_cert, cfg.server.tls_key)
        except tls.TlsError as err:
            print(f"streamscribe: error: {err}", file=sys.stderr)
            return EXIT_ERROR

    def load() -> Engine:
        return selection.load_engine(**cfg.engine.load_keywords())

    def load_refine() -> Engine:
        return selection.load_engine(**cfg.engine.load_keywords(refine))

    try:
        run = eventloop.runner(cfg.server.event_loop)
    except RuntimeError as err:  # uvloop asked for and not installed
        print(f"streamscribe: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    workers = supervisor.worker_count(cfg.server.workers)
    where = choice.device if len(devices) == 1 else ", ".join(devices)
    loading = f"{_model_name(choice)} on {where}"
    if refine_choice is not None:
        loading += f", refine model {_model_name(refine_choice)} on {refine_choice.device}"
    print(f"streamscribe: loading {loading} ...", flush=True)
    try:
        if workers > 1 or len(devices) > 1:
            error = supervisor.serve(
                cfg, workers, functools.partial(_ready_lines, choice, refine_choice)
            )
        else:
            error = run(
                server.run(
                    cfg,
                    load,
                    on_ready=functools.partial(_print_ready, choice, refine_choice),
                    load_refine_engine=load_refine if refine is not None else None,
                    tls_context=tls_context,
                )
            )
    except OSError as err:  # e.g. the port is taken: one line, not a traceback
        error = f"cannot listen: {err.strerror or err}"
    if error:
        print(f"streamscribe: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _checked_choice(cfg: Config, model: str) -> ModelChoice:
    """What `model` would load with the engine section's sources and device, failing at once
    (before a slow load, and before `serve` opens its port) when it or its device is wrong."""
    from engine import selection

    engine = cfg.engine
    choices = [
        selection.choose_model(
            model,
            granite_nar_model=engine.granite_nar_model,
            whisper_model=engine.whisper_model,
            device=device,
            granite_ar_model=engine.granite_ar_model,
        )
        for device in engine.device.split(",")  # `serve` runs one engine process per device
    ]
    for choice in choices:
        selection.check_device(choice)
    return choices[0]


def _model_name(choice: ModelChoice) -> str:
    family, source = choice.family, choice.source
    return family if not source or source == family else f"{family} ({source})"


def _print_ready(choice: ModelChoice, refine: ModelChoice | None, gateway: Gateway) -> None:
    print("\n".join(_ready_lines(choice, refine, gateway)), flush=True)


def _ready_lines(choice: ModelChoice, refine: ModelChoice | None, gateway: Gateway) -> list[str]:
    """The few lines a person needs once the model is loaded: what runs, and where to connect."""
    server = gateway.config.server
    wildcard = server.host in ("0.0.0.0", "::", "")
    host = "127.0.0.1" if wildcard else server.host
    host = f"[{host}]" if ":" in host else host
    base = f"{host}:{gateway.port}"
    ws, web = ("wss", "https") if gateway.tls is not None else ("ws", "http")
    lines = [
        f"streamscribe {_version()} ready: {_model_name(choice)} on "
        f"{gateway.scheduler.engine.device}"
        + (" (listening on every interface)" if wildcard else ""),
    ]
    if refine is not None:
        lines.append(
            f"  refine    {_model_name(refine)} on {gateway.scheduler.refine_engine.device}   "
            "(accuracy pass after each final, lowest priority)"
        )
    lines += [
        f"  streams   {ws}://{base}/v1/stream   (Deepgram /v1/listen, OpenAI /v1/realtime, "
        "Twilio /v1/telephony/twilio)",
        f"  browser   {web}://{base}/",
    ]
    if gateway.rest is not None:
        lines.append(f"  REST      {web}://{host}:{gateway.rest.port}/v1/audio/transcriptions")
    lines += [
        f"  health    {web}://{base}/readyz   metrics {web}://{base}/metrics",
        "Ctrl-C stops.",
    ]
    return lines


def _list_models(args: argparse.Namespace) -> int:
    """What `--model <family>` would load and where, without loading anything."""
    cfg = _configure(args, {"engine.device": args.device})
    from engine import selection

    rows = selection.describe_families(
        granite_nar_model=cfg.engine.granite_nar_model,
        granite_ar_model=cfg.engine.granite_ar_model,
        whisper_model=cfg.engine.whisper_model,
        device=cfg.engine.device,
    )
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return EXIT_OK
    table = [("FAMILY", "CODE", "WEIGHTS", "DEVICE")]
    for row in rows:
        missing = " ".join(row["missing_packages"])
        code = "installed" if row["installed"] else f"missing (pip install {missing})"
        weights = row["weights"] if row["weights_present"] else f"not here ({row['weights']})"
        table.append((row["family"], code, weights, row["device"]))
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    for family, code, weights, device in table:
        print(f"{family:<{widths[0]}}  {code:<{widths[1]}}  {weights:<{widths[2]}}  {device}")
    return EXIT_OK


def _transcribe(args: argparse.Namespace) -> int:
    if args.format in CAPTION_FORMATS and len(args.files) > 1:
        print(f"streamscribe: error: --format {args.format} takes one file", file=sys.stderr)
        return EXIT_ERROR
    cfg = _configure(
        args,
        {
            "engine.model": args.model,
            "engine.device": args.device,
            "engine.max_batch": args.batch,
            "engine.refine_model": args.refine_model,
            "session.language": args.language,
        },
    )
    # Imported here so that commands which need no model stay light.
    from engine.api import engine_languages, primary_language
    from streaming.core.audiofile import AudioFileError, probe, read_audio
    from streaming.ops.config import check_language

    # Inputs and the output are checked before the model loads (seconds to minutes), so a typo
    # is reported at once; a file that fails only later is still reported in its place.
    refused: dict[str, str] = {}
    for path in args.files:
        try:
            probe(path)
        except AudioFileError as exc:
            refused[path] = str(exc)
    if len(refused) == len(args.files):
        for reason in refused.values():
            print(f"streamscribe: {reason}", file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    except OSError as exc:
        print(f"streamscribe: error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return EXIT_ERROR

    language = primary_language(cfg.session.language) if cfg.session.language else None

    def read(path: str) -> Segment | str:
        if path in refused:
            return refused[path]
        try:
            audio, sample_rate = read_audio(path)
        except AudioFileError as exc:
            return str(exc)
        return Segment(audio=audio, sample_rate=sample_rate, language=language)

    with out if args.output else contextlib.nullcontext():
        started = time.monotonic()
        engine = _load_offline_engine(cfg)
        log.info(
            "engine loaded",
            extra={
                "family": engine.family,
                "device": engine.device,
                "load_s": round(time.monotonic() - started, 2),
            },
        )
        check_language(cfg.session.language, engine_languages(engine), "session.language")
        return _transcribe_files(engine, args, read, out, cfg.engine.max_batch)


def _load_offline_engine(cfg: Config) -> Engine:
    """The primary model, or, when a refine model is set, only that one: files are not
    latency-bound, so the accuracy model's text is the one to write, and loading the primary
    too would only cost time and memory."""
    from engine import selection

    refine = cfg.engine.refine
    if refine is None:
        return selection.load_engine(**cfg.engine.load_keywords())
    log.info(
        "refine model set: transcribing files with it only, the primary model is not loaded",
        extra={"refine_model": refine, "model": cfg.engine.model},
    )
    try:
        return selection.load_engine(**cfg.engine.load_keywords(refine))
    except ModelLoadError as err:
        raise ModelLoadError(f"cannot load refine model {refine!r}: {err}") from err


def _transcribe_files(
    engine: Engine,
    args: argparse.Namespace,
    read: Callable[[str], Segment | str],
    out: TextIO,
    max_batch: int,
) -> int:
    show_bar = args.progress or (len(args.files) >= 2 and sys.stderr.isatty())
    unreadable = 0
    with tqdm(total=len(args.files), unit="file", file=sys.stderr, disable=not show_bar) as bar:
        for batch in _batches(args.files, read, max_batch):
            for path, result in _run_batch(engine, batch):
                if isinstance(result, Hypothesis):
                    _write_result(out, path, result, args.format, several=len(args.files) > 1)
                else:
                    unreadable += 1
                    _write_error(out, path, result, args.format)
                bar.update()
            out.flush()
    return EXIT_UNREADABLE if unreadable else EXIT_OK


def _batches(
    paths: Sequence[str], read: Callable[[str], Segment | str], max_batch: int
) -> Iterator[Batch]:
    """Read files lazily, yielding as soon as `max_batch` of them hold audio."""
    batch: Batch = []
    readable = 0
    for path in paths:
        item = read(path)
        batch.append((path, item))
        readable += isinstance(item, Segment)
        if readable == max_batch:
            yield batch
            batch, readable = [], 0
    if batch:
        yield batch


def _run_batch(engine: Engine, batch: Batch) -> list[tuple[str, Hypothesis | str]]:
    """One engine call for the batch's audio; results back in the files' order."""
    segments = [item for _, item in batch if isinstance(item, Segment)]
    started = time.monotonic()
    hypotheses = list(engine.transcribe(segments)) if segments else []
    if len(hypotheses) != len(segments):
        raise RuntimeError(
            f"engine returned {len(hypotheses)} hypotheses for {len(segments)} segments"
        )
    log.debug(
        "batch transcribed",
        extra={
            "segments": len(segments),
            "audio_s": round(sum(len(s.audio) / s.sample_rate for s in segments), 2),
            "compute_s": round(time.monotonic() - started, 3),
        },
    )
    found = iter(hypotheses)
    return [(path, next(found) if isinstance(item, Segment) else item) for path, item in batch]


def _write_result(out: TextIO, path: str, hyp: Hypothesis, fmt: str, several: bool) -> None:
    if fmt in CAPTION_FORMATS:
        # No cue may end past the audio; an engine that leaves `duration_ms` 0 does not say it.
        cues = cues_from_words(hyp.words, duration_ms=hyp.duration_ms or None)
        out.write(CAPTION_FORMATS[fmt](cues))
        return
    if fmt == "json":
        line = json.dumps({"file": path, **hyp.to_dict()}, ensure_ascii=False)
    else:
        line = f"{path}: {hyp.text}" if several else hyp.text
    tqdm.write(line, file=out)


def _write_error(out: TextIO, path: str, reason: str, fmt: str) -> None:
    tqdm.write(f"streamscribe: {reason}", file=sys.stderr)  # the reason names the file
    if fmt == "json":
        tqdm.write(json.dumps({"file": path, "error": reason}, ensure_ascii=False), file=out)

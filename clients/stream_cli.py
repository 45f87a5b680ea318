"""`streamscribe stream`: send a file or raw PCM from stdin to a server and show the text live.

On a terminal the open partials are one line rewritten in place (the volatile tail dim and
italic, unless NO_COLOR is set) and each final gets its own line; anywhere else only finals are
printed, so a pipe or a file gets a clean transcript. `--json` prints every server message.
Exit status, as for every `streamscribe` verb: 0 success; 1 the input failed (a file could not be
read, the server ended the session with an error or before all the audio was sent); 2 usage,
configuration or connection error; 130 interrupted (the first Ctrl-C stops the audio and still
flushes; a second one quits).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

import numpy as np

from clients.client import (
    DEFAULT_URL,
    RECONNECT_TRIES,
    ClientError,
    SessionEndedEarly,
    SessionError,
    stream_file,
    stream_pcm,
)

if TYPE_CHECKING:
    from streaming.core.audio import AudioFormat

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
RAW_FORMAT = ("encoding", "sample_rate", "channels")  # flags for stdin; a file has a header
STDIN_QUEUE_CHUNKS = 16  # how far reading stdin may run ahead of sending
LOUD_DBFS = -40.0  # raw audio louder than this with no words back is worth a hint
VOLATILE_STYLE, RESET = "\x1b[2;3m", "\x1b[0m"  # dim italic
CLEAR_LINE = "\r\x1b[2K"
ELLIPSIS = "…"  # marks words cut from the left of the live line


def add_stream_command(
    subparsers: argparse._SubParsersAction, parents: Sequence[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """Add `stream` to a command line's subparsers; it runs through `args.run(args)`."""
    stream = subparsers.add_parser(
        "stream",
        parents=list(parents),
        help="stream an audio file (WAV, FLAC, OGG, MP3; M4A etc. with PyAV) or raw PCM from stdin "
        "(-) to a server; print the text",
        description="Stream audio to a streamscribe server and print transcripts as they come.",
    )
    stream.add_argument("source", metavar="FILE|-", help="audio file, or - for raw PCM on stdin")
    stream.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    stream.add_argument("--realtime", action="store_true", help="pace the audio like a live source")
    stream.add_argument("--json", action="store_true", help="every server message as a JSON line")
    stream.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("STREAMSCRIBE_API_KEY"),
        help="sent as Authorization: Bearer (default $STREAMSCRIBE_API_KEY)",
    )
    stream.add_argument(
        "--encoding", help="raw stdin only: pcm_s16le (default), pcm_f32le, mulaw or alaw"
    )
    stream.add_argument(
        "--sample-rate", type=int, metavar="HZ", help="raw stdin only (default 16000)"
    )
    stream.add_argument("--channels", type=int, help="raw stdin only: 1 (default) or 2")
    stream.add_argument(
        "--reconnect",
        type=_reconnect,
        default=RECONNECT_TRIES,
        metavar="N",
        help=f"after a dropped connection, tries to resume the session ({RECONNECT_TRIES}; "
        "0: a drop ends the stream)",
    )
    stream.add_argument(
        "--frame-ms", type=_frame_ms, default=100, metavar="MS", help="audio per frame (100)"
    )
    stream.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        type=_option,
        metavar="KEY=VALUE",
        help="a session option, e.g. -o hangover_ms=800 (repeatable)",
    )
    stream.set_defaults(run=run_stream)
    return stream


def _reconnect(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 100:
        raise argparse.ArgumentTypeError("must be 0..100")
    return number


def _frame_ms(value: str) -> int:
    number = int(value)
    if not 10 <= number <= 1000:
        raise argparse.ArgumentTypeError("must be 10..1000")
    return number


def _option(value: str) -> tuple[str, str]:
    key, sep, setting = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key.strip(), setting.strip()


def run_stream(args: argparse.Namespace) -> int:
    """The `stream` command: returns the exit status."""
    # Imported on use: they load scipy (~1 s), and every `streamscribe` command imports this.
    from streaming.core.audio import AudioFormat, AudioFormatError
    from streaming.core.audiofile import AudioFileError, probe

    raw = {key: getattr(args, key) for key in RAW_FORMAT if getattr(args, key) is not None}
    if raw and args.source != "-":
        flags = ", ".join("--" + key.replace("_", "-") for key in raw)
        return _fail(f"{flags}: only for raw stdin (-); a file's header says it")
    fixed = sorted({key for key, _ in args.option} & set(RAW_FORMAT))
    if fixed:
        return _fail(f"-o {', '.join(fixed)}: use --encoding, --sample-rate, --channels")
    audio_format = None
    if args.source == "-":
        if sys.stdin.isatty():
            return _fail("stdin is a terminal; pipe raw PCM into it, e.g. from arecord or ffmpeg")
        try:
            audio_format = AudioFormat(**raw)
        except AudioFormatError as err:
            return _fail(str(err))
    if args.source != "-":
        try:
            probe(args.source)  # before connecting: a typo is not a server problem
        except AudioFileError as err:
            return _fail(str(err), EXIT_INPUT)
    try:
        return asyncio.run(_stream(args, audio_format, sys.stdout))
    except AudioFileError as err:
        return _fail(str(err), EXIT_INPUT)
    except ClientError as err:
        return _fail(str(err))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return EXIT_INTERRUPTED


def _say_resumed(event: dict) -> None:
    print(
        f"streamscribe stream: connection lost for {event['gap_ms'] / 1000:.1f} s; "
        f"session resumed at {event['audio_ms'] / 1000:.1f} s of audio",
        file=sys.stderr,
    )


def _fail(message: str, status: int = EXIT_USAGE) -> int:
    print(f"streamscribe stream: error: {message}", file=sys.stderr)
    return status


async def _stream(args: argparse.Namespace, raw: AudioFormat | None, out: TextIO) -> int:
    """Stream a file, or stdin in the `raw` format, and print; returns the exit status."""
    stop = asyncio.Event()
    _on_interrupt(stop)
    options: dict[str, Any] = {
        "api_key": args.api_key,
        "reconnect": args.reconnect,
        **dict(args.option),
    }
    meter = LevelMeter(raw.encoding if raw is not None else "pcm_s16le")
    if raw is not None:
        size = raw.frame_bytes * max(1, raw.sample_rate * args.frame_ms // 1000)
        events = stream_pcm(
            args.url,
            meter.metered(read_chunks(sys.stdin.buffer, size)),
            realtime=args.realtime,
            stop=stop,
            encoding=raw.encoding,
            sample_rate=raw.sample_rate,
            channels=raw.channels,
            **options,
        )
    else:
        events = stream_file(
            args.url,
            args.source,
            realtime=args.realtime,
            frame_ms=args.frame_ms,
            stop=stop,
            **options,
        )
    show = JsonPrinter(out) if args.json else TextPrinter(out)
    recognised, closed = False, None
    try:
        async for event in events:
            show(event)
            kind = event.get("type")
            recognised = recognised or (kind == "transcript.final" and bool(event.get("text")))
            closed = event if kind == "session.closed" else closed
    except SessionError as err:
        show.finish()
        if err.code not in show.reported:  # else the printer has shown the server's error
            print(f"streamscribe stream: session error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except SessionEndedEarly as err:
        show.finish()
        print(f"streamscribe stream: error: {err}; the transcript is incomplete", file=sys.stderr)
        return EXIT_INPUT
    finally:
        show.finish()
    if not recognised and closed is not None:
        _explain_no_text(closed, meter if raw is not None else None, raw)
    return EXIT_INTERRUPTED if stop.is_set() else EXIT_OK


def _explain_no_text(closed: dict, meter: LevelMeter | None, raw: AudioFormat | None) -> None:
    """No words came back: say so, and when the audio had clear energy or the server heard
    speech in it, point at the raw format flags, the usual cause (audio at the wrong rate or
    in the wrong encoding sounds like noise to a model)."""
    seconds = closed.get("audio_ms", 0) / 1000
    segments = closed.get("segments", 0)
    heard = f"; the server found {segments} speech segment(s) in it" if segments else ""
    message = f"no words were recognised in {seconds:.1f} s of audio{heard}"
    loud = meter is not None and meter.rms_dbfs() > LOUD_DBFS
    if raw is not None and (segments or loud):
        level = f" (its level is {meter.rms_dbfs():.0f} dBFS)" if loud else ""
        message += (
            f"{level}: if it holds speech, check that it really is {raw.encoding} at "
            f"{raw.sample_rate} Hz, {raw.channels} channel(s) (--encoding, --sample-rate, "
            "--channels)"
        )
    print(f"streamscribe stream: {message}", file=sys.stderr)


def _on_interrupt(stop: asyncio.Event) -> None:
    """First Ctrl-C: stop the audio and let the session flush; second: cancel everything."""
    task = asyncio.current_task()

    def interrupted() -> None:
        if stop.is_set():
            task.cancel()
        stop.set()

    # Not possible off the main thread or on Windows: Ctrl-C then stops at once (exit 130).
    with contextlib.suppress(RuntimeError, NotImplementedError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted)


async def read_chunks(stream: BinaryIO, size: int) -> AsyncIterator[bytes]:
    """Chunks of `size` bytes from a blocking binary stream (stdin), read in a daemon thread so
    that neither the event loop nor the process exit waits on a read that may never return."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | OSError] = asyncio.Queue(STDIN_QUEUE_CHUNKS)

    def deliver(item: bytes | OSError) -> bool:
        try:
            asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()
        except (RuntimeError, concurrent.futures.CancelledError):
            return False  # the loop has finished; nobody is listening any more
        return True

    def pump() -> None:
        try:
            while (chunk := stream.read(size)) and deliver(chunk):
                pass
        except OSError as err:
            deliver(err)
            return
        deliver(b"")

    threading.Thread(target=pump, name="stdin-reader", daemon=True).start()
    while item := await queue.get():
        if isinstance(item, OSError):
            raise item
        yield item


class LevelMeter:
    """The RMS level of the raw audio sent, to tell silence from audio the model could not
    make sense of."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self.energy = 0.0
        self.samples = 0

    async def metered(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.add(chunk)
            yield chunk

    def add(self, chunk: bytes) -> None:
        from streaming.core.audio import decode_alaw, decode_mulaw

        if self.encoding == "pcm_f32le":
            samples = np.frombuffer(chunk[: len(chunk) // 4 * 4], "<f4").astype(np.float64)
        elif self.encoding == "mulaw":
            samples = decode_mulaw(chunk).astype(np.float64)
        elif self.encoding == "alaw":
            samples = decode_alaw(chunk).astype(np.float64)
        else:
            samples = np.frombuffer(chunk[: len(chunk) // 2 * 2], "<i2") / 32768.0
        self.energy += float(np.dot(samples, samples))
        self.samples += samples.size

    def rms_dbfs(self) -> float:
        if not self.samples or not self.energy:
            return -120.0
        return 10 * float(np.log10(self.energy / self.samples))


class JsonPrinter:
    """Every server message as one JSON line, flushed at once for whoever reads the pipe."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.reported: set[str] = set()  # errors go to stdout here, so stderr gets them too

    def __call__(self, event: dict) -> None:
        self.out.write(json.dumps(event, ensure_ascii=False) + "\n")
        self.out.flush()
        if event.get("type") == "session.resumed":
            _say_resumed(event)

    def finish(self) -> None:
        pass


class TextPrinter:
    """Finals one per line (`[channel] text` for stereo); on a terminal, partials on a live line."""

    def __init__(
        self,
        out: TextIO,
        live: bool | None = None,
        color: bool | None = None,
        width: Callable[[], int] | None = None,
    ) -> None:
        self.out = out
        self.live = out.isatty() if live is None else live
        self.color = (self.live and "NO_COLOR" not in os.environ) if color is None else color
        self.width = width or (lambda: shutil.get_terminal_size().columns)
        self.stereo = False
        self.partials: dict[int, tuple[str, str]] = {}
        self.drawn = False
        self.reported: set[str] = set()  # error codes shown on stderr

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "session.started":
            self.stereo = event.get("config", {}).get("channels", 1) > 1
        elif kind == "transcript.partial" and self.live:
            self.partials[event["channel"]] = (event["stable_text"], event["volatile_text"])
            self._draw()
        elif kind == "transcript.final":
            self.partials.pop(event["channel"], None)
            if event["text"]:
                self._clear()
                self.out.write(f"{self._prefix(event['channel'])}{event['text']}\n")
            self._draw()
        elif kind == "session.resumed":
            self._clear()
            self.out.flush()
            _say_resumed(event)
            self._draw()
        elif kind == "error":
            self._clear()
            self.out.flush()
            self.reported.add(event["code"])
            print(
                f"streamscribe stream: server error: {event['code']}: {event['message']}",
                file=sys.stderr,
            )
            self._draw()

    def finish(self) -> None:
        self._clear()
        self.out.flush()

    def _prefix(self, channel: int) -> str:
        return f"[{channel}] " if self.stereo else ""

    def _clear(self) -> None:
        if self.drawn:
            self.out.write(CLEAR_LINE)
            self.drawn = False

    def _draw(self) -> None:
        """Rewrite the live line: each channel's open partial, trimmed to the terminal's width
        from the left (whole words, after an ellipsis) so the newest words stay visible and the
        line never wraps."""
        if not self.live:
            self.out.flush()
            return
        runs: list[tuple[str, bool]] = []
        for channel, (stable, volatile) in sorted(self.partials.items()):
            if runs:
                runs.append(("  ", False))
            runs.append((self._prefix(channel) + stable, False))
            if volatile:
                runs += [(" " if stable else "", False), (volatile, True)]
        line = []
        for text, volatile in _tail_on_words(runs, self.width() - 1):
            if text and volatile and self.color:
                text = f"{VOLATILE_STYLE}{text}{RESET}"
            line.append(text)
        self.out.write(CLEAR_LINE + "".join(line))
        self.drawn = bool(runs)
        self.out.flush()


def _tail_on_words(runs: list[tuple[str, bool]], width: int) -> list[tuple[str, bool]]:
    """The end of the styled `runs` that fits in `width` characters, starting at a word: "…"
    and then whole words (a single word wider than the line is cut)."""
    text = "".join(part for part, _ in runs)
    if len(text) <= width:
        return runs
    earliest = len(text) - (width - len(ELLIPSIS))
    start = next(
        (i for i in range(earliest, len(text)) if text[i - 1] == " " and text[i] != " "),
        earliest,
    )
    kept: list[tuple[str, bool]] = [(ELLIPSIS, False)]
    position = 0
    for part, volatile in runs:
        end = position + len(part)
        if end > start:
            kept.append((part[max(0, start - position) :], volatile))
        position = end
    return kept

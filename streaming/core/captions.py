"""Broadcast captions from committed text: roll-up appends, pop-on cues, SRT and WebVTT.

Pure: words in, caption events out; no clock, socket or model.

What is committed. A caption once sent cannot be taken back (a roll-up row is on air, a cue is
in the file), so captions use only text that does not flicker: the stable prefix of partials
(streaming/core/stability.py) and finals, never the volatile tail. Per channel and segment:

- partial: the words of its stable prefix not seen before are committed;
- hold-back: while a segment is open its last `hold_back_words` committed words are held, so a
  cue does not close on half a phrase that the next words or the final would change;
- final (reconciliation): the final is the model's best text and replaces the committed words
  not released yet. Released words stay as they are; the captions go on with the final's words
  after the last released word that the final still has (`stability.resume_point`: fewest word
  edits, case and punctuation ignored), so no released word is repeated and no final word after
  it is lost. A released word that the final contradicts (substitutes or drops, as
  `stability.changed_words` counts) is a *correction*: counted, never retracted; a final word
  inserted before the last released one cannot be shown any more;
- order: a channel's segments are released in order; a segment's words wait while an earlier
  segment still waits for its final. A failed final releases the committed words as they are.

Roll-up (`CaptionAppend`): one display per session, rows of 32 characters. `text` is appended to
the current row exactly as given (it starts with the separating space), or with `row_break` it
starts a new row. When the words come from another channel than the previous append, the new
row starts with ">> " (`speaker_change`); this module has no diarization, so a channel is a
speaker. Nothing is ever removed.

Pop-on (`CaptionCue`), one sequence per channel, ids increasing across the session:
- at most 2 lines of at most `preset` characters; one line when the text fits on one;
- a cue closes when the next word does not fit (lines or `max_cue_ms` of speech), after a pause
  of `PAUSE_MS`, at the end of each segment, and after a sentence once it holds half a line or
  more (no need to wait for more words); when the next word does not fit, the cut may move back
  a few words so that it falls after a sentence or clause end (`CARRY_COST`), carrying at most
  `MAX_CARRY_MS` of speech: live, each carried word delays the cue it leaves by its length (the
  broadcast budget is 3 s from speech to screen, and committing a word already takes ~2 s);
- line and cue breaks prefer sentence ends, then clause ends, then before a conjunction, and are
  never made after an article, determiner, preposition or title ("the | house", "Mr. | Smith")
  nor inside a run of capitalised words ("John | Dashwood"): a line break never, a cue break
  only when a single cue cannot hold the run;
- words are printed as the model spelt them, less control characters; a word longer than a line
  (or than a roll-up row) is cut into pieces;
- timing: start at the first word (or at the previous cue's end, so cues never overlap), end at
  the last word's end, extended to at least `min_cue_ms` and to the time the text needs at
  `max_cps` characters per second (counting spaces). When speech is faster than `max_cps`, the
  extension pushes the next cue later: cues drift behind the speech until the next pause.
  `max_cue_ms` bounds the speech in a cue, and no extension goes past it. In a file
  (`cues_from_words` given the audio's length), no cue ends past the audio either.
- `start_tc`/`end_tc`: programme time (audio time + `timecode_origin_ms`) as HH:MM:SS.mmm, the
  WebVTT timestamp form: exact to the millisecond and independent of a frame rate (25, 29.97
  drop-frame), which a SMPTE HH:MM:SS:FF code would have to assume.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import NamedTuple, Protocol

from engine.api import Word
from streaming.core.events import CaptionAppend, CaptionCue
from streaming.core.stability import changed_words, resume_point, word_key

MODES = ("off", "rollup", "popon")
PRESETS = (32, 37, 42)
ROLLUP_ROW_CHARS = 32
SPEAKER_MARK = ">> "
PAUSE_MS = 1000  # a silence this long between two words ends the cue
MAX_CARRY_MS = 800  # longest a cue break may hold a full cue back (unless it must: names)

CaptionEvent = CaptionAppend | CaptionCue

SENTENCE_END = (".", "?", "!", "…")
CLAUSE_END = (",", ";", ":", "—", "–")
TITLES = frozenset("mr mrs ms dr st prof rev sir gen capt sgt lt col".split())
# Never the last word of a line or cue: it belongs with the word after it.
NO_BREAK_AFTER = TITLES | frozenset(
    """a an the this that these those my your his her its our their some any no every each
    of to in on at by for with from into onto upon about over under between through during
    without within against toward towards""".split()
)
BREAK_BEFORE = frozenset(
    """and but or nor so because which who whom whose where when while although though if
    unless""".split()
)
# Costs of a break between two words (lower is better), for lines and cues alike.
SENTENCE, CLAUSE, CONJUNCTION, PLAIN, FORBIDDEN = 0, 15, 22, 30, 10_000
CARRY_COST = 0.3  # per character moved from a full cue to the next one


@dataclass(frozen=True)
class CaptionConfig:
    """How a session captions: `mode` off | rollup | popon; cue limits for pop-on."""

    mode: str = "off"
    preset: int = 42  # characters per pop-on line
    rows: int = 2  # roll-up rows the display keeps (sent with every append)
    hold_back_words: int = 1
    max_cps: float = 17.0
    min_cue_ms: int = 1000
    max_cue_ms: int = 7000
    timecode_origin_ms: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.rows not in (2, 3):
            raise ValueError(f"rows must be 2 or 3, got {self.rows!r}")
        for name in ("hold_back_words", "min_cue_ms", "timecode_origin_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.max_cps > 0:
            raise ValueError(f"max_cps must be > 0, got {self.max_cps!r}")
        # A full cue must be readable within the longest cue, or reading speed could not hold.
        least = max(self.min_cue_ms, _reading_ms(2 * self.preset, self.max_cps))
        if self.max_cue_ms < least:
            raise ValueError(f"max_cue_ms must be >= {least}, got {self.max_cue_ms!r}")


# --- breaking text ----------------------------------------------------------------------------


def _reading_ms(chars: int, cps: float) -> int:
    return math.ceil(chars * 1000 / cps)


class _Traits(NamedTuple):
    """What the break rules need to know of one spelling."""

    after: int | None  # cost of a break after it, or None when the next word decides
    capitalised: bool
    conjunction: bool  # a break before it is a CONJUNCTION one


@lru_cache(maxsize=16384)
def _traits(text: str) -> _Traits:
    """Cached: a cue is laid out again for every word added to it, so its words come back often."""
    key = word_key(text)
    if text.endswith(SENTENCE_END) and key not in TITLES:
        after: int | None = SENTENCE
    elif text.endswith(CLAUSE_END):
        after = CLAUSE
    elif key in NO_BREAK_AFTER:
        after = FORBIDDEN
    else:
        after = None
    return _Traits(after, text[:1].isupper(), key in BREAK_BEFORE)


def _ends_sentence(word: Word) -> bool:
    return _traits(word.word).after == SENTENCE


def _break_cost(before: Word, after: Word) -> int:
    """How bad a line or cue break between two words is (module doc)."""
    first, second = _traits(before.word), _traits(after.word)
    if first.after is not None:
        return first.after
    if first.capitalised and second.capitalised:
        return FORBIDDEN
    return CONJUNCTION if second.conjunction else PLAIN


def _text(words: Sequence[Word]) -> str:
    return " ".join(w.word for w in words)


def _width(words: Sequence[Word]) -> int:
    """len(_text(words)), without building the text."""
    return max(sum(len(w.word) for w in words) + len(words) - 1, 0)


def _line_break(words: Sequence[Word], width: int) -> int | None:
    """Where the best layout (`_layout`) breaks the words: 0 for one line, None for no layout.

    Line lengths come from word lengths, so a call costs one pass over the words: pop-on lays
    its open cue out again for every word it adds.
    """
    lengths = [len(w.word) for w in words]
    total = sum(lengths) + len(lengths) - 1
    if total <= width:
        return 0
    if total > 2 * width + 1:
        return None  # two lines and the space between them cannot hold it
    best: tuple[int, int] | None = None
    top = -1  # len(_text(words[:i]))
    for i in range(1, len(words)):
        top += lengths[i - 1] + 1
        if top > width:
            break
        bottom = total - top - 1
        if bottom > width:
            continue
        cost = _break_cost(words[i - 1], words[i])
        if cost >= FORBIDDEN:
            continue
        cost += abs(top - bottom)
        if best is None or cost < best[0]:
            best = (cost, i)
    return None if best is None else best[1]


def _layout(words: Sequence[Word], width: int) -> list[str] | None:
    """The best one or two lines of at most `width` characters with no forbidden break, or None
    if there are none."""
    cut = _line_break(words, width)
    if cut is None:
        return None
    return [_text(words[:cut]), _text(words[cut:])] if cut else [_text(words)]


@lru_cache(maxsize=16384)
def _printable(text: str) -> str:
    """Cached: the same spellings come back in every stream."""
    return " ".join("".join(c for c in text if c.isprintable() or c.isspace()).split())


def _pieces(words: Iterable[Word], width: int) -> Iterator[Word]:
    """Words with control characters removed, whitespace normalised, empty ones dropped, and any
    longer than `width` cut into pieces that fit (the word's time shared among them by length)."""
    for w in words:
        text = _printable(w.word)
        if text == w.word and 0 < len(text) <= width and w.end_ms >= w.start_ms:
            yield w  # the common case: the piece would equal the word
            continue
        span = max(w.end_ms - w.start_ms, 0)
        for i in range(0, len(text), width):
            end = min(i + width, len(text))
            start_ms = w.start_ms + span * i // len(text)
            yield Word(text[i:end], start_ms, w.start_ms + span * end // len(text), w.confidence)


def _span(words: Sequence[Word]) -> tuple[int, int]:
    return words[0].start_ms, words[-1].end_ms


def timestamp(ms: int, separator: str = ".") -> str:
    """HH:MM:SS.mmm (WebVTT, and programme timecodes) or with "," (SRT)."""
    ms = max(0, ms)
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{separator}{millis:03d}"


# --- displays ---------------------------------------------------------------------------------


class Display(Protocol):
    """Where released words go: roll-up rows or pop-on cues."""

    def add(self, channel: int, words: Sequence[Word]) -> list[CaptionEvent]: ...

    def end_segment(self, channel: int) -> list[CaptionEvent]: ...


class RollUp:
    """The roll-up display of a session: rows of 32 characters, only ever appended to."""

    def __init__(self, config: CaptionConfig) -> None:
        self.rows = config.rows
        self.row_chars = 0  # characters in the current row
        self.channel: int | None = None

    def add(self, channel: int, words: Sequence[Word]) -> list[CaptionEvent]:
        parts: list[tuple[list[str], bool, bool, list[Word]]] = []  # text, row break, >>, words
        for word in _pieces(words, ROLLUP_ROW_CHARS - len(SPEAKER_MARK)):
            new_speaker = self.channel is not None and channel != self.channel
            self.channel = channel
            piece = f" {word.word}" if self.row_chars else word.word
            if new_speaker or self.row_chars + len(piece) > ROLLUP_ROW_CHARS:
                piece = (SPEAKER_MARK if new_speaker else "") + word.word
                parts.append(([], True, new_speaker, []))
                self.row_chars = 0
            elif not parts:
                parts.append(([], False, False, []))
            parts[-1][0].append(piece)
            parts[-1][3].append(word)
            self.row_chars += len(piece)
        return [
            CaptionAppend(channel, "".join(text), row_break, change, self.rows, *_span(spoken))
            for text, row_break, change, spoken in parts
        ]

    def end_segment(self, channel: int) -> list[CaptionEvent]:
        return []


class PopOn:
    """The pop-on cues of one channel (rules: module doc)."""

    def __init__(self, channel: int, config: CaptionConfig, ids: Callable[[], int]) -> None:
        self.channel = channel
        self.cfg = config
        self.ids = ids
        self.words: list[Word] = []  # the open cue
        self.last_end = 0  # end of the last cue sent: the next one starts no earlier

    def add(self, channel: int, words: Sequence[Word]) -> list[CaptionEvent]:
        out: list[CaptionEvent] = []
        for word in _pieces(words, self.cfg.preset):
            if self.words and word.start_ms - self.words[-1].end_ms >= PAUSE_MS:
                out += self.end_segment(channel)
            candidate = [*self.words, word]
            if len(candidate) == 1 or self._fits(candidate):
                self.words = candidate
                if _ends_sentence(word) and _width(candidate) >= self.cfg.preset // 2:
                    out += self.end_segment(channel)  # a sentence is a cue: send it now
                continue
            cut = self._best_cut(candidate)
            out.append(self._cue(candidate[:cut]))
            self.words = candidate[cut:]
        return out

    def end_segment(self, channel: int) -> list[CaptionEvent]:
        if not self.words:
            return []
        cue, self.words = self._cue(self.words), []
        return [cue]

    def _fits(self, words: Sequence[Word]) -> bool:
        spoken = words[-1].end_ms - words[0].start_ms
        return spoken <= self.cfg.max_cue_ms and _line_break(words, self.cfg.preset) is not None

    def _best_cut(self, words: Sequence[Word]) -> int:
        """How many words close the cue: the cheapest break whose remainder fits a cue and
        holds the cue back at most `MAX_CARRY_MS` (the last word alone always may start the
        next cue: a piece fits on one line; a longer carry only to avoid a forbidden break)."""
        best: tuple[float, int] | None = None
        carried = -1  # len(_text(words[cut:]))
        for cut in range(len(words) - 1, 0, -1):
            carried += len(words[cut].word) + 1
            if best is not None and not self._fits(words[cut:]):
                break
            held_ms = words[-1].end_ms - words[cut - 1].end_ms  # how much later the cue goes
            if best is not None and held_ms > MAX_CARRY_MS and best[0] < FORBIDDEN:
                break
            cost = _break_cost(words[cut - 1], words[cut]) + CARRY_COST * carried
            if best is None or cost < best[0]:
                best = (cost, cut)
        assert best is not None
        return best[1]

    def _cue(self, words: Sequence[Word]) -> CaptionCue:
        cfg = self.cfg
        lines = _layout(words, cfg.preset)
        assert lines is not None
        start = max(words[0].start_ms, self.last_end)
        chars = sum(len(line) for line in lines)
        least = max(cfg.min_cue_ms, _reading_ms(chars, cfg.max_cps))
        end = min(max(words[-1].end_ms, start + least), start + cfg.max_cue_ms)
        self.last_end = end
        origin = cfg.timecode_origin_ms
        return CaptionCue(
            id=self.ids(),
            channel=self.channel,
            start_ms=start,
            end_ms=end,
            lines=lines,
            speech_end_ms=words[-1].end_ms,
            start_tc=timestamp(start + origin),
            end_tc=timestamp(end + origin),
        )


# --- committed words --------------------------------------------------------------------------


@dataclass
class _Segment:
    committed: list[Word] = field(default_factory=list)  # stream time
    released: int = 0  # how many of `committed` went to the display (never changed after)
    done: bool = False  # the final (or its failure) is known


class CaptionSegmenter:
    """One channel: committed words in, in time order, released words to a display.

    Rules (commit, hold-back, reconciliation with finals, order): module doc.
    """

    def __init__(self, channel: int, config: CaptionConfig, display: Display) -> None:
        self.channel = channel
        self.cfg = config
        self.display = display
        self.segments: dict[int, _Segment] = {}
        self.finished = -1  # segments up to this id are released entirely: late calls ignored
        self.corrections = 0  # released words that a final contradicted

    def stable(self, segment_id: int, words: Sequence[Word]) -> list[CaptionEvent]:
        """A partial's whole stable prefix (stream time); only its new words are committed."""
        if segment_id <= self.finished:
            return []
        segment = self.segments.setdefault(segment_id, _Segment())
        if segment.done:
            return []
        segment.committed += words[len(segment.committed) :]
        return self._release()

    def closed(self, segment_id: int) -> None:
        """The segment ended and awaits its final: later segments wait for it."""
        if segment_id > self.finished:
            self.segments.setdefault(segment_id, _Segment())

    def final(self, segment_id: int, words: Sequence[Word] | None) -> list[CaptionEvent]:
        """The segment's final words (stream time), or None when its final failed."""
        if segment_id <= self.finished:
            return []
        segment = self.segments.setdefault(segment_id, _Segment())
        segment.done = True
        if words is not None:
            shown = segment.committed[: segment.released]
            resume = resume_point(shown, words)
            self.corrections += changed_words(
                [w.word for w in shown], [w.word for w in words[:resume]]
            )
            segment.committed = shown + list(words[resume:])
        return self._release()

    def _release(self) -> list[CaptionEvent]:
        out: list[CaptionEvent] = []
        for segment_id in sorted(self.segments):
            segment = self.segments[segment_id]
            held = 0 if segment.done else self.cfg.hold_back_words
            upto = max(segment.released, len(segment.committed) - held)
            if upto > segment.released:
                out += self.display.add(self.channel, segment.committed[segment.released : upto])
                segment.released = upto
            if not segment.done:
                break
            out += self.display.end_segment(self.channel)
            del self.segments[segment_id]
            self.finished = segment_id
        return out


class Captions:
    """The captions of a session: one segmenter per channel, displays wired as the mode says
    (one roll-up display shared by all channels, or pop-on cues per channel). Mode off: no-op."""

    def __init__(self, config: CaptionConfig, channels: int) -> None:
        self.config = config
        ids = itertools.count(1).__next__
        shared = RollUp(config) if config.mode == "rollup" else None
        self.channels = (
            []
            if config.mode == "off"
            else [
                CaptionSegmenter(c, config, shared or PopOn(c, config, ids))
                for c in range(channels)
            ]
        )

    @property
    def corrections(self) -> int:
        return sum(s.corrections for s in self.channels)

    def stable(self, channel: int, segment_id: int, words: Sequence[Word]) -> list[CaptionEvent]:
        return self.channels[channel].stable(segment_id, words) if self.channels else []

    def closed(self, channel: int, segment_id: int) -> None:
        if self.channels:
            self.channels[channel].closed(segment_id)

    def final(
        self, channel: int, segment_id: int, words: Sequence[Word] | None
    ) -> list[CaptionEvent]:
        return self.channels[channel].final(segment_id, words) if self.channels else []


# --- whole transcripts and files --------------------------------------------------------------


class _FilePopOn(PopOn):
    """The pop-on cues of a whole file, noting where each cue's speech starts (`_within`)."""

    def __init__(self, preset: int) -> None:
        config = CaptionConfig(mode="popon", preset=preset)
        super().__init__(0, config, itertools.count(1).__next__)
        self.speech_starts: list[int] = []

    def _cue(self, words: Sequence[Word]) -> CaptionCue:
        self.speech_starts.append(words[0].start_ms)
        return super()._cue(words)


def cues_from_words(
    words: list[Word], preset: int = 42, duration_ms: int | None = None
) -> list[CaptionCue]:
    """Pop-on cues of a whole transcript (times from its start), e.g. for SRT/WebVTT files.

    `duration_ms`, the audio's length, bounds the cues: a player has no picture to show a cue
    over after the audio ends, so the reading-time extensions stop there (`_within`).
    """
    popon = _FilePopOn(preset)
    cues = [*popon.add(0, sorted(words, key=lambda w: w.start_ms)), *popon.end_segment(0)]
    return cues if duration_ms is None else _within(cues, popon.speech_starts, duration_ms)


def _within(cues: list[CaptionCue], speech_starts: list[int], duration_ms: int) -> list[CaptionCue]:
    """The cues made to end by `duration_ms`, from the last one back: each ends by the audio's
    end or the next cue's start. A cut cue that extensions had pushed behind its speech moves
    back towards it to keep its length, cutting the cue before; one that cannot is shortened.
    Cue i starts at i ms or later, so each keeps at least 1 ms: only audio shorter than 1 ms
    per cue gets cues past its end."""
    limit = max(duration_ms, len(cues))
    out: list[CaptionCue] = []
    for i in reversed(range(len(cues))):
        cue = cues[i]
        end = min(cue.end_ms, limit)
        back = max(speech_starts[i], end - (cue.end_ms - cue.start_ms))
        start = max(i, min(cue.start_ms, back, end - 1))
        if (start, end) != (cue.start_ms, cue.end_ms):
            cue = replace(
                cue, start_ms=start, end_ms=end, start_tc=timestamp(start), end_tc=timestamp(end)
            )
        out.append(cue)
        limit = start
    return out[::-1]


def to_srt(cues: Iterable[CaptionCue], offset_ms: int = 0) -> str:
    """SubRip: cues numbered from 1 in the order given, times shifted by `offset_ms`."""
    blocks = [
        f"{n}\n{timestamp(c.start_ms + offset_ms, ',')} --> "
        f"{timestamp(c.end_ms + offset_ms, ',')}\n" + "\n".join(c.lines) + "\n"
        for n, c in enumerate(cues, 1)
    ]
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(cues: Iterable[CaptionCue], offset_ms: int = 0) -> str:
    """WebVTT: cue identifiers are the cue ids; text is escaped (&, <, >)."""
    blocks = [
        f"{c.id}\n{timestamp(c.start_ms + offset_ms)} --> {timestamp(c.end_ms + offset_ms)}\n"
        + "\n".join(_vtt_escape(line) for line in c.lines)
        + "\n"
        for c in cues
    ]
    return "\n".join(["WEBVTT\n", *blocks])


# --- recent sessions' cues, for GET .../captions.vtt|srt ---------------------------------------


class CaptionSink(Protocol):
    """Where a store also writes its own sessions' cues, so that other server instances can
    serve their files (streaming/transport/caption_share.py); the store does no I/O itself."""

    def opened(self, session_id: str, origin_ms: int) -> None: ...

    def added(self, session_id: str, origin_ms: int, cue: CaptionCue) -> None: ...


@dataclass
class _Kept:
    origin_ms: int
    cues: deque[CaptionCue] = field(default_factory=deque)
    local: bool = True  # this server's own session; False: mirrored from another server
    ids: set[int] = field(default_factory=set)  # a mirrored session's cue ids: no repeats


class CaptionStore:
    """The pop-on cues of recent sessions, running and finished, bounded in memory.

    At most `max_sessions` sessions and `max_cues` cues in all: the session least recently
    given a cue is forgotten first; a single session over `max_cues` loses its oldest cues.
    With a `sink`, this server's sessions are written there too, and `mirror` keeps the
    sessions of other servers (within the same bounds), so any server can serve any file.
    """

    def __init__(self, max_sessions: int, max_cues: int, sink: CaptionSink | None = None) -> None:
        self.max_sessions = max_sessions
        self.max_cues = max_cues
        self.sink = sink
        self.sessions: OrderedDict[str, _Kept] = OrderedDict()
        self.total = 0

    def open(self, session_id: str, origin_ms: int) -> None:
        """Start (or restart) keeping a session's cues; its files carry programme time."""
        self._start(session_id, _Kept(origin_ms))
        if self.sink is not None:
            self.sink.opened(session_id, origin_ms)

    def add(self, session_id: str, cue: CaptionCue) -> None:
        kept = self.sessions.get(session_id)
        if kept is None or not kept.local:
            return  # forgotten already: not kept again
        self.sessions.move_to_end(session_id)
        kept.cues.append(cue)
        self.total += 1
        self._bound(kept)
        if self.sink is not None:
            self.sink.added(session_id, kept.origin_ms, cue)

    def mirror(
        self, session_id: str, origin_ms: int, cues: Iterable[CaptionCue], fresh: bool = False
    ) -> None:
        """Keep cues another server gave a session: merged by cue id, so a cue heard twice
        (live, then when catching up) is kept once. `fresh`: the session (re)started there.
        This server's own sessions are left alone: they are complete here."""
        kept = self.sessions.get(session_id)
        if kept is not None and kept.local:
            return
        if kept is None or fresh or kept.origin_ms != origin_ms:
            kept = self._start(session_id, _Kept(origin_ms, local=False))
        self.sessions.move_to_end(session_id)
        for cue in cues:
            if cue.id not in kept.ids:
                kept.ids.add(cue.id)
                kept.cues.append(cue)
                self.total += 1
        self._bound(kept)

    def is_local(self, session_id: str) -> bool:
        """Whether this server keeps the session as its own (not mirrored, not unknown)."""
        kept = self.sessions.get(session_id)
        return kept is not None and kept.local

    def cues(self, session_id: str, channel: int | None = None) -> tuple[list[CaptionCue], int]:
        """(cues in start order, timecode origin); KeyError for a session not kept."""
        kept = self.sessions[session_id]
        cues = [c for c in kept.cues if channel is None or c.channel == channel]
        return sorted(cues, key=lambda c: (c.start_ms, c.id)), kept.origin_ms

    def _start(self, session_id: str, kept: _Kept) -> _Kept:
        old = self.sessions.pop(session_id, None)
        self.total -= len(old.cues) if old else 0
        self.sessions[session_id] = kept
        while len(self.sessions) > self.max_sessions:
            self._forget_oldest()
        return kept

    def _bound(self, kept: _Kept) -> None:
        while self.total > self.max_cues:
            if len(self.sessions) > 1:
                self._forget_oldest()
            else:
                kept.ids.discard(kept.cues.popleft().id)
                self.total -= 1

    def _forget_oldest(self) -> None:
        _, kept = self.sessions.popitem(last=False)
        self.total -= len(kept.cues)

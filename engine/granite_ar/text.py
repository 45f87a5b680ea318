"""Pure functions on generated tokens and words: loop trimming, approximate word times, and
joining the texts of overlapping windows.

An autoregressive decoder gives neither token times nor a guarantee to stop, so these rules
stand in for what the NAR family gets from its CTC alignment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from ..api import Word
from ..granite_nar.windows import owned_ranges

# A trailing unit of 1..MAX_LOOP_UNIT tokens counts as a loop once it has been repeated
# MIN_LOOP_REPEATS times in a row and the repeats cover MIN_LOOP_TOKENS tokens: "no, no, no"
# or a digit string stays, a decoder stuck on one phrase is cut.
MAX_LOOP_UNIT = 32
MIN_LOOP_REPEATS = 4
MIN_LOOP_TOKENS = 16
# The longest tail the rule above ever needs to look at.
LOOP_WINDOW = MAX_LOOP_UNIT * MIN_LOOP_REPEATS
# A text match shorter than this between two windows is too likely to be chance.
MIN_OVERLAP_WORDS = 2


def loop_end(ids: Sequence[int]) -> int | None:
    """If `ids` ends in a loop, the length to keep: everything before the loop plus one copy
    of its unit (the shortest unit when several fit). None when the tail is not a loop."""
    ids = list(ids)
    total = len(ids)
    best = None
    for unit in range(1, min(MAX_LOOP_UNIT, total // MIN_LOOP_REPEATS) + 1):
        tail = ids[total - unit :]
        repeats = 1
        while (repeats + 1) * unit <= total and (
            ids[total - (repeats + 1) * unit : total - repeats * unit] == tail
        ):
            repeats += 1
        if repeats >= max(MIN_LOOP_REPEATS, math.ceil(MIN_LOOP_TOKENS / unit)):
            keep = total - (repeats - 1) * unit
            if best is None or keep < best:
                best = keep
    return best


def spread_times(words: Sequence[str], duration_ms: int) -> list[tuple[int, int]]:
    """Approximate (start, end) per word: the duration shared out in proportion to each word's
    length in characters. AR decoding has no alignment; this only keeps words ordered and
    roughly placed (silences and speaking rate are not seen)."""
    total = sum(len(w) for w in words)
    times = []
    done = 0
    for word in words:
        start = duration_ms * done // total
        done += len(word)
        times.append((start, duration_ms * done // total))
    return times


def word_key(word: str) -> str:
    """What two windows must agree on for a word to count as the same: case and punctuation
    differ at window edges (a cut sentence), the letters do not."""
    return "".join(c for c in word.casefold() if c.isalnum()) or word


def overlap_cut(
    previous: Sequence[str], following: Sequence[str], max_words: int
) -> tuple[int, int] | None:
    """Where to splice two windows' word keys: keep previous[:i] and following[j:].

    The longest run of words common to the last `max_words` of `previous` and the first
    `max_words` of `following` is taken as the audio both windows heard; it is kept once. The
    run need not touch either edge, because the words cut in half at a window's edge differ.
    None when no run of MIN_OVERLAP_WORDS words is found."""
    offset = max(0, len(previous) - max_words)
    tail, head = previous[offset:], following[:max_words]
    best_length, best_end = 0, (0, 0)
    above = [0] * (len(head) + 1)
    for i, word in enumerate(tail):
        row = [0] * (len(head) + 1)
        for j, other in enumerate(head):
            if word == other:
                row[j + 1] = above[j] + 1
                if row[j + 1] > best_length:
                    best_length, best_end = row[j + 1], (i + 1, j + 1)
        above = row
    if best_length < MIN_OVERLAP_WORDS:
        return None
    return offset + best_end[0], best_end[1]


def join_windows(
    per_window: Sequence[Sequence[tuple[Word, list[int]]]],
    ranges: Sequence[tuple[int, int]],
    sample_rate: int,
    max_words: int,
) -> list[tuple[Word, list[int]]]:
    """One word list (with token ids) for a segment from its overlapping windows' lists, words
    already on the segment's timeline.

    Consecutive windows are spliced where their texts agree (`overlap_cut`); where they do not,
    each keeps the words whose approximate middle lies in its own half of the overlap. Times
    are then made non-decreasing, since each window's times are only estimates."""
    owned = owned_ranges(ranges)
    merged: list[tuple[Word, list[int]]] = []
    for index, words in enumerate(per_window):
        if index == 0:
            merged = list(words)
            continue
        cut = overlap_cut(
            [word_key(w.word) for w, _ in merged], [word_key(w.word) for w, _ in words], max_words
        )
        if cut is not None:
            merged = merged[: cut[0]] + list(words[cut[1] :])
            continue
        boundary_ms = owned[index][0] * 1000 / sample_rate
        merged = [p for p in merged if _middle(p[0]) < boundary_ms] + [
            p for p in words if _middle(p[0]) >= boundary_ms
        ]
    return _ordered(merged)


def _middle(word: Word) -> float:
    return (word.start_ms + word.end_ms) / 2


def _ordered(words: list[tuple[Word, list[int]]]) -> list[tuple[Word, list[int]]]:
    out = []
    floor = 0
    for word, ids in words:
        start = max(word.start_ms, floor)
        end = max(word.end_ms, start)
        out.append((replace(word, start_ms=start, end_ms=end), ids))
        floor = end
    return out

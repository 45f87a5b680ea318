"""Cutting long audio into overlapping windows and stitching their words back together.

Each window owns the part of the timeline closer to its own centre than to its neighbour's
(the middle of each overlap is the cut), and keeps only words whose midpoint falls in what it
owns: every word is kept once, by the window that saw it with the most context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..api import Word


def plan_windows(n_samples: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) sample ranges covering [0, n) with consecutive windows sharing `overlap`."""
    if n_samples <= window:
        return [(0, n_samples)]
    step = window - overlap
    starts = list(range(0, n_samples - window, step)) + [n_samples - window]
    return [(s, s + window) for s in sorted(set(starts))]


def owned_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[float, float]]:
    """The part of the timeline each window answers for: cuts at the middle of each overlap."""
    if not ranges:
        return []
    cuts = [
        (a_end + b_start) / 2 for (_, a_end), (b_start, _) in zip(ranges, ranges[1:], strict=False)
    ]
    lows = [float("-inf"), *cuts]
    highs = [*cuts, float("inf")]
    return list(zip(lows, highs, strict=True))


def merge_words(
    per_window: Sequence[Sequence[tuple[Word, list[int]]]],
    ranges: Sequence[tuple[int, int]],
    sample_rate: int,
) -> list[tuple[Word, list[int]]]:
    """Shift each window's words (with their token ids) to the segment's timeline and keep
    each word once."""
    merged: list[tuple[Word, list[int]]] = []
    for words, (start, _), (low, high) in zip(
        per_window, ranges, owned_ranges(ranges), strict=True
    ):
        offset = start * 1000 // sample_rate
        for word, ids in words:
            shifted = replace(word, start_ms=word.start_ms + offset, end_ms=word.end_ms + offset)
            middle = (shifted.start_ms + shifted.end_ms) / 2 * sample_rate / 1000
            if low <= middle < high:
                merged.append((shifted, ids))
    return merged

"""From per-frame and per-slot argmax ids to tokens with times, and from tokens to words.

Pure functions on lists, so each rule of the spec (CTC collapse, insertion slots, timing of
inserted tokens) is testable without a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..api import Word

BPE_WINDOW_MS = 80  # one BPE CTC window = 4 encoder frames of 20 ms


@dataclass(frozen=True)
class TokenSpan:
    token_id: int
    start_ms: int
    end_ms: int
    prob: float


def collapse(ids: Sequence[int], blank: int) -> list[tuple[int, int, int]]:
    """CTC rule: merge consecutive repeats, then drop blanks. Returns (id, first, last) runs."""
    runs: list[tuple[int, int, int]] = []
    previous = None
    for index, token in enumerate(ids):
        if token == previous:
            if token != blank:
                runs[-1] = (token, runs[-1][1], index)
            continue
        previous = token
        if token != blank:
            runs.append((token, index, index))
    return runs


def draft_spans(ids: Sequence[int], probs: Sequence[float], blank: int) -> list[TokenSpan]:
    """CTC draft tokens timed by the 80 ms windows they were emitted in."""
    return [
        TokenSpan(
            token,
            first * BPE_WINDOW_MS,
            (last + 1) * BPE_WINDOW_MS,
            sum(probs[first : last + 1]) / (last - first + 1),
        )
        for token, first, last in collapse(ids, blank)
    ]


def draft_confidence(draft: Sequence[TokenSpan]) -> float:
    """How sure the CTC draft is: the mean over its collapsed tokens of each token's probability
    (the argmax posterior averaged over the windows that emitted it), the first of the TURBO
    routing criteria (spec §8: mean >= 0.92; its min, entropy, blank- and repeat-ratio checks
    are not applied). A draft without tokens scores 0: an editor may still insert some."""
    return sum(s.prob for s in draft) / len(draft) if draft else 0.0


def build_slots(tokens: Sequence[int], blank: int, min_length: int) -> list[int]:
    """Editor text slots: blank, y0, blank, y1, ..., blank, padded with blanks to `min_length`."""
    slots = [blank] * max(2 * len(tokens) + 1, min_length)
    slots[1 : 2 * len(tokens) : 2] = tokens
    return slots


def slot_times(draft: Sequence[TokenSpan], n_slots: int, duration_ms: int) -> list[tuple[int, int]]:
    """Time span of each slot: a token slot has its draft token's span, a blank slot the gap
    between its neighbours (so a token the editor inserts there is timed between them)."""
    times = []
    for slot in range(n_slots):
        j, is_token = divmod(slot, 2)
        if is_token and j < len(draft):
            times.append((draft[j].start_ms, draft[j].end_ms))
            continue
        before = draft[min(j, len(draft)) - 1].end_ms if min(j, len(draft)) > 0 else 0
        after = draft[j].start_ms if j < len(draft) else duration_ms
        times.append((before, max(before, after)))
    return times


def editor_spans(
    slot_ids: Sequence[int],
    slot_probs: Sequence[float],
    times: Sequence[tuple[int, int]],
    blank: int,
) -> list[TokenSpan]:
    return [
        TokenSpan(
            token,
            times[first][0],
            max(times[last][1], times[first][0]),
            sum(slot_probs[first : last + 1]) / (last - first + 1),
        )
        for token, first, last in collapse(slot_ids, blank)
    ]


def group_words(
    spans: Sequence[TokenSpan],
    decode_batch: Callable[[list[list[int]]], list[str]],
    special: set[int],
) -> list[tuple[Word, list[int]]]:
    """Byte-level BPE marks a word start with a leading space; tokens join until the next one.

    Each word comes with the token ids it was decoded from. The tokenizer is called twice per
    window (every token alone, then every word), not once per token."""
    kept = [span for span in spans if span.token_id not in special]
    pieces = decode_batch([[span.token_id] for span in kept]) if kept else []
    groups: list[list[TokenSpan]] = []
    for span, piece in zip(kept, pieces, strict=True):
        if not groups or piece[:1].isspace():
            groups.append([span])
        else:
            groups[-1].append(span)
    texts = decode_batch([[s.token_id for s in group] for group in groups]) if groups else []
    words = []
    for group, text in zip(groups, texts, strict=True):
        if not text.strip():
            continue
        log_prob = sum(math.log(max(s.prob, 1e-12)) for s in group) / len(group)
        word = Word(text.strip(), group[0].start_ms, group[-1].end_ms, math.exp(log_prob))
        words.append((word, [s.token_id for s in group]))
    return words

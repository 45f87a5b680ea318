"""Stable prefix / volatile tail of the partial transcripts of one open segment.

Each partial is a fresh hypothesis of the whole segment so far, so its words may disagree with
what was shown before. Clients (and the caption segmenter) need a part that never flickers: the
stable prefix, which only grows within a segment, followed by a volatile tail that may change.

Rules (`StabilityTracker.update`):

- Words are compared by `word_key`: case and punctuation are ignored ("Hello," == "hello").
- Alignment by time: a word of the new hypothesis whose midpoint lies before the end of the last
  stable word is covered by the stable prefix and dropped; the rest, in order, is the candidate
  tail. A hypothesis shorter than the stable prefix (in words or in time) simply gives a shorter
  or empty tail; the stable prefix stays as it was.
- Agreement: tail word i is agreed when tail words 0..i (the word and its left context) have
  been identical in `agreement` consecutive partials. A word seen at the same index after a
  different word is a coincidence, not agreement (the LocalAgreement rule of streaming ASR).
- Settling: a tail word is settled when `settle_ms` of audio follows it
  (`word.end_ms <= audio_ms - settle_ms`); no later partial is likely to revise it.
- The longest leading run of tail words that are agreed or settled joins the stable prefix, so
  the stable words are always a contiguous prefix.
- Spelling: a volatile word shows its latest spelling; a word is committed with the spelling and
  times of the hypothesis that commits it and then frozen (captions may have printed it). The
  final is authoritative and carries the model's last spelling.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from engine.api import Word

# Not a letter or digit: `\w` is exactly `str.isalnum` plus "_" (tests check every code point).
_NOT_ALNUM = re.compile(r"[\W_]+")


@lru_cache(maxsize=16384)
def word_key(text: str) -> str:
    """The form in which two spellings count as the same word: case-folded letters and digits.

    Cached: every partial repeats the words of the one before, in every stream.
    """
    folded = text.casefold()
    return folded if folded.isalnum() else _NOT_ALNUM.sub("", folded)


def _join(words: Sequence[Word]) -> str:
    return " ".join([w.word for w in words])


def _kept(old: Sequence[str], new: Sequence[str]) -> list[bool]:
    """Which words of `old` survive in `new`, under a fewest-edits word alignment.

    Words that `new` appends after the last aligned one cost nothing: growth at the tail is not a
    change. A word of `old` that is substituted or deleted is not kept.
    """
    # Successive texts mostly share their first words, so the table is built only for what
    # follows the first p common words: the edits between two texts with a common start are the
    # edits between the rest, so it is the full table less its first p rows and columns, with
    # the same cheapest end and the same walk back. In those first rows and columns one side is
    # a prefix of the other, so the cost there is |i - j|.
    p = 0
    while p < len(old) and p < len(new) and old[p] == new[p]:
        p += 1
    rest_old, rest_new = old[p:], new[p:]
    n, m = len(rest_old), len(rest_new)
    cost = [[i + j if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        above, row, key = cost[i - 1], cost[i], rest_old[i - 1]
        for j in range(1, m + 1):
            row[j] = min(above[j - 1] + (key != rest_new[j - 1]), above[j] + 1, row[j - 1] + 1)
    i, j = n, min(range(m + 1), key=cost[n].__getitem__)
    kept = [False] * (p + n)
    while i > 0 and j > 0:
        if rest_old[i - 1] == rest_new[j - 1] and cost[i][j] == cost[i - 1][j - 1]:
            kept[p + i - 1] = True
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j - 1] + 1:
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j] + 1:
            i -= 1
        else:
            j -= 1
    # The walk goes on through the first p rows and columns: with a cost of |i - j| there, the
    # rules above take a match for equal words, else a deletion below the diagonal and an
    # insertion above it.
    i, j = i + p, j + p
    while i > 0 and j > 0:
        if old[i - 1] == new[j - 1]:
            kept[i - 1] = True
            i, j = i - 1, j - 1
        elif i > j:
            i -= 1
        else:
            j -= 1
    return kept


def changed_words(shown: Sequence[str], later: Sequence[str]) -> int:
    """How many words of `shown` a later text contradicts (substitutes or drops).

    Case, punctuation and words appended at the end do not count as changes.
    """
    kept = _kept([word_key(w) for w in shown], [word_key(w) for w in later])
    return kept.count(False)


@dataclass(frozen=True)
class StabilityConfig:
    """How cautious the stable prefix is: more agreement or settling means less flicker, later."""

    agreement: int = 2
    settle_ms: int = 1200

    def __post_init__(self) -> None:
        for name, least in (("agreement", 1), ("settle_ms", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


@dataclass(frozen=True)
class Partial:
    """One transcript.partial of a segment: the frozen stable prefix and the current tail."""

    rev: int
    stable: list[Word]
    volatile: list[Word]

    @property
    def stable_text(self) -> str:
        return _join(self.stable)

    @property
    def volatile_text(self) -> str:
        return _join(self.volatile)


@dataclass(frozen=True)
class FinalText:
    """A segment's final words; `changed_stable` counts stable words the final contradicted."""

    words: list[Word]
    changed_stable: int

    @property
    def text(self) -> str:
        return _join(self.words)


class StabilityTracker:
    """Turns the successive hypotheses of one open segment into partials (rules: module doc).

    One tracker per segment: after `final` it refuses further calls.
    """

    def __init__(self, cfg: StabilityConfig | None = None) -> None:
        self._cfg = cfg or StabilityConfig()
        self._stable: list[Word] = []
        # The previous partial's volatile tail (as keys), and for each of its words the number of
        # consecutive partials in which the tail up to and including that word was identical.
        self._tail_keys: list[str] = []
        self._tail_runs: list[int] = []
        self._rev = 0
        self._closed = False

    @property
    def stable(self) -> list[Word]:
        """The words committed so far (they never change)."""
        return list(self._stable)

    def update(self, words: Sequence[Word], audio_ms: int) -> Partial:
        """Take a new hypothesis of the whole segment so far, covering `audio_ms` of audio."""
        self._check_open()
        if audio_ms < 0:
            raise ValueError(f"audio_ms must be >= 0, got {audio_ms}")
        tail = self._uncovered(words)
        keys = [word_key(w.word) for w in tail]
        # A word agrees with the previous partial when the tails are identical up to it.
        same, previous = 0, self._tail_keys
        while same < len(keys) and same < len(previous) and keys[same] == previous[same]:
            same += 1
        runs = [run + 1 for run in self._tail_runs[:same]] + [1] * (len(keys) - same)
        settled_before = audio_ms - self._cfg.settle_ms
        commit = 0
        while commit < len(tail) and (
            runs[commit] >= self._cfg.agreement or tail[commit].end_ms <= settled_before
        ):
            commit += 1
        self._stable.extend(tail[:commit])
        self._tail_keys, self._tail_runs = keys[commit:], runs[commit:]
        self._rev += 1
        return Partial(rev=self._rev, stable=list(self._stable), volatile=list(tail[commit:]))

    def final(self, words: Sequence[Word]) -> FinalText:
        """Close the segment with the model's final hypothesis, which wins over the partials."""
        self._check_open()
        self._closed = True
        changed = changed_words([w.word for w in self._stable], [w.word for w in words])
        return FinalText(words=list(words), changed_stable=changed)

    def _uncovered(self, words: Sequence[Word]) -> list[Word]:
        if not self._stable:
            return list(words)
        stable_end = self._stable[-1].end_ms
        # midpoint >= stable_end, in integers
        return [w for w in words if w.start_ms + w.end_ms >= 2 * stable_end]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("segment already has its final; start a new StabilityTracker")


@dataclass
class StabilityStats:
    """Partial stability over many segments (product.md, Measures, "Partial stability").

    A segment is seen as the sequence of texts shown to the client, one per partial
    (`stable_text` + `volatile_text`), followed by its final. Each text is aligned to the next
    with the fewest word edits (case and punctuation ignored; words appended at the end are free,
    since growth at the tail is not a change). A word *appears* when a text shows it and the
    previous text did not have it at that aligned place (every word of the first partial
    appears); it *changes* when the next text (or the final, after the last partial)
    substitutes or drops it. A word shown unchanged in many partials is one appearance, so the
    rate does not depend on how often partials are sent.

    - `change_rate` = `words_changed` / `words_shown`: the share of words shown in partials that
      later changed; 0 is perfectly stable.
    - `stable_change_rate` = `stable_changed` / `stable_shown`: stable words (the last partial's
      stable prefix; it only grows) that the final contradicted. Partials never change stable
      words, so this counts only the final's corrections.
    """

    segments: int = 0
    words_shown: int = 0
    words_changed: int = 0
    stable_shown: int = 0
    stable_changed: int = 0

    def add_segment(self, partials: Sequence[tuple[str, str]], final: str) -> None:
        """Count one segment: its partials as (stable_text, volatile_text) pairs, then its final."""
        final_keys = [word_key(w) for w in final.split()]
        previous: list[str] = []
        for stable_text, volatile_text in partials:
            shown = [word_key(w) for w in f"{stable_text} {volatile_text}".split()]
            kept = _kept(previous, shown)
            self.words_changed += kept.count(False)
            self.words_shown += len(shown) - sum(kept)
            previous = shown
        self.words_changed += _kept(previous, final_keys).count(False)
        stable = partials[-1][0].split() if partials else []
        self.stable_shown += len(stable)
        self.stable_changed += changed_words(stable, final.split())
        self.segments += 1

    @property
    def change_rate(self) -> float:
        return self.words_changed / self.words_shown if self.words_shown else 0.0

    @property
    def stable_change_rate(self) -> float:
        return self.stable_changed / self.stable_shown if self.stable_shown else 0.0

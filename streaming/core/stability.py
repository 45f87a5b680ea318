"""Committed text (stable prefix) and volatile tail of the partial transcripts of one open segment.

Each partial is a fresh hypothesis of the open segment, or of its last part (a window), so its
words may disagree with what was shown before. Clients and captions need a part that never
flickers and is never wrong in a way a later message must undo: the committed words, which only
grow within a segment, followed by a volatile tail that may change.

The invariant (checked by property tests): words are committed in order, each word of a
hypothesis at most once and none skipped; at every commit the committed words equal a word
prefix of the hypothesis they were committed from (case, punctuation and the spaces between
words aside: "old-fashioned" may be committed as "old" + "fashioned" by a later hypothesis).

Rules (`StabilityTracker.update`):

- Window: a partial decodes the audio from a little before the last committed words
  (`window(context_ms)`); the committed words inside it are its `prefix`, which a text decoder
  continues from. The hypothesis of a window is the committed words before it followed by the
  window's words.
- Anchoring: a hypothesis can commit only when its words start with the committed words (by
  `word_key`, compared as one string so that splits and merges still match; a window may start
  with one stray word, a fragment of audio before its prefix). The rest is the tail. A
  hypothesis that does not start with them (the model changed its mind about committed words)
  commits nothing: its tail, shown as volatile, is its words whose midpoint lies after the last
  committed word, a guess by time.
- Agreement: tail word i is agreed when tail words 0..i (the word and its left context) have
  been identical in `agreement` consecutive anchored partials. A word seen at the same index
  after a different word is a coincidence, not agreement (the LocalAgreement rule).
- Settling: a tail word is settled when `settle_ms` of audio follows it
  (`word.end_ms <= audio_ms - settle_ms`) and it was agreed by two consecutive partials; it then
  needs no more of them even when `agreement` asks for more. One partial is never enough:
  draft word times can be approximate (Whisper's are spread over the audio by length), and a
  single draft of the first second of a segment is often wrong ("How do you" for "Had he").
- The longest leading run of tail words that are agreed or settled is committed.
- Spelling: a volatile word shows its latest spelling; a word is committed with the spelling and
  times of the hypothesis that commits it and then frozen (captions may have printed it). The
  final is authoritative and carries the model's last spelling; what was committed and shown
  goes on after the last committed word that the final still has (`resume_point`).
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


def resume_point(shown: Sequence[Word], final: Sequence[Word]) -> int:
    """Where text that was shown and cannot be taken back goes on in a segment's final.

    The shown words stand for the first words of the final that they align with (fewest word
    edits, case and punctuation ignored); the result is the index of the final word after
    those. An alignment that ends on the last shown word counts one edit less and wins a tie,
    so the text goes on from the word on screen and never repeats it; other ties go to the end
    nearest in time to the last shown word (draft and final word times differ by hundreds of
    milliseconds, so time alone would repeat or drop words). Final words before that point
    which were not shown cannot be shown any more.
    """
    if not shown or not final:
        return 0
    old, new = [word_key(w.word) for w in shown], [word_key(w.word) for w in final]
    # row[j]: edits to align the released words with final[:j]. The final mostly repeats them,
    # and with the first p words in common, those edits are the edits between the rests for
    # j >= p; for j < p, final[:j] is a prefix of them: len(old) - j edits.
    p = 0
    while p < len(old) and p < len(new) and old[p] == new[p]:
        p += 1
    row = list(range(len(new) - p + 1))
    for i, key in enumerate(old[p:], 1):
        above, row = row, [i] + [0] * (len(new) - p)
        for j, other in enumerate(new[p:], 1):
            row[j] = min(above[j - 1] + (key != other), above[j] + 1, row[j - 1] + 1)
    row = [len(old) - j for j in range(p)] + row
    last = shown[-1].end_ms
    ends = [final[0].start_ms] + [w.end_ms for w in final]
    anchored = [False] + [key == old[-1] for key in new]  # ends on the last released word
    return min(
        range(len(new) + 1),
        key=lambda j: (row[j] - anchored[j], not anchored[j], abs(ends[j] - last)),
    )


def changed_words(shown: Sequence[str], later: Sequence[str]) -> int:
    """How many words of `shown` a later text contradicts (substitutes or drops).

    Case, punctuation and words appended at the end do not count as changes.
    """
    kept = _kept([word_key(w) for w in shown], [word_key(w) for w in later])
    return kept.count(False)


@dataclass(frozen=True)
class StabilityConfig:
    """How cautious the stable prefix is: more agreement or settling means less flicker, later."""

    agreement: int = 3
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


@dataclass(frozen=True)
class Window:
    """The audio a partial decodes: from `start_ms` of the segment to its end so far.

    `first` is the index of the first committed word inside it and `prefix` those committed
    words with times from `start_ms` (what a text decoder continues from).
    """

    start_ms: int = 0
    first: int = 0
    prefix: tuple[Word, ...] = ()


WHOLE_SEGMENT = Window()


class StabilityTracker:
    """Turns the successive hypotheses of one open segment into partials (rules: module doc).

    One tracker per segment: after `final` it refuses further calls.
    """

    def __init__(self, cfg: StabilityConfig | None = None) -> None:
        self._cfg = cfg or StabilityConfig()
        self._stable: list[Word] = []
        self._stable_keys: list[str] = []
        # The previous anchored partial's tail (as keys), and for each of its words the number of
        # consecutive partials in which the tail up to and including that word was identical.
        self._tail_keys: list[str] = []
        self._tail_runs: list[int] = []
        self._rev = 0
        self._closed = False

    @property
    def stable(self) -> list[Word]:
        """The words committed so far (they never change)."""
        return list(self._stable)

    def window(self, context_ms: int) -> Window:
        """Where the next partial's audio starts: `context_ms` before the end of the last
        committed word, moved back to the end of a committed word so that no committed word is
        cut; 0 means the whole segment (with every committed word as the prefix)."""
        stable = self._stable
        first = 0
        if context_ms > 0 and stable:
            target = stable[-1].end_ms - context_ms
            first = len(stable) - 1
            while first > 0 and stable[first - 1].end_ms > target:
                first -= 1
        start = min(stable[first - 1].end_ms, stable[first].start_ms) if first else 0
        prefix = tuple(
            Word(w.word, max(w.start_ms - start, 0), max(w.end_ms - start, 0), w.confidence)
            for w in stable[first:]
        )
        return Window(start, first, prefix)

    def update(
        self, words: Sequence[Word], audio_ms: int, window: Window = WHOLE_SEGMENT
    ) -> Partial:
        """Take a new hypothesis of `window` (word times from its start); the segment so far
        covers `audio_ms` of audio."""
        self._check_open()
        if audio_ms < 0:
            raise ValueError(f"audio_ms must be >= 0, got {audio_ms}")
        hypothesis = [
            Word(w.word, w.start_ms + window.start_ms, w.end_ms + window.start_ms, w.confidence)
            for w in words
        ]
        all_keys = [word_key(w.word) for w in hypothesis]
        taken = self._after_committed(all_keys, window)
        if taken is None:  # not anchored: show a guess, commit nothing, agreement starts again
            self._tail_keys, self._tail_runs = [], []
            self._rev += 1
            return Partial(self._rev, list(self._stable), self._guess_tail(hypothesis))
        tail, keys = hypothesis[taken:], all_keys[taken:]
        # A word agrees with the previous partial when the tails are identical up to it.
        same, previous = 0, self._tail_keys
        while same < len(keys) and same < len(previous) and keys[same] == previous[same]:
            same += 1
        runs = [run + 1 for run in self._tail_runs[:same]] + [1] * (len(keys) - same)
        settled_before = audio_ms - self._cfg.settle_ms
        commit = 0
        settle_runs = min(2, self._cfg.agreement)
        while commit < len(tail) and (
            runs[commit] >= self._cfg.agreement
            or (runs[commit] >= settle_runs and tail[commit].end_ms <= settled_before)
        ):
            commit += 1
        self._stable.extend(tail[:commit])
        self._stable_keys.extend(keys[:commit])
        self._tail_keys, self._tail_runs = keys[commit:], runs[commit:]
        self._rev += 1
        return Partial(rev=self._rev, stable=list(self._stable), volatile=tail[commit:])

    def final(self, words: Sequence[Word]) -> FinalText:
        """Close the segment with the model's final hypothesis, which wins over the partials."""
        self._check_open()
        self._closed = True
        changed = changed_words([w.word for w in self._stable], [w.word for w in words])
        return FinalText(words=list(words), changed_stable=changed)

    def _after_committed(self, keys: list[str], window: Window) -> int | None:
        """Where the words after the committed ones start in a window's hypothesis (given as
        word keys), or None when it does not start with them (rules: Anchoring)."""
        committed = "".join(self._stable_keys[window.first :])
        for stray in (0, 1) if window.start_ms > 0 else (0,):
            taken = _spelt_by(committed, keys, stray)
            if taken is not None:
                return taken
        return None

    def _guess_tail(self, hypothesis: list[Word]) -> list[Word]:
        if not self._stable:
            return hypothesis
        stable_end = self._stable[-1].end_ms
        # midpoint >= stable_end, in integers
        return [w for w in hypothesis if w.start_ms + w.end_ms >= 2 * stable_end]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("segment already has its final; start a new StabilityTracker")


def _spelt_by(text: str, keys: Sequence[str], start: int) -> int | None:
    """The index after the words keys[start:end] that spell exactly `text` when joined, or None.

    Words with empty keys (punctuation alone) right after the text are not taken: they belong to
    the tail.
    """
    if start > len(keys):
        return None
    spelt = ""
    for index in range(start, len(keys)):
        if spelt == text:
            return index
        spelt += keys[index]
        if not text.startswith(spelt):
            return None
    return len(keys) if spelt == text else None


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

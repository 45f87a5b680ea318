"""Property tests: committed text is exact under any sequence of hypotheses.

Hypotheses are generated from a true word sequence with the edits a streaming recogniser makes
between partials: insertions, deletions, substitutions, re-timings, split and merged words,
punctuation and case changes, and windows that start before the last committed words.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.api import Word
from streaming.core.captions import CaptionConfig, Captions
from streaming.core.stability import (
    StabilityConfig,
    StabilityTracker,
    Window,
    resume_point,
    word_key,
)

VOCABULARY = ["the", "cat", "sat", "on", "a", "mat", "to", "consider", "had", "then", "of"]
SLOT_MS = 300


def truth_words(indices: list[int]) -> list[Word]:
    return [
        Word(VOCABULARY[k], i * SLOT_MS, i * SLOT_MS + 250, 0.9) for i, k in enumerate(indices)
    ]


@st.composite
def noisy_prefix(draw, truth: list[Word]) -> list[Word]:
    """A hypothesis of the first words of `truth`, with a recogniser's edits."""
    count = draw(st.integers(0, len(truth)))
    out: list[Word] = []
    for w in truth[:count]:
        edit = draw(
            st.sampled_from(
                ["keep"] * 6 + ["drop", "substitute", "insert", "retime", "split", "merge", "case"]
            )
        )
        shift = draw(st.integers(-400, 400)) if edit == "retime" else 0
        start = max(0, w.start_ms + shift)
        word = Word(w.word, start, max(start, w.end_ms + shift), w.confidence)
        if edit == "drop":
            continue
        if edit == "substitute":
            out.append(Word(draw(st.sampled_from(VOCABULARY)), word.start_ms, word.end_ms, 0.4))
        elif edit == "insert":
            out += [Word(draw(st.sampled_from(VOCABULARY)), start, start + 100, 0.4), word]
        elif edit == "split" and len(w.word) > 1:
            cut = len(w.word) // 2
            middle = (start + word.end_ms) // 2
            out.append(Word(w.word[:cut], start, middle, 0.5))
            out.append(Word(w.word[cut:], middle, word.end_ms, 0.5))
        elif edit == "merge" and out:
            out[-1] = Word(out[-1].word + w.word, out[-1].start_ms, word.end_ms, 0.5)
        elif edit == "case":
            out.append(Word(w.word.upper() + draw(st.sampled_from([",", ".", "?", ""])), start,
                            word.end_ms, 0.9))
        else:
            out.append(word)
    return out


def joined(words: list[Word]) -> str:
    return "".join(word_key(w.word) for w in words)


def committed_from(before: list[Word], after: list[Word], window: Window, hyp: list[Word]) -> bool:
    """True when the commit from `before` to `after` took the words of the window's hypothesis
    that follow a word prefix spelling the committed words: in order, once, none skipped."""
    added = len(after) - len(before)
    shifted = [
        Word(w.word, w.start_ms + window.start_ms, w.end_ms + window.start_ms, w.confidence)
        for w in hyp
    ]
    spelt = joined(before[window.first :])
    for stray in (0, 1) if window.start_ms > 0 else (0,):
        for end in range(stray, len(shifted) + 1):
            if joined(shifted[stray:end]) != spelt:
                continue
            if after[len(before) :] == shifted[end : end + added]:
                return True
    return False


sentence = st.lists(st.integers(0, len(VOCABULARY) - 1), min_size=1, max_size=14)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), indices=sentence)
def test_commits_are_a_word_prefix_of_the_hypothesis_they_came_from(data, indices):
    truth = truth_words(indices)
    cfg = StabilityConfig(
        agreement=data.draw(st.integers(1, 3)), settle_ms=data.draw(st.sampled_from([0, 600, 1200]))
    )
    context_ms = data.draw(st.sampled_from([0, 300, 1000]))
    tracker = StabilityTracker(cfg)
    committed: list[Word] = []
    audio_ms = 0
    for _ in range(data.draw(st.integers(1, 12))):
        audio_ms += data.draw(st.integers(0, 600))
        window = tracker.window(context_ms)
        # the window's audio holds the truth from its start: what a recogniser hears there
        visible = [w for w in truth if w.end_ms > window.start_ms and w.start_ms < audio_ms]
        local = [
            Word(w.word, max(0, w.start_ms - window.start_ms), w.end_ms - window.start_ms, 0.9)
            for w in visible
        ]
        if window.prefix and data.draw(st.booleans()):
            # a text decoder continues from the prefix, which it returns as given
            hyp = [*window.prefix, *data.draw(noisy_prefix(local[len(window.prefix) :]))]
        else:
            hyp = data.draw(noisy_prefix(local))
        partial = tracker.update(hyp, audio_ms, window)
        assert partial.stable[: len(committed)] == committed  # only ever grows
        if len(partial.stable) > len(committed):
            assert committed_from(committed, partial.stable, window, hyp)
        committed = partial.stable


@settings(max_examples=300, deadline=None)
@given(data=st.data(), indices=sentence)
def test_exact_hypotheses_commit_the_truth_exactly(data, indices):
    """Hypotheses without errors (re-timed and re-cased only) commit exactly the truth's words:
    nothing doubled, nothing dropped, whatever the windows."""
    truth = truth_words(indices)
    tracker = StabilityTracker(StabilityConfig(agreement=2, settle_ms=1200))
    context_ms = data.draw(st.sampled_from([0, 300, 1000]))
    audio_ms = 0
    while audio_ms < truth[-1].end_ms + 2000:
        audio_ms += data.draw(st.integers(100, 500))
        window = tracker.window(context_ms)
        heard = [w for w in truth if w.start_ms >= window.start_ms and w.end_ms <= audio_ms]
        hyp = [
            Word(
                w.word.capitalize() if data.draw(st.booleans()) else w.word,
                max(0, w.start_ms - window.start_ms + data.draw(st.integers(-200, 200))),
                w.end_ms - window.start_ms,
                0.9,
            )
            for w in heard
        ]
        tracker.update(hyp, audio_ms, window)
    assert [word_key(w.word) for w in tracker.stable] == [word_key(w.word) for w in truth]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), indices=sentence)
def test_resume_point_neither_repeats_nor_loses_words(data, indices):
    final = truth_words(indices)
    shown_count = data.draw(st.integers(0, len(final)))
    shown = final[:shown_count]
    # shown words exactly a prefix of the final: the rest of the final follows, nothing else
    assert resume_point(shown, final) == shown_count
    # the final re-cased and re-punctuated: the same
    recased = [Word(w.word.upper() + ".", w.start_ms, w.end_ms, 0.9) for w in final]
    assert resume_point(shown, recased) == shown_count
    # a shown word the final contradicts (a correction) is never shown twice
    if shown:
        wrong = [*shown[:-1], Word("xyzzy", shown[-1].start_ms, shown[-1].end_ms, 0.5)]
        resume = resume_point(wrong, final)
        assert resume <= shown_count
        if len(shown) > 1:
            assert resume >= shown_count - 1


def rollup_text(events) -> list[str]:
    """Appends as text: a row break is a word boundary too."""
    return [(" " if e.row_break else "") + e.text for e in events]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), indices=sentence)
def test_rollup_captions_equal_the_final_when_partials_are_prefixes_of_it(data, indices):
    """Captions built from committed partials and then the final show each final word once."""
    final = truth_words(indices)
    held = data.draw(st.integers(0, 2))
    captions = Captions(CaptionConfig(mode="rollup", hold_back_words=held), 1)
    tracker = StabilityTracker(StabilityConfig(agreement=2, settle_ms=1200))
    text = []
    audio_ms = 0
    while audio_ms < final[-1].end_ms:
        audio_ms += data.draw(st.integers(100, 500))
        window = tracker.window(1000)
        heard = [w for w in final if w.start_ms >= window.start_ms and w.end_ms <= audio_ms]
        local = [
            Word(w.word, w.start_ms - window.start_ms, w.end_ms - window.start_ms, 0.9)
            for w in heard
        ]
        partial = tracker.update(local, audio_ms, window)
        text += rollup_text(captions.stable(0, 0, partial.stable))
    text += rollup_text(captions.final(0, 0, final))
    shown = " ".join("".join(text).split())
    assert shown == " ".join(w.word for w in final)

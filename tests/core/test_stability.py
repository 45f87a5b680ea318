import random

import pytest

from engine.api import Word
from streaming.core.stability import (
    StabilityConfig,
    StabilityStats,
    StabilityTracker,
    _kept,
    changed_words,
    word_key,
)

STEP_MS = 300

# Settling never triggers with this: only the agreement rule is at work.
NO_SETTLE = 10**9


def words(text: str, first: int = 0) -> list[Word]:
    """One word per STEP_MS slot, the i-th word of `text` in slot `first + i`."""
    return [
        Word(w, (first + i) * STEP_MS, (first + i) * STEP_MS + 250, 0.9)
        for i, w in enumerate(text.split())
    ]


def texts(partial) -> tuple[str, str]:
    return partial.stable_text, partial.volatile_text


def test_config_defaults_and_validation():
    cfg = StabilityConfig()
    assert (cfg.agreement, cfg.settle_ms) == (3, 1200)
    assert StabilityConfig(agreement=1, settle_ms=0).settle_ms == 0
    for bad in ({"agreement": 0}, {"agreement": True}, {"agreement": 1.5}, {"settle_ms": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StabilityConfig(**bad)


def test_word_key_ignores_case_and_punctuation():
    assert word_key("Hello,") == word_key("hello") == "hello"
    assert word_key("Don't") == "dont"
    assert word_key("Hello") != word_key("Help")


def word_key_by_definition(text: str) -> str:
    return "".join(ch for ch in text.casefold() if ch.isalnum())


TRICKY = [
    "",
    " ",
    "\x00\t\n",
    *(
        "Straße STRASSE ß ẞ naïve e\u0301 İstanbul ǅungla ﬁne ΣΑΣ Привет, 日本語。 ٣٤ ²³ Ⅻ 3.14 "
        "don't snake_case __ — ... 👍 a\u200db \ud800 ﾊﾝｶｸ Ω Kelvin\u212a"
    ).split(),
]


def test_word_key_equals_its_definition_on_any_text():
    rng = random.Random(0)
    every_code_point = "".join(map(chr, range(0x110000)))
    pool = "".join(TRICKY) + "aZ09_-' "
    mixed = ["".join(rng.choices(pool, k=rng.randint(0, 8))) for _ in range(500)]
    for text in [*TRICKY, every_code_point, *mixed]:
        assert word_key(text) == word_key_by_definition(text), ascii(text)
        assert word_key(text) == word_key_by_definition(text)  # from the cache, the same


def kept_by_full_table(old: list[str], new: list[str]) -> list[bool]:
    """`_kept` as first written: the whole table, then the walk back from the cheapest end."""
    n, m = len(old), len(new)
    cost = [[i + j if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i][j] = min(
                cost[i - 1][j - 1] + (old[i - 1] != new[j - 1]),
                cost[i - 1][j] + 1,
                cost[i][j - 1] + 1,
            )
    i, j = n, min(range(m + 1), key=lambda col: cost[n][col])
    kept = [False] * n
    while i > 0 and j > 0:
        if old[i - 1] == new[j - 1] and cost[i][j] == cost[i - 1][j - 1]:
            kept[i - 1] = True
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j - 1] + 1:
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j] + 1:
            i -= 1
        else:
            j -= 1
    return kept


def test_kept_skips_the_common_start_with_the_same_result():
    # Few distinct words, so that repeats make many alignments equally cheap: which words are
    # kept then depends on the walk, which must not change.
    rng = random.Random(1)
    for _ in range(20000):
        letters = "ab" if rng.random() < 0.5 else "abcd"
        start = rng.choices(letters, k=rng.randint(0, 6))
        old = start + rng.choices(letters, k=rng.randint(0, 6))
        new = start + rng.choices(letters, k=rng.randint(0, 6))
        assert _kept(old, new) == kept_by_full_table(old, new), (old, new)


def test_scripted_sequence_of_partials():
    tracker = StabilityTracker(StabilityConfig(agreement=2, settle_ms=NO_SETTLE))
    script = [
        ("the", ("", "the")),
        ("the cat", ("the", "cat")),
        # an early word revised before it is stable: its agreement starts over
        ("the cap sat", ("the", "cap sat")),
        ("the cap sat on", ("the cap sat", "on")),
        # the tail revised
        ("the cap sat in a", ("the cap sat", "in a")),
        # a committed word contradicted: nothing commits, the tail is a guess by time
        ("a cat sat in a mat", ("the cap sat", "in a mat")),
        ("the cat sat in a hat", ("the cap sat", "in a hat")),
        # the committed words again: agreement starts over
        ("the cap sat in a hat", ("the cap sat", "in a hat")),
        ("the cap sat in a hat", ("the cap sat in a hat", "")),
    ]
    for rev, (hypothesis, expected) in enumerate(script, start=1):
        partial = tracker.update(words(hypothesis), audio_ms=rev * 400)
        assert partial.rev == rev
        assert texts(partial) == expected, hypothesis

    final = tracker.final(words("the cat sat in a hat"))
    assert final.text == "the cat sat in a hat"
    assert final.changed_stable == 1  # "cap" -> "cat"


def test_agreement_needs_the_left_context_to_agree_too():
    tracker = StabilityTracker(StabilityConfig(agreement=2, settle_ms=NO_SETTLE))
    tracker.update(words("a x c"), 1000)
    partial = tracker.update(words("a b c"), 1000)
    # "c" is the same word at the same place, but after a different word: not agreed
    assert texts(partial) == ("a", "b c")
    assert texts(tracker.update(words("a b c"), 1000)) == ("a b c", "")


def test_agreement_counts_consecutive_partials():
    tracker = StabilityTracker(StabilityConfig(agreement=3, settle_ms=NO_SETTLE))
    assert texts(tracker.update(words("one two"), 500)) == ("", "one two")
    assert texts(tracker.update(words("one two"), 600)) == ("", "one two")
    assert texts(tracker.update(words("one too three"), 900)) == ("one", "too three")
    assert texts(tracker.update(words("one too three"), 1000)) == ("one", "too three")
    assert texts(tracker.update(words("one too three"), 1100)) == ("one too three", "")


def test_stable_word_keeps_the_spelling_it_was_committed_with():
    tracker = StabilityTracker(StabilityConfig(agreement=2, settle_ms=NO_SETTLE))
    tracker.update(words("Hello"), 300)
    partial = tracker.update(words("hello, world"), 600)  # same word, new spelling: agreed
    assert texts(partial) == ("hello,", "world")
    partial = tracker.update(words("Hello. World!"), 900)
    assert texts(partial) == ("hello, World!", "")
    # the final is authoritative; case and punctuation are not contradictions
    final = tracker.final(words("Hello. World!"))
    assert (final.text, final.changed_stable) == ("Hello. World!", 0)


def test_agreement_one_makes_every_word_stable_at_once():
    tracker = StabilityTracker(StabilityConfig(agreement=1, settle_ms=NO_SETTLE))
    assert texts(tracker.update(words("the cat"), 600)) == ("the cat", "")
    # a disagreeing hypothesis cannot change them, nor commit what lies after them
    assert texts(tracker.update(words("a bat sat"), 900)) == ("the cat", "sat")
    # once a hypothesis starts with them again, what follows commits at once
    assert texts(tracker.update(words("The cat, sat"), 900)) == ("the cat sat", "")


def test_settled_words_need_two_partials_not_agreement():
    tracker = StabilityTracker(StabilityConfig(agreement=5, settle_ms=1000))
    hypothesis = [Word("a", 0, 300, 0.9), Word("b", 300, 600, 0.9), Word("c", 600, 900, 0.9)]
    # one partial is never enough, however much audio follows its words
    assert texts(tracker.update(hypothesis, audio_ms=1500)) == ("", "a b c")
    assert texts(tracker.update(hypothesis, audio_ms=1500)) == ("a", "b c")
    # the boundary is inclusive: end_ms == audio_ms - settle_ms settles
    assert texts(tracker.update(hypothesis, audio_ms=1600)) == ("a b", "c")
    assert texts(tracker.update(hypothesis, audio_ms=1899)) == ("a b", "c")
    assert texts(tracker.update(hypothesis, audio_ms=1900)) == ("a b c", "")


def test_settling_zero_commits_every_word_the_audio_covers():
    tracker = StabilityTracker(StabilityConfig(agreement=5, settle_ms=0))
    hypothesis = [Word("a", 0, 300, 0.9), Word("b", 300, 600, 0.9)]
    tracker.update(hypothesis, audio_ms=500)
    assert texts(tracker.update(hypothesis, audio_ms=500)) == ("a", "b")


def test_a_single_draft_never_commits_by_settling():
    """The real case: Whisper's first draft of a segment said "How do you" for "Had he", with
    times spread over the audio, so its first words looked settled."""
    tracker = StabilityTracker(StabilityConfig(agreement=2, settle_ms=1200))
    tracker.update(words("Howdy, married, and more."), 1440)
    partial = tracker.update(words("How do you marry the more Emmio?"), 1840)
    assert texts(partial) == ("", "How do you marry the more Emmio?")


def test_stable_words_are_a_contiguous_prefix():
    tracker = StabilityTracker(StabilityConfig(agreement=5, settle_ms=1000))
    # "late" ends after the settle point, so "early" cannot commit past it
    hypothesis = [Word("late", 0, 2000, 0.9), Word("early", 0, 100, 0.9)]
    assert texts(tracker.update(hypothesis, audio_ms=1500)) == ("", "late early")


def test_new_words_follow_the_committed_words_by_spelling_not_time():
    hypothesis = [
        Word("thecat", 0, 480, 0.8),  # "the" + "cat" merged: the same letters
        Word("on", 100, 300, 0.8),  # re-timed inside the committed words' time: still new
        Word("sat", 600, 800, 0.8),
    ]
    tracker = StabilityTracker(StabilityConfig(agreement=2, settle_ms=NO_SETTLE))
    tracker.update([Word("the", 0, 200, 0.9), Word("cat", 200, 500, 0.9)], 500)
    tracker.update([Word("the", 0, 200, 0.9), Word("cat", 200, 500, 0.9)], 600)
    partial = tracker.update(hypothesis, 900)
    assert texts(partial) == ("the cat", "on sat")


def test_hypothesis_shorter_than_the_stable_prefix():
    tracker = StabilityTracker(StabilityConfig(agreement=1, settle_ms=NO_SETTLE))
    tracker.update(words("one two three four"), 1200)
    # fewer words, all inside the stable prefix's time: nothing new to show
    partial = tracker.update(words("one two"), 1300)
    assert texts(partial) == ("one two three four", "")
    # a hypothesis that lost "four": "five" is shown past the committed words, not committed
    merged = [Word("onetwothree", 0, 850, 0.5), Word("five", 1200, 1400, 0.5)]
    assert texts(tracker.update(merged, 1500)) == ("one two three four", "five")
    split = [*words("one two three"), Word("fo", 900, 1000, 0.5), Word("ur", 1000, 1150, 0.5)]
    five = Word("five", 1200, 1400, 0.5)
    assert texts(tracker.update([*split, five], 1600)) == ("one two three four five", "")


def test_empty_hypotheses():
    tracker = StabilityTracker(StabilityConfig(agreement=2, settle_ms=NO_SETTLE))
    assert texts(tracker.update([], 0)) == ("", "")
    partial = tracker.update([], 400)
    assert (partial.rev, partial.stable, partial.volatile) == (2, [], [])
    tracker.update(words("hi"), 800)
    # an empty hypothesis breaks the run of agreeing partials
    tracker.update([], 1000)
    assert texts(tracker.update(words("hi"), 1200)) == ("", "hi")
    assert texts(tracker.update(words("hi"), 1400)) == ("hi", "")
    # and leaves the stable prefix alone
    assert texts(tracker.update([], 1600)) == ("hi", "")
    final = tracker.final([])
    assert (final.words, final.text, final.changed_stable) == ([], "", 1)


def test_partial_lists_are_copies():
    tracker = StabilityTracker(StabilityConfig(agreement=1, settle_ms=NO_SETTLE))
    tracker.update(words("a b"), 600).stable.clear()
    assert texts(tracker.update(words("a b c"), 900)) == ("a b c", "")


def test_final_counts_only_contradicted_stable_words():
    tracker = StabilityTracker(StabilityConfig(agreement=1, settle_ms=NO_SETTLE))
    tracker.update(words("the cat sat"), 900)
    # an inserted word does not change the stable words around it; growth is free
    assert tracker.final(words("oh the cat sat down")).changed_stable == 0

    tracker = StabilityTracker(StabilityConfig(agreement=1, settle_ms=NO_SETTLE))
    tracker.update(words("the cat sat"), 900)
    # one substitution and one dropped word
    final = tracker.final(words("the bat"))
    assert final.changed_stable == 2
    assert [w.word for w in final.words] == ["the", "bat"]


def test_tracker_refuses_calls_after_the_final():
    tracker = StabilityTracker()
    tracker.final(words("done"))
    with pytest.raises(RuntimeError):
        tracker.update(words("more"), 300)
    with pytest.raises(RuntimeError):
        tracker.final(words("more"))


def test_negative_audio_is_refused():
    with pytest.raises(ValueError, match="audio_ms"):
        StabilityTracker().update([], -1)


def noisy(truth: list[Word], count: int, rng: random.Random) -> list[Word]:
    """A hypothesis of the first `count` words with substitutions, drops, merges and jitter."""
    out: list[Word] = []
    for w in truth[:count]:
        roll = rng.random()
        start = max(0, w.start_ms + rng.randint(-80, 80))
        end = max(start, w.end_ms + rng.randint(-80, 80))
        if roll < 0.1:
            continue
        if roll < 0.25:
            out.append(Word(rng.choice(["uh", "a", "the", "cat", "xyz"]), start, end, 0.3))
        elif roll < 0.3 and out:
            out[-1] = Word(out[-1].word + w.word, out[-1].start_ms, end, 0.3)
        else:
            out.append(Word(w.word.upper() if roll > 0.9 else w.word, start, end, 0.9))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_stable_prefix_only_grows_under_noisy_hypotheses(seed):
    rng = random.Random(seed)
    truth = words(" ".join(f"w{i % 7}" for i in range(40)))
    cfg = StabilityConfig(agreement=rng.randint(1, 3), settle_ms=rng.choice([0, 600, 1200, 5000]))
    tracker = StabilityTracker(cfg)
    previous: list[Word] = []
    audio_ms = 0
    for rev in range(1, 60):
        audio_ms += rng.randint(0, 400)
        count = min(len(truth), audio_ms // STEP_MS)
        partial = tracker.update(noisy(truth, count, rng), audio_ms)
        assert partial.rev == rev
        assert partial.stable[: len(previous)] == previous
        assert partial.stable_text.startswith(" ".join(w.word for w in previous))
        if partial.stable:
            end = partial.stable[-1].end_ms
            assert all(w.start_ms + w.end_ms >= 2 * end for w in partial.volatile)
        previous = partial.stable
    final = tracker.final(noisy(truth, len(truth), rng))
    assert 0 <= final.changed_stable <= len(previous)


def test_changed_words_aligns_by_fewest_edits():
    assert changed_words("the cat sat".split(), "the cat sat on the mat".split()) == 0
    assert changed_words("the cat sat".split(), "oh the cat sat".split()) == 0
    assert changed_words("the cat sat".split(), "the bat sat".split()) == 1
    assert changed_words("the cat sat".split(), "the cat".split()) == 1
    assert changed_words("The cat.".split(), "the Cat".split()) == 0
    assert changed_words([], "anything".split()) == 0


def test_stats_pure_growth_is_perfectly_stable():
    stats = StabilityStats()
    stats.add_segment([("", "the"), ("the", "cat"), ("the cat", "sat")], "The cat sat.")
    assert (stats.words_shown, stats.words_changed) == (3, 0)
    assert stats.change_rate == 0.0
    assert (stats.stable_shown, stats.stable_changed) == (2, 0)


def test_stats_counts_each_appearance_once_and_each_revision():
    stats = StabilityStats()
    stats.add_segment([("", "the"), ("", "the cap"), ("the", "cat sat")], "the cat sat")
    # shown: the, cap, then cat and sat (cap's replacement and growth); changed: cap
    assert (stats.words_shown, stats.words_changed) == (4, 1)
    assert stats.change_rate == 0.25


def test_stats_repeated_partials_do_not_dilute_the_rate():
    stats = StabilityStats()
    stats.add_segment([("", "a b")] * 10 + [("", "a c")], "a c")
    assert (stats.words_shown, stats.words_changed) == (3, 1)


def test_stats_shrinking_tail_and_final_corrections_count():
    stats = StabilityStats()
    stats.add_segment([("", "the cat sat"), ("", "the cat")], "the cat")
    assert (stats.words_shown, stats.words_changed) == (3, 1)

    stats = StabilityStats()
    stats.add_segment([("the cap", "is")], "the cat is here")
    assert (stats.words_shown, stats.words_changed) == (3, 1)
    assert (stats.stable_shown, stats.stable_changed) == (2, 1)
    assert stats.stable_change_rate == 0.5


def test_stats_case_punctuation_and_early_insertions_are_not_changes():
    stats = StabilityStats()
    partials = [("", "hello world"), ("", "Hello, world!"), ("", "oh hello world")]
    stats.add_segment(partials, "Oh, hello world.")
    assert (stats.words_shown, stats.words_changed) == (3, 0)
    # an empty final drops every word shown last
    stats.add_segment(partials, "")
    assert (stats.words_shown, stats.words_changed) == (6, 3)


def test_stats_accumulate_over_segments():
    stats = StabilityStats()
    assert (stats.change_rate, stats.stable_change_rate) == (0.0, 0.0)
    stats.add_segment([("", "a b")], "a b")
    stats.add_segment([("", "c d")], "c e")
    stats.add_segment([], "unseen")
    assert stats.segments == 3
    assert (stats.words_shown, stats.words_changed) == (4, 1)
    assert stats.change_rate == 0.25

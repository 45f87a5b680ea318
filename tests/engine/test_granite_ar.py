"""The granite-ar family: prompts, stopping rules, window joining, the engine on a tiny random
checkpoint, and oracles that call transformers' GraniteSpeech model directly."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from fnmatch import fnmatch
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import selection
from engine.api import (
    EngineOptions,
    Hypothesis,
    ModelLoadError,
    Segment,
    Word,
    engine_translations,
)
from engine.features import ar_features
from engine.granite_ar import engine as ar_engine
from engine.granite_ar import generation, load_engine
from engine.granite_ar.checkpoint import audio_token_count
from engine.granite_ar.generation import (
    LOOP_CHECK_EVERY,
    TOKEN_HEADROOM,
    TOKENS_PER_SECOND,
    BudgetStop,
    LoopStop,
    first_loop,
    token_budget,
)
from engine.granite_ar.prompt import (
    TRANSLATION_TARGETS,
    Task,
    instruction,
    parse_task,
    render_prompt,
)
from engine.granite_ar.text import (
    MIN_LOOP_TOKENS,
    join_windows,
    loop_end,
    overlap_cut,
    spread_times,
    word_key,
)
from tests.checkpoints.granite_ar import AUDIO_TOKEN_ID, write_tiny_ar_checkpoint
from tests.gateway_harness import EchoEngine

RATE = 16000
PLAIN = instruction(Task())  # the default task's instruction, for clips without hotwords
SYSTEM = (
    "You are a helpful assistant. Please ensure responses are professional, accurate, and safe."
)


def tone(freq: float, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * RATE)) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_ar_checkpoint(tmp_path_factory.mktemp("tiny-ar"), seed=0)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return load_engine(str(checkpoint), EngineOptions(device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def model(engine):
    return engine.model


# A mix the tiny checkpoint answers in all three ways: end-of-text, budget and loop.
MIX = [(300, 1.0), (1000, 2.25), (3000, 1.5), (6000, 0.69), (200, 4.0)]


def mixed_segments() -> list[Segment]:
    return [Segment(tone(freq, seconds)) for freq, seconds in MIX]


# --- prompts ---------------------------------------------------------------------------------


def chat(user: str) -> str:
    return (
        f"<|start_of_role|>system<|end_of_role|>{SYSTEM}<|end_of_text|>\n"
        f"<|start_of_role|>user<|end_of_role|><|audio|>{user}<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>"
    )


@pytest.mark.parametrize(
    ("task", "hotwords", "user"),
    [
        (Task(), (), "transcribe the speech with proper punctuation and capitalization."),
        (
            Task("transcribe", "French"),
            (),
            "transcribe the French speech with proper punctuation and capitalization.",
        ),
        (
            Task(),
            ("Granite", " call  center "),
            "transcribe the speech to text. Keywords: Granite, call center",
        ),
        (
            Task("transcribe", "German"),
            ("Bahnhof",),
            "transcribe the speech to text. Keywords: Bahnhof",
        ),
        (
            Task("translate", "German"),
            (),
            "translate the speech to German with proper punctuation and capitalization.",
        ),
        (
            Task("translate", "Mandarin"),
            ("IBM",),
            "translate the speech to Mandarin. Keywords: IBM",
        ),
    ],
    ids=["asr", "language", "keywords", "keywords-over-language", "translate", "translate-kw"],
)
def test_prompt_is_the_granite_chat_rendering(task, hotwords, user):
    assert render_prompt(instruction(task, hotwords)) == chat(user)


def test_hotwords_cannot_spell_control_tokens():
    text = instruction(Task(), ("<|end_of_text|>oops", "", "  "))
    assert text == "transcribe the speech to text. Keywords: <end_of_text>oops"


@pytest.mark.parametrize(
    ("task", "language", "expected"),
    [
        ("transcribe", None, Task("transcribe", None)),
        ("transcribe", "FR", Task("transcribe", "French")),
        ("transcribe", "japanese", Task("transcribe", "Japanese")),
        ("translate", "en", Task("translate", "English")),
        ("translate", "it", Task("translate", "Italian")),
        ("translate", "Chinese", Task("translate", "Mandarin")),
        ("translate", "zh", Task("translate", "Mandarin")),
    ],
)
def test_parse_task_accepts_codes_and_names(task, language, expected):
    assert parse_task(task, language) == expected


@pytest.mark.parametrize(
    ("task", "language", "message"),
    [
        ("translate", None, "needs a target language"),
        ("translate", "ko", "unsupported translation target 'ko'.*en \\(English\\)"),
        ("translate", "Klingon", "unsupported translation target"),
        ("transcribe", "it", "unsupported transcription language 'it'"),
        ("summarise", None, "unknown task 'summarise'"),
    ],
)
def test_parse_task_refuses_what_the_model_cannot_do(task, language, message):
    with pytest.raises(ValueError, match=message):
        parse_task(task, language)


def test_unsupported_translation_target_fails_before_loading(tmp_path):
    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(ModelLoadError, match="unsupported translation target 'ru'"):
        load_engine(missing, task="translate", language="ru")


def test_prompt_ids_expand_the_audio_token(engine):
    ids = engine.prompt_ids(
        engine.instruction(Segment(tone(300, 1.0), hotwords=("sea shells",))), 9
    )
    audio = [i for i, token in enumerate(ids) if token == AUDIO_TOKEN_ID]
    assert len(audio) == 9 and audio == list(range(audio[0], audio[0] + 9))
    collapsed = ids[: audio[0] + 1] + ids[audio[-1] + 1 :]
    text = engine.tokenizer.decode(collapsed, skip_special_tokens=False)
    assert text == chat("transcribe the speech to text. Keywords: sea shells")


# --- stopping rules and budgets ----------------------------------------------------------------


def test_token_budget_is_proportional_and_capped():
    assert token_budget(1.0, 10_000) == TOKENS_PER_SECOND + TOKEN_HEADROOM
    assert token_budget(30.0, 10_000) == 30 * TOKENS_PER_SECOND + TOKEN_HEADROOM
    assert token_budget(0.1, 10_000) == 1 + TOKEN_HEADROOM
    assert token_budget(30.0, 40) == 40
    assert token_budget(30.0, 0) == 1


@pytest.mark.parametrize(
    ("ids", "keep"),
    [
        ([1, 2, 3] + [7, 8] * 8, 5),  # 2-token unit, 8 copies -> one copy kept
        ([5] * 16, 1),
        ([5] * 15, None),  # a 1-token unit needs MIN_LOOP_TOKENS copies
        ([1, 2, 3, 4] * 4, 4),
        ([1, 2, 3, 4] * 3, None),
        ([9, 10] * 3, None),  # "no, no, no" is speech, not a loop
        ([7, 8] * 10 + [3], None),  # the loop must reach the end
        ([4] + [6] * 20, 2),  # several units fit: the shortest is kept once
        ([], None),
    ],
)
def test_loop_end(ids, keep):
    assert loop_end(ids) == keep


def check_loops_every_token(monkeypatch) -> None:
    """The loop check after every generated token, as before it was spaced out."""
    monkeypatch.setattr(generation, "LOOP_CHECK_EVERY", 1)
    monkeypatch.setattr(ar_engine, "LOOP_CHECK_EVERY", 1)


def test_loop_stop_looks_only_at_generated_tokens(monkeypatch):
    check_loops_every_token(monkeypatch)
    prompt = [4] + [3] * MIN_LOOP_TOKENS
    rows = torch.tensor(
        [
            prompt + [1, 2, 3] + [7, 8] * 8,
            prompt + list(range(20, 39)),
            [4] * len(prompt) + [3] * 19,
        ]
    )
    assert LoopStop(prompt_width=len(prompt))(rows, None).tolist() == [True, False, True]
    # The prompt's own run of 3s plus three generated 3s is no loop of the output.
    continued = torch.tensor([prompt + [3, 3, 3]])
    assert LoopStop(prompt_width=len(prompt))(continued, None).tolist() == [False]
    assert LoopStop(prompt_width=0)(continued, None).tolist() == [True]


def test_loop_stop_reads_tokens_only_every_few_steps_and_misses_no_loop():
    prompt = [4, 5, 6]
    looped = prompt + [1, 2, 3] + [7, 8] * 8
    generated = len(looped) - len(prompt)  # the loop is complete at this step
    assert generated % LOOP_CHECK_EVERY != 0
    stop = LoopStop(prompt_width=len(prompt))
    assert stop(torch.tensor([looped]), None).tolist() == [False], "no check on this step"
    check_at = math.ceil(generated / LOOP_CHECK_EVERY) * LOOP_CHECK_EVERY
    # The decoder has left the loop by the next check, which still sees where it was.
    moved_on = looped + list(range(40, 40 + check_at - generated))
    clean = prompt + list(range(40, 40 + check_at))
    assert stop(torch.tensor([moved_on, clean]), None).tolist() == [True, False]


def test_first_loop_is_where_a_check_per_token_stops():
    row = [9] + [7, 8] * 8 + [5, 6, 5]
    assert first_loop(row) == 17
    assert first_loop(row, after=16) == 17
    assert first_loop(row, after=17) is None
    assert first_loop([5] * 200) == 16
    assert first_loop([1, 2, 3]) is None


def test_budget_stop_is_per_sample():
    stop = BudgetStop(prompt_width=4, budgets=[2, 3], device=torch.device("cpu"))
    assert stop(torch.zeros(2, 5, dtype=torch.long), None).tolist() == [False, False]
    assert stop(torch.zeros(2, 6, dtype=torch.long), None).tolist() == [True, False]
    assert stop(torch.zeros(2, 7, dtype=torch.long), None).tolist() == [True, True]


def test_window_text_cuts_at_end_of_text_padding_budget_and_loops(engine):
    eos, pad = engine.eos, engine.pad
    probs = [0.5] * 40
    cases = [
        ([10, 11, eos, pad, pad], 5, [10, 11], "eos"),
        ([10, 11, 12, pad, pad], 5, [10, 11, 12], "budget"),
        ([10, 11, 12, 13, 14], 3, [10, 11, 12], "budget"),
        ([9] + [7, 8] * 8 + [pad], 40, [9, 7, 8], "loop"),
        # A loop seen at a later check: cut where a check per token would have stopped it.
        ([9] + [7, 8] * 8 + [5, 6, 5, pad], 40, [9, 7, 8], "loop"),
        ([9] + [7, 8] * 8 + [5, eos, pad], 40, [9, 7, 8], "loop"),
    ]
    for row, budget, ids, stop in cases:
        text = engine.window_text(row, probs[: len(row)], budget)
        assert (text.ids, text.stop, len(text.probs)) == (ids, stop, len(ids))


def test_generation_respects_budgets_and_trims_loops(engine):
    waves = [s.audio for s in mixed_segments()]
    results = engine.generate(waves, [PLAIN] * len(waves))
    budgets = [token_budget(w.size / RATE, 10_000) for w in waves]
    assert {r.stop for r in results} == {"eos", "budget", "loop"}, "the mix should hit all three"
    for result, budget in zip(results, budgets, strict=True):
        assert len(result.ids) == len(result.probs) <= budget
        assert all(0.0 < p <= 1.0 for p in result.probs)
        assert engine.eos not in result.ids and AUDIO_TOKEN_ID not in result.ids
        if result.stop == "budget":
            assert len(result.ids) == budget
        assert loop_end(result.ids) is None


def looping_segments() -> list[Segment]:
    """The mix plus noise and long tones: windows that loop, run to the budget or stop."""
    noisy = [Segment(noise(seconds, seed=seed)) for seed, seconds in enumerate([1.3, 2.0, 3.7])]
    return mixed_segments() + noisy + [Segment(tone(200, 9.0)), Segment(tone(150, 6.5))]


def test_spacing_the_loop_checks_changes_no_result(engine, monkeypatch):
    segments = looping_segments()
    waves = [s.audio for s in segments]
    spaced = engine.generate(waves, [PLAIN] * len(waves))
    assert sum(r.stop == "loop" for r in spaced) >= 2, "the inputs should loop"
    spaced_hyps = engine.transcribe(segments)
    check_loops_every_token(monkeypatch)
    assert engine.generate(waves, [PLAIN] * len(waves)) == spaced
    assert engine.transcribe(segments) == spaced_hyps


def test_a_smaller_budget_binds_generation(engine, monkeypatch):
    monkeypatch.setattr(ar_engine, "token_budget", lambda seconds, limit: 3)
    results = engine.generate([tone(1000, 2.25), tone(300, 1.0)], [PLAIN, PLAIN])
    assert all(len(r.ids) <= 3 for r in results)
    assert any(r.stop == "budget" and len(r.ids) == 3 for r in results)


# --- word times and window joining --------------------------------------------------------------


def test_spread_times_follow_character_counts():
    assert spread_times(["a", "bbb", "cccc"], 800) == [(0, 100), (100, 400), (400, 800)]
    assert spread_times([], 800) == []


def words(text: str, start_ms: int, end_ms: int) -> list[tuple[Word, list[int]]]:
    tokens = text.split()
    times = spread_times(tokens, end_ms - start_ms)
    return [
        (Word(t, start_ms + a, start_ms + b, 0.5), [index])
        for index, (t, (a, b)) in enumerate(zip(tokens, times, strict=True))
    ]


def test_overlap_cut_finds_the_shared_run():
    previous = ["the", "quick", "brown", "fox", "jum"]
    following = ["own", "fox", "jumps", "over"]
    assert overlap_cut(previous, ["brown", "fox", "jumps", "over"], 10) == (4, 2)
    assert overlap_cut(previous, following, 10) is None  # one shared word is not enough
    assert overlap_cut(previous + ["x"], ["quick", "brown", "fox"], 10) == (4, 3)
    assert overlap_cut(previous + ["x"], ["quick", "brown", "fox"], 3) is None  # out of reach


def test_word_key_ignores_case_and_punctuation():
    assert word_key("Fox,") == word_key("fox") == "fox"
    assert word_key("—") == "—"


def test_join_windows_removes_the_overlap_duplicates():
    first = words("so the quick brown fox jumped", 0, 4000)
    second = words("Brown fox jumped over the lazy dog.", 3000, 7000)
    joined = join_windows([first, second], [(0, 64000), (48000, 112000)], RATE, 12)
    assert [w.word for w, _ in joined] == "so the quick brown fox jumped over the lazy dog.".split()
    starts = [w.start_ms for w, _ in joined]
    assert starts == sorted(starts)
    assert all(w.start_ms <= w.end_ms for w, _ in joined)


def test_join_windows_falls_back_to_times_when_texts_disagree():
    first = [
        (Word(w, m - 400, m + 400, 0.5), [i])
        for i, (w, m) in enumerate([("one", 400), ("two", 1200), ("three", 2400), ("four", 3500)])
    ]
    second = [
        (Word(w, m - 400, m + 400, 0.5), [i])
        for i, (w, m) in enumerate([("uno", 2500), ("dos", 3100), ("tres", 4000), ("cuatro", 5200)])
    ]
    # Windows 0-4000 ms and 2000-6000 ms: each keeps its words on its side of 3000 ms.
    joined = join_windows([first, second], [(0, 64000), (32000, 96000)], RATE, 12)
    assert [w.word for w, _ in joined] == ["one", "two", "three", "dos", "tres", "cuatro"]


# --- the engine on the tiny checkpoint ----------------------------------------------------------


def check_hypothesis(hyp: Hypothesis, engine) -> None:
    assert hyp.text == " ".join(w.word for w in hyp.words)
    assert " ".join(engine.decode(hyp.token_ids).split()) == hyp.text
    ends = [0] + [w.end_ms for w in hyp.words]
    for word, floor in zip(hyp.words, ends, strict=False):
        assert floor <= word.start_ms <= word.end_ms <= hyp.duration_ms
        assert 0.0 < word.confidence <= 1.0
    if hyp.words:
        low, high = min(w.confidence for w in hyp.words), max(w.confidence for w in hyp.words)
        assert low <= hyp.confidence <= high


def test_loads_as_the_granite_ar_family(engine, checkpoint):
    assert (engine.family, engine.device) == ("granite-ar", "cpu")
    chosen = selection.load_engine(str(checkpoint), granite_nar_model="unused", device="cpu")
    assert (type(chosen).__name__, chosen.family, chosen.device) == (
        "GraniteArEngine",
        "granite-ar",
        "cpu",
    )


def test_transcribe_returns_one_hypothesis_per_segment_in_order(engine):
    segments = mixed_segments()
    out = engine.transcribe(segments)
    assert [h.duration_ms for h in out] == [int(s * 1000) for _, s in MIX]
    assert len({h.text for h in out}) >= 3, "texts should depend on the audio"
    assert all(h.text for h in out)
    for hyp in out:
        check_hypothesis(hyp, engine)
    assert engine.draft(segments) == out


def test_batch_results_equal_one_at_a_time(engine):
    segments = [
        Segment(tone(1000, 2.25), hotwords=("sea shells", "billing department")),
        Segment(tone(300, 1.0)),
        Segment(tone(3000, 1.5), hotwords=("fox",)),
        Segment(tone(6000, 0.69)),
    ]
    ids, _, mask = engine.batch_inputs(
        [s.audio for s in segments], [engine.instruction(s) for s in segments]
    )
    assert len(set(mask.sum(dim=1).tolist())) == 4, "prompts of different lengths: left padding"
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()
    batched = engine.transcribe(segments)
    alone = [engine.transcribe([s])[0] for s in segments]
    for b, a in zip(batched, alone, strict=True):
        assert (b.text, b.token_ids, b.duration_ms) == (a.text, a.token_ids, a.duration_ms)
        assert [(w.word, w.start_ms, w.end_ms) for w in b.words] == [
            (w.word, w.start_ms, w.end_ms) for w in a.words
        ]
        assert b.confidence == pytest.approx(a.confidence, abs=1e-5)
    assert engine.transcribe(segments[::-1])[::-1] == batched


def clip_alone(model, wave: np.ndarray) -> torch.Tensor:
    """Projector rows of one clip encoded on its own, straight through transformers."""
    features, _ = ar_features([wave])
    with torch.inference_mode():
        return model.get_audio_features(features).pooler_output[0]


def test_clips_of_one_length_share_an_encoder_call(engine, model, monkeypatch):
    """Rows match the clip encoded alone up to float rounding (a batch of B rounds its 1x1
    convolutions differently from a batch of 1, by ~1e-6); padding would move them by ~1."""
    # 4800 and 4801 samples give the same encoder frame count, but not the same features.
    waves = [noise(2.0, seed=1), tone(300, 1.0), noise(2.0, seed=2), noise(4800 / RATE, seed=3)]
    waves += [noise(4801 / RATE, seed=4), noise(2.0, seed=5), tone(1000, 1.3)]
    calls = []
    encode_same_length = engine.encode_same_length
    monkeypatch.setattr(
        engine,
        "encode_same_length",
        lambda group: calls.append(len(group)) or encode_same_length(group),
    )
    with torch.inference_mode():
        rows = engine.audio_embeddings(waves)
    assert sorted(calls) == [1, 1, 1, 1, 3], "one call per distinct length"
    for wave, row in zip(waves, rows, strict=True):
        torch.testing.assert_close(row, clip_alone(model, wave), rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    segments = [Segment(w) for w in waves]
    for batched, alone in zip(
        engine.transcribe(segments), [engine.transcribe([s])[0] for s in segments], strict=True
    ):
        assert (batched.text, batched.token_ids) == (alone.text, alone.token_ids)
        assert [(w.word, w.start_ms, w.end_ms) for w in batched.words] == [
            (w.word, w.start_ms, w.end_ms) for w in alone.words
        ]
        assert batched.confidence == pytest.approx(alone.confidence, abs=1e-5)


def test_max_batch_splits_without_changing_results(engine):
    segments = mixed_segments()
    small = ar_engine.GraniteArEngine(engine.model, engine.tokenizer, engine.config, max_batch=2)
    assert [h.token_ids for h in small.transcribe(segments)] == [
        h.token_ids for h in engine.transcribe(segments)
    ]


def test_hotwords_reach_the_model(engine):
    plain, biased = engine.transcribe(
        [Segment(tone(1000, 2.25)), Segment(tone(1000, 2.25), hotwords=("sea shells",))]
    )
    assert plain.duration_ms == biased.duration_ms
    assert plain.confidence != biased.confidence


def rendered_prompts(engine, monkeypatch, segments: list[Segment]) -> list[list[str]]:
    """The user turns of the prompts `transcribe` renders, per `generate` call (a batch)."""
    batches: list[list[str]] = []
    prompt_ids, generate = engine.prompt_ids, engine.generate

    def spy_prompt(user: str, n_audio: int) -> list[int]:
        ids = prompt_ids(user, n_audio)
        text = engine.tokenizer.decode(
            [i for i in ids if i != AUDIO_TOKEN_ID], skip_special_tokens=False
        )
        batches[-1].append(text.split("<|start_of_role|>user<|end_of_role|>")[1])
        return ids

    def spy_generate(waves, instructions):
        batches.append([])
        return generate(waves, instructions)

    monkeypatch.setattr(engine, "prompt_ids", spy_prompt)
    monkeypatch.setattr(engine, "generate", spy_generate)
    hypotheses = engine.transcribe(segments)
    assert len(hypotheses) == len(segments)
    for hyp in hypotheses:
        check_hypothesis(hyp, engine)
    return batches


def test_each_segment_of_a_batch_is_prompted_in_its_language_or_translation(engine, monkeypatch):
    wave = tone(1000, 2.25)
    segments = [
        Segment(wave, language="fr"),
        Segment(wave, language="de"),
        Segment(wave, language="fr", translate_to="it"),  # translation overrides the language
        Segment(wave),
    ]
    (batch,) = rendered_prompts(engine, monkeypatch, segments)
    assert [user.split("<|end_of_text|>")[0] for user in batch] == [
        "transcribe the French speech with proper punctuation and capitalization.",
        "transcribe the German speech with proper punctuation and capitalization.",
        "translate the speech to Italian with proper punctuation and capitalization.",
        "transcribe the speech with proper punctuation and capitalization.",
    ]


def test_a_load_time_translation_is_kept_for_segments_with_a_language(engine, monkeypatch):
    english = ar_engine.GraniteArEngine(
        engine.model, engine.tokenizer, engine.config, task=Task("translate", "German")
    )
    segments = [Segment(tone(300, 1.0), language="en"), Segment(tone(300, 1.0))]
    (batch,) = rendered_prompts(english, monkeypatch, segments)
    assert all(user.startswith("translate the speech to German") for user in batch)


def test_a_language_the_model_lacks_is_refused_not_dropped_from_the_prompt(engine):
    with pytest.raises(ValueError, match="'ru'"):
        engine.transcribe([Segment(tone(300, 1.0), language="ru")])
    with pytest.raises(ValueError, match="'ru'"):
        engine.transcribe([Segment(tone(300, 1.0), translate_to="ru")])


def test_translation_targets_are_declared_and_other_engines_have_none(engine):
    assert engine_translations(engine) == frozenset(TRANSLATION_TARGETS) >= {"fr", "it", "zh"}
    assert engine_translations(EchoEngine()) == frozenset()


def test_long_audio_is_windowed_and_joined(engine):
    short = ar_engine.GraniteArEngine(
        engine.model, engine.tokenizer, engine.config, window_s=3.0, window_overlap_s=1.0
    )
    calls = []
    original = short.generate

    def spy(waves, instructions):
        calls.append([w.size for w in waves])
        return original(waves, instructions)

    short.generate = spy
    wave = np.concatenate([tone(300 + 500 * k, 1.0) for k in range(8)])
    (hyp,) = short.transcribe([Segment(wave)])
    assert sum(len(c) for c in calls) == 4 and max(max(c) for c in calls) == 3 * RATE
    assert hyp.duration_ms == 8000 and hyp.words
    check_hypothesis(hyp, engine)
    assert hyp.words[-1].start_ms >= 5000, "the last window's words land late in the segment"


def test_window_is_capped_at_thirty_seconds(engine):
    wide = ar_engine.GraniteArEngine(
        engine.model, engine.tokenizer, engine.config, window_s=60.0, window_overlap_s=30.0
    )
    assert (wide.window, wide.overlap) == (30 * RATE, 10 * RATE)


@pytest.mark.parametrize(
    ("audio", "duration_ms"),
    [
        (np.zeros(0, dtype=np.float32), 0),
        (np.zeros(5 * RATE, dtype=np.float32), 5000),
        (np.full(RATE, 5e-5, dtype=np.float32), 1000),  # below the silence peak
        (noise(0.019), 19),  # 304 samples: less than one encoder frame
    ],
    ids=["empty", "digital-silence", "near-silence", "sub-frame"],
)
def test_silent_or_tiny_audio_gives_empty_hypothesis_without_the_model(
    engine, monkeypatch, audio, duration_ms
):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not run")

    monkeypatch.setattr(engine, "generate", refuse)
    (hyp,) = engine.transcribe([Segment(audio)])
    assert hyp == Hypothesis(text="", duration_ms=duration_ms)


def test_empty_segments_next_to_speech(engine):
    out = engine.transcribe([Segment(np.zeros(0, dtype=np.float32)), Segment(tone(300, 1.0))])
    assert out[0] == Hypothesis(text="", duration_ms=0)
    assert out[1] == engine.transcribe([Segment(tone(300, 1.0))])[0] and out[1].text


# --- oracles: transformers' own GraniteSpeech path ---------------------------------------------


@pytest.mark.parametrize("n_samples", [320, 4639, 4640, 4960, 9600, 9760, 36000])
def test_audio_token_count_matches_the_projector_and_the_processor(engine, model, n_samples):
    from transformers.models.granite_speech.feature_extraction_granite_speech import (
        GraniteSpeechFeatureExtractor,
    )

    wave = noise(n_samples / RATE, seed=n_samples)
    features, frames = ar_features([wave])
    with torch.inference_mode():
        projected = model.get_audio_features(features).pooler_output
    count = audio_token_count(int(frames[0]), engine.config)
    assert projected.shape[1] == count
    processor = SimpleNamespace(
        melspec_kwargs={"hop_length": 160}, projector_window_size=15, projector_downsample_rate=5
    )
    assert GraniteSpeechFeatureExtractor._get_num_audio_features(processor, [n_samples]) == [count]


def reference(model, engine, wave: np.ndarray, user: str = PLAIN):
    """transformers' path: our ids with features computed by hand, merged by the model."""
    features, frames = ar_features([wave])
    n_audio = audio_token_count(int(frames[0]), engine.config)
    ids = torch.tensor([engine.prompt_ids(user, n_audio)])
    inputs = {
        "input_ids": ids,
        "input_features": features,
        "input_features_mask": torch.ones(1, n_audio, dtype=torch.bool),
        "attention_mask": torch.ones_like(ids),
    }
    return inputs


def test_first_step_logits_match_a_direct_forward(engine, model):
    waves = [tone(1000, 2.25), tone(300, 1.0), noise(1.3, seed=4)]
    users = [instruction(Task(), ("sea shells",)), PLAIN, PLAIN]
    with torch.inference_mode():
        _, embeds, mask = engine.batch_inputs(waves, users)
        ours = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
        for row, (wave, user) in enumerate(zip(waves, users, strict=True)):
            expected = model(**reference(model, engine, wave, user)).logits[0, -1]
            torch.testing.assert_close(ours[row], expected, atol=1e-4, rtol=1e-4)
    results = engine.generate(waves, users)
    for row, result in enumerate(results):
        scores = ours[row].clone()
        scores[engine.suppressed] = -math.inf
        assert result.ids[0] == int(scores.argmax())
        assert result.probs[0] == pytest.approx(float(scores.softmax(-1).max()), abs=1e-5)


def test_greedy_tokens_match_transformers_generate(engine, model):
    wave = tone(1000, 2.25)
    (ours,) = engine.generate([wave], [PLAIN])
    budget = token_budget(wave.size / RATE, 10_000)
    with torch.inference_mode():
        out = model.generate(
            **reference(model, engine, wave),
            max_new_tokens=budget,
            do_sample=False,
            num_beams=1,
            eos_token_id=engine.eos,
            pad_token_id=engine.pad,
            suppress_tokens=engine.suppressed,
        )
    width = len(reference(model, engine, wave)["input_ids"][0])
    generated = out[0, width:].tolist()
    assert generated[: len(ours.ids)] == ours.ids
    if ours.stop == "eos":
        assert generated[len(ours.ids)] == engine.eos


# --- loading -------------------------------------------------------------------------------------


def copy_checkpoint(source, target, config_changes=None):
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    if config_changes is not None:
        config = json.loads((target / "config.json").read_text())
        config.update(config_changes)
        (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "granite_speech_nar"}, "use the granite-nar family"),
        ({"model_type": "granite_speech_plus"}, "model_type is 'granite_speech_plus'"),
        ({"audio_token_index": 5}, "<\\|audio\\|> is id 322 but .*audio_token_index is 5"),
        ({"audio_token_index": None}, "missing or invalid value"),
    ],
)
def test_wrong_checkpoints_are_refused_clearly(checkpoint, tmp_path, changes, message):
    folder = copy_checkpoint(checkpoint, tmp_path / "bad", changes)
    with pytest.raises(ModelLoadError, match=message):
        load_engine(str(folder), EngineOptions(device="cpu"))


@pytest.mark.skipif(importlib.util.find_spec("peft") is not None, reason="peft is installed")
def test_a_lora_checkpoint_needs_peft(checkpoint, tmp_path):
    folder = copy_checkpoint(checkpoint, tmp_path / "lora", {"has_lora_adapter": True})
    with pytest.raises(ModelLoadError, match="LoRA adapter"):
        load_engine(str(folder), EngineOptions(device="cpu"))


def test_a_missing_weight_is_an_error_not_a_random_value(checkpoint, tmp_path):
    folder = copy_checkpoint(checkpoint, tmp_path / "partial")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["language_model.lm_head.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="does not match the model.*lm_head"):
        load_engine(str(folder), EngineOptions(device="cpu"))


def test_hub_id_fetches_only_what_loading_needs(checkpoint, monkeypatch):
    import huggingface_hub

    calls = []

    def cached_snapshot(repo_id, *, allow_patterns, **options):
        calls.append((repo_id, allow_patterns, options))
        return str(checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_snapshot)
    loaded = load_engine(
        "ibm-granite/granite-speech-4.1-2b", EngineOptions(device="cpu", dtype="float32")
    )
    assert loaded.family == "granite-ar"
    ((repo_id, patterns, options),) = calls
    assert repo_id == "ibm-granite/granite-speech-4.1-2b" and options["local_files_only"]
    wanted = ["config.json", "tokenizer.json", "model-00001-of-00002.safetensors"]
    assert all(any(fnmatch(name, p) for p in patterns) for name in wanted)
    assert not any(fnmatch("out_llm.safetensors", p) for p in patterns)


def test_unreachable_hub_fails_fast():
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="streamscribe-test/granite-speech-unreachable"):
        load_engine(
            "streamscribe-test/granite-speech-unreachable",
            EngineOptions(device="cpu", hub_timeout_s=2),
        )
    assert time.monotonic() - started < 2 + 20


def official_name(name: str) -> str:
    """transformers' in-memory name of a tensor -> its name in the official checkpoint."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.language_model."):
        return "language_model.model." + name.removeprefix("model.language_model.")
    return name.removeprefix("model.")


def test_weights_round_trip_under_their_official_names(checkpoint, model):
    tensors = load_file(str(checkpoint / "model.safetensors"))
    state = {official_name(k): v for k, v in model.state_dict().items()}
    assert "language_model.lm_head.weight" in tensors  # untied head, as in 4.1-2b
    assert set(tensors) <= set(state)
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name

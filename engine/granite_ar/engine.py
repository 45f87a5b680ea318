"""The `granite-ar` family: Granite Speech 4.1 2B (autoregressive) through transformers.

Used as an accuracy pass on finals, and for keyword biasing and translation prompts. A clip is
encoded (features, encoder, projector) only with clips of its own length, never padded, so its
text does not depend on what else is in the batch; the prompts then decode together,
left-padded, with greedy search and the KV cache. `draft` is `transcribe`: decoding is the whole
cost of this model, so there is no cheaper partial.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from ..api import (
    DEFAULT_OPTIONS,
    TARGET_SAMPLE_RATE,
    EngineOptions,
    Hypothesis,
    ModelLoadError,
    Segment,
    Word,
)
from ..audio import prepare_waveform
from ..features import ar_features
from ..granite_nar.decoding import TokenSpan, group_words
from ..granite_nar.engine import SAMPLES_PER_FRAME, SILENCE_PEAK, pick_device, pick_dtype
from ..granite_nar.windows import plan_windows
from ..hub import resolve_source
from .checkpoint import (
    HUB_PATTERNS,
    ArConfig,
    load_model,
    load_tokenizer,
    read_config,
)
from .generation import (
    LOOP_CHECK_EVERY,
    BudgetStop,
    ChosenTokenProbs,
    LoopStop,
    first_loop,
    token_budget,
)
from .prompt import (
    ASR_LANGUAGES,
    END_OF_TEXT,
    TRANSLATION_TARGETS,
    Task,
    instruction,
    parse_task,
    render_prompt,
)
from .text import join_windows, loop_end, spread_times

log = logging.getLogger("engine.granite_ar")

TRANSCRIBE = Task()

FAMILY = "granite-ar"
MAX_WINDOW_S = 30.0  # the model was trained on clips of at most 30 s
# Upper bound on words spoken per second, to size the search for a window overlap's words;
# a few more words cover the ones garbled at a window's edge.
MAX_WORDS_PER_SECOND = 6
EDGE_WORDS = 4


@dataclass(frozen=True)
class WindowText:
    """What one window decoded to: tokens (end-of-text and loops removed), the probability of
    each, and why decoding stopped: "eos", "budget" or "loop"."""

    ids: list[int]
    probs: list[float]
    stop: str


class GraniteArEngine:
    """`languages`: the six it transcribes (prompt.ASR_LANGUAGES); `translations`: the targets
    it translates into (prompt.TRANSLATION_TARGETS). The prompt is chosen per segment (see
    `task_for`), so one batch may mix languages and translations."""

    family = FAMILY
    languages = frozenset(ASR_LANGUAGES)
    translations = frozenset(TRANSLATION_TARGETS)

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        config: ArConfig,
        *,
        task: Task = TRANSCRIBE,
        max_batch: int = 16,
        window_s: float = 30.0,
        window_overlap_s: float = 5.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.task = task
        self.device = str(model.device)
        self.max_batch = max_batch
        window = min(window_s, MAX_WINDOW_S)
        overlap = min(window_overlap_s, window / 3)
        self.window = int(window * TARGET_SAMPLE_RATE)
        self.overlap = int(overlap * TARGET_SAMPLE_RATE)
        self.overlap_words = math.ceil(overlap * MAX_WORDS_PER_SECOND) + EDGE_WORDS
        self.eos = tokenizer.token_to_id(END_OF_TEXT)
        self.pad = self.eos if config.pad_token_id is None else config.pad_token_id
        # The audio placeholder (and padding) are never text: keep greedy search off them.
        self.suppressed = [config.audio_token_id] + ([self.pad] if self.pad != self.eos else [])
        self.special = {
            token_id
            for token_id, added in tokenizer.get_added_tokens_decoder().items()
            if added.special
        }

    def draft(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        return self.transcribe(segments)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_batch(self, id_lists: list[list[int]]) -> list[str]:
        return self.tokenizer.decode_batch(id_lists, skip_special_tokens=True)

    def task_for(self, segment: Segment) -> Task:
        """What the model is asked to do with `segment`: translate it when it says so;
        else transcribe it in its `language`, which the model then writes out instead of the
        one it would guess. Without either, the task chosen at load time (a load-time
        translation stays one: the spoken language is not part of that prompt)."""
        if segment.translate_to is not None:
            return Task("translate", _lookup(TRANSLATION_TARGETS, segment.translate_to))
        if segment.language is not None and self.task.kind == "transcribe":
            return Task("transcribe", _lookup(ASR_LANGUAGES, segment.language))
        return self.task

    def instruction(self, segment: Segment) -> str:
        """The user instruction for `segment`: its task and hotwords."""
        return instruction(self.task_for(segment), segment.hotwords)

    def prompt_ids(self, user_instruction: str, n_audio: int) -> list[int]:
        """Token ids of the full prompt, with `<|audio|>` repeated once per audio embedding."""
        text = render_prompt(user_instruction)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        at = ids.index(self.config.audio_token_id)
        return ids[:at] + [self.config.audio_token_id] * n_audio + ids[at + 1 :]

    @torch.inference_mode()
    def transcribe(self, segments: Sequence[Segment]) -> list[Hypothesis]:
        waves = [prepare_waveform(s.audio, s.sample_rate) for s in segments]
        plans = [self._plan(wave) for wave in waves]
        pieces = [(index, a, b) for index, plan in enumerate(plans) for a, b in plan]
        instructions = [self.instruction(s) for s in segments]
        texts: dict[tuple[int, int, int], WindowText] = {}
        order = sorted(pieces, key=lambda p: p[2] - p[1])
        for start in range(0, len(order), self.max_batch):
            batch = order[start : start + self.max_batch]
            outputs = self.generate(
                [waves[i][a:b] for i, a, b in batch], [instructions[i] for i, _, _ in batch]
            )
            texts.update(zip(batch, outputs, strict=True))
        hypotheses = []
        for index, (wave, plan) in enumerate(zip(waves, plans, strict=True)):
            per_window = [self._timed_words(texts[(index, a, b)], a, b) for a, b in plan]
            words = join_windows(per_window, plan, TARGET_SAMPLE_RATE, self.overlap_words)
            hypotheses.append(self._hypothesis(words, wave.size))
        return hypotheses

    def _plan(self, wave: np.ndarray) -> list[tuple[int, int]]:
        """Windows of a segment; none for silence or audio shorter than one encoder frame."""
        if wave.size == 0 or float(np.abs(wave).max()) < SILENCE_PEAK:
            return []
        plan = plan_windows(wave.size, self.window, self.overlap)
        return [(a, b) for a, b in plan if b - a >= SAMPLES_PER_FRAME]

    def audio_embeddings(self, waves: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Projector output [N, hidden] per clip, one encoder call per distinct clip length.

        The encoder takes no padding mask: padding would enter a short clip's last attention
        block, its convolutions, its projector window and its log-mel floor. Clips of one length
        need none, and windows of long audio or clips of a fixed size share a length."""
        by_length: dict[int, list[int]] = {}
        for index, wave in enumerate(waves):
            by_length.setdefault(wave.size, []).append(index)
        rows: dict[int, torch.Tensor] = {}
        for indices in by_length.values():
            encoded = self.encode_same_length([waves[i] for i in indices])
            rows.update(zip(indices, encoded, strict=True))
        return [rows[index] for index in range(len(waves))]

    def encode_same_length(self, waves: Sequence[np.ndarray]) -> torch.Tensor:
        """Projector output [B, N, hidden] of clips that all have the same length."""
        model = self.model
        features, _ = ar_features(waves, device=model.device)
        return model.get_audio_features(features.to(model.dtype)).pooler_output

    def batch_inputs(
        self, waves: Sequence[np.ndarray], instructions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids (one user instruction per clip), their embeddings with the
        audio rows in place, and the attention mask, ready for `generate`."""
        model, audio_id = self.model, self.config.audio_token_id
        audio = self.audio_embeddings(waves)
        prompts = [
            self.prompt_ids(text, rows.shape[0])
            for rows, text in zip(audio, instructions, strict=True)
        ]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        is_audio = ids == audio_id
        embeds = model.get_input_embeddings()(ids.masked_fill(is_audio, self.pad))
        embeds[is_audio] = torch.cat(audio).to(embeds.dtype)
        return ids, embeds, mask

    @torch.inference_mode()
    def generate(
        self, waves: Sequence[np.ndarray], instructions: Sequence[str]
    ) -> list[WindowText]:
        """Greedy decoding of one batch of clips (at most 30 s each), each with its own user
        instruction (`instruction`), one result per clip."""
        ids, embeds, mask = self.batch_inputs(waves, instructions)
        width = ids.shape[1]
        limit = self.config.max_positions - width
        budgets = [token_budget(w.size / TARGET_SAMPLE_RATE, limit) for w in waves]
        probs = ChosenTokenProbs()
        out = self.model.generate(
            input_ids=ids,
            inputs_embeds=embeds,
            attention_mask=mask,
            generation_config=GenerationConfig(
                max_new_tokens=max(budgets),
                do_sample=False,
                num_beams=1,
                use_cache=True,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                suppress_tokens=self.suppressed,
            ),
            logits_processor=LogitsProcessorList([probs]),
            stopping_criteria=StoppingCriteriaList(
                [BudgetStop(width, budgets, ids.device), LoopStop(width)]
            ),
        )
        rows = out[:, width:].tolist()
        results = [
            self.window_text(row, p, budget)
            for row, p, budget in zip(rows, probs.per_sample(), budgets, strict=True)
        ]
        log.debug(
            "granite-ar batch",
            extra={
                "batch": len(rows),
                "prompt_tokens": width,
                "steps": len(rows[0]),
                "stops": dict(Counter(r.stop for r in results)),
            },
        )
        return results

    def window_text(self, row: list[int], probs: list[float], budget: int) -> WindowText:
        """The text tokens of one generated row: up to end-of-text (or the padding that follows
        a stopped sample), within the budget, cut where a loop check after every token would
        have stopped (`LoopStop` checks every LOOP_CHECK_EVERY tokens, so the first loop lies in
        the last ones) and the loop trimmed to one copy."""
        end, stop = min(len(row), budget), "budget"
        for position, token in enumerate(row[:end]):
            if token in (self.eos, self.pad):
                end, stop = position, "eos" if token == self.eos else "budget"
                break
        looped = first_loop(row[:end], end - LOOP_CHECK_EVERY)
        if looped is not None:
            end, stop = loop_end(row[:looped]), "loop"
        return WindowText(row[:end], probs[:end], stop)

    def _timed_words(self, text: WindowText, start: int, end: int) -> list[tuple[Word, list[int]]]:
        """Words of one window on the segment's timeline, with approximate times (see
        `spread_times`) and, as in granite-nar, the geometric mean of their tokens'
        probabilities as confidence."""
        spans = [TokenSpan(t, 0, 0, p) for t, p in zip(text.ids, text.probs, strict=True)]
        words = group_words(spans, self.decode_batch, self.special)
        offset = start * 1000 // TARGET_SAMPLE_RATE
        times = spread_times([w.word for w, _ in words], (end - start) * 1000 // TARGET_SAMPLE_RATE)
        return [
            (replace(word, start_ms=offset + a, end_ms=offset + b), ids)
            for (word, ids), (a, b) in zip(words, times, strict=True)
        ]

    def _hypothesis(self, kept: list[tuple[Word, list[int]]], n_samples: int) -> Hypothesis:
        words = [w for w, _ in kept]
        confidence = (
            math.exp(sum(math.log(max(w.confidence, 1e-12)) for w in words) / len(words))
            if words
            else 0.0
        )
        return Hypothesis(
            text=" ".join(w.word for w in words),
            token_ids=[i for _, ids in kept for i in ids],
            words=words,
            confidence=confidence,
            duration_ms=n_samples * 1000 // TARGET_SAMPLE_RATE,
        )


def _lookup(table: dict[str, str], code: str) -> str:
    """The model's name of a language code; a code it lacks is refused rather than left out of
    the prompt, where the model would silently pick a language of its own."""
    try:
        return table[code]
    except KeyError:
        raise ValueError(
            f"granite-ar cannot be asked for language {code!r}: use one of {', '.join(table)}"
        ) from None


def load_engine(
    source: str,
    options: EngineOptions = DEFAULT_OPTIONS,
    *,
    task: str = "transcribe",
    language: str | None = None,
) -> GraniteArEngine:
    """Load a checkpoint folder or hub id into a ready engine.

    `task` is "transcribe" (with `language` the spoken language, or None) or "translate"
    (with `language` the target); both are checked before anything is loaded."""
    try:
        parsed = parse_task(task, language)
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    folder = resolve_source(
        source, options.hub_timeout_s, patterns=HUB_PATTERNS, setting="engine.granite_ar_model"
    )
    config = read_config(folder)
    tokenizer = load_tokenizer(folder, config)
    torch_device = pick_device(options.device)
    model = load_model(folder, torch_device, pick_dtype(options.dtype, torch_device))
    log.info(
        "granite-ar loaded",
        extra={"source": str(folder), "device": str(torch_device), "task": parsed.kind},
    )
    return GraniteArEngine(
        model,
        tokenizer,
        config,
        task=parsed,
        max_batch=options.max_batch,
        window_s=options.window_s,
        window_overlap_s=options.window_overlap_s,
    )

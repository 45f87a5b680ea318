"""Hooks into transformers' greedy `generate`: per-sample stopping and token probabilities.

Each sample in a batch gets its own token budget and its own loop check, so one long or stuck
sample does not make its neighbours decode past their end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria

from .text import LOOP_WINDOW, loop_end

# Token budget per audio second. Read speech runs at ~2.7 words/s, 3.5-4 Granite tokens/s;
# 8/s leaves room for fast talkers, numbers and languages with more tokens per word (IBM's
# wrapper allows 200 tokens per 30 s, 6.7/s). The headroom covers very short segments.
TOKENS_PER_SECOND = 8
TOKEN_HEADROOM = 10


def token_budget(seconds: float, limit: int) -> int:
    """Most new tokens a sample of `seconds` may generate, never above `limit` (what is left of
    the model's positions after the prompt)."""
    return max(1, min(math.ceil(seconds * TOKENS_PER_SECOND) + TOKEN_HEADROOM, limit))


class BudgetStop(StoppingCriteria):
    """Stops each sample once it has generated its own budget of tokens."""

    def __init__(self, prompt_width: int, budgets: Sequence[int], device: torch.device) -> None:
        self.prompt_width = prompt_width
        self.budgets = torch.tensor(list(budgets), device=device)

    def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_width) >= self.budgets


# LoopStop reads the generated tokens back to the host only every LOOP_CHECK_EVERY steps: each
# read waits for the device, and a wait per token stalls a GPU's queue of decoding steps. Each
# check looks at every prefix that ended since the previous one, so a loop is still seen, up to
# LOOP_CHECK_EVERY - 1 tokens late; `first_loop` then finds where a check after every token would
# have stopped, and results are the same as with one.
LOOP_CHECK_EVERY = 8


def first_loop(ids: Sequence[int], after: int = 0) -> int | None:
    """Length of the shortest prefix of `ids` longer than `after` that ends in a loop (see
    `text.loop_end`): where a loop check after every token stops. None when there is none."""
    for length in range(max(after, 0) + 1, len(ids) + 1):
        if loop_end(ids[max(0, length - LOOP_WINDOW) : length]) is not None:
            return length
    return None


class LoopStop(StoppingCriteria):
    """Stops a sample whose generated tokens end in a loop, checked every LOOP_CHECK_EVERY
    steps."""

    def __init__(self, prompt_width: int) -> None:
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs) -> torch.Tensor:
        width = input_ids.shape[1]
        if (width - self.prompt_width) % LOOP_CHECK_EVERY:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        start = max(self.prompt_width, width - LOOP_WINDOW - LOOP_CHECK_EVERY + 1)
        tails = input_ids[:, start:].tolist()
        looped = [first_loop(t, len(t) - LOOP_CHECK_EVERY) is not None for t in tails]
        return torch.tensor(looped, device=input_ids.device)


class ChosenTokenProbs(LogitsProcessor):
    """Records, per step, the softmax probability of the token greedy search picks.

    Runs last, so the argmax of the scores it sees is the chosen token. Keeping one number per
    sample and step, instead of `output_scores`, avoids holding a [steps, batch, vocab] tensor
    (GBs at the real 100k vocabulary)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(scores.float().softmax(dim=-1).amax(dim=-1))
        return scores

    def per_sample(self) -> list[list[float]]:
        """[batch][step] probabilities, moved to the host once."""
        return torch.stack(self.steps, dim=1).tolist()

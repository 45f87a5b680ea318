"""Word error rate as the project defines it: Whisper's English normaliser, then corpus-level WER.

One definition shared by the WER benchmark and the tests, so a figure in a results file and a
bound in a test always mean the same thing. Offline, the normaliser's British/American spelling
map is empty (see `_normaliser`), so "colour" against "color" counts as an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import jiwer


@lru_cache(maxsize=1)
def _normaliser():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    # The British->American spelling map ("colour" -> "color") is english.json, shipped with
    # Whisper's tokenizer on the model hub and not with transformers. Offline it is not
    # available, so the map is empty: spelling variants count as errors. Everything else
    # (case, punctuation, numbers to digits, "mr" -> "mister", contractions, fillers) applies.
    return EnglishTextNormalizer({})


def normalise(text: str) -> str:
    """Text as it is scored: lower case, no punctuation, numbers as digits, standard spellings."""
    return _normaliser()(text)


def _measure(references: Sequence[str], hypotheses: Sequence[str]) -> jiwer.WordOutput:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    return jiwer.process_words(
        [normalise(r) for r in references], [normalise(h) for h in hypotheses]
    )


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """(S + D + I) / N summed over all utterances (not a mean of per-utterance rates), so long
    utterances weigh by their length, as in published WER figures."""
    if not references:
        raise ValueError("no utterances to score")
    out = _measure(references, hypotheses)
    if out.hits + out.substitutions + out.deletions == 0:
        raise ValueError("the references hold no words after normalisation")
    return float(out.wer)


@dataclass(frozen=True)
class UtteranceScore:
    """Errors of one utterance, with the normalised texts that were compared."""

    id: str
    reference: str
    hypothesis: str
    errors: int  # substitutions + deletions + insertions
    words: int  # words in the normalised reference

    @property
    def wer(self) -> float | None:
        """None for a reference without words, where a rate is undefined."""
        return self.errors / self.words if self.words else None


def utterance_scores(
    ids: Sequence[str], references: Sequence[str], hypotheses: Sequence[str]
) -> list[UtteranceScore]:
    """One score per utterance, in the given order."""
    if len(ids) != len(references):
        raise ValueError(f"{len(ids)} ids but {len(references)} references")
    scores = []
    for uid, reference, hypothesis in zip(ids, references, hypotheses, strict=True):
        out = _measure([reference], [hypothesis])
        scores.append(
            UtteranceScore(
                id=uid,
                reference=normalise(reference),
                hypothesis=normalise(hypothesis),
                errors=out.substitutions + out.deletions + out.insertions,
                words=out.hits + out.substitutions + out.deletions,
            )
        )
    return scores


def worst(scores: Sequence[UtteranceScore], count: int = 5) -> list[UtteranceScore]:
    """Up to `count` utterances that add most to the corpus WER (those without errors left out):
    most errors first, then highest rate.

    Ranked by error count rather than rate, because the corpus figure sums errors; a two-word
    utterance with one error matters less than a long one with five.
    """
    ranked = sorted(scores, key=lambda s: (s.errors, s.wer or 0.0), reverse=True)
    return [s for s in ranked[:count] if s.errors]

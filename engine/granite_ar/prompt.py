"""The text prompt around the audio: the Granite-4 chat rendering and the trained instructions.

Rendered here as a plain string (no chat-template engine, no AutoProcessor) so it is exact,
testable and identical on every machine. The instructions are the ones IBM's wrapper uses
(spec §5); the model follows them, so a wording change is a behaviour change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

AUDIO_TOKEN = "<|audio|>"
START_OF_ROLE = "<|start_of_role|>"
END_OF_ROLE = "<|end_of_role|>"
END_OF_TEXT = "<|end_of_text|>"
SPECIAL_TOKENS = (START_OF_ROLE, END_OF_ROLE, END_OF_TEXT, AUDIO_TOKEN)
# What the Granite-4 chat template inserts when the conversation has no system turn.
DEFAULT_SYSTEM = (
    "You are a helpful assistant. Please ensure responses are professional, accurate, and safe."
)

TASKS = ("transcribe", "translate")
# Languages the model transcribes, and the targets it translates into (X<->en for the five
# European languages and Japanese, plus en->it and en->zh, which the model calls "Mandarin").
ASR_LANGUAGES = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "pt": "Portuguese",
    "ja": "Japanese",
}
TRANSLATION_TARGETS = {**ASR_LANGUAGES, "it": "Italian", "zh": "Mandarin"}
ALIASES = {"chinese": "zh"}


@dataclass(frozen=True)
class Task:
    """What the model is asked to do for every segment: `language` is the spoken language for
    `transcribe` (None: let the model tell) and the target language for `translate`."""

    kind: str = "transcribe"
    language: str | None = None


def parse_task(task: str, language: str | None) -> Task:
    """Validate a task and language (ISO 639-1 code or English name, any case) up front, so a
    bad configuration fails at load time, not on the first request."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    table = ASR_LANGUAGES if task == "transcribe" else TRANSLATION_TARGETS
    if language is None:
        if task == "translate":
            raise ValueError("task 'translate' needs a target language: one of " + _describe(table))
        return Task(task)
    key = language.strip().lower()
    key = ALIASES.get(key, key)
    by_name = {name.lower(): name for name in table.values()}
    name = table.get(key) or by_name.get(key)
    if name is None:
        what = "transcription language" if task == "transcribe" else "translation target"
        raise ValueError(
            f"unsupported {what} {language!r} for Granite Speech AR: use one of " + _describe(table)
        )
    return Task(task, name)


def _describe(table: dict[str, str]) -> str:
    return ", ".join(f"{code} ({name})" for code, name in table.items())


def instruction(task: Task, hotwords: Sequence[str] = ()) -> str:
    """The user instruction: plain ASR, ASR in a named language, translation, or either of
    the keyword-biasing forms when the segment carries hotwords."""
    keywords = [k for k in (_keyword(w) for w in hotwords) if k]
    if task.kind == "translate":
        head = f"translate the speech to {task.language}"
        if keywords:
            return f"{head}. Keywords: {', '.join(keywords)}"
        return f"{head} with proper punctuation and capitalization."
    if keywords:
        return f"transcribe the speech to text. Keywords: {', '.join(keywords)}"
    spoken = f"{task.language} speech" if task.language else "speech"
    return f"transcribe the {spoken} with proper punctuation and capitalization."


def _keyword(word: str) -> str:
    """A hotword as prompt text: one line, and unable to spell a control token such as
    `<|end_of_text|>` (hotwords come from clients)."""
    return " ".join(word.split()).replace("<|", "<").replace("|>", ">")


def render_prompt(user_instruction: str, system: str = DEFAULT_SYSTEM) -> str:
    """The Granite-4 chat rendering of [system, user(audio + instruction)] with the generation
    prompt: the assistant turn is opened and left for the model to fill."""
    return (
        f"{START_OF_ROLE}system{END_OF_ROLE}{system}{END_OF_TEXT}\n"
        f"{START_OF_ROLE}user{END_OF_ROLE}{AUDIO_TOKEN}{user_instruction}{END_OF_TEXT}\n"
        f"{START_OF_ROLE}assistant{END_OF_ROLE}"
    )

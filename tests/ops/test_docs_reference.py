"""The README's operations reference, checked against the code so that neither drifts alone:
the metrics table against the registry of streaming/ops/metrics.py, and the native protocol's
message reference against what the native dialect accepts and what its serializer writes."""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import pytest
from prometheus_client.metrics import MetricWrapperBase

from engine.api import Word
from engine.scheduler import Scheduler
from streaming.core.events import (
    CaptionAppend,
    CaptionCue,
    ErrorEvent,
    Event,
    FinalTranscript,
    Latency,
    PartialTranscript,
    RefinedTranscript,
    SessionClosed,
    SessionResumed,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    Status,
    TranslatedTranscript,
)
from streaming.dialects.base import Close, Configure, Finalize, KeepAlive, Reject, Update
from streaming.dialects.native import NativeDialect
from streaming.ops.config import Config, override_section
from streaming.ops.metrics import Metrics, SchedulerCollector
from tests.gateway_harness import EchoEngine
from tests.test_readme_examples import section

# --- metrics ------------------------------------------------------------------------------------


def registered_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """{name as exposed (counters with `_total`): (type, label names)} of every metric a server
    registers, the scheduler's included. prometheus_client keeps label names only on the metric
    objects (`_labelnames`), so they are read there, and the registry says what is exported."""
    metrics = Metrics()
    scheduler = Scheduler(EchoEngine())
    metrics.watch(scheduler)
    labels: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels[value.describe()[0].name] = tuple(value._labelnames)
    for family in SchedulerCollector(scheduler).collect():
        labels[family.name] = tuple(family._labelnames)
    registered = {}
    for family in metrics.registry.collect():
        assert family.name in labels, f"{family.name}: registered in an unexpected way"
        name = family.name + "_total" if family.type == "counter" else family.name
        registered[name] = (family.type, labels[family.name])
    return registered


def documented_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    rows = [
        line
        for line in section("### Metrics reference").splitlines()
        if line.startswith("| `streamscribe")
    ]
    documented = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert len(cells) == 4, f"malformed metrics row: {row}"
        name_cell, kind, label_cell, meaning = cells
        name = name_cell.strip("`")
        assert name not in documented, f"{name} listed twice"
        assert meaning.strip(), f"{name} has no meaning"
        documented[name] = (kind, tuple(re.findall(r"`(\w+)`", label_cell)))
    return documented


def test_metrics_table_lists_every_metric_with_its_type_and_labels():
    registered = registered_metrics()
    documented = documented_metrics()
    assert len(registered) >= 18  # the registry was really read
    assert set(documented) == set(registered), (
        f"missing from the README: {sorted(set(registered) - set(documented))}; "
        f"not in the code: {sorted(set(documented) - set(registered))}"
    )
    for name, (kind, labels) in registered.items():
        assert documented[name] == (kind, labels), name


# --- native protocol ----------------------------------------------------------------------------

WORD = Word("He", 2000, 2420, 0.56)
# One instance of every session event (both shapes of `error`), as the native dialect gets them.
EVENTS: list[Event] = [
    SessionStarted("5a0c0d6e", dataclasses.asdict(Config().session)),
    SpeechStarted(0, 1, 2000),
    SpeechStopped(0, 1, 4490),
    PartialTranscript(0, 1, 2, 1700, 2900, "He was", "not an", [WORD]),
    FinalTranscript(0, 1, 1700, 4990, "He", [WORD], 0.81, Latency(500, 3, 180), "endpoint"),
    RefinedTranscript(0, 1, 1700, 4990, "He", [WORD], 0.9, 40, 620, changed=False),
    RefinedTranscript(0, 2, 5200, 7900, "He", [], 0.0, 3000, 0, False, True, "deadline"),
    TranslatedTranscript(0, 1, 1700, 4990, "fr", "Il"),
    TranslatedTranscript(0, 2, 5200, 7900, "fr", "", skipped=True, reason="deadline"),
    Status(1250, 8400),
    ErrorEvent("invalid_update", "cannot change sample_rate mid-stream"),
    ErrorEvent("engine_error", "segment 2 failed", channel=0, segment_id=2),
    SessionResumed(gap_ms=2140, audio_bytes=211200, audio_ms=6600, replayed=3, dropped=0),
    SessionClosed(12480, 2, "client"),
    CaptionAppend(0, " He was", False, False, 3, 2000, 3100),
    CaptionCue(1, 0, 2000, 4990, ["He was"], 4490, "00:00:02.000", "00:00:04.990"),
]
# What each client message must become in the dialect.
CLIENT_COMMANDS = {
    "session.start": Configure,
    "session.update": Update,
    "finalize": Finalize,
    "keepalive": KeepAlive,
    "close": Close,
}


def shape(value: object) -> object:
    """The key structure of a message: dicts by their keys (recursively), lists by their first
    item; `config` (the session options, shortened in the README) by nothing."""
    if isinstance(value, dict):
        return {k: None if k == "config" else shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None


def keys_of(value: object) -> set[str]:
    """Every key in a shape, nested ones included."""
    if isinstance(value, dict):
        return set(value).union(*(keys_of(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(keys_of(v) for v in value))
    return set()


def produced_messages() -> dict[str, list[dict]]:
    """{type: messages} that the native dialect writes for EVENTS."""
    dialect = NativeDialect()
    dialect.resume_token = "mVq3oK1pW0gS6x2cTz8yRb7uN4eLhA5d"  # a resumable server's
    produced: dict[str, list[dict]] = {}
    for event in EVENTS:
        for frame in dialect.encode(event):
            message = json.loads(frame)
            produced.setdefault(message["type"], []).append(message)
    return produced


def examples(part: str) -> list[dict]:
    """The one-line JSON examples of a part of the message reference."""
    text = section(part)
    block = re.search(r"^```json\n(.*?)^```$", text, flags=re.M | re.S)
    assert block, f"no ```json block under {part!r}"
    return [json.loads(line) for line in block.group(1).splitlines() if line.strip()]


def field_notes(part: str) -> dict[str, str]:
    """{type: its description} from the list items `- `type` (/ `type`): fields...`."""
    notes: dict[str, str] = {}
    items = re.split(r"^- ", section(part), flags=re.M)[1:]
    for item in items:
        head, _, body = item.partition(": ")
        for kind in re.findall(r"`([a-z_.]+)`", head):
            notes[kind] = notes.get(kind, "") + body
    return notes


def mismatches(found: list[dict], produced: dict[str, list[dict]]) -> list[str]:
    """Why each documented server message differs from every message the code writes for its
    type (none: it matches one of them)."""
    problems = []
    for message in found:
        kind = message.get("type")
        shapes = [shape(m) for m in produced.get(kind, [])]
        if not shapes:
            problems.append(f"{kind}: the code sends no such message")
        elif shape(message) not in shapes:
            problems.append(f"{kind}: keys {shape(message)} are not any of {shapes}")
    return problems


def test_every_event_type_has_a_sample():
    """A new session event must be added to EVENTS (and so to the README)."""
    assert {type(e) for e in EVENTS} == set(typing.get_args(Event))


def test_server_examples_match_what_the_code_sends():
    produced = produced_messages()
    found = examples("#### Server messages")
    assert {m["type"] for m in found} == set(produced)
    assert mismatches(found, produced) == []
    assert all(isinstance(m["seq"], int) and m["seq"] > 0 for m in found)
    (started,) = [m for m in found if m["type"] == "session.started"]
    shortened = override_section("session", Config().session, started["config"], "README")
    assert dataclasses.asdict(shortened).items() >= started["config"].items()


def test_server_field_notes_name_every_field():
    produced = produced_messages()
    notes = field_notes("#### Server messages")
    for kind, messages in produced.items():
        assert kind in notes, f"no description of {kind}"
        fields = set().union(*(keys_of(shape(m)) for m in messages)) - {"type", "seq"}
        unnamed = {f for f in fields if f"`{f}`" not in notes[kind]}
        assert not unnamed, f"{kind}: fields not described: {sorted(unnamed)}"


def test_client_examples_are_accepted_by_the_native_dialect():
    found = examples("#### Client messages")
    (refusal,) = NativeDialect().on_text('{"type": "no.such.message"}')
    assert isinstance(refusal, Reject) and refusal.code == "unknown_type"
    accepted = set(refusal.message.split("expected one of ")[1].split(", "))
    assert accepted == set(CLIENT_COMMANDS)
    assert {m["type"] for m in found} == accepted
    notes = field_notes("#### Client messages")
    assert accepted <= set(notes)
    session = Config().session
    for message in found:
        (command,) = NativeDialect().on_text(json.dumps(message))
        assert isinstance(command, CLIENT_COMMANDS[message["type"]]), (message, command)
        if isinstance(command, Configure | Update):
            override_section("session", session, command.options, "README")  # valid values
        if "hotwords" in message:
            assert command.hotwords == ("Streamscribe", "Granite")


def test_mismatches_catch_a_wrong_example():
    """The server check fails on an example with a field the code does not send, one missing a
    field, and an unknown type."""
    produced = produced_messages()
    status = {"type": "status", "seq": 1, "lag_ms": 0, "queued_audio_ms": 0}
    assert mismatches([status], produced) == []
    assert mismatches([{**status, "extra": 1}], produced)
    assert mismatches([{k: v for k, v in status.items() if k != "lag_ms"}], produced)
    assert mismatches([{"type": "status.v2", "seq": 1}], produced)


@pytest.mark.parametrize("heading", ["#### Client messages", "#### Server messages"])
def test_reference_sections_sit_under_the_native_protocol(heading):
    """The message reference belongs to the native protocol, not another dialect's section."""
    assert heading in section("## The native protocol")

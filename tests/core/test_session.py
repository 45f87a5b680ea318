"""The sans-I/O session core driven synchronously with real speech and a fake engine."""

from __future__ import annotations

import numpy as np
import pytest

from engine.api import Hypothesis, Word
from streaming.core.events import (
    EngineRequest,
    ErrorEvent,
    FinalTranscript,
    PartialTranscript,
    SessionClosed,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
)
from streaming.core.session import Session
from streaming.ops.config import SessionConfig
from tests.streams import RATE, chunks, joined, librivox_clips, to_s16le

WORD_MS = 300


def fake_words(audio: np.ndarray) -> Hypothesis:
    """One word per 300 ms of audio, named by position: prefixes agree as audio grows."""
    n = len(audio) * 1000 // RATE // WORD_MS
    words = [Word(f"w{i}", i * WORD_MS, (i + 1) * WORD_MS, 0.9) for i in range(n)]
    return Hypothesis(
        " ".join(w.word for w in words),
        words=words,
        confidence=0.9,
        duration_ms=len(audio) * 1000 // RATE,
    )


class Driver:
    """Runs a session, answering engine requests at once (or failing the finals)."""

    def __init__(self, session: Session, fail_finals: bool = False) -> None:
        self.session = session
        self.events: list = []
        self.requests: list[EngineRequest] = []
        self.fail_finals = fail_finals

    def run(self, outputs) -> None:
        for item in outputs:
            if isinstance(item, EngineRequest):
                self.requests.append(item)
                if item.kind == "final" and self.fail_finals:
                    self.run(self.session.on_result(item, None, error="boom"))
                else:
                    self.run(
                        self.session.on_result(
                            item, fake_words(item.audio), queue_ms=5, compute_ms=7
                        )
                    )
            else:
                self.events.append(item)

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture(scope="module")
def speech():
    clips = librivox_clips()[:3]
    return [audio for _, audio, _ in clips]


def stream(session: Session, audio: np.ndarray, frame_ms: int = 100, **kw) -> Driver:
    driver = Driver(session, **kw)
    driver.run(session.start())
    data = to_s16le(audio)
    for chunk in chunks(data, RATE * 2 * frame_ms // 1000):
        driver.run(session.feed_audio(chunk))
    return driver


def test_one_final_per_utterance_with_partials_first(speech):
    session = Session("s1", SessionConfig())
    driver = stream(session, joined(speech))
    driver.run(session.close())
    finals = driver.of(FinalTranscript)
    assert len(finals) == 3
    assert isinstance(driver.events[0], SessionStarted)
    assert isinstance(driver.events[-1], SessionClosed)
    assert driver.events[-1].segments == 3
    # Utterances sit at 2 s + previous clips + gaps; each final covers its clip.
    starts, t = [], 0.0
    for clip in speech:
        t += 2.0
        starts.append(t * 1000)
        t += len(clip) / RATE
    for final, start, clip in zip(finals, starts, speech, strict=True):
        assert abs(final.start_ms - start) < 600
        assert abs(final.end_ms - (start + len(clip) * 1000 / RATE)) < 1200
        assert final.reason == "endpoint"
        assert final.latency.queue_ms == 5 and final.latency.compute_ms == 7
        assert all(
            final.start_ms <= w.start_ms <= w.end_ms <= final.end_ms + WORD_MS for w in final.words
        )
    for seg in {f.segment_id for f in finals}:
        index = next(
            i
            for i, e in enumerate(driver.events)
            if isinstance(e, FinalTranscript) and e.segment_id == seg
        )
        partials = [
            e
            for e in driver.events[:index]
            if isinstance(e, PartialTranscript) and e.segment_id == seg
        ]
        assert partials, "partials arrive before the final"
        stable = [p.stable_text for p in partials]
        assert all(b.startswith(a) for a, b in zip(stable, stable[1:], strict=False))
        assert not [
            e
            for e in driver.events[index:]
            if isinstance(e, PartialTranscript) and e.segment_id == seg
        ]


def test_speech_events_bracket_each_segment(speech):
    session = Session("s2", SessionConfig(interim_results=False))
    driver = stream(session, joined(speech[:2]))
    driver.run(session.close())
    started, stopped = driver.of(SpeechStarted), driver.of(SpeechStopped)
    assert len(started) == len(stopped) == 2
    assert not driver.of(PartialTranscript)
    for a, b, final in zip(started, stopped, driver.of(FinalTranscript), strict=True):
        assert final.start_ms <= a.ms < b.ms <= final.end_ms


def test_every_sample_is_in_one_final_or_a_gap(speech):
    session = Session("s3", SessionConfig())
    audio = joined(speech[:2], silence_s=1.0)
    driver = stream(session, audio, frame_ms=37)
    driver.run(session.close())
    finals = driver.of(FinalTranscript)
    spans = sorted((f.start_ms, f.end_ms) for f in finals)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # no overlap
    final_audio = [len(r.audio) for r in driver.requests if r.kind == "final"]
    assert len(final_audio) == len(finals) == 2
    for samples, final in zip(final_audio, finals, strict=True):
        assert abs(samples - (final.end_ms - final.start_ms) * RATE // 1000) <= RATE // 1000


def test_finalize_flushes_open_segment_and_keeps_session(speech):
    session = Session("s4", SessionConfig())
    clip = speech[0]
    driver = stream(session, clip[: len(clip) // 2])
    assert not driver.of(FinalTranscript)
    driver.run(session.finalize())
    (final,) = driver.of(FinalTranscript)
    assert final.from_finalize and final.reason == "flush"
    assert session.state == "open"
    for chunk in chunks(to_s16le(joined([clip])), 3200):
        driver.run(session.feed_audio(chunk))
    driver.run(session.close())
    assert len(driver.of(FinalTranscript)) == 2
    assert driver.of(SessionClosed)


def test_two_channels_give_per_channel_finals(speech):
    a, b = speech[0], speech[1]
    left = joined([a], silence_s=1.0)
    right = joined([b], silence_s=3.0)
    n = max(len(left), len(right))
    stereo = np.zeros((n, 2), dtype=np.float32)
    stereo[: len(left), 0] = left
    stereo[: len(right), 1] = right
    session = Session("s5", SessionConfig(channels=2))
    driver = stream(session, stereo.reshape(-1))
    driver.run(session.close())
    finals = driver.of(FinalTranscript)
    assert sorted(f.channel for f in finals) == [0, 1]
    by_channel = {f.channel: f for f in finals}
    assert abs(by_channel[0].start_ms - 1000) < 600
    assert abs(by_channel[1].start_ms - 3000) < 600


def test_mulaw_8k_input(speech):
    from engine.audio import resample
    from streaming.core.audio import encode_mulaw

    audio = resample(joined(speech[:1], silence_s=1.0), RATE, 8000)
    session = Session("s6", SessionConfig(encoding="mulaw", sample_rate=8000))
    driver = Driver(session)
    for chunk in chunks(encode_mulaw(audio), 160):
        driver.run(session.feed_audio(chunk))
    driver.run(session.close())
    (final,) = driver.of(FinalTranscript)
    assert abs(final.start_ms - 1000) < 600
    assert session.audio_ms == pytest.approx(len(audio) / 8, abs=5)


def test_failed_final_reports_error_and_session_still_closes(speech):
    session = Session("s7", SessionConfig())
    driver = stream(session, joined(speech[:1]), fail_finals=True)
    driver.run(session.close())
    (error,) = driver.of(ErrorEvent)
    assert error.code == "engine_error" and "boom" in error.message
    assert driver.of(SessionClosed)


def test_audio_after_close_is_refused(speech):
    session = Session("s8", SessionConfig())
    driver = Driver(session)
    driver.run(session.close())
    driver.run(session.feed_audio(b"\x00\x00" * 160))
    assert driver.of(ErrorEvent)[0].code == "session_closing"


def test_late_partial_after_final_is_ignored(speech):
    session = Session("s9", SessionConfig())
    driver = Driver(session)
    held = []
    for chunk in chunks(to_s16le(joined(speech[:1])), 3200):
        for item in session.feed_audio(chunk):
            if isinstance(item, EngineRequest) and item.kind == "partial":
                held.append(item)  # answered only after the final
            else:
                driver.run([item])
    driver.run(session.close())
    assert held and driver.of(FinalTranscript)
    for request in held:
        assert session.on_result(request, fake_words(request.audio)) == []


def slot_words(request: EngineRequest) -> Hypothesis:
    """A recogniser that is always right: one word per 300 ms slot of the segment, named by the
    slot, with times from the start of the audio it was given (a window of the segment)."""
    offset = request.window.start_ms
    duration = len(request.audio) * 1000 // RATE
    first, last = -(-offset // WORD_MS), (offset + duration) // WORD_MS
    words = [
        Word(f"w{k}", k * WORD_MS - offset, (k + 1) * WORD_MS - offset, 0.9)
        for k in range(first, last)
    ]
    return Hypothesis(" ".join(w.word for w in words), words=words, duration_ms=duration)


@pytest.mark.parametrize("window_ms", [0, 600, 1000])
def test_partials_decode_a_window_after_the_committed_words(speech, window_ms):
    session = Session("s1", SessionConfig(partial_window_ms=window_ms))
    requests: list[EngineRequest] = []
    partials: list[PartialTranscript] = []

    def answer(outputs) -> None:
        for item in outputs:
            if isinstance(item, EngineRequest):
                requests.append(item)
                answer(session.on_result(item, slot_words(item)))
            elif isinstance(item, PartialTranscript):
                partials.append(item)

    answer(session.start())
    for chunk in chunks(to_s16le(speech[0]), RATE * 2 // 10):
        answer(session.feed_audio(chunk))
    answer(session.close())
    asked = [r for r in requests if r.kind == "partial"]
    assert len(asked) > 10
    # committed words: exactly the slots in order, each once, whatever the window
    stable = partials[-1].stable_text.split()
    assert len(stable) > 10
    assert stable == [f"w{k}" for k in range(len(stable))]
    for earlier, later in zip(partials, partials[1:], strict=False):
        assert later.stable_text.startswith(earlier.stable_text)
    for request in asked:
        if window_ms == 0:
            assert request.window.start_ms == 0
        else:
            # the window starts at most `window_ms` before the end of the committed words it
            # holds as its prefix, so its audio stays short however long the segment grows
            prefix = request.window.prefix
            if prefix:
                assert prefix[-1].end_ms - prefix[0].start_ms <= window_ms + WORD_MS
                assert prefix[0].start_ms >= 0
    longest = max(len(r.audio) for r in asked) * 1000 // RATE
    if window_ms:
        assert longest < 4000  # the clip is ~7 s: the window never grew with the segment
    else:
        assert longest > 6000


def test_partial_requests_say_whether_their_segment_has_shown_words(speech):
    session = Session("s1", SessionConfig())
    flags: list[tuple[int, bool]] = []

    def answer(outputs) -> None:
        for item in outputs:
            if isinstance(item, EngineRequest):
                if item.kind == "partial":
                    flags.append((item.segment_id, item.first_text))
                answer(session.on_result(item, slot_words(item)))

    answer(session.start())
    for chunk in chunks(to_s16le(joined(speech[:2])), RATE * 2 // 10):
        answer(session.feed_audio(chunk))
    answer(session.close())
    segments = sorted({s for s, _ in flags})
    assert len(segments) == 2
    for segment in segments:
        seen = [first for s, first in flags if s == segment]
        # until a partial shows words (slot words: from the first 300 ms on), then never again
        assert seen[0] and not seen[-1]
        assert seen == sorted(seen, reverse=True)


def test_every_request_carries_the_session_language_as_a_primary_subtag(speech):
    """Partials and finals alike, so the engine decodes every piece in the client's language;
    a `session.update` takes effect on the next request, and empty leaves it to the model."""
    session = Session("s1", SessionConfig(language="fr-CA"))
    driver = stream(session, joined(speech[:1]))
    assert {r.kind for r in driver.requests} == {"partial", "final"}
    assert {r.language for r in driver.requests} == {"fr"}
    session.options = SessionConfig(language="")
    driver = stream(session, joined(speech[1:2]))
    driver.run(session.close())
    assert driver.requests and {r.language for r in driver.requests} == {None}

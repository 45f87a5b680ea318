"""Session resume in the sans-I/O protocol: whatever moment the link drops and however many
messages the client got before, the client ends with every message once, in order, and the
transcript of a stream that was never cut."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.test_protocol import FRAME, answer, protocol, sent, speech, stream_audio

__all__ = ["speech"]  # the fixture, shared with test_protocol
PER_SESSION = ("seq", "session_id", "resume_token")  # differ between two sessions


def uncut(audio: bytes) -> list[dict]:
    stream = protocol()
    steps = [stream.open(), *stream_audio(stream, audio)]
    steps += answer(stream, stream.receive_text(json.dumps({"type": "close"}), 9.0))
    return sent(steps)


def without_seq(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in PER_SESSION} for m in messages]


def test_resume_gives_every_message_once_and_the_uncut_transcript(speech):
    reference = uncut(speech)
    frames = len(speech) // FRAME

    @settings(max_examples=40, deadline=None)
    @given(cut=st.integers(0, frames), got=st.floats(0.0, 1.0), lost=st.integers(0, 5))
    def check(cut: int, got: float, lost: int) -> None:
        """The client sent `cut` frames, the last `lost` of them never arrived, and it got
        the first `got` of the messages the server sent before the link dropped."""
        arrived = max(0, cut - lost) * FRAME
        stream = protocol()
        before = sent([stream.open(), *stream_audio(stream, speech[:arrived])])
        received = before[: max(1, int(len(before) * got))]
        stream.detach(1.0)
        missed, actions = stream.resume(received[-1]["seq"], 3.5)
        resumed = json.loads(actions.send[0])
        assert resumed["type"] == "session.resumed" and resumed["gap_ms"] == 2500
        assert resumed["audio_bytes"] == arrived  # the client resends from here
        after = sent(
            [
                *stream_audio(stream, speech[resumed["audio_bytes"] :]),
                *answer(stream, stream.receive_text(json.dumps({"type": "close"}), 9.0)),
            ]
        )
        missed = [json.loads(frame) for frame in missed]
        whole = [*received, *missed, resumed, *after]
        assert [m["seq"] for m in whole] == list(range(1, len(whole) + 1))
        assert resumed["replayed"] == len(missed) and resumed["dropped"] == 0
        assert without_seq([*received, *missed, *after]) == without_seq(reference)

    check()


@pytest.mark.parametrize("kept", [10, 12])
def test_a_small_buffer_counts_what_it_dropped(speech, kept):
    stream = protocol(resume_buffer_events=kept)
    before = sent([stream.open(), *stream_audio(stream, speech)])
    assert len(before) > kept
    stream.detach(0.0)
    missed, actions = stream.resume(0, 1.0)
    resumed = json.loads(actions.send[0])
    assert [json.loads(f) for f in missed] == before[-kept:]
    assert resumed["dropped"] == len(before) - kept and resumed["replayed"] == kept


def test_resume_refuses_a_last_seq_never_sent(speech):
    stream = protocol()
    stream.open()
    stream.detach(0.0)
    with pytest.raises(ValueError, match="last_seq must be 0 to 1"):
        stream.resume(2, 1.0)
    missed, actions = stream.resume(1, 1.0)  # the refusal changed nothing
    assert missed == [] and json.loads(actions.send[0])["seq"] == 2


def test_no_token_and_no_buffer_without_a_window():
    stream = protocol(resume_window_s=0)
    started = json.loads(stream.open().send[0])
    assert started["resume_token"] is None and not stream.replay


def test_tokens_are_unguessable_and_distinct():
    tokens = {json.loads(protocol().open().send[0])["resume_token"] for _ in range(50)}
    assert len(tokens) == 50 and all(len(t) >= 32 for t in tokens)


def test_expire_flushes_the_open_segment_and_closes(speech):
    stream = protocol()
    stream.open()
    steps = stream_audio(stream, speech[: len(speech) * 2 // 3])  # mid-speech
    stream.detach(0.0)
    out = sent(answer(stream, stream.expire()))
    kinds = [m["type"] for m in out]
    assert kinds[-1] == "session.closed" and out[-1]["reason"] == "resume_expired"
    assert "transcript.final" in kinds and not stream.reading
    assert steps  # the audio was fed

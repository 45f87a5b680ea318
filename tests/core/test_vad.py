"""The per-channel VAD segmenter on real LibriVox speech and on constructed signals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streaming.core.vad import (
    Gap,
    SegmentClosed,
    Segmenter,
    SegmenterConfig,
    SpeechStarted,
    SpeechStopped,
)

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
CLIPS = ["0870", "0880", "0890"]  # 7.1 s, 3.0 s and 5.3 s of read speech
SR = 16000
FRAME = 320  # default 20 ms
PAD = 300 * 16
HANGOVER = 500 * 16


def clip(name: str) -> np.ndarray:
    path = LIBRIVOX / f"sense_and_sensibility_01_austen_64kb-{name}.wav"
    if not path.exists():
        pytest.skip("needs Debian pocketsphinx-testdata (real speech)")
    audio, rate = sf.read(path, dtype="float32")
    assert rate == SR
    return audio


def frame_dbfs(audio: np.ndarray) -> np.ndarray:
    count = len(audio) // FRAME
    frames = audio[: count * FRAME].reshape(count, FRAME).astype(np.float64)
    return 10 * np.log10((frames**2).mean(axis=1) + 1e-20)


def loud_span(audio: np.ndarray, dbfs: float = -35.0) -> tuple[int, int]:
    """First and last sample of the frames clearly carrying speech."""
    loud = np.flatnonzero(frame_dbfs(audio) >= dbfs)
    return int(loud[0]) * FRAME, (int(loud[-1]) + 1) * FRAME


def trimmed(name: str) -> np.ndarray:
    """A clip cut to its loud part, so that clips put back to back leave no pause."""
    audio = clip(name)
    start, end = loud_span(audio)
    return audio[start:end]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), np.float32)


def noise(length: int, dbfs: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 10 ** (dbfs / 20), length).astype(np.float32)


def run(segmenter: Segmenter, audio: np.ndarray, flush: bool = True) -> list:
    events = segmenter.feed(audio)
    return events + segmenter.flush() if flush else events


def of(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def as_tuples(events: list) -> list[tuple]:
    """Events in comparable form (SegmentClosed holds an array)."""
    out = []
    for e in events:
        if isinstance(e, SegmentClosed):
            out.append(
                ("closed", e.segment_id, e.start_sample, e.end_sample, e.reason, e.audio.tobytes())
            )
        else:
            out.append((type(e).__name__, *vars(e).values()))
    return out


def assert_consistent(events: list, stream: np.ndarray) -> None:
    """Segments and gaps are disjoint, in order, inside the stream, and segments hold exactly
    their stream samples; ids increase by one."""
    spans = [(e.start_sample, e.end_sample) for e in events if isinstance(e, SegmentClosed | Gap)]
    for start, end in spans:
        assert 0 <= start < end <= len(stream)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start
    closed = of(events, SegmentClosed)
    assert [s.segment_id for s in closed] == list(range(len(closed)))
    for seg in closed:
        np.testing.assert_array_equal(seg.audio, stream[seg.start_sample : seg.end_sample])


@pytest.fixture(scope="module")
def three_clips() -> tuple[np.ndarray, list[tuple[int, int]], list[np.ndarray]]:
    """1 s lead-in, three clips each followed by 2 s of silence, all under -60 dBFS noise."""
    parts, bounds, clips, pos = [silence(1.0)], [], [], SR
    for name in CLIPS:
        audio = clip(name)
        clips.append(audio)
        bounds.append((pos, pos + len(audio)))
        parts += [audio, silence(2.0)]
        pos += len(audio) + 2 * SR
    stream = np.concatenate(parts)
    return stream + noise(len(stream), -60.0), bounds, clips


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_one_segment_per_clip(three_clips, frame_ms):
    # Each clip is one sentence; its longest internal pause is under 100 ms (webrtcvad at 20 ms
    # frames, see frame_dbfs), far below the 500 ms hangover, while 2 s of silence separates
    # the clips: so exactly one segment per clip, each closed by the endpoint.
    stream, bounds, clips = three_clips
    events = run(Segmenter(SegmenterConfig(frame_ms=frame_ms)), stream)
    closed = of(events, SegmentClosed)
    assert [s.reason for s in closed] == ["endpoint"] * 3
    assert not of(events, Gap)
    slack = PAD + HANGOVER + frame_ms * 16
    for seg, (start, end), audio in zip(closed, bounds, clips, strict=True):
        assert abs(seg.start_sample - start) <= slack
        assert abs(seg.end_sample - end) <= slack
        loud_start, loud_end = loud_span(audio)
        assert seg.start_sample <= start + loud_start and seg.end_sample >= start + loud_end
    assert_consistent(events, stream)


def test_speech_events_mark_onset_and_end(three_clips):
    stream, bounds, clips = three_clips
    events = run(Segmenter(), stream)
    kinds = [type(e) for e in events]
    assert kinds == [SpeechStarted, SpeechStopped, SegmentClosed] * 3
    for i, (start, _), audio in zip(range(3), bounds, clips, strict=True):
        started, stopped, seg = events[3 * i : 3 * i + 3]
        assert started.segment_id == stopped.segment_id == seg.segment_id == i
        loud_start, loud_end = loud_span(audio)
        # The onset is the first voiced frame: within the 100 ms start window of loud speech.
        assert abs(started.sample - (start + loud_start)) <= 100 * 16
        # Speech ends after the last loud frame and inside the clip.
        assert start + loud_end <= stopped.sample <= start + len(audio)
        # Padding is exactly speech_pad_ms on each side (nothing earlier limits it here).
        assert seg.start_sample == started.sample - PAD
        assert seg.end_sample == stopped.sample + PAD
        assert started.ms == started.sample / 16 and seg.end_ms == seg.end_sample / 16


def test_chunk_sizes_do_not_change_events(three_clips):
    stream, _, _ = three_clips
    burst = noise(150 * 16, -20.0, seed=3)  # becomes a Gap
    stream = np.concatenate([stream, burst, silence(1.0), clip("0930")[: 2 * SR]])
    whole = run(Segmenter(), stream)
    assert of(whole, Gap) and of(whole, SegmentClosed)[-1].reason == "flush"

    rng = np.random.default_rng(7)
    segmenter, events, pos = Segmenter(), [], 0
    while pos < len(stream):
        size = int(rng.choice([0, 1, 7, 160, 333, 1600, 4801, 40000]))
        events += segmenter.feed(stream[pos : pos + size])
        pos += size
    events += segmenter.flush()
    assert as_tuples(events) == as_tuples(whole)
    assert segmenter.samples_seen == len(stream)


def test_16bit_pcm_is_segmented_alike_in_any_chunking_and_kept_exactly(three_clips):
    # Fed as a client sends it, 16-bit PCM reaches webrtcvad unchanged, and the segments hold
    # it as float32 / 32768 whatever the chunk sizes (a frame may straddle feeds).
    stream, _, _ = three_clips
    pcm = np.clip(np.rint(stream * 32768), -32768, 32767).astype(np.int16)
    whole = Segmenter()
    events = whole.feed_pcm16(pcm) + whole.flush()
    closed = of(events, SegmentClosed)
    assert len(closed) == 3
    for seg in closed:
        expected = pcm[seg.start_sample : seg.end_sample].astype(np.float32) / 32768
        assert seg.audio.dtype == np.float32 and seg.audio.tobytes() == expected.tobytes()
    floats = run(Segmenter(), pcm.astype(np.float32) / 32768)
    assert [t[:3] for t in as_tuples(floats)] == [t[:3] for t in as_tuples(events)]

    rng = np.random.default_rng(5)
    segmenter, chunked, pos = Segmenter(), [], 0
    while pos < len(pcm):
        size = int(rng.choice([0, 1, 7, 321, 1600, 4801, 40000]))
        chunked += segmenter.feed_pcm16(pcm[pos : pos + size])
        pos += size
    chunked += segmenter.flush()
    assert as_tuples(chunked) == as_tuples(events)
    with pytest.raises(ValueError, match="throughout"):
        segmenter.feed(stream[:160])
    with pytest.raises(TypeError, match="int16"):
        Segmenter().feed_pcm16(stream[:160])


def test_flush_closes_open_segment_and_segmenter_goes_on():
    first = np.concatenate([silence(1.0), clip("0880"), noise(123, -60.0)])
    segmenter = Segmenter()
    events = segmenter.feed(first)
    assert of(events, SpeechStarted) and not of(events, SegmentClosed)
    assert segmenter.open_segment() is not None

    flushed = segmenter.flush()
    assert [type(e) for e in flushed] == [SpeechStopped, SegmentClosed]
    seg = flushed[1]
    assert seg.reason == "flush" and seg.segment_id == 0
    assert seg.end_sample == segmenter.samples_seen == len(first)  # the partial frame included
    assert segmenter.open_segment() is None
    assert segmenter.flush() == []

    second = np.concatenate([silence(2.0), clip("0930"), silence(2.0)])
    later = segmenter.feed(second)
    closed = of(later, SegmentClosed)
    assert [(s.segment_id, s.reason) for s in closed] == [(1, "endpoint")]
    assert closed[0].start_sample >= seg.end_sample
    assert_consistent(flushed + later, np.concatenate([first, second]))


def test_flush_of_a_short_burst_reports_a_gap():
    segmenter = Segmenter()
    assert segmenter.feed(np.concatenate([silence(1.0), noise(120 * 16, -20.0)])) == []
    assert segmenter.flush() == [Gap(SR - PAD, segmenter.samples_seen, "too_short")]


def test_open_segment_is_the_audio_so_far():
    stream = np.concatenate([silence(1.0), clip("0870")])
    segmenter = Segmenter()
    segmenter.feed(stream[: 3 * SR + 77])
    current = segmenter.open_segment()
    assert current is not None and current.segment_id == 0
    assert current.end_sample == 3 * SR  # whole frames only; 77 samples wait for the next
    np.testing.assert_array_equal(current.audio, stream[current.start_sample : 3 * SR])
    assert not current.audio.flags.writeable

    closed = of(segmenter.feed(stream[3 * SR + 77 :]) + segmenter.flush(), SegmentClosed)
    assert closed[0].start_sample == current.start_sample
    np.testing.assert_array_equal(closed[0].audio[: len(current.audio)], current.audio)


def continuous_speech(seconds: float) -> np.ndarray:
    """Trimmed clips back to back: speech with no pause long enough to end a segment."""
    names = ["0870", "0880", "0890", "0920", "0930"]
    parts, total = [], 0
    while total < seconds * SR:
        parts.append(trimmed(names[len(parts) % len(names)]))
        total += len(parts[-1])
    return np.concatenate(parts)[: int(seconds * SR)]


def test_max_length_split_at_the_quietest_point():
    cfg = SegmenterConfig(max_segment_ms=6000)
    speech = continuous_speech(14.0)
    dip_start, dip_end = 5 * SR, 5 * SR + 3 * FRAME  # 60 ms of silence in the last third
    speech[dip_start:dip_end] = 0.0
    stream = np.concatenate([speech, silence(2.0)])
    events = run(Segmenter(cfg), stream)

    assert len(of(events, SpeechStarted)) == len(of(events, SpeechStopped)) == 1
    closed = of(events, SegmentClosed)
    assert [s.reason for s in closed] == ["max_length", "max_length", "endpoint"]
    assert dip_start <= closed[0].end_sample < dip_end
    for before, after in zip(closed, closed[1:], strict=False):
        assert after.start_sample == before.end_sample  # nothing lost, nothing twice
    assert all(len(s.audio) <= 6000 * 16 for s in closed)
    joined = np.concatenate([s.audio for s in closed])
    np.testing.assert_array_equal(joined, stream[closed[0].start_sample : closed[-1].end_sample])
    assert_consistent(events, stream)


def test_memory_stays_bounded_on_endless_speech():
    segmenter = Segmenter()
    most = 0
    for piece in np.split(continuous_speech(60.0), 600):
        segmenter.feed(piece)
        most = max(most, segmenter.buffered_samples)
    # The open segment (at most max_segment_ms) plus the feed it started in.
    assert 14 * SR < most <= 15 * SR + 1600 + FRAME
    segmenter.feed(silence(2.0))
    assert segmenter.open_segment() is None
    assert segmenter.buffered_samples <= PAD + 100 * 16 + 2 * SR


def test_segment_audio_is_the_stream_bit_for_bit():
    # Padded segments, a max-length split and a flush, fed in odd chunk sizes (one over the
    # 1 s block): every snapshot and every closed segment holds exactly its stream samples.
    cfg = SegmenterConfig(max_segment_ms=6000)
    stream = np.concatenate(
        [silence(1.0), continuous_speech(9.0), silence(1.5), clip("0880"), silence(1.0)]
        + [clip("0890"), noise(2345, -60.0)]
    )
    stream = stream + noise(len(stream), -60.0, seed=4)
    segmenter, events, snapshots, pos = Segmenter(cfg), [], 0, 0
    rng = np.random.default_rng(11)
    while pos < len(stream):
        size = int(rng.choice([1, 13, 319, 321, 1601, 4799, 17000]))
        events += segmenter.feed(stream[pos : pos + size])
        pos += size
        current = segmenter.open_segment()
        if current is not None:
            assert not current.audio.flags.writeable
            expected = stream[current.start_sample : current.end_sample]
            assert current.audio.tobytes() == expected.tobytes()
            snapshots += 1
    events += segmenter.flush()

    closed = of(events, SegmentClosed)
    assert snapshots > 30
    assert [s.reason for s in closed] == ["max_length", "endpoint", "endpoint", "flush"]
    onsets = {e.segment_id: e.sample for e in of(events, SpeechStarted)}
    ends = {e.segment_id: e.sample for e in of(events, SpeechStopped)}
    for seg in closed:
        assert not seg.audio.flags.writeable
        assert seg.audio.tobytes() == stream[seg.start_sample : seg.end_sample].tobytes()
        if seg.segment_id in onsets:  # not the continuation of a split
            assert seg.start_sample == onsets[seg.segment_id] - PAD
        if seg.reason == "endpoint":
            assert seg.end_sample == ends[seg.segment_id] + PAD
    assert_consistent(events, stream)


def test_audio_handed_out_is_never_overwritten():
    # The scheduler may hold a partial's audio (or a final's) while the stream goes on: the
    # memory under it must not be reused as the segment grows, is split or closes, nor for
    # later segments. Memory stays bounded all the same.
    cfg = SegmenterConfig(max_segment_ms=6000)
    one_round = [silence(0.5), continuous_speech(14.0), silence(1.0), clip("0880"), silence(2.0)]
    stream = np.concatenate(one_round * 2)
    segmenter, held, closed, most = Segmenter(cfg), [], [], 0
    for piece in np.array_split(stream, len(stream) // 1600):
        for event in segmenter.feed(piece):
            if isinstance(event, SegmentClosed):
                closed.append(event)
                held.append((event.audio, event.audio.tobytes()))
        current = segmenter.open_segment()
        if current is not None:
            held.append((current.audio, current.audio.tobytes()))
        most = max(most, segmenter.buffered_samples)
    assert [s.reason for s in closed].count("max_length") >= 4 and len(closed) >= 8
    for audio, data in held:
        assert audio.tobytes() == data
    assert most <= 6000 * 16 + 1601 + FRAME
    assert segmenter.buffered_samples <= PAD + 100 * 16 + 2 * SR


def test_samples_past_full_scale_are_clipped_for_webrtcvad():
    # Resampled audio can overshoot [-1, 1] a little: webrtcvad must get it clipped to full
    # scale, not wrapped around, so it decides as on the clipped stream. (Wrapped, the hum
    # after the speech would open a segment instead of making a gap.)
    tone = 1.1 * np.sin(2 * np.pi * 100 * np.arange(2 * SR) / SR)
    stream = np.concatenate([silence(1.0), clip("0870") * 1.5, silence(1.0), tone, silence(1.0)])
    stream = stream.astype(np.float32)
    cfg = SegmenterConfig(aggressiveness=3)
    events = run(Segmenter(cfg), stream)
    assert len(of(events, SegmentClosed)) == len(of(events, Gap)) == 1
    clipped = run(Segmenter(cfg), np.clip(stream, -1.0, 1.0))
    assert [t[:5] for t in as_tuples(events)] == [t[:5] for t in as_tuples(clipped)]
    assert_consistent(events, stream)


def test_short_bursts_become_gaps_and_take_no_id():
    # Loud crackle and a noise burst: webrtcvad calls them speech, but they last under
    # min_segment_ms, so they are reported as gaps (padding included) and never start speech.
    crackle = np.zeros(150 * 16, np.float32)
    crackle[::80], crackle[1::80] = 0.9, -0.9
    burst = noise(200 * 16, -20.0, seed=1)
    stream = np.concatenate(
        [silence(1.0), crackle, silence(1.0), burst, silence(1.0), clip("0880"), silence(1.0)]
    )
    events = run(Segmenter(), stream)
    gaps = of(events, Gap)
    assert [g.reason for g in gaps] == ["too_short", "too_short"]
    assert gaps[0].start_sample == SR - PAD and gaps[0].end_sample >= SR + len(crackle)
    burst_start = 2 * SR + len(crackle)
    assert burst_start - PAD - FRAME < gaps[1].start_sample <= burst_start - PAD  # frame grid
    assert gaps[1].end_sample >= burst_start + len(burst)
    assert gaps[0].end_ms == gaps[0].end_sample / 16
    assert [type(e) for e in events if not isinstance(e, Gap)] == [
        SpeechStarted,
        SpeechStopped,
        SegmentClosed,
    ]
    assert of(events, SegmentClosed)[0].segment_id == 0
    assert_consistent(events, stream)


def test_sparse_clicks_open_nothing():
    clicks = silence(3.0)
    clicks[::4000], clicks[1::4000] = 0.9, -0.9  # 4 clicks a second
    assert run(Segmenter(), clicks) == []
    # webrtcvad alone keeps calling the silence after each click speech: the gate stops it.
    ungated = SegmenterConfig(energy_gate_dbfs=float("-inf"))
    assert of(run(Segmenter(ungated), clicks), SegmentClosed)


@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
def test_energy_gate_keeps_hiss_and_hum_out(aggressiveness):
    cfg = SegmenterConfig(aggressiveness=aggressiveness)
    t = np.arange(10 * SR) / SR
    hum = sum(np.sin(2 * np.pi * 50 * k * t) / k for k in range(1, 8))  # 50 Hz and harmonics
    hum = (hum / np.sqrt(np.mean(hum**2)) * 10 ** (-50 / 20)).astype(np.float32)
    assert run(Segmenter(cfg), hum) == []
    hiss = noise(10 * SR, -50.0, seed=2)
    assert run(Segmenter(cfg), hiss) == []
    ungated = SegmenterConfig(aggressiveness=aggressiveness, energy_gate_dbfs=float("-inf"))
    assert run(Segmenter(ungated), hiss) != []  # webrtcvad alone lets white noise in


def test_energy_gate_ignores_a_faint_talker():
    # Crosstalk from a far-away speaker at -60 dBFS: webrtcvad finds the speech, the gate
    # keeps it from becoming a segment.
    audio = clip("0890")
    faint = audio / np.sqrt(np.mean(audio**2)) * 10 ** (-60 / 20)
    stream = np.concatenate([silence(1.0), faint, silence(1.0)]).astype(np.float32)
    assert run(Segmenter(), stream) == []
    ungated = SegmenterConfig(energy_gate_dbfs=float("-inf"))
    assert len(of(run(Segmenter(ungated), stream), SegmentClosed)) == 1


def test_padding_never_reaches_into_the_previous_segment():
    # 550 ms between two utterances: longer than the hangover, so two segments, but shorter
    # than hangover + padding, so the second one's padding is cut where the first one ends.
    first, second = trimmed("0880"), trimmed("0930")
    stream = np.concatenate([silence(1.0), first, silence(0.55), second, silence(1.0)])
    stream = stream + noise(len(stream), -60.0)
    events = run(Segmenter(), stream)
    a, b = of(events, SegmentClosed)
    onset = of(events, SpeechStarted)[1].sample
    assert onset - PAD < a.end_sample  # full padding would have overlapped
    assert b.start_sample == a.end_sample
    assert_consistent(events, stream)


def test_feed_checks_its_input():
    segmenter = Segmenter()
    assert segmenter.feed(np.zeros(0, np.float32)) == []
    with pytest.raises(ValueError, match="one-dimensional"):
        segmenter.feed(np.zeros((2, 160), np.float32))
    with pytest.raises(TypeError, match="floating point"):
        segmenter.feed(np.zeros(160, np.int16))
    segmenter.feed(np.zeros(500, np.float64))
    assert segmenter.samples_seen == 500


@pytest.mark.parametrize(
    "field, value",
    [
        ("frame_ms", 25),
        ("frame_ms", 20.0),
        ("aggressiveness", 4),
        ("aggressiveness", True),
        ("speech_pad_ms", -1),
        ("hangover_ms", 0),
        ("start_ms", 0),
        ("start_window_ms", 40),
        ("min_segment_ms", -10),
        ("max_segment_ms", 3000),
        ("energy_gate_dbfs", 3.0),
        ("energy_gate_dbfs", float("nan")),
        ("energy_gate_dbfs", "-45"),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SegmenterConfig(**{field: value})


def test_config_defaults_and_limits():
    cfg = SegmenterConfig()
    assert (cfg.frame_ms, cfg.aggressiveness, cfg.speech_pad_ms) == (20, 2, 300)
    assert (cfg.hangover_ms, cfg.start_ms, cfg.start_window_ms) == (500, 60, 100)
    assert (cfg.min_segment_ms, cfg.max_segment_ms, cfg.energy_gate_dbfs) == (250, 15000, -45.0)
    SegmenterConfig(max_segment_ms=3 * (300 + 250 + 500 + 40))  # the least allowed
    SegmenterConfig(frame_ms=10, energy_gate_dbfs=float("-inf"))

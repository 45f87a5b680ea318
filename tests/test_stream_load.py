"""The stream load benchmark: its pure parts, and a short run against a real server process with
the noop engine (the real figures come from running the benchmark itself)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import numpy as np
import pytest

from benchmarks import results, stream_load
from benchmarks.stream_load import (
    Clip,
    StreamPlan,
    StreamRecord,
    Tape,
    Utterance,
    by_label,
    frame_due,
    machine_busy_seconds,
    measure_stream,
    parse_prometheus,
    percentile,
    plan_stream,
    proc_cpu_seconds,
    scalar,
    speech_onset_ms,
    spoken_at,
    summary,
)
from tests.streams import librivox_clips

# --- percentiles ------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank():
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert [percentile(values, q) for q in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert percentile([7.0], 95) == 7.0
    # 20 samples: p95 is the 19th, so one outlier in 20 does not set it
    assert percentile([10.0] * 19 + [900.0], 95) == 10.0
    assert percentile([10.0] * 18 + [800.0, 900.0], 95) == 800.0


def test_summary_of_nothing_has_no_figures():
    assert summary([]) == {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    assert summary([1.04, 2.0, 3.0]) == {"n": 3, "p50": 2.0, "p95": 3.0, "p99": 3.0, "max": 3.0}


# --- audio time and clock time ----------------------------------------------------------------


def test_a_frame_leaves_once_its_audio_has_been_spoken():
    t0, frame_s = 1000.0, 0.1
    assert frame_due(t0, 0, frame_s) == pytest.approx(1000.1)
    assert spoken_at(t0, 2500) == pytest.approx(1002.5)
    for audio_ms in range(0, 3000, 7):
        frame = audio_ms // 100  # the frame that carries this audio
        sent = frame_due(t0, frame, frame_s)
        assert spoken_at(t0, audio_ms) < sent <= spoken_at(t0, audio_ms) + frame_s + 1e-9


def test_speech_onset_skips_the_quiet_lead_in():
    audio = np.concatenate([np.full(4000, 1e-3), np.full(8000, 0.3)]).astype(np.float32)
    assert speech_onset_ms(audio) == 250
    assert speech_onset_ms(np.zeros(1600, np.float32)) == 0


def _tape() -> Tape:
    """Two clips of 3 and 2 frames (100 ms) at frames 2 and 8 of a 12-frame period."""
    a = Clip("a", (b"a1", b"a2", b"a3"), onset_ms=50, duration_ms=280)
    b = Clip("b", (b"b1", b"b2"), onset_ms=0, duration_ms=200)
    return Tape(((2, a), (8, b)), period=12, silence=b".")


def test_a_stream_plays_whole_clips_only_in_stream_time(monkeypatch):
    monkeypatch.setattr(stream_load, "TAIL_MS", 200)
    tape = _tape()
    plan = plan_stream(tape, offset=0, n_frames=12, frame_ms=100)
    assert (
        plan.frames
        == [b".", b".", b"a1", b"a2", b"a3", b".", b".", b".", b"b1", b"b2"] + [b"."] * 2
    )
    assert plan.utterances == [Utterance(200, 250, 480), Utterance(800, 800, 1000)]
    # starting inside clip a: it is replaced by quiet; the tape wraps around to play a again
    plan = plan_stream(tape, offset=3, n_frames=16, frame_ms=100)
    assert plan.frames[:5] == [b".", b".", b".", b".", b"."] and plan.frames[5:7] == [b"b1", b"b2"]
    assert plan.utterances == [Utterance(500, 500, 700), Utterance(1100, 1150, 1380)]
    # a clip without TAIL_MS of quiet after it before the end is not played
    plan = plan_stream(tape, offset=0, n_frames=10, frame_ms=100)
    assert plan.frames[8:] == [b".", b"."] and len(plan.utterances) == 1


def test_streams_start_at_evenly_spread_points_of_the_tape(monkeypatch):
    monkeypatch.setattr(stream_load, "TAIL_MS", 200)
    tape = _tape()
    plans = stream_load.plan_streams(tape, count=4, seconds=1.2, frame_ms=100)
    assert plans == [plan_stream(tape, offset, 12, 100) for offset in (0, 3, 6, 9)]


def test_the_real_tape_is_built_from_the_librivox_clips():
    librivox_clips()  # skips when pocketsphinx-testdata is missing
    clips = stream_load.load_clips(100)
    assert len(clips) == 5 and all(len(f) == 3200 for c in clips for f in c.frames)
    assert all(150 <= c.onset_ms <= 400 for c in clips)
    tape = stream_load.build_tape(clips, 100)
    assert tape.period * 100 > sum(c.duration_ms for c in clips) + 5 * 1500


# --- measuring what a stream saw ---------------------------------------------------------------


def _partial(seg: int, rev: int, start: int, end: int, stable: str, volatile: str) -> dict:
    return {
        "type": "transcript.partial",
        "channel": 0,
        "segment_id": seg,
        "rev": rev,
        "start_ms": start,
        "end_ms": end,
        "stable_text": stable,
        "volatile_text": volatile,
    }


def _final(seg: int, start: int, end: int, words: list[tuple[str, int, int]]) -> dict:
    return {
        "type": "transcript.final",
        "channel": 0,
        "segment_id": seg,
        "start_ms": start,
        "end_ms": end,
        "text": " ".join(w for w, _, _ in words),
        "words": [{"word": w, "start_ms": s, "end_ms": e, "confidence": 1.0} for w, s, e in words],
        "latency": {"endpoint_ms": 500, "queue_ms": 20, "compute_ms": 30},
    }


def test_latencies_are_taken_from_when_the_audio_was_spoken():
    plan = StreamPlan(
        frames=[],
        utterances=[
            Utterance(1000, 1200, 3000),
            Utterance(6000, 6100, 8000),  # no final: missing
            Utterance(10000, 10300, 11000),  # only a final: its first text
        ],
    )
    t0 = 100.0
    messages = [
        (101.4, _partial(0, 1, 900, 1400, "", "")),  # empty: not shown text
        (101.5, _partial(0, 2, 900, 1500, "", "he")),
        (102.0, _partial(0, 3, 900, 2000, "he", "was")),
        (103.7, _final(0, 900, 3200, [("he", 1200, 1500), ("is", 1600, 2900)])),
        (106.5, _partial(1, 1, 5900, 6400, "", "")),
        (109.0, _final(2, 8600, 8900, [])),  # noise, no words, covers no utterance
        (111.9, _final(3, 9900, 11200, [("so", 10300, 10800)])),
        (112.0, {"type": "status", "lag_ms": 1500, "queued_audio_ms": 3000}),
        (112.5, {"type": "session.closed", "audio_ms": 12000, "segments": 4, "reason": "client"}),
    ]
    m = measure_stream(plan, StreamRecord(t0=t0, messages=messages))
    assert (m.utterances, m.finals, m.missing, m.extra_finals, m.empty_finals) == (3, 3, 1, 1, 1)
    assert m.first_text_ms == pytest.approx([300.0, 1600.0]) and m.no_partial == 1
    assert m.finalization_ms == pytest.approx([800.0, 1100.0])
    assert m.split_ms["endpoint"] == [500, 500] and m.split_ms["compute"] == [30, 30]
    assert m.split_ms["delivery"] == pytest.approx([250.0, 550.0])
    assert m.partial_delay_ms == pytest.approx([0.0, 0.0, 0.0, 100.0])
    assert m.partials == 4 and m.status_lag_ms == [1500] and m.closed
    assert m.segments[0] == ([("", ""), ("", "he"), ("he", "was")], "he is")


# --- CPU time and /metrics ---------------------------------------------------------------------


def test_process_cpu_time_counts_fields_after_the_command_name():
    fields = ["S"] + [str(n) for n in range(1, 11)] + ["250", "50", "7", "9"] + ["0"] * 30
    stat = "4242 (a (strange) name) " + " ".join(fields)
    assert proc_cpu_seconds(stat, 100) == pytest.approx(3.0)  # utime 250 + stime 50 ticks


def test_process_cpu_time_of_this_process_grows_when_it_works():
    before = stream_load.process_cpu_seconds(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert stream_load.process_cpu_seconds(os.getpid()) - before >= 0.03


def test_machine_busy_time_leaves_out_idle_and_iowait():
    stat = "cpu  100 10 50 1000 20 5 5 3 3 0\ncpu0 50 5 25 500 10 2 2 1 1 0\n"
    assert machine_busy_seconds(stat, 100) == pytest.approx(1.73)


def test_prometheus_text_is_parsed_by_name_and_labels():
    text = "\n".join(
        [
            "# HELP streamscribe_partials_dropped_total Partial requests dropped",
            "# TYPE streamscribe_partials_dropped_total counter",
            'streamscribe_partials_dropped_total{reason="superseded"} 12.0',
            'streamscribe_partials_dropped_total{reason="stale"} 3.0',
            "streamscribe_lag_seconds 0.25",
            'streamscribe_final_latency_seconds_bucket{le="+Inf",stage="queue"} 7.0',
            'odd_total{path="/a \\"b\\"",code="503"} 1e3',
            "",
        ]
    )
    samples = parse_prometheus(text)
    assert by_label(samples, "streamscribe_partials_dropped_total", "reason") == {
        "superseded": 12.0,
        "stale": 3.0,
    }
    assert scalar(samples, "streamscribe_lag_seconds") == 0.25
    assert scalar(samples, "missing_metric") == 0.0
    assert samples["streamscribe_final_latency_seconds_bucket"] == {
        (("le", "+Inf"), ("stage", "queue")): 7.0
    }
    assert samples["odd_total"] == {(("code", "503"), ("path", '/a \\"b\\"')): 1000.0}


def test_urls_name_the_stream_and_the_http_endpoints():
    e = stream_load.endpoints("ws://127.0.0.1:8765")
    assert (e.stream, e.http) == ("ws://127.0.0.1:8765/v1/stream", "http://127.0.0.1:8765")
    e = stream_load.endpoints("wss://asr.example:443/v1/stream")
    assert (e.stream, e.http) == ("wss://asr.example:443/v1/stream", "https://asr.example:443")


def test_ramp_doubles_a_single_level():
    assert stream_load.levels_to_run([3], ramp=True)[:4] == [3, 6, 12, 24]
    assert stream_load.levels_to_run([1, 4, 16], ramp=True) == [1, 4, 16]
    assert stream_load.levels_to_run([5], ramp=False) == [5]


# --- end to end --------------------------------------------------------------------------------


def test_two_noop_streams_end_to_end(tmp_path, monkeypatch):
    librivox_clips()  # skips when pocketsphinx-testdata is missing
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    args = stream_load.parse_args(["--model", "noop", "--streams", "2", "--seconds", "7"])
    figures, path = asyncio.run(stream_load.run_benchmark(args))

    (level,) = figures["levels"]
    assert level["streams"] == 2 and level["streams_closed"] == 2 and level["utterances"] >= 1
    assert level["finals_missing"] == 0 and level["streams_failed"] == 0
    for name in ("first_partial_ms", "finalization_ms", "endpoint_ms", "queue_ms", "compute_ms"):
        assert level[name]["n"] >= 1
        assert level[name]["p50"] <= level[name]["p95"] <= level[name]["p99"]
    assert 0 < level["first_partial_ms"]["p95"] < 5000
    assert level["hangover_ms"] == 500
    assert level["server_cpu_s"] > 0 and level["streams_per_core"] > 0
    assert level["targets"]["streams_per_core"]["limit"] == ">= 500"
    assert path.parent == tmp_path
    record = json.loads(path.read_text())
    assert record["benchmark"] == "stream_load" and record["settings"]["model"] == "noop"
    assert record["settings"]["server_event_loop"] == "uvloop"
    assert record["figures"]["levels"][0]["finals"] == level["finals"]


def test_histogram_p95_from_bucket_deltas():
    from benchmarks.stream_load import histogram_p95, parse_prometheus

    name = "streamscribe_caption_delay_seconds"

    def scrape(counts):
        lines = [f'{name}_bucket{{kind="cue",le="{le}"}} {n}' for le, n in counts]
        return parse_prometheus("\n".join(lines))

    before = scrape([("1.0", 5), ("3.0", 5), ("+Inf", 5)])
    after = scrape([("1.0", 50), ("3.0", 100), ("+Inf", 105)])
    assert histogram_p95(before, after, name, "cue") == 3.0  # 95 of 100 new ones by 3 s
    assert histogram_p95(before, before, name, "cue") is None
    assert histogram_p95(before, after, name, "append") is None

"""The stream load benchmark: its pure parts, and a short run against a real server process with
the noop engine (the real figures come from running the benchmark itself)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import results, stream_load
from benchmarks.stream_load import (
    Clip,
    LevelRun,
    StreamPlan,
    StreamRecord,
    Tape,
    Utterance,
    by_label,
    engine_targets,
    frame_due,
    lag_growth_ms,
    level_figures,
    machine_busy_seconds,
    measure_stream,
    parse_prometheus,
    percentile,
    plan_stream,
    proc_cpu_seconds,
    scalar,
    speech_end_ms,
    speech_onset_ms,
    spoken_at,
    summary,
    target,
    target_profile,
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


def test_speech_onset_and_end_skip_the_quiet_around_it():
    quiet, loud = np.full(4000, 1e-3), np.full(8000, 0.3)
    audio = np.concatenate([quiet, loud, quiet[:3200]]).astype(np.float32)
    assert speech_onset_ms(audio) == 250
    assert speech_end_ms(audio) == 750
    assert speech_onset_ms(np.zeros(1600, np.float32)) == 0
    assert speech_end_ms(np.zeros(1600, np.float32)) == 0


def _tape() -> Tape:
    """Two clips of 3 and 2 frames (100 ms) at frames 2 and 8 of a 12-frame period."""
    a = Clip("a", (b"a1", b"a2", b"a3"), onset_ms=50, speech_end_ms=250, duration_ms=280)
    b = Clip("b", (b"b1", b"b2"), onset_ms=0, speech_end_ms=180, duration_ms=200)
    return Tape(((2, a), (8, b)), period=12, silence=b".")


def test_a_stream_plays_whole_clips_only_in_stream_time(monkeypatch):
    monkeypatch.setattr(stream_load, "TAIL_MS", 200)
    tape = _tape()
    plan = plan_stream(tape, offset=0, n_frames=12, frame_ms=100)
    assert (
        plan.frames
        == [b".", b".", b"a1", b"a2", b"a3", b".", b".", b".", b"b1", b"b2"] + [b"."] * 2
    )
    assert plan.utterances == [Utterance(200, 250, 450, 480), Utterance(800, 800, 980, 1000)]
    # starting inside clip a: it is replaced by quiet; the tape wraps around to play a again
    plan = plan_stream(tape, offset=3, n_frames=16, frame_ms=100)
    assert plan.frames[:5] == [b".", b".", b".", b".", b"."] and plan.frames[5:7] == [b"b1", b"b2"]
    assert plan.utterances == [Utterance(500, 500, 680, 700), Utterance(1100, 1150, 1350, 1380)]
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
    assert all(c.duration_ms - 500 <= c.speech_end_ms < c.duration_ms for c in clips)
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
            Utterance(1000, 1200, 2800, 3000),
            Utterance(6000, 6100, 7800, 8000),  # no final: missing
            Utterance(10000, 10300, 10900, 11000),  # only a final: its first text
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
    # the finals added words to the stable text: they are the last change
    assert [at for at, _ in m.final_change] == [2800, 10900]
    assert [ms for _, ms in m.final_change] == pytest.approx([900.0, 1000.0])
    assert m.split_ms["endpoint"] == [500, 500] and m.split_ms["compute"] == [30, 30]
    assert m.split_ms["delivery"] == pytest.approx([250.0, 550.0])
    assert m.partial_delay_ms == pytest.approx([0.0, 0.0, 0.0, 100.0])
    assert m.partials == 4 and m.status_lag_ms == [1500] and m.closed
    assert m.segments[0] == ([("", ""), ("", "he"), ("he", "was")], "he is")


def test_final_is_the_last_change_of_the_committed_words():
    plan = StreamPlan(
        frames=[], utterances=[Utterance(0, 200, 1500, 2300), Utterance(5000, 5100, 9000, 9300)]
    )
    words = [("He", 200, 700), ("was.", 800, 1500)]
    messages = [
        (101.0, _partial(0, 1, 0, 1000, "", "he was")),
        (101.8, _partial(0, 2, 0, 1800, "he was", "not")),  # the words a reader waits for
        (102.1, _partial(0, 3, 0, 2100, "he was", "")),  # nothing new committed
        (102.6, _final(0, 0, 2300, words)),  # only capitalises and punctuates: no change
        # a segment cut at max length: the utterance's last change is in its second segment
        (106.0, _final(1, 5000, 7000, [("and", 5100, 5400), ("then", 5500, 6900)])),
        (109.5, _partial(2, 1, 7000, 9000, "she left us", "")),
        (110.0, _final(2, 7000, 9300, [("she", 7100, 7500), ("left", 7600, 8900)])),  # drops us
    ]
    m = measure_stream(plan, StreamRecord(t0=100.0, messages=messages))
    assert [at for at, _ in m.final_change] == [1500, 9000]
    assert [ms for _, ms in m.final_change] == pytest.approx([300.0, 1000.0])


def test_lag_growth_compares_the_last_third_of_the_run_with_the_first():
    samples = [(1000, 500.0), (2000, 600.0), (5000, 9999.0), (8000, 900.0), (9500, 700.0)]
    assert lag_growth_ms(samples, 9000) == 200.0  # medians (nearest rank) 700 - 500
    assert lag_growth_ms([(8000, 400.0), (500, 900.0)], 9000) == -500.0
    assert lag_growth_ms(samples[:3], 9000) is None  # nothing in the last third
    assert lag_growth_ms([], 9000) is None


# --- targets ------------------------------------------------------------------------------------


def test_a_target_records_the_value_even_where_it_does_not_judge():
    assert target(3.0, 5.0, "<=") == {"value": 3.0, "limit": "<= 5", "ok": True}
    assert target(3.0, 5.0, ">=")["ok"] is False
    assert target(None, 5.0, "<=")["ok"] is None  # not measured
    assert target(3.0, None, "<=") == {"value": 3.0, "limit": None, "ok": None}


def test_whisper_on_the_cpu_has_its_own_targets_by_level():
    one = target_profile("whisper", 1, hangover_ms=500)
    assert (one.first_text_ms, one.final_change_ms, one.cpu_s_per_stream_s) == (700, 1100, 0.5)
    assert one.finalization_ms is None and one.lag_growth_ms is None
    four = target_profile("whisper", 4, hangover_ms=500)
    assert (four.first_text_ms, four.final_change_ms, four.cpu_s_per_stream_s) == (1200, 1500, None)
    assert four.lag_growth_ms == stream_load.LAG_GROWTH_TARGET_MS
    assert target_profile("whisper", 2, 500) == four
    gateway = target_profile("gateway", 1, hangover_ms=600)
    assert (gateway.first_text_ms, gateway.finalization_ms) == (500, 750)
    assert gateway.final_change_ms is None and gateway.cpu_s_per_stream_s is None
    assert engine_targets("auto", "whisper") == "whisper"
    assert engine_targets("auto", "noop:20") == engine_targets("auto", "granite-nar") == "gateway"
    assert engine_targets("whisper", "noop") == "whisper"


def test_a_level_is_judged_by_its_engines_targets():
    plan = StreamPlan(frames=[b"."] * 40, utterances=[Utterance(0, 200, 1500, 2300)])
    messages = [
        (100.8, _partial(0, 1, 0, 800, "", "he")),  # first text 600 ms after the onset
        (102.0, _partial(0, 2, 0, 2000, "he", "was")),
        (102.4, _final(0, 0, 2300, [("he", 200, 700), ("was", 800, 1400)])),  # 1000 / 900 ms
        (102.5, {"type": "session.closed", "audio_ms": 4000, "segments": 1, "reason": "client"}),
    ]

    def judged(engine: str, server_cpu_s: float) -> dict:
        record = StreamRecord(t0=100.0, messages=messages)
        run = LevelRun([record], server_cpu_s=server_cpu_s, wall_s=5.0)
        run.session_options["hangover_ms"] = 500
        return level_figures([plan], run, 100, gateway_only=False, engine=engine)

    cpu = judged("whisper", server_cpu_s=1.6)  # 0.4 CPU-s per stream-second
    assert cpu["target_profile"] == "whisper-cpu, 1 stream"
    assert cpu["final_change_ms"]["p95"] == 900.0 and cpu["finalization_ms"]["p95"] == 1000.0
    t = cpu["targets"]
    assert t["first_partial_p95_ms"] == {"value": 600.0, "limit": "<= 700", "ok": True}
    assert t["final_change_p95_ms"] == {"value": 900.0, "limit": "<= 1100", "ok": True}
    assert t["finalization_p95_ms"]["limit"] is None
    assert t["cpu_s_per_stream_s"] == {"value": 0.4, "limit": "<= 0.5", "ok": True}
    assert cpu["sustained"] and cpu["at_slo"]
    assert not judged("whisper", server_cpu_s=2.4)["targets"]["cpu_s_per_stream_s"]["ok"]

    gateway = judged("gateway", server_cpu_s=1.6)  # limits: final 650 ms, first text 500 ms
    assert gateway["target_profile"] == "gateway"
    assert gateway["targets"]["final_change_p95_ms"]["ok"] is None
    assert gateway["targets"]["finalization_p95_ms"]["ok"] is False
    assert gateway["targets"]["first_partial_p95_ms"]["ok"] is False
    assert not gateway["sustained"] and not gateway["at_slo"]


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


# python -c LAUNCH ARGS...: runs `python -c ARGS...` and waits for it
LAUNCH = "import subprocess, sys; subprocess.run([sys.executable, '-c', *sys.argv[1:]])"
BUSY = "import time\nend = time.process_time() + 30\nwhile time.process_time() < end: pass"


def test_process_cpu_time_counts_the_live_descendants():
    # parent -> child -> grandchild, which spins: the server's workers are its children
    parent = subprocess.Popen([sys.executable, "-c", LAUNCH, LAUNCH, BUSY], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while len(stream_load.process_tree(parent.pid)) < 3:
            assert time.monotonic() < deadline, "the grandchild did not start"
            time.sleep(0.05)
        ticks = os.sysconf("SC_CLK_TCK")

        def own(pid: int) -> float:
            with open(f"/proc/{pid}/stat") as stat:
                return proc_cpu_seconds(stat.read(), ticks)

        tree, alone = stream_load.process_cpu_seconds(parent.pid), own(parent.pid)
        time.sleep(0.5)
        assert stream_load.process_cpu_seconds(parent.pid) - tree >= 0.1  # a loaded machine
        assert own(parent.pid) - alone < 0.05  # the parent itself only waits
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert stream_load.process_tree(os.getpid())[0] == os.getpid()


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


def test_worker_counts_are_a_number_or_a_list():
    assert stream_load.parse_args([]).worker_counts == [1]
    assert stream_load.parse_args(["--workers", "2"]).worker_counts == [2]
    assert stream_load.parse_args(["--workers", "1,2"]).worker_counts == [1, 2]
    assert stream_load.parse_args(["--url", "ws://h:1", "--workers", "1"]).worker_counts == [1]
    for bad in ("0", "two", "1,", "1,-2"):
        with pytest.raises(SystemExit):
            stream_load.parse_args(["--workers", bad])
    with pytest.raises(SystemExit):  # a running server has the workers it has
        stream_load.parse_args(["--url", "ws://h:1", "--workers", "2"])


def test_worker_counts_are_compared_by_their_highest_levels():
    def level(streams: int, sustained: bool, at_slo: bool) -> dict:
        return {"streams": streams, "sustained": sustained, "at_slo": at_slo}

    one = [level(200, True, True), level(400, True, False), level(600, False, False)]
    two = [level(200, True, True), level(400, True, True), level(600, True, True)]
    result = stream_load.compare_workers([(1, one), (2, two)])
    a, b = result["workers"]
    assert result["ratio_to_workers"] == 1 and a["levels"] == one and b["levels"] == two
    assert a["workers"] == 1 and a["highest_sustained_streams"] == 400
    assert a["highest_streams_at_slo"] == 200
    assert a["sustained_bracketed"] and a["at_slo_bracketed"]
    assert (a["sustained_ratio"], a["at_slo_ratio"]) == (1.0, 1.0)
    assert (b["highest_sustained_streams"], b["highest_streams_at_slo"]) == (600, 600)
    assert not b["sustained_bracketed"] and not b["at_slo_bracketed"]  # no level broke them
    assert (b["sustained_ratio"], b["at_slo_ratio"]) == (1.5, 3.0)
    text = stream_load.workers_report(result).splitlines()
    assert text[1] == "1 worker : 400 sustained, 200 at the targets"
    assert text[2] == (
        "2 workers: >= 600 sustained, >= 600 at the targets; "
        "2 : 1 workers = 1.5 sustained, 3 at the targets"
    )
    assert text[3].startswith("(>=: no higher level run failed")

    failed = stream_load.compare_workers([(2, two), (1, [level(200, False, False)])])
    assert failed["ratio_to_workers"] == 1  # the smallest count, wherever it is listed
    assert failed["workers"][0]["sustained_ratio"] is None
    assert "2 : 1 workers = n/a sustained" in stream_load.workers_report(failed)


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
    assert level["target_profile"] == "gateway" and level["final_change_ms"]["n"] >= 1
    assert path.parent == tmp_path
    record = json.loads(path.read_text())
    assert record["benchmark"] == "stream_load" and record["settings"]["model"] == "noop"
    assert record["settings"]["server_event_loop"] == "uvloop"
    assert record["settings"]["server_engine_family"] == "noop"
    assert record["settings"]["targets"] == "gateway"
    assert record["settings"]["workers"] == [1]
    assert record["figures"]["levels"][0]["finals"] == level["finals"]


def test_one_server_per_worker_count_end_to_end(tmp_path, monkeypatch):
    librivox_clips()  # skips when pocketsphinx-testdata is missing
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    argv = ["--model", "noop", "--workers", "1,2", "--streams", "2", "--seconds", "2"]
    figures, path = asyncio.run(stream_load.run_benchmark(stream_load.parse_args(argv)))

    assert [entry["workers"] for entry in figures["workers"]] == [1, 2]
    for entry in figures["workers"]:
        (level,) = entry["levels"]
        assert level["streams"] == level["streams_closed"] == 2 and level["streams_failed"] == 0
        assert level["server_cpu_s"] > 0 and level["machine_busy_cores"] > 0
    record = json.loads(path.read_text())
    assert record["settings"]["workers"] == [1, 2] and record["settings"]["streams"] == [2]
    assert record["settings"]["server_engine_family"] == "noop"  # the engine process's record
    assert record["figures"]["ratio_to_workers"] == 1 and "levels" not in record["figures"]


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


def test_refine_latency_is_from_the_final_to_its_refined_message():
    plan = StreamPlan(frames=[], utterances=[Utterance(0, 200, 1500, 2300)])

    def refined(seg: int, **fields) -> dict:
        return {"type": "transcript.refined", "channel": 0, "segment_id": seg, **fields}

    messages = [
        (102.0, _final(0, 0, 2300, [("he", 200, 700), ("was", 800, 1500)])),
        (102.4, _final(1, 5000, 7000, [("so", 5100, 6900)])),
        (102.9, refined(0, text="He was.", changed=False)),
        (103.0, refined(1, text="So.", changed=True)),
        (104.0, _final(2, 8000, 9000, [("it", 8100, 8900)])),
        (107.0, refined(2, text="it", changed=False, skipped=True, reason="deadline")),
    ]
    m = measure_stream(plan, StreamRecord(t0=100.0, messages=messages))
    assert m.refine_ms == pytest.approx([900.0, 600.0, 3000.0])
    assert (m.refined, m.refine_changed, m.refine_skipped) == (2, 1, {"deadline": 1})
    assert m.finals == 3  # refined messages are not finals

    run = LevelRun([StreamRecord(t0=100.0, messages=messages)], wall_s=10.0)
    refine = level_figures([plan], run, 100, False, "whisper")["refine"]
    assert refine["latency_ms"]["n"] == 3 and refine["latency_ms"]["p50"] == 900.0
    assert (refine["refined"], refine["changed"], refine["skipped"]) == (2, 1, {"deadline": 1})


def test_the_refine_model_is_passed_to_the_started_server():
    assert stream_load.parse_args(["--refine-model", "base"]).refine_model == "base"
    assert stream_load.parse_args([]).refine_model is None

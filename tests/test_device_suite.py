"""`python -m benchmarks.device_suite --cpu-smoke`: the whole suite at reduced size on the CPU,
checked for the record's shape and for figures that are measured numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import device_suite, results


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_cpu_smoke_writes_one_record_of_measured_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    path = device_suite.main(["--cpu-smoke", "--batches", "16,1,4"])

    assert path.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [path.name]
    record = json.loads(path.read_text())
    assert record["benchmark"] == "device_suite"
    assert {"date", "commit", "machine", "settings", "figures"} <= record.keys()
    assert record["settings"]["mode"] == "cpu-smoke"
    assert record["settings"]["sizes"] == ["tiny"]
    assert record["settings"]["rtfx_batches"] == [1, 4, 16]
    figures = record["figures"]

    tiny = figures["parity"]["tiny"]
    for part in ("ctc_draft_argmax", "editor_argmax"):
        assert number(tiny[part]["agreement"]) and 0.0 <= tiny[part]["agreement"] <= 1.0
        assert isinstance(tiny[part]["positions"], int) and tiny[part]["positions"] > 0
    assert "tiny config only" in figures["parity"]["full"]["skipped"]

    for mode in ("eager", "compiled"):
        entries = figures["rtfx"][mode]
        assert list(entries) == [str(b) for b in device_suite.CPU_BATCHES]
        for batch, entry in entries.items():
            for call in ("draft", "transcribe"):
                run = entry[call]
                assert number(run["rtfx"]) and run["rtfx"] > 0
                assert number(run["seconds"]) and run["seconds"] >= 0
                expected_audio = int(batch) * device_suite.CPU_CLIP_S
                assert run["audio_seconds"] == round(expected_audio, 1)
                assert all(number(v) for v in run["split"].values())
            assert entry["peak_memory_bytes"] is None and entry["peak_memory_gib"] is None
    for entry in figures["rtfx"]["compiled"].values():  # fp32: the compiled runner is exact
        assert entry["same_as_eager"]["segments_identical"] == 1.0
    assert number(figures["rtfx"]["compile_seconds"]) and figures["rtfx"]["compile_seconds"] > 0
    assert "skipped" in figures["rtfx"]["host_syncs_per_batch"]
    assert figures["rtfx"]["graphs_compiled_after_warm_up"] == 0
    assert figures["rtfx"]["eager_fallbacks"] == 0 and figures["rtfx"]["graphs_total"] > 0
    assert "skipped" in figures["load"]
    assert number(figures["suite_seconds"])

    out = capsys.readouterr().out
    assert "[device_suite]    eager batch    1:" in out and "written to" in out
    assert "[device_suite] compiled batch   16:" in out


def test_same_transcripts_counts_identical_segments_and_agreeing_tokens():
    from engine.api import Hypothesis

    def hyp(ids):
        return Hypothesis(text="", token_ids=ids, words=[], confidence=0.0, duration_ms=0)

    figures = device_suite.same_transcripts(
        [hyp([1, 2]), hyp([3, 4, 5])], [hyp([1, 2]), hyp([3, 9])]
    )
    assert figures == {"segments_identical": 0.5, "token_agreement": 0.6}


def test_batches_must_be_positive_whole_numbers(capsys):
    assert device_suite.parse_args(["--batches", "32,1,32"]).batches == (1, 32)
    for bad in ("0,4", "a", ""):
        with pytest.raises(SystemExit):
            device_suite.parse_args(["--batches", bad])
    assert "positive whole numbers" in capsys.readouterr().err


def test_agreement_counts_matching_positions():
    a = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    b = [torch.tensor([1, 0, 3]), torch.tensor([4])]
    assert device_suite.agreement(a, b) == {"agreement": 0.75, "positions": 4}
    assert device_suite.agreement([torch.tensor([], dtype=torch.long)], [torch.tensor([])]) == {
        "agreement": None,
        "positions": 0,
    }


def test_clips_have_the_fixed_length():
    segments, source = device_suite.clip_audio(5, 2.5)
    assert source in ("librivox", "synthetic")
    assert [len(s.audio) for s in segments] == [40000] * 5

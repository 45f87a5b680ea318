"""`python -m benchmarks.fuzz` and `python -m benchmarks.churn` end to end at tiny sizes, each
against its own `streamscribe serve` process with the noop engine: what they print, their exit
status, and the JSON record they write."""

from __future__ import annotations

import json

import pytest

from benchmarks import churn, fuzz, results
from tests.fuzz_cases import ENDPOINTS


@pytest.fixture
def record(tmp_path, monkeypatch):
    """The one record a benchmark run writes (into a temporary results folder)."""
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "results")

    def read() -> dict:
        (written,) = (tmp_path / "results").iterdir()
        return json.loads(written.read_text())

    return read


def test_fuzz_cli_runs_every_endpoint_and_records_the_outcomes(record, capsys):
    argv = ["--cases", "20", "--seed", "3", "--model", "noop", "--speed", "8", "--clip", "1"]
    status = fuzz.main(argv)
    out = capsys.readouterr().out
    written = record()
    assert written["benchmark"] == "fuzz" and written["commit"] and written["machine"]
    assert written["settings"]["cases"] == 20 and written["settings"]["seed"] == 3
    figures = written["figures"]
    assert figures["cases"] == 20
    assert {name: row["cases"] for name, row in figures["per_endpoint"].items()} == {
        name: 2 for name in ENDPOINTS
    }
    good = figures["good_stream"]
    assert good["baseline"] and good["runs"] >= 1 and good["changed"] == 0
    assert good["fresh_after"] == good["baseline"]
    assert figures["server_alive_after"] and figures["server_exit_status"] == 0
    clean = figures["bad"] == 0 and not figures["server_errors_unattributed"]
    assert status == (0 if clean else 1)
    assert len(figures["bad_cases"]) == figures["bad"]
    assert "total" in out and "written to" in out


def test_fuzz_cli_replays_one_case_by_seed_and_index(capsys):
    status = fuzz.main(["--seed", "3", "--replay", "9", "--model", "noop"])
    out = capsys.readouterr().out
    assert "seed=3 index=9 (audiosocket/" in out  # index 9 of 10 endpoints: AudioSocket
    assert "outcome: ended" in out and status == 0


def test_churn_cli_samples_the_server_and_says_whether_it_is_flat(record, capsys):
    argv = ["--cycles", "68", "--warmup", "34", "--every", "34", "--resume-window", "0.5"]
    status = churn.main([*argv, "--settle", "2"])
    out = capsys.readouterr().out
    written = record()
    assert written["benchmark"] == "churn" and written["settings"]["cycles"] == 68
    figures = written["figures"]
    assert figures["cycles"] == 68
    # The warm-up sample, one more, and the last after the resume window.
    assert [s["cycles"] for s in figures["samples"]] == [34, 68, 68]
    assert all(s["rss_kb"] > 0 and s["fds"] > 0 and s["threads"] > 0 for s in figures["samples"])
    assert set(figures["growth_after_warmup"]) == {"rss_kb", "fds", "threads"}
    assert sum(sum(kind.values()) for kind in figures["outcomes"].values()) == 68
    assert figures["server_exit_status"] == 0 and figures["server_alive_after"]
    clean = figures["flat"] and not figures["cycles_not_ok"] and not figures["server_errors"]
    assert status == (0 if clean else 1)
    assert ("NOT flat" in out) != figures["flat"] and "written to" in out

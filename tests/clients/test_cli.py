import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from engine.api import Hypothesis, ModelLoadError, Segment, Word
from streaming.cli import main
from streaming.ops.config import Config, EngineConfig

REPO = Path(__file__).resolve().parents[2]


class FakeEngine:
    """Answers from the audio's length, and remembers what it was given."""

    family = "fake"
    device = "cpu"

    def __init__(self) -> None:
        self.calls: list[list[Segment]] = []

    def draft(self, segments):
        return self.transcribe(segments)

    def transcribe(self, segments):
        self.calls.append(list(segments))
        return [self._answer(s) for s in segments]

    @staticmethod
    def _answer(segment: Segment) -> Hypothesis:
        samples = len(segment.audio)
        duration_ms = round(1000 * samples / segment.sample_rate)
        return Hypothesis(
            text=f"{samples} samples at {segment.sample_rate} Hz",
            words=[Word(word="samples", start_ms=0, end_ms=duration_ms, confidence=0.75)],
            confidence=0.5,
            duration_ms=duration_ms,
        )


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """No STREAMSCRIBE_* settings from the caller's shell; logging restored after each test."""
    for var in [v for v in list(os.environ) if v.startswith("STREAMSCRIBE_")]:
        monkeypatch.delenv(var)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def fake(monkeypatch):
    """Install a fake engine; `fake.load_kwargs` holds what load_engine was called with."""
    engine = FakeEngine()

    def load_engine(**kwargs):
        engine.load_kwargs = kwargs
        return engine

    monkeypatch.setattr("engine.selection.load_engine", load_engine)
    return engine


def pcm16(rng: np.random.Generator, frames: int, channels: int = 1) -> np.ndarray:
    """Samples that 16-bit PCM stores exactly, with silence at both ends."""
    data = rng.integers(-20000, 20000, size=(frames, channels)) / 32768.0
    data[:100] = 0.0
    data[-100:] = 0.0
    return data.squeeze() if channels == 1 else data


@pytest.fixture
def files(tmp_path):
    """Three readable files: 16 kHz mono WAV, 44.1 kHz stereo WAV, 8 kHz mono FLAC."""
    rng = np.random.default_rng(0)
    made = {
        "mono.wav": (pcm16(rng, 8000), 16000),
        "stereo.wav": (pcm16(rng, 11025, channels=2), 44100),
        "low.flac": (pcm16(rng, 4000), 8000),
    }
    for name, (data, rate) in made.items():
        sf.write(tmp_path / name, data, rate, subtype="PCM_16")
    return {str(tmp_path / name): value for name, value in made.items()}


def test_one_file_prints_just_its_text(fake, files, capsys):
    path = next(iter(files))
    assert main(["transcribe", path]) == 0
    out, err = capsys.readouterr()
    assert out == "8000 samples at 16000 Hz\n"
    assert err == ""


def test_files_keep_their_order_across_batches(fake, files, capsys):
    paths = list(files)
    assert main(["transcribe", "--batch", "2", *paths]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines() == [
        f"{paths[0]}: 8000 samples at 16000 Hz",
        f"{paths[1]}: 11025 samples at 44100 Hz",
        f"{paths[2]}: 4000 samples at 8000 Hz",
    ]
    assert [len(call) for call in fake.calls] == [2, 1]


def test_audio_reaches_the_engine_whole_and_unaltered(fake, files, capsys):
    assert main(["transcribe", *files]) == 0
    (segments,) = fake.calls
    for segment, (data, rate) in zip(segments, files.values(), strict=True):
        expected = data.mean(axis=1) if data.ndim == 2 else data  # stereo is mixed to mono
        assert segment.sample_rate == rate  # not resampled: that is the engine's job
        assert segment.audio.dtype == np.float32
        np.testing.assert_allclose(segment.audio, expected, atol=1e-6)  # no trimming or gain


def test_load_engine_gets_the_engine_config_with_flags_applied(fake, files, monkeypatch):
    monkeypatch.setenv("STREAMSCRIBE_ENGINE__DTYPE", "float32")
    monkeypatch.setenv("STREAMSCRIBE_ENGINE__MODEL", "granite-nar")
    path = next(iter(files))
    assert main(["transcribe", "--model", "whisper", "--device", "cpu", "--batch", "3", path]) == 0
    expected = dataclasses.asdict(
        EngineConfig(model="whisper", device="cpu", max_batch=3, dtype="float32")
    )
    del expected["refine_model"]  # the refine model is no loading option
    assert fake.load_kwargs == expected


def test_transcribe_with_a_refine_model_loads_only_it(fake, files, monkeypatch, caplog):
    """Files are not latency-bound: the refine (accuracy) model's text is written, and the
    primary model is not loaded at all."""
    loads = []
    monkeypatch.setattr("engine.selection.load_engine", lambda **kw: loads.append(kw) or fake)
    path = next(iter(files))
    argv = ["transcribe", "--model", "granite-nar", "--refine-model", "base", "--device", "cpu"]
    with caplog.at_level(logging.INFO, logger="streaming.cli"):
        assert main([*argv, path]) == 0
    (kwargs,) = loads
    assert (kwargs["model"], kwargs["device"]) == ("base", "cpu") and "refine_model" not in kwargs
    assert len(fake.calls) == 1
    assert any("primary model is not loaded" in r.getMessage() for r in caplog.records)


def test_transcribe_names_the_refine_model_that_cannot_load(files, monkeypatch, capsys):
    def load_engine(**kwargs):
        raise ModelLoadError(f"cannot load whisper model {kwargs['model']!r} on cpu: gone")

    monkeypatch.setattr("engine.selection.load_engine", load_engine)
    assert main(["transcribe", "--refine-model", "/m/w", next(iter(files))]) == 2
    err = capsys.readouterr().err
    assert err == (
        "streamscribe: error: cannot load refine model '/m/w': "
        "cannot load whisper model '/m/w' on cpu: gone\n"
    )


def test_json_lines_carry_file_text_words_confidence_and_duration(fake, files, capsys):
    paths = list(files)
    assert main(["transcribe", "--json", *paths]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == paths
    assert lines[1] == {
        "file": paths[1],
        "text": "11025 samples at 44100 Hz",
        "words": [{"word": "samples", "start_ms": 0, "end_ms": 250, "confidence": 0.75}],
        "confidence": 0.5,
        "duration_ms": 250,
    }


def test_unreadable_files_are_reported_and_the_rest_transcribed(fake, files, tmp_path, capsys):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio" * 10)
    missing = tmp_path / "missing.wav"
    good = list(files)
    argv = ["transcribe", "--json", "--batch", "1", good[0], str(missing), good[1], str(garbage)]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["file"] for line in lines] == [good[0], str(missing), good[1], str(garbage)]
    assert "text" in lines[0] and "text" in lines[2]
    assert lines[1]["error"] and lines[3]["error"]
    assert "missing.wav" in err and "garbage.wav" in err
    assert "Traceback" not in err
    assert sum(len(call) for call in fake.calls) == 2


def test_unreadable_file_in_text_mode_goes_to_stderr_only(fake, tmp_path, capsys):
    assert main(["transcribe", str(tmp_path / "missing.wav")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "missing.wav" in err
    assert fake.calls == []


def test_model_load_failure_is_one_line_and_exit_2(monkeypatch, files, capsys):
    def load_engine(**kwargs):
        raise ModelLoadError("cannot load model 'nope': not a folder and the hub is unreachable")

    monkeypatch.setattr("engine.selection.load_engine", load_engine)
    assert main(["transcribe", "--model", "nope", *files]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().count("\n") == 0
    assert "cannot load model 'nope'" in err
    assert "Traceback" not in err


def test_ctrl_c_exits_130_quietly(fake, files, monkeypatch, capsys):
    def interrupted(segments):
        raise KeyboardInterrupt

    monkeypatch.setattr(fake, "transcribe", interrupted)
    assert main(["transcribe", *files]) == 130
    assert capsys.readouterr().err == ""


def test_bad_flag_value_is_a_config_error_naming_the_key(fake, files, capsys):
    assert main(["transcribe", "--batch", "0", *files]) == 2
    err = capsys.readouterr().err
    assert "engine.max_batch" in err and "command line" in err
    assert "Traceback" not in err


def test_progress_bar_only_when_asked_or_on_a_terminal(fake, files, capsys):
    assert main(["transcribe", *files]) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal here
    assert main(["transcribe", "--progress", *files]) == 0
    out, err = capsys.readouterr()
    assert "3/3" in err
    assert len(out.splitlines()) == 3


def test_log_level_flag_gives_json_log_lines_on_stderr(fake, files, capsys):
    assert main(["--log-level", "info", "transcribe", next(iter(files))]) == 0
    out, err = capsys.readouterr()
    assert out == "8000 samples at 16000 Hz\n"
    records = [json.loads(line) for line in err.splitlines()]
    loaded = next(r for r in records if r["msg"] == "engine loaded")
    assert loaded["level"] == "info"
    assert loaded["logger"] == "streaming.cli"
    assert loaded["family"] == "fake" and loaded["device"] == "cpu"
    assert loaded["ts"].endswith("Z")


def test_text_log_format_from_config_file(fake, files, tmp_path, capsys):
    settings = tmp_path / "settings.yaml"
    settings.write_text("logging:\n  level: info\n  format: text\n")
    assert main(["--config", str(settings), "transcribe", next(iter(files))]) == 0
    err = capsys.readouterr().err
    assert "INFO streaming.cli: engine loaded" in err
    assert "family=fake" in err


def test_config_command_prints_the_defaults_as_yaml(capsys):
    assert main(["config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == Config().to_dict()


def test_config_command_shows_file_environment_and_flags(tmp_path, monkeypatch, capsys):
    settings = tmp_path / "settings.yaml"
    settings.write_text("engine:\n  max_batch: 4\n")
    monkeypatch.setenv("STREAMSCRIBE_ENGINE__DEVICE", "cuda:1")
    assert main(["--config", str(settings), "--log-level", "DEBUG", "config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["engine"]["max_batch"] == 4
    assert shown["engine"]["device"] == "cuda:1"
    assert shown["logging"]["level"] == "debug"


def test_config_errors_exit_2_with_the_reason(tmp_path, capsys):
    settings = tmp_path / "settings.yaml"
    settings.write_text("engine:\n  modle: whisper\n")
    assert main(["--config", str(settings), "config"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "engine.modle" in err and "did you mean engine.model" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["transcribe"])
    assert exit_.value.code == 2


def test_python_dash_m_streaming_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "streaming", "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert yaml.safe_load(done.stdout) == Config().to_dict()


# --- models ---------------------------------------------------------------------------------


@pytest.fixture
def no_gpu_no_loading(monkeypatch):
    """Neither torch nor CTranslate2 sees a GPU, and loading any model fails the test."""

    def load_engine(**kwargs):
        raise AssertionError("`models` must not load a model")

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("engine.whisper.resolve_device", lambda device: "cpu")
    monkeypatch.setattr("engine.selection.load_engine", load_engine)


def table(out: str) -> dict[str, list[str]]:
    """Rows of the `models` table by family, split on runs of two or more spaces."""
    header, *rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]
    assert header == ["FAMILY", "CODE", "WEIGHTS", "DEVICE"]
    return {row[0]: row[1:] for row in rows}


def test_models_lists_every_family_with_code_weights_and_device(no_gpu_no_loading, capsys):
    from engine import whisper

    assert main(["models"]) == 0
    rows = table(capsys.readouterr().out)
    whisper_code = "installed" if whisper.missing_packages("tiny.en") == [] else "missing"
    nar_hub = "ibm-granite/granite-speech-4.1-2b-nar"
    assert rows["granite-nar"][0] == "installed" and rows["granite-nar"][2] == "cpu"
    assert nar_hub in rows["granite-nar"][1]
    assert rows["whisper"][0].split()[0] == whisper_code and rows["whisper"][2] == "cpu"
    assert rows["noop"] == ["installed", "none needed", "cpu"]
    assert set(rows) == {"granite-nar", "granite-ar", "whisper", "noop"}


def test_models_json_follows_configuration_and_flags(
    no_gpu_no_loading, monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("STREAMSCRIBE_ENGINE__WHISPER_MODEL", "base")
    monkeypatch.setenv("STREAMSCRIBE_ENGINE__GRANITE_NAR_MODEL", str(tmp_path))
    monkeypatch.setenv("STREAMSCRIBE_ENGINE__GRANITE_AR_MODEL", "/models/granite-ar")
    assert main(["models", "--json", "--device", "cuda:1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_family = {line["family"]: line for line in lines}
    assert len(lines) == len(by_family) == 4
    assert by_family["granite-ar"]["source"] == "/models/granite-ar"
    for line in lines:
        assert set(line) == {
            "family", "installed", "missing_packages", "weights_present", "weights", "source",
            "device",
        }  # fmt: skip
        assert line["device"] == ("cpu" if line["family"] == "noop" else "cuda:1")
        assert line["installed"] is (line["missing_packages"] == [])
    assert by_family["whisper"]["source"] == "base"
    nar, ar = by_family["granite-nar"], by_family["granite-ar"]
    assert (nar["source"], nar["weights_present"], nar["weights"]) == (
        str(tmp_path), True, str(tmp_path)
    )  # fmt: skip
    assert ar["weights_present"] is False and ar["weights"] == "no folder /models/granite-ar"


def test_models_names_the_packages_to_install(no_gpu_no_loading, monkeypatch, capsys):
    monkeypatch.setattr("engine.whisper.missing_packages", lambda source: ["faster-whisper"])
    assert main(["models"]) == 0
    assert table(capsys.readouterr().out)["whisper"][0] == "missing (pip install faster-whisper)"
    assert main(["models", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (row,) = [line for line in lines if line["family"] == "whisper"]
    assert (row["installed"], row["missing_packages"]) == (False, ["faster-whisper"])


def test_serve_flags_reach_the_configuration(monkeypatch):
    seen = {}

    def run(cfg, load, on_ready=None, load_refine_engine=None, tls_context=None):
        seen["cfg"], seen["load_refine"] = cfg, load_refine_engine

        async def served():
            return None

        return served()

    monkeypatch.setattr("streaming.server.run", run)
    argv = ["serve", "--model", "noop", "--batch", "4", "--port", "0", "--log-level", "error"]
    assert main(argv) == 0
    engine = seen["cfg"].engine
    assert (engine.model, engine.max_batch, seen["cfg"].logging.level) == ("noop", 4, "error")
    assert seen["load_refine"] is None  # engine.refine_model: none

    assert main([*argv, "--refine-model", "noop:5"]) == 0
    assert seen["cfg"].engine.refine_model == "noop:5"
    assert seen["load_refine"]().delay_ms == 5.0  # the refine model, loaded for real


def test_models_bad_device_is_a_config_error(no_gpu_no_loading, capsys):
    assert main(["models", "--device", "tpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "engine.device" in err and "Traceback" not in err


def test_srt_of_a_short_file_ends_within_its_audio(tmp_path, capsys):
    """The noop engine's last word ends 50 ms before the 7.55 s file does: its cue, held 1 s for
    reading, must still end with the audio."""
    path = tmp_path / "short.wav"
    sf.write(path, np.zeros(120_800, dtype=np.int16), 16000)
    assert main(["transcribe", "--model", "noop", "--format", "srt", str(path)]) == 0
    ends = re.findall(r" --> (\d\d):(\d\d):(\d\d),(\d\d\d)", capsys.readouterr().out)
    hours, minutes, seconds, millis = map(int, ends[-1])
    assert ((hours * 60 + minutes) * 60 + seconds) * 1000 + millis <= 7550


# --- the README's command lines -----------------------------------------------------------

PLACEHOLDERS = {"H": "127.0.0.1", "P": "0", "M": "noop", "D": "cpu", "N": "1", "FILE": "x.yaml"}


def readme_command_lines() -> list[list[str]]:
    """Every `streamscribe ...` line of the README's sh blocks, as argv: comments cut, optional
    parts ([--json]) unwrapped, placeholders (H, P, ...) given values."""
    readme = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", readme, re.S):
        for line in block.splitlines():
            command = line.split("|")[-1].split("#")[0].split("&&")[-1].strip()
            if command.startswith("streamscribe ") or command.startswith(".venv/bin/streamscribe"):
                argv = command.replace("[", " ").replace("]", " ").split()[1:]
                lines.append([PLACEHOLDERS.get(token, token) for token in argv])
    return lines


def test_every_readme_command_line_parses_with_the_real_parser():
    from streaming.cli import build_parser

    lines = readme_command_lines()
    verbs = {argv[0] for argv in lines if argv and not argv[0].startswith("-")}
    assert {"serve", "stream", "transcribe", "models", "config", "bench"} <= verbs
    for argv in lines:
        if argv == ["--version"]:
            continue
        args = build_parser().parse_args(argv)  # an unknown flag exits 2 and fails the test
        assert callable(args.run), argv


def test_every_flag_the_configuration_section_names_exists():
    from streaming.cli import build_parser

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Configuration") : readme.index("## Models")]
    flags = set(re.findall(r"`(--[a-z-]+)", section))
    assert {"--model", "--batch", "--log-level", "--config"} <= flags
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them only here
    known = {o for p in (parser, *commands.values()) for a in p._actions for o in a.option_strings}
    assert flags <= known


def test_transcribe_language_reaches_the_engine_and_must_be_the_models(fake, files, capsys):
    fake.languages = frozenset({"en", "fr"})
    assert main(["transcribe", "--language", "fr-CA", *files]) == 0
    assert {s.language for call in fake.calls for s in call} == {"fr"}
    assert main(["transcribe", "--language", "de", *files]) == 2
    err = capsys.readouterr().err
    assert "session.language = 'de'" in err and "its languages: en, fr" in err

import dataclasses
import re
from pathlib import Path
from typing import get_type_hints

import pytest

from streaming.ops.config import (
    Config,
    ConfigError,
    EngineConfig,
    LoggingConfig,
    load_config,
    parse_bool,
)

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return path


def test_no_sources_gives_the_dataclass_defaults():
    assert load_config(env={}) == Config()


def test_repo_config_yaml_equals_the_defaults():
    assert load_config(REPO_CONFIG, env={}) == Config()


def test_every_field_is_documented_in_config_yaml_with_a_comment():
    documented: dict[str, set[str]] = {}
    section = None
    for line in REPO_CONFIG.read_text().splitlines():
        if match := re.fullmatch(r"(\w+):\s*(#.*)?", line):
            section = match.group(1)
            documented[section] = set()
        elif match := re.fullmatch(r"  (\w+): *\S.*?#\s*\S.*", line):
            documented[section].add(match.group(1))
    expected = {
        name: {f.name for f in dataclasses.fields(section)}
        for name, section in get_type_hints(Config).items()
    }
    assert documented == expected


def test_environment_overrides_file_and_flags_override_environment(tmp_path):
    path = write(tmp_path, "engine:\n  max_batch: 4\n  model: whisper\n  device: cpu\n")
    env = {"STREAMSCRIBE_ENGINE__MAX_BATCH": "8", "STREAMSCRIBE_ENGINE__MODEL": "granite-nar"}
    cfg = load_config(path, env=env, overrides={"engine.model": "/models/x", "engine.dtype": None})
    assert cfg.engine.device == "cpu"  # file only
    assert cfg.engine.max_batch == 8  # environment beats file
    assert cfg.engine.model == "/models/x"  # override beats environment
    assert cfg.engine.dtype == "auto"  # a None override is ignored
    assert cfg.logging == LoggingConfig()


def test_config_file_from_environment_variable(tmp_path):
    path = write(tmp_path, "logging:\n  format: text\n")
    cfg = load_config(env={"STREAMSCRIBE_CONFIG": str(path)})
    assert cfg.logging.format == "text"


def test_explicit_path_beats_config_environment_variable(tmp_path):
    path = write(tmp_path, "logging:\n  level: info\n")
    cfg = load_config(path, env={"STREAMSCRIBE_CONFIG": str(tmp_path / "missing.yaml")})
    assert cfg.logging.level == "info"


def test_text_values_are_converted_to_field_types():
    env = {
        "STREAMSCRIBE_ENGINE__WINDOW_S": "12.5",
        "STREAMSCRIBE_ENGINE__MAX_BATCH": " 3 ",
        "STREAMSCRIBE_LOGGING__LEVEL": "DEBUG",
        "STREAMSCRIBE_ENGINE__DEVICE": "cuda:1",
    }
    cfg = load_config(env=env, overrides={"engine.hub_timeout_s": "2"})
    assert cfg.engine == EngineConfig(
        window_s=12.5, max_batch=3, device="cuda:1", hub_timeout_s=2.0
    )
    assert cfg.logging.level == "debug"  # choices are matched case-insensitively


def test_unrelated_environment_variables_are_ignored():
    env = {"STREAMSCRIBE_HOME": "/x", "PATH": "/bin", "OTHER__KEY": "1"}
    assert load_config(env=env) == Config()


def test_unknown_key_names_the_key_lists_the_section_and_suggests(tmp_path):
    path = write(tmp_path, "engine:\n  max_bach: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = str(err.value)
    assert "engine.max_bach" in message
    assert str(path) in message
    assert "did you mean engine.max_batch" in message
    assert "window_overlap_s" in message  # the section's valid keys are listed


def test_unknown_section_suggests_the_closest():
    with pytest.raises(
        ConfigError,
        match=r"engin\.model.*valid sections: engine, scheduler, server, session, logging",
    ) as err:
        load_config(env={}, overrides={"engin.model": "x"})
    assert "did you mean engine?" in str(err.value)


def test_unknown_environment_key_names_the_variable():
    with pytest.raises(ConfigError, match="STREAMSCRIBE_LOGGING__LEVL") as err:
        load_config(env={"STREAMSCRIBE_LOGGING__LEVL": "info"})
    assert "logging.levl" in str(err.value)


def test_single_underscore_environment_typo_is_caught():
    with pytest.raises(ConfigError, match="STREAMSCRIBE_ENGINE__MAX_BATCH"):
        load_config(env={"STREAMSCRIBE_ENGINE_MAX_BATCH": "8"})


@pytest.mark.parametrize(
    ("env", "key", "expected"),
    [
        ({"STREAMSCRIBE_ENGINE__MAX_BATCH": "many"}, "engine.max_batch", "an integer >= 1"),
        ({"STREAMSCRIBE_ENGINE__MAX_BATCH": "0"}, "engine.max_batch", "an integer >= 1"),
        ({"STREAMSCRIBE_ENGINE__MAX_BATCH": "2.5"}, "engine.max_batch", "an integer"),
        ({"STREAMSCRIBE_ENGINE__WINDOW_S": "-1"}, "engine.window_s", "a number > 0"),
        ({"STREAMSCRIBE_ENGINE__WINDOW_S": "inf"}, "engine.window_s", "a number > 0"),
        ({"STREAMSCRIBE_ENGINE__DTYPE": "fp8"}, "engine.dtype", "one of auto, float32"),
        ({"STREAMSCRIBE_ENGINE__DEVICE": "gpu"}, "engine.device", "cuda:N"),
        ({"STREAMSCRIBE_LOGGING__FORMAT": "xml"}, "logging.format", "one of json, text"),
    ],
)
def test_bad_environment_values_name_key_value_source_and_expectation(env, key, expected):
    ((var, value),) = env.items()
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    message = str(err.value)
    assert key in message
    assert repr(value) in message
    assert var in message
    assert expected in message


@pytest.mark.parametrize(
    ("yaml_text", "key", "expected"),
    [
        ("engine:\n  max_batch: true\n", "engine.max_batch", "an integer"),
        ("engine:\n  max_batch: [1]\n", "engine.max_batch", "an integer"),
        ("engine:\n  model: 7\n", "engine.model", "a string"),
        ("engine:\n  hub_timeout_s: 0\n", "engine.hub_timeout_s", "a number > 0"),
    ],
)
def test_bad_file_values_name_key_and_file(tmp_path, yaml_text, key, expected):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = str(err.value)
    assert key in message and str(path) in message and expected in message


def test_bad_override_names_the_command_line():
    with pytest.raises(ConfigError, match=r"engine\.max_batch = 0 \(from command line\)"):
        load_config(env={}, overrides={"engine.max_batch": 0})


def test_window_overlap_must_stay_below_window():
    with pytest.raises(ConfigError, match=r"window_overlap_s = 5\.0 \(from default\).*window_s"):
        load_config(env={"STREAMSCRIBE_ENGINE__WINDOW_S": "5"})
    cfg = load_config(env={}, overrides={"engine.window_s": 5, "engine.window_overlap_s": 0})
    assert cfg.engine.window_overlap_s == 0.0


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "engine:\n  max_batch: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML at line") as err:
        load_config(path, env={})
    assert str(path) in str(err.value)


def test_unknown_empty_section_in_file_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="no section 'loging'.*did you mean logging"):
        load_config(write(tmp_path, "loging:\n"), env={})


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "engine: fast\n"), env={})


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing set\n"), env={}) == Config()


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as err:
        load_config(missing, env={})
    assert str(missing) in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(env={"STREAMSCRIBE_CONFIG": str(missing)})


@pytest.mark.parametrize(
    ("text", "value"),
    [("TRUE", True), ("false", False), ("1", True), (" 0 ", False), ("True", True)],
)
def test_parse_bool_accepts_true_false_any_case_and_1_0(text, value):
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["yes", "", "2", "on"])
def test_parse_bool_rejects_anything_else(text):
    with pytest.raises(ValueError):
        parse_bool(text)


def test_to_dict_is_plain_nested_data():
    data = Config().to_dict()
    assert data["engine"]["max_batch"] == 16
    assert data["logging"] == {"level": "warning", "format": "json"}


def test_session_options_override_validates_like_the_file():
    from streaming.ops.config import SessionConfig, override_section

    base = SessionConfig()
    opts = override_section(
        "session",
        base,
        {"sample_rate": "8000", "encoding": "MULAW", "interim_results": "false"},
        "query string",
    )
    assert (opts.sample_rate, opts.encoding, opts.interim_results) == (8000, "mulaw", False)
    with pytest.raises(ConfigError, match=r"sample_rate = 11025 \(from query string\).*8000"):
        override_section("session", base, {"sample_rate": 11025}, "query string")
    with pytest.raises(ConfigError, match="unknown option 'hangover'.*did you mean hangover_ms"):
        override_section("session", base, {"hangover": 3}, "session.start")
    with pytest.raises(ConfigError, match="channels"):
        override_section("session", base, {"channels": 3}, "session.start")


@pytest.mark.parametrize(
    ("value", "refine"), [("none", None), ("None", None), ("", None), ("whisper", "whisper")]
)
def test_refine_model_none_or_empty_means_no_refine_model(value, refine):
    engine = load_config(env={"STREAMSCRIBE_ENGINE__REFINE_MODEL": value}).engine
    assert engine.refine == refine


def test_load_keywords_are_the_engine_section_without_refine_model():
    engine = EngineConfig(model="granite-nar", device="cpu", dtype="float32", refine_model="base")
    primary = engine.load_keywords()
    assert "refine_model" not in primary
    assert primary == {k: v for k, v in dataclasses.asdict(engine).items() if k != "refine_model"}
    # The refine model loads with the primary's device, dtype and sources: only `model` differs.
    assert engine.load_keywords(engine.refine) == {**primary, "model": "base"}

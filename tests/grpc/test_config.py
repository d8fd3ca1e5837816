"""ServerConfig.load: defaults < file (TOML/JSON) < PROTOSERVE_* env < flags; validated."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from server.config import (
    _FIELDS,
    ConfigError,
    ServerConfig,
    add_serve_arguments,
    config_from_args,
)

ROOT = Path(__file__).resolve().parents[2]
MODELS = str(ROOT / "models")


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        f'[server]\nport = 6000\nmax_queue = 7\nworkers = 3\nmodel_repo = "{MODELS}"\n'
        "max_delay_ms = 2.5\n"
    )
    env = {"PROTOSERVE_PORT": "6001", "PROTOSERVE_MAX_QUEUE": "8", "PROTOSERVE_CUDA": "ON"}
    cfg = ServerConfig.load(f, env, {"port": 6002, "workers": None})
    assert cfg.port == 6002  # flag
    assert cfg.max_queue == 8  # env over file
    assert cfg.workers == 3  # file (the flag was not given)
    assert cfg.max_delay_ms == 2.5
    assert cfg.max_batch_size == ServerConfig.max_batch_size  # default
    assert cfg.model_repo == Path(MODELS)


def test_json_file_and_config_from_env(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"metrics_port": 9100, "model_repo": MODELS, "data_dir": "d"}))
    cfg = ServerConfig.load(None, {"PROTOSERVE_CONFIG": str(f)})
    assert (cfg.metrics_port, cfg.data_dir) == (9100, Path("d"))


def test_flags(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(
        ["--port", "0", "--model-repo", MODELS, "--max-classes-per-collection", "5"]
    )
    env = {"PROTOSERVE_PORT": "7", "PROTOSERVE_MAX_QUEUE": "9", "PROTOSERVE_MODEL_INSTANCES": "2"}
    cfg = config_from_args(args, env=env)
    assert (cfg.port, cfg.max_classes_per_collection, cfg.max_queue) == (0, 5, 9)
    assert cfg.model_instances == 2 and ServerConfig(model_repo=MODELS).model_instances == 0


@pytest.mark.parametrize(
    ("file_text", "env", "overrides", "words"),
    [
        ("", {"PROTOSERVE_PORT": "x"}, {}, ["PROTOSERVE_PORT", "integer", "'x'"]),
        ("", {"PROTOSERVE_MAX_DELAY_MS": "-1"}, {}, ["max_delay_ms", ">= 0"]),
        ("bogus = 1\n", {}, {}, ["unknown setting 'bogus'"]),
        ("port = 70000\n", {}, {}, ["port", "0..65535"]),
        ('max_queue = "many"\n', {}, {}, ["max_queue", "positive integer"]),
        ("port = [\n", {}, {}, ["c.toml"]),
        ("", {}, {"max_images_per_request": 0}, ["max_images_per_request"]),
        ("", {}, {"model_instances": -1}, ["model_instances", ">= 0 (0: automatic)"]),
        ("", {"PROTOSERVE_RUN_BATCH": "-2"}, {}, ["run_batch", ">= 0 (0: automatic)"]),
        ("", {}, {"nope": 1}, ["unknown setting 'nope'"]),
        ("", {"PROTOSERVE_MODEL_REPO": "/no/such"}, {}, ["model_repo", "not a directory"]),
    ],
)
def test_invalid_settings_name_the_setting(
    tmp_path: Path,
    file_text: str,
    env: dict[str, str],
    overrides: dict[str, object],
    words: list[str],
) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f'model_repo = "{MODELS}"\n' + file_text)
    with pytest.raises(ConfigError) as e:
        ServerConfig.load(f, env, overrides)
    for w in words:
        assert w in str(e.value)


def test_missing_or_unsupported_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml"):
        ServerConfig.load(tmp_path / "nope.toml")
    (tmp_path / "c.yaml").write_text("port: 1\n")
    with pytest.raises(ConfigError, match="toml or .json"):
        ServerConfig.load(tmp_path / "c.yaml")


def test_every_flag_says_what_it_does() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    flags = [a for a in parser._actions if a.dest in _FIELDS]
    assert len(flags) == len(_FIELDS)
    for action in flags:
        assert action.help and not action.help.startswith(" ("), action.dest

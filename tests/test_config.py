"""Server configuration: flags over RWKVD_* variables over defaults, and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import OPTIONS, ServerConfig, build_config, parse_serve_args
from service.engine.config import EngineConfig


def test_defaults() -> None:
    config = parse_serve_args([], {})
    assert config == ServerConfig()
    assert (config.grpc_port, config.http_port, config.engine.model_path) == (50051, 8000, None)


def test_flags_win_over_environment_which_wins_over_defaults() -> None:
    env = {"RWKVD_GRPC_PORT": "6000", "RWKVD_MAX_BATCH_SIZE": "8", "RWKVD_MODEL": "/m/a.pth", "RWKVD_THREADS": "3"}
    config = parse_serve_args(["--grpc-port", "7000"], env)
    assert config.grpc_port == 7000  # flag
    assert config.engine.max_batch_size == 8  # environment
    assert config.engine.model_path == "/m/a.pth"
    assert config.engine.threads == 3
    assert config.http_port == 8000  # default


def test_state_dtype_is_float32_unless_asked() -> None:
    assert parse_serve_args([], {}).engine.state_dtype == "float32"
    assert parse_serve_args([], {"RWKVD_STATE_DTYPE": "bfloat16"}).engine.state_dtype == "bfloat16"
    assert parse_serve_args(["--state-dtype", "float16"], {"RWKVD_STATE_DTYPE": "bfloat16"}).engine.state_dtype == (
        "float16"
    )


@pytest.mark.parametrize(
    ("argv", "cuda_available", "on"),
    [
        ([], True, True),  # auto: a CUDA device gets its engine process
        ([], False, False),  # auto on a CPU: the engine's threads keep the cores
        (["--device", "cuda:1"], False, True),
        (["--device", "cpu"], True, False),
        (["--engine-process", "on", "--device", "cpu"], False, True),
        (["--engine-process", "off"], True, False),
    ],
)
def test_the_engine_gets_a_process_of_its_own_on_cuda_unless_told(
    argv: list[str], cuda_available: bool, on: bool
) -> None:
    assert parse_serve_args(argv, {}).engine_process_on(cuda_available) is on


def test_every_option_has_a_distinct_flag_and_variable() -> None:
    assert len({o.flag for o in OPTIONS}) == len(OPTIONS)
    assert len({o.env for o in OPTIONS}) == len(OPTIONS)
    assert all(o.env.startswith("RWKVD_") for o in OPTIONS)


def test_api_keys_from_flags_environment_and_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k3\n\n  k4  \n")
    assert parse_serve_args(["--api-key", "k1", "--api-key", "k2"], {}).api_keys == ("k1", "k2")
    assert parse_serve_args([], {"RWKVD_API_KEYS": "a, b,"}).api_keys == ("a", "b")
    assert parse_serve_args(["--api-key-file", str(keys)], {}).api_keys == ("k3", "k4")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"grpc_port": 70000}, "grpc_port"),
        ({"log_format": "xml"}, "log_format"),
        ({"engine.backend": "cuda-magic"}, "backend"),
        ({"engine.max_batch_size": 64, "engine.max_batch_tokens": 8}, "max_batch_tokens"),
        ({"engine.prefill_chunk": 0}, "prefill_chunk"),
        ({"engine.state_dtype": "auto"}, "state_dtype must be float32, float16 or bfloat16"),
        ({"engine.state_dtype": "fp8"}, "state_dtype"),
        ({"engine_process": "yes"}, "engine_process must be auto, on or off"),
        ({"nonsense": 1}, "unknown settings"),
    ],
)
def test_invalid_settings_are_refused_naming_them(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_config(settings)


def test_bad_environment_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_serve_args([], {"RWKVD_GRPC_PORT": "fifty"})
    assert "RWKVD_GRPC_PORT" in capsys.readouterr().err


def test_engine_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        EngineConfig().max_batch_size = 3  # type: ignore[misc]

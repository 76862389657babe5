"""Settings from SageMaker/recsql environment variables and flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.errors import RecsqlError
from serve.cli import main
from serve.config import from_env
from serve.server import gunicorn_options


def test_local_defaults_bind_loopback() -> None:
    config = from_env({}, model_dir=Path("m"))
    assert config.host == "127.0.0.1" and config.port == 8080
    assert config.max_payload_bytes == 6_291_456 and not config.batch


def test_container_settings_from_sagemaker_env() -> None:
    env = {
        "RECSQL_CONTAINER": "true",
        "SAGEMAKER_BIND_TO_PORT": "9001",
        "SAGEMAKER_MODEL_SERVER_WORKERS": "3",
        "SAGEMAKER_MODEL_SERVER_TIMEOUT": "30",
        "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "text/csv",
        "SAGEMAKER_BATCH": "true",
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": "50",
        "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "4",
    }
    config = from_env(env)
    assert (config.host, config.port, config.workers, config.timeout) == ("0.0.0.0", 9001, 3, 30)
    assert config.model_dir == Path("/opt/ml/model")
    assert config.default_accept == "text/csv"
    assert config.batch and config.max_payload_bytes == 50 * 1024 * 1024
    assert config.max_concurrent_transforms == 4
    options = gunicorn_options(config)
    assert options["bind"] == "0.0.0.0:9001" and options["workers"] == 3
    assert options["timeout"] == 30 and options["graceful_timeout"] < 30
    assert options["worker_class"].endswith("DrainingGeventWorker")
    assert options["loglevel"] == "info" and from_env({}).log_format == "text"
    sagemaker_level = from_env({"SAGEMAKER_CONTAINER_LOG_LEVEL": "30"})  # a number there
    assert gunicorn_options(sagemaker_level)["loglevel"] == "warning"


def test_multi_model_container_has_no_startup_model() -> None:
    config = from_env({"SAGEMAKER_MULTI_MODEL": "true"}, container=True)
    assert config.model_dir is None and config.multi_model
    assert config.model_root == Path("/opt/ml/models")


def test_flags_override_env() -> None:
    config = from_env({"SAGEMAKER_BIND_TO_PORT": "9001"}, port=7000, workers=2)
    assert config.port == 7000 and config.workers == 2


@pytest.mark.parametrize(
    "env",
    [
        {"SAGEMAKER_MODEL_SERVER_WORKERS": "many"},
        {"RECSQL_FALLBACK": "zero"},
        {"RECSQL_LOG_FORMAT": "xml"},
    ],
)
def test_bad_settings_are_one_line_errors(env) -> None:
    with pytest.raises(RecsqlError):
        from_env(env)


def test_cli_needs_a_model(capsys, monkeypatch) -> None:
    for name in ("RECSQL_CONTAINER", "SAGEMAKER_MULTI_MODEL", "RECSQL_MODEL_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert main([]) == 1
    assert "--model-dir" in capsys.readouterr().err

"""The SageMaker training-container contract (`docker run IMAGE train`).

    /opt/ml/input/config/hyperparameters.json   {"name": "string value", ...}
    /opt/ml/input/data/<channel>/               event files, or a prepared folder
    /opt/ml/model/                              the artifact (becomes model.tar.gz)
    /opt/ml/output/failure                      the reason, when the job fails

The root is /opt/ml, or RECSQL_SM_ROOT (tests build a fake tree in a temp dir).
The toolkit's variables win where set: SM_MODEL_DIR, SM_CHANNELS +
SM_CHANNEL_<NAME>, SM_HPS (a JSON object), SM_OUTPUT_DATA_DIR.
Hyperparameter values are strings: each is json.loads'ed, and kept as the raw
string when that fails ("sgd" stays "sgd", "0.02" becomes 0.02). Names are the
seed's (num_embeddings, opt, lr, momentum, wd, epochs, batch_size) plus
TrainConfig's; names starting with `sagemaker_` (set by the SDK) are ignored,
any other unknown name fails the job, so a typo does not train with defaults.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/opt/ml")
FAILURE_LIMIT = 1024  # SageMaker shows the first 1024 characters


@dataclass(frozen=True)
class SageMakerEnv:
    """Where a job's files are. Channels and hyperparameters are read on use, inside
    the job's error handling, so a bad hyperparameters.json still leaves a failure file."""

    root: Path
    environ: Mapping[str, str]

    @classmethod
    def detect(cls, environ: Mapping[str, str] | None = None) -> SageMakerEnv | None:
        """The job's environment, or None when this is not a SageMaker training job."""
        environ = dict(os.environ if environ is None else environ)
        root = Path(environ.get("RECSQL_SM_ROOT") or DEFAULT_ROOT)
        has_sm_vars = any(k in environ for k in ("SM_MODEL_DIR", "SM_CHANNELS", "SM_HPS"))
        return cls(root, environ) if root.is_dir() or has_sm_vars else None

    @property
    def model_dir(self) -> Path:
        return Path(self.environ.get("SM_MODEL_DIR") or self.root / "model")

    @property
    def output_data_dir(self) -> Path:
        return Path(self.environ.get("SM_OUTPUT_DATA_DIR") or self.root / "output" / "data")

    @property
    def failure_path(self) -> Path:
        return self.root / "output" / "failure"

    def channels(self) -> dict[str, Path]:
        env, data = self.environ, self.root / "input" / "data"
        if "SM_CHANNELS" in env:
            try:
                names = json.loads(env["SM_CHANNELS"])
            except ValueError as exc:
                raise DataError(f"SM_CHANNELS is not a JSON list ({exc})") from exc
            return {n: Path(env.get(f"SM_CHANNEL_{n.upper()}") or data / n) for n in names}
        return {p.name: p for p in sorted(data.iterdir()) if p.is_dir()} if data.is_dir() else {}

    def hyperparameters(self) -> dict[str, Any]:
        """The raw (string-valued) hyperparameters: SM_HPS, else hyperparameters.json."""
        if self.environ.get("SM_HPS"):
            text, where = self.environ["SM_HPS"], "SM_HPS"
        else:
            path = self.root / "input" / "config" / "hyperparameters.json"
            if not path.is_file():
                return {}
            text, where = path.read_text(), str(path)
        try:
            hps = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(hps, dict):
            raise DataError(f"{where}: expected a JSON object of hyperparameters")
        return hps


def parse_hyperparameters(raw: Mapping[str, Any]) -> dict[str, Any]:
    """json.loads each string value, keeping the raw string when that fails."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[name] = value
    return out


def training_config(hyperparameters: Mapping[str, Any]) -> Any:
    from training.config import config_from_dict

    parsed = parse_hyperparameters(hyperparameters)
    return config_from_dict({k: v for k, v in parsed.items() if not k.startswith("sagemaker_")})


def input_paths(env: SageMakerEnv) -> list[Path]:
    """The `train` channel when there is one, else every channel."""
    channels = env.channels()
    if not channels:
        raise DataError(f"no input channels under {env.root / 'input' / 'data'}")
    return [channels["train"]] if "train" in channels else list(channels.values())


def write_failure(env: SageMakerEnv, reason: str) -> None:
    print(f"recsql train: error: {reason}", file=sys.stderr)
    try:
        env.failure_path.parent.mkdir(parents=True, exist_ok=True)
        env.failure_path.write_text(reason[:FAILURE_LIMIT] + "\n")
    except OSError as exc:
        log.error("cannot write %s: %s", env.failure_path, exc)

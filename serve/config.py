"""Server settings: one frozen dataclass, built once from env vars and CLI flags.

Names follow the SageMaker toolkits (`SAGEMAKER_*`) where one exists and use
`RECSQL_*` otherwise. Nothing else in serve/ reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import RecsqlError
from model.variants import DEFAULT_VARIANT, check_name, parse_weight, shares, split_spec

MB = 1024 * 1024
REALTIME_MAX_PAYLOAD = 6 * MB  # 6,291,456 bytes: the real-time InvokeEndpoint limit
BATCH_MAX_PAYLOAD_MB = 100
CONTAINER_MODEL_DIR = Path("/opt/ml/model")
CONTAINER_MODEL_ROOT = Path("/opt/ml/models")
FALLBACK_POLICIES = ("null", "mean", "popularity")
TABULAR_OUTPUTS = ("probability", "label")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class VariantSpec:
    """One production (or shadow) variant: `--variant NAME=DIR[:WEIGHT]`, `--shadow NAME=DIR`."""

    name: str
    model_dir: Path
    weight: float = 1.0


def parse_variant(text: str, shadow: bool = False) -> VariantSpec:
    """`NAME=DIR[:WEIGHT]` (a shadow takes no weight); a one-line error naming the spec."""
    flag = "--shadow" if shadow else "--variant"
    usage = "NAME=DIR" if shadow else "NAME=DIR[:WEIGHT]"
    try:
        name, directory, tail = split_spec(text.strip())
    except ValueError:
        raise RecsqlError(f"{flag} {text!r}: write {usage}") from None
    weight = 1.0
    if tail is not None and shadow:
        raise RecsqlError(f"{flag} {text!r}: a shadow variant takes no weight; write {usage}")
    if tail is not None:
        weight = parse_weight(tail, f"{flag} {text!r}")
    if not directory:
        raise RecsqlError(f"{flag} {text!r}: write {usage}")
    try:
        check_name(name)
    except RecsqlError as exc:
        raise RecsqlError(f"{flag} {text!r}: {exc}") from None
    return VariantSpec(name, Path(directory), weight)


def _variants(specs: Any) -> tuple[VariantSpec, ...]:
    """CLI strings (a list) or RECSQL_VARIANTS (one comma-separated string) -> specs."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    return tuple(s if isinstance(s, VariantSpec) else parse_variant(s) for s in specs)


@dataclass(frozen=True)
class ServeConfig:
    model_dir: Path | None = None  # the model served at startup (None: multi-model only)
    model_name: str = "model"  # its name in /models and /endpoints/<name>/invocations
    # A/B: several startup models, each user sticky to one by weight (model/variants.py);
    # empty: `model_dir` alone is the one variant, AllTraffic
    variants: tuple[VariantSpec, ...] = ()
    shadow: VariantSpec | None = None  # scores every request after the reply; never answers
    capture_dir: Path | None = None  # data capture (serve/capture.py): each variant's in/out
    capture_percent: float = 100.0  # share of requests captured
    capture_max_file_mb: float = 64.0  # a new capture file once one passes this
    capture_max_mb: float = 1024.0  # the capture folder's bound: oldest files go first
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    worker_class: str = "gevent"  # keeps connections alive; "sync" closes each one
    timeout: int = 60  # SAGEMAKER_MODEL_SERVER_TIMEOUT: worker heartbeat / request limit
    graceful_timeout: int = 25  # SIGTERM drain; SageMaker sends SIGKILL 30 s after SIGTERM
    keepalive: int = 75  # seconds an idle keep-alive connection stays open
    default_accept: str | None = None  # None: answer in the request's own content type
    max_payload_bytes: int = REALTIME_MAX_PAYLOAD
    batch: bool = False
    batch_strategy: str = "MULTI_RECORD"
    max_concurrent_transforms: int = 1
    multi_model: bool = False
    model_root: Path | None = None  # POST /models only loads from below this folder
    max_models_mb: float | None = None  # memory guard: cap on the models loaded via /models
    min_free_mb: float = 256.0  # memory guard: keep this much memory available
    fallback: str = "null"  # score for rows the model cannot score (see README)
    tabular_output: str = "probability"  # tabular models: "label" adds the class (label,prob)
    program: str = "inference.py"
    submit_dir: Path | None = None
    state_dir: Path | None = None  # shared by workers: model registry and metrics files
    log_level: str = "INFO"
    log_format: str = "text"  # "json": one JSON object a line (serve/logs.py)
    log_every: int = 1  # one request line per this many successful invocations (errors: all)
    # fresh events (serve/events.py): None = SQLite under state_dir; "off"; sqlite:///..., redis://
    events_url: str | None = None
    events_keep: int = 200  # last events kept per user (the history models' recent_events)
    events_ttl: int = 30 * 86400  # seconds a user is kept after their latest event
    events_prefix: str = "recsql:events:"  # Redis key prefix

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACK_POLICIES:
            choices = ", ".join(FALLBACK_POLICIES)
            raise RecsqlError(f"fallback policy {self.fallback!r} unknown; use one of {choices}")
        if self.tabular_output not in TABULAR_OUTPUTS:
            choices = " or ".join(TABULAR_OUTPUTS)
            raise RecsqlError(f"tabular output {self.tabular_output!r} unknown; use {choices}")
        if self.workers < 1:
            raise RecsqlError(f"workers must be >= 1, not {self.workers}")
        if self.log_format not in LOG_FORMATS:
            choices = " or ".join(LOG_FORMATS)
            raise RecsqlError(f"log format {self.log_format!r} unknown; use {choices}")
        if self.log_every < 1:
            raise RecsqlError(f"log_every must be >= 1, not {self.log_every}")
        if self.events_keep < 1 or self.events_ttl < 1:
            raise RecsqlError("RECSQL_EVENTS_KEEP and RECSQL_EVENTS_TTL must be >= 1")
        if self.events_url is not None and self.events_url != "off":
            scheme = self.events_url.partition("://")[0]
            if scheme not in ("sqlite", "redis", "rediss", "unix"):
                raise RecsqlError(
                    "RECSQL_EVENTS_URL must be off, sqlite:///path or redis://host:port/db"
                )
        if self.max_payload_bytes < 1:
            raise RecsqlError("the payload limit must be positive")
        self._check_variants()

    def _check_variants(self) -> None:
        if self.variants and self.model_dir is not None:
            raise RecsqlError("give --model-dir or --variant NAME=DIR[:WEIGHT], not both")
        if (self.variants or self.shadow) and self.multi_model:
            raise RecsqlError(
                "--variant/--shadow serve fixed models; --multi-model loads them through"
                " /models: use one or the other"
            )
        if self.shadow is not None and not self.production_variants:
            raise RecsqlError("--shadow needs a production model: --model-dir or --variant")
        names = [v.name for v in self.production_variants]
        names += [self.shadow.name] if self.shadow else []
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise RecsqlError(f"variant names must be unique; {', '.join(twice)} given twice")
        if self.variants:
            shares([v.weight for v in self.variants])  # a positive total
        if not 0 <= self.capture_percent <= 100:
            raise RecsqlError(f"capture percent must be 0..100, not {self.capture_percent:g}")
        if not 0 < self.capture_max_file_mb <= self.capture_max_mb:
            raise RecsqlError(
                "need 0 < RECSQL_CAPTURE_MAX_FILE_MB <= RECSQL_CAPTURE_MAX_MB, not"
                f" {self.capture_max_file_mb:g} and {self.capture_max_mb:g}"
            )

    @property
    def production_variants(self) -> tuple[VariantSpec, ...]:
        """The variants that answer requests: --variant ones, else --model-dir as AllTraffic."""
        if self.variants:
            return self.variants
        if self.model_dir is not None:
            return (VariantSpec(DEFAULT_VARIANT, self.model_dir),)
        return ()


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise RecsqlError(f"{name}={raw!r} is not an integer") from None


def _float(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise RecsqlError(f"{name}={raw!r} is not a number") from None


def from_env(
    env: Mapping[str, str] | None = None, container: bool | None = None, **flags: Any
) -> ServeConfig:
    """Build the config: defaults < environment < CLI flags (those not None).

    `container` (or RECSQL_CONTAINER=true) selects SageMaker container defaults:
    bind 0.0.0.0, model from /opt/ml/model (or /opt/ml/models in multi-model mode).
    """
    env = os.environ if env is None else env
    container = _flag(env.get("RECSQL_CONTAINER")) if container is None else container
    multi_model = _flag(env.get("SAGEMAKER_MULTI_MODEL")) or _flag(env.get("RECSQL_MULTI_MODEL"))
    batch = _flag(env.get("SAGEMAKER_BATCH"))
    workers = _int(env, "SAGEMAKER_MODEL_SERVER_WORKERS", os.cpu_count() or 1)
    payload_mb = _float(env, "SAGEMAKER_MAX_PAYLOAD_IN_MB", None)
    if payload_mb is not None:
        max_payload = int(min(payload_mb, BATCH_MAX_PAYLOAD_MB) * MB)
    else:
        max_payload = REALTIME_MAX_PAYLOAD
    model_dir = env.get("RECSQL_MODEL_DIR") or None
    model_root = env.get("RECSQL_MODEL_ROOT") or None
    if container:
        model_dir = model_dir or (None if multi_model else str(CONTAINER_MODEL_DIR))
        model_root = model_root or str(CONTAINER_MODEL_ROOT)
    submit = env.get("SAGEMAKER_SUBMIT_DIRECTORY") or None
    variants = _variants(flags.pop("variants", None) or env.get("RECSQL_VARIANTS") or "")
    shadow = flags.pop("shadow", None) or env.get("RECSQL_SHADOW") or None
    if variants and not env.get("RECSQL_MODEL_DIR") and flags.get("model_dir") is None:
        model_dir = None  # the container default /opt/ml/model gives way to the variants
    capture = env.get("RECSQL_CAPTURE_DIR") or None
    values: dict[str, Any] = {
        "model_dir": Path(model_dir) if model_dir else None,
        "model_name": env.get("RECSQL_MODEL_NAME") or "model",
        "variants": variants,
        "shadow": parse_variant(shadow, shadow=True) if isinstance(shadow, str) else shadow,
        "capture_dir": Path(capture) if capture else None,
        "capture_percent": _float(env, "RECSQL_CAPTURE_PERCENT", 100.0),
        "capture_max_file_mb": _float(env, "RECSQL_CAPTURE_MAX_FILE_MB", 64.0),
        "capture_max_mb": _float(env, "RECSQL_CAPTURE_MAX_MB", 1024.0),
        "host": "0.0.0.0" if container else "127.0.0.1",
        "port": _int(env, "SAGEMAKER_BIND_TO_PORT", 8080),
        "workers": workers,
        "worker_class": env.get("RECSQL_WORKER_CLASS") or "gevent",
        "timeout": _int(env, "SAGEMAKER_MODEL_SERVER_TIMEOUT", 60),
        "default_accept": env.get("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT") or None,
        "max_payload_bytes": max_payload,
        "batch": batch,
        "batch_strategy": env.get("SAGEMAKER_BATCH_STRATEGY") or "MULTI_RECORD",
        "max_concurrent_transforms": _int(env, "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", workers),
        "multi_model": multi_model,
        "model_root": Path(model_root) if model_root else None,
        "max_models_mb": _float(env, "RECSQL_MAX_MODELS_MB", None),
        "min_free_mb": _float(env, "RECSQL_MIN_FREE_MB", 256.0),
        "fallback": (env.get("RECSQL_FALLBACK") or "null").strip().lower(),
        "tabular_output": (env.get("RECSQL_TABULAR_OUTPUT") or "probability").strip().lower(),
        "program": env.get("SAGEMAKER_PROGRAM") or "inference.py",
        "submit_dir": Path(submit) if submit else None,
        "state_dir": Path(env["RECSQL_STATE_DIR"]) if env.get("RECSQL_STATE_DIR") else None,
        "log_level": (
            env.get("SAGEMAKER_CONTAINER_LOG_LEVEL") or env.get("RECSQL_LOG_LEVEL") or "INFO"
        ),
        "log_format": (env.get("RECSQL_LOG_FORMAT") or "text").strip().lower(),
        "log_every": _int(env, "RECSQL_LOG_EVERY", 1),
        "events_url": env.get("RECSQL_EVENTS_URL") or None,
        "events_keep": _int(env, "RECSQL_EVENTS_KEEP", 200),
        "events_ttl": _int(env, "RECSQL_EVENTS_TTL", 30 * 86400),
        "events_prefix": env.get("RECSQL_EVENTS_PREFIX") or "recsql:events:",
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    return ServeConfig(**values)

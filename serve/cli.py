"""`recsql serve`: the inference server (also what a SageMaker container runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

_DESCRIPTION = (
    "Serve a model directory over SageMaker's container HTTP API "
    "(/ping, /invocations, /models, ...). Settings come from SAGEMAKER_* and RECSQL_* "
    "environment variables; flags override them. Binds 127.0.0.1 unless --container "
    "(or RECSQL_CONTAINER=true), which binds 0.0.0.0 and serves /opt/ml/model."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (SageMaker-compatible)", description=_DESCRIPTION
    )
    _add_arguments(p)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, help="model directory (or RECSQL_MODEL_DIR)")
    p.add_argument("--name", dest="model_name", help="the model's name (default: model)")
    p.add_argument(
        "--variant",
        action="append",
        dest="variants",
        metavar="NAME=DIR[:WEIGHT]",
        help="a production variant instead of --model-dir (repeat for A/B): each user goes to"
        " one variant by weight (default 1), always the same (a hash of the user id)"
        ' (or RECSQL_VARIANTS="a=/m/a:0.5,b=/m/b:0.5")',
    )
    p.add_argument(
        "--shadow",
        metavar="NAME=DIR",
        help="a shadow variant: scores every request after the reply is sent; its answers"
        " go to the metrics, the log and --capture only (or RECSQL_SHADOW)",
    )
    p.add_argument(
        "--capture",
        dest="capture_dir",
        type=Path,
        metavar="DIR",
        help="data capture: write each variant's input and output under DIR"
        " (or RECSQL_CAPTURE_DIR)",
    )
    p.add_argument(
        "--capture-percent",
        type=float,
        metavar="P",
        help="share of requests captured, 0-100 (default 100, or RECSQL_CAPTURE_PERCENT)",
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1; container 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (default 8080 or SAGEMAKER_BIND_TO_PORT)")
    p.add_argument("--workers", type=int, help="worker processes (default: CPU count)")
    p.add_argument("--worker-class", help="gunicorn worker class (default gevent)")
    p.add_argument("--timeout", type=int, help="request/worker timeout, seconds (default 60)")
    p.add_argument(
        "--container", action="store_true", default=None, help="SageMaker container defaults"
    )
    p.add_argument(
        "--multi-model", action="store_true", default=None, help="enable the /models API"
    )
    p.add_argument("--model-root", type=Path, help="POST /models loads only from below here")
    p.add_argument(
        "--fallback",
        choices=("null", "mean", "popularity"),
        help="score for unknown ids (default null: empty output)",
    )
    p.add_argument(
        "--log-every",
        type=int,
        metavar="N",
        help="one request log line per N successful invocations; failures always "
        "(default 1, or RECSQL_LOG_EVERY; RECSQL_LOG_LEVEL=WARNING drops them all)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from model.errors import RecsqlError
    from serve.config import from_env
    from serve.server import run

    config = from_env(
        container=args.container,
        model_dir=args.model_dir,
        model_name=args.model_name,
        variants=args.variants,
        shadow=args.shadow,
        capture_dir=args.capture_dir,
        capture_percent=args.capture_percent,
        host=args.host,
        port=args.port,
        workers=args.workers,
        worker_class=args.worker_class,
        timeout=args.timeout,
        multi_model=args.multi_model,
        model_root=args.model_root,
        fallback=args.fallback,
        log_every=args.log_every,
    )
    if not config.production_variants and not config.multi_model:
        raise RecsqlError(
            "give --model-dir DIR, --variant NAME=DIR[:WEIGHT] (repeatable)"
            " or --multi-model to load models via /models"
        )
    return run(config)


def main(argv: list[str] | None = None) -> int:
    """`python -m serve [flags]`: `recsql serve` without the other subcommands' imports."""
    import logging
    import os
    import sys

    from model.errors import RecsqlError

    parser = argparse.ArgumentParser(
        prog="recsql serve", description=_DESCRIPTION, allow_abbrev=False
    )
    _add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    level = os.environ.get("SAGEMAKER_CONTAINER_LOG_LEVEL") or os.environ.get("RECSQL_LOG_LEVEL")
    if level and level.isdigit():
        level = logging.getLevelName(int(level))
    logging.basicConfig(
        level=level or "INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except RecsqlError as exc:
        print(f"recsql serve: error: {exc}", file=sys.stderr)
        return 1

"""The `recsql` console script: one entry point, subcommands owned by the packages.

Each package that drives a subcommand has a `cli.py` with `register(subparsers)`;
this module only stitches them together, so a command lives next to its code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

_COMMAND_MODULES = ("training.cli", "serve.cli", "serve.deploy", "db.cli")


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (`--train` is not read as `--train-mse-rows`);
    add_subparsers makes every subcommand's parser of the same class."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="recsql",
        description="Score user-product pairs with a recommender model from SQL and HTTP.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a package without commands yet
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = os.environ.get("SAGEMAKER_CONTAINER_LOG_LEVEL") or os.environ.get("RECSQL_LOG_LEVEL")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (level or "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from model.errors import RecsqlError

    try:
        return int(args.func(args) or 0)
    except RecsqlError as exc:
        print(f"recsql {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

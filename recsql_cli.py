"""The `recsql` console script: one entry point, subcommands owned by the packages.

Each package that drives a subcommand has a `cli.py` with `register(subparsers)`;
this module only stitches them together, so a command lives next to its code. A
command line that names a subcommand imports only the package that owns it: the
container's `recsql serve` never imports the AWS control plane (deploy/).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand -> the module whose register() adds it (tests check the two agree)
COMMANDS = {
    **dict.fromkeys(
        ("synth", "prepare", "train", "evaluate", "train-tabular", "synth-fraud"), "training.cli"
    ),
    "serve": "serve.cli",
    "deploy": "deploy.cli",
    "ab-report": "abtest.cli",
    **dict.fromkeys(("load", "sql", "score", "demo"), "db.cli"),
    "events": "db.cli",
}


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (`--train` is not read as `--train-mse-rows`);
    add_subparsers makes every subcommand's parser of the same class."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given a command line that names a known subcommand, only the
    part that parses it (so only that package is imported)."""
    parser = Parser(
        prog="recsql",
        description="Score user-product pairs with a recommender model from SQL and HTTP.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    # the top-level options take no values: the first other word is the subcommand
    command = next((a for a in argv or () if not a.startswith("-")), None)
    wanted = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in wanted:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
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

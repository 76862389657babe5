"""recsql_cli: the subcommand table, and which packages a command line imports."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import recsql_cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_command_table_names_what_each_module_registers() -> None:
    registered = {}
    for module in dict.fromkeys(recsql_cli.COMMANDS.values()):
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        registered.update(dict.fromkeys(sub.choices, module))
    assert registered == recsql_cli.COMMANDS


def test_a_command_line_parses_the_same_with_the_partial_parser() -> None:
    argv = ["-v", "train", "x.csv", "--objective", "mse"]
    assert vars(recsql_cli.build_parser(argv).parse_args(argv)) == vars(
        recsql_cli.build_parser().parse_args(argv)
    )


def _imported(code: str) -> list[str]:
    """The recsql packages a fresh interpreter has imported after running `code`."""
    probe = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'model', 'training', 'serve', 'db', 'deploy'})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_serve_path_never_imports_the_control_plane() -> None:
    # `recsql serve` (the container's) fails here for want of a model, after parsing
    serve = "import recsql_cli\nassert recsql_cli.main(['serve']) == 1"
    assert _imported(serve) == ["model", "serve"]
    assert _imported("import serve.cli, serve.server") == ["model", "serve"]
    assert "deploy" in _imported("import recsql_cli\nrecsql_cli.build_parser()")

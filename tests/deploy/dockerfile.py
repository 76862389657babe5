"""A small Dockerfile reader for the tests: stages, instructions, continuation lines."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Instruction:
    keyword: str
    value: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ENTRYPOINT/CMD/HEALTHCHECK CMD, else None."""
        text = self.value
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + 3 :] if "CMD" in text else ""
        try:
            value = json.loads(text.strip())
        except ValueError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def labels(self) -> dict[str, str]:
        labels = {}
        for inst in self.all("LABEL"):
            for token in shlex.split(inst.value):
                key, _, value = token.partition("=")
                labels[key] = value
        return labels


def logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments and blank lines may sit inside a continued RUN
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return lines


def parse(path: Path = ROOT / "Dockerfile") -> tuple[list[Instruction], list[Stage]]:
    """(instructions before the first FROM, stages in order)."""
    preamble: list[Instruction] = []
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, value = line.partition(" ")
        inst = Instruction(keyword.upper(), value.strip())
        if inst.keyword == "FROM":
            parts = inst.value.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif stages:
            stages[-1].instructions.append(inst)
        else:
            preamble.append(inst)
    return preamble, stages

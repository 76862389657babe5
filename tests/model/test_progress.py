"""Progress bars: redrawn in place on a terminal, a few plain lines in a log."""

from __future__ import annotations

import io
import re
import time

import pytest

from model import progress
from model.progress import progress_bar

ANSI = re.compile(r"\x1b\[")


class _Terminal(io.StringIO):
    encoding = "utf-8"  # what tqdm checks before it draws with blocks

    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_fast_loop_writes_a_first_and_a_last_line() -> None:
    log = io.StringIO()
    with progress_bar(total=200_000, desc="synth", unit="row", file=log) as bar:
        for _ in range(200_000):
            bar.update(1)
            bar.set_postfix(loss=0.5)  # set_postfix redraws at once on a terminal
    text = log.getvalue()
    assert "\r" not in text and not ANSI.search(text)
    lines = text.splitlines()
    assert len(lines) == 2 and text.endswith("\n"), lines
    assert lines[0].startswith("synth:   0%") and "0/200000" in lines[0]
    assert lines[1].startswith("synth: 100%") and "200000/200000" in lines[1]
    assert lines[1].isascii()


def test_off_a_terminal_one_line_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress._LogLines, "interval", 0.05)
    log = io.StringIO()
    started = time.monotonic()
    bar = progress_bar(total=40, desc="epoch 1", file=log, leave=False, mininterval=0)
    for _ in range(40):
        time.sleep(0.01)
        bar.update(1)
        bar.refresh()
    bar.close()
    elapsed = time.monotonic() - started
    text = log.getvalue()
    assert "\r" not in text and not ANSI.search(text)
    lines = text.splitlines()
    # the first line, then at most one per interval, then the last (leave=False too)
    assert 3 <= len(lines) <= elapsed / 0.05 + 2, (elapsed, lines)
    assert "40/40" in lines[-1] and all(lines)


def test_a_disabled_bar_writes_nothing() -> None:
    log = io.StringIO()
    with progress_bar(total=10, file=log, disable=True) as bar:
        bar.update(10)
    assert log.getvalue() == ""


def test_on_a_terminal_the_usual_bar() -> None:
    term = _Terminal()
    with progress_bar(total=10, desc="read", file=term, mininterval=0) as bar:
        for _ in range(10):
            bar.update(1)
    text = term.getvalue()
    assert text.count("\r") >= 10 and text.count("\n") == 1
    assert "read: 100%" in text and "█" in text

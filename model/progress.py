"""Progress bars: tqdm's bar on a terminal, a few plain lines in a log.

On a terminal tqdm redraws one line in place with '\\r'. A log that is not a terminal
(SageMaker's CloudWatch, `docker logs`, a pipe) would keep every redraw, thousands of them,
so there a bar writes one plain line (no '\\r', no ANSI codes, an ASCII bar) when it starts,
at most one every LOG_INTERVAL_S seconds while it runs, and one when it closes.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(*, file: IO[str] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar (same arguments) written to `file` (default stderr): redrawn in place on a
    terminal, as plain lines every LOG_INTERVAL_S seconds anywhere else."""
    stream = sys.stderr if file is None else file
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(file=stream, **kwargs)
    return _LogLines(file=stream, ascii=True, **kwargs)


class _LogLines(tqdm):
    """tqdm for a log: every redraw tqdm asks for (updates, refresh(), set_postfix()) goes
    through display(), which lets one through per interval as a line of its own."""

    interval = LOG_INTERVAL_S
    _next_line = 0.0
    _closing = False

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm's request to clear the bar: nothing to clear in a log
            return False
        now = time.monotonic()
        if self._closing or now >= self._next_line:
            self.fp.write(f"{self}\n")
            self.fp.flush()
            self._next_line = now + self.interval
        return True

    def close(self) -> None:
        # tqdm's own close redraws in place and then ends the line; here the last state is
        # one more line (also for leave=False bars), and tqdm only tidies up.
        if not self.disable:
            self._closing = True
            self.refresh()
            self.leave = False
        super().close()

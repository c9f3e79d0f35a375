"""Progress bars on stderr: tqdm, drawn as separate lines at most every 30 s when stderr is not a terminal.

A bar redrawn ten times a second into a log file fills it with carriage-return lines (47 KB
for a 13 s SASRec run), and a log line written while the bar is on screen would continue the
bar's line. A redirected run (a batch job's log) gets a bar line now and then, and the last
one, each on a line of its own between the log lines. Callers set a bar's postfix with
``refresh=False``: a refreshing ``set_postfix`` redraws at every call whatever the interval.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from tqdm import tqdm

REDIRECTED_INTERVAL_S = 30.0


# cursor moves: tqdm draws a bar opened inside another (position 1) as "\n" + bar + ESC[A
CURSOR_MOVE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class LineWriter:
    """A file for tqdm that writes each redraw of a bar as one line of ``sys.stderr`` (no
    carriage returns, no cursor moves)."""

    def write(self, text: str) -> None:
        for line in CURSOR_MOVE.sub("", text).replace("\r", "\n").splitlines():
            if line.strip():  # tqdm draws "\r" + bar + padding, and clears with spaces
                sys.stderr.write(line.rstrip() + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def progress(iterable: Any = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on stderr; hidden when ``show`` is False (ranks other than 0)."""
    if sys.stderr.isatty():
        return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, disable=not show, **kwargs)
    # tqdm's monitor thread would redraw every maxinterval (10 s) otherwise
    kwargs.setdefault("mininterval", REDIRECTED_INTERVAL_S)
    kwargs.setdefault("maxinterval", REDIRECTED_INTERVAL_S)
    # a line written cannot be erased: a bar that would vanish from a terminal at the end
    # (leave=False) would leave its last redraw, "0%" for a short one; it ends with its final state instead
    kwargs["leave"] = True
    return tqdm(iterable, file=LineWriter(), disable=not show, **kwargs)

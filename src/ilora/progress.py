"""Progress bars on stderr: tqdm, redrawn at most every 30 s when stderr is not a terminal.

A bar redrawn ten times a second into a log file fills it with carriage-return lines (47 KB
for a 13 s SASRec run); a redirected run still gets a line now and then, and the last one.
Callers set a bar's postfix with ``refresh=False``: a refreshing ``set_postfix`` redraws at
every call whatever the interval.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

REDIRECTED_INTERVAL_S = 30.0


def progress(iterable: Any = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on stderr; hidden when ``show`` is False (ranks other than 0)."""
    if not sys.stderr.isatty():  # tqdm's monitor thread would redraw every maxinterval (10 s) otherwise
        kwargs.setdefault("mininterval", REDIRECTED_INTERVAL_S)
        kwargs.setdefault("maxinterval", REDIRECTED_INTERVAL_S)
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, disable=not show, **kwargs)

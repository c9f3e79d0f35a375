"""Progress bars on stderr: tqdm, drawn as separate lines at most every 30 s when stderr is not a terminal.

A bar redrawn ten times a second into a log file fills it with carriage-return lines (47 KB
for a 13 s SASRec run), and a log line written while the bar is on screen would continue the
bar's line. A redirected run (a batch job's log) gets a bar line now and then, and the last
one, each on a line of its own between the log lines. Callers set a bar's postfix with
``refresh=False``: a refreshing ``set_postfix`` redraws at every call whatever the interval.
Within `library_bars_as_lines` (around the LLM loads and saves) transformers' own bars
("Loading weights", "Writing model shards") are drawn the same way when stderr is redirected.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
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


def redirected(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A bar's tqdm arguments for a redirected stderr: one line per redraw, at most every 30 s."""
    kwargs = dict(kwargs, file=LineWriter())
    # tqdm's monitor thread would redraw every maxinterval (10 s) otherwise
    kwargs.setdefault("mininterval", REDIRECTED_INTERVAL_S)
    kwargs.setdefault("maxinterval", REDIRECTED_INTERVAL_S)
    # a line written cannot be erased: a bar that would vanish from a terminal at the end
    # (leave=False) would leave its last redraw, "0%" for a short one; it ends with its final state instead
    kwargs["leave"] = True
    return kwargs


def progress(iterable: Any = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on stderr; hidden when ``show`` is False (ranks other than 0)."""
    if sys.stderr.isatty():
        return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, disable=not show, **kwargs)
    return tqdm(iterable, disable=not show, **redirected(kwargs))


def _library_bar(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """transformers' tqdm hook: its bars drawn as `progress` draws ours when stderr is redirected."""
    if sys.stderr.isatty() or not isinstance(factory, type) or not issubclass(factory, tqdm):
        return factory(*args, **kwargs)  # a terminal, or bars switched off (transformers' empty stand-in)
    return factory(*args, **redirected(kwargs))


@contextlib.contextmanager
def library_bars_as_lines() -> Iterator[None]:
    """Within the block, transformers' progress bars follow `progress`'s rule: unchanged on a
    terminal, one line per redraw (no carriage returns or cursor moves) at most every 30 s
    when stderr is redirected. A transformers without ``set_tqdm_hook`` (5.24 has it) keeps its
    own bars. The previous hook is restored on exit."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:
        yield
        return
    previous = set_hook(_library_bar)
    try:
        yield
    finally:
        set_hook(previous)

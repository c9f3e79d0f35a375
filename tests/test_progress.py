"""Progress bars: throttled when stderr is redirected, hidden on ranks other than 0."""

from __future__ import annotations

import io

import pytest

from ilora import progress as progress_module
from ilora.progress import REDIRECTED_INTERVAL_S, progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_redirected_bar_redraws_at_most_every_30_s(monkeypatch) -> None:
    """Updated as the trainers update it (a step, then the postfix without a refresh), 0.15 s
    apart: tqdm's defaults would redraw at every step (interval 0.1 s), ours only at the start
    and at the end."""
    import time

    from tqdm import tqdm

    def run(make) -> int:
        out = io.StringIO()
        monkeypatch.setattr(progress_module.sys, "stderr", out)
        with make(out) as bar:
            for step in range(4):
                time.sleep(0.15)
                bar.update(1)
                bar.set_postfix(loss=f"{step:.3f}", refresh=False)
        return out.getvalue().count("\n")

    ours = run(lambda out: progress(total=4))
    plain = run(lambda out: tqdm(total=4, file=out))
    assert ours <= 2
    assert plain == 1 and run(lambda out: tqdm(total=4, file=out, mininterval=0)) == 1  # tqdm: one line of redraws
    with progress(total=1) as bar:
        assert bar.mininterval == bar.maxinterval == REDIRECTED_INTERVAL_S == 30.0


def test_a_redirected_bar_and_log_lines_each_keep_their_own_lines(monkeypatch) -> None:
    """What a batch job's log file holds: no carriage return, no bar line continued by a log line."""
    import logging

    out = io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", out)
    log = logging.getLogger("test_progress")
    handler = logging.StreamHandler(out)
    log.addHandler(handler)
    try:
        with progress(total=2, desc="train", mininterval=0, maxinterval=0) as bar:
            bar.update(1)
            log.warning("epoch 1 done")
            bar.update(1)
        with progress(total=1, desc="eval", leave=False) as bar:
            bar.update(1)
        with progress(total=1, desc="train") as outer:  # a validation bar inside the training bar
            for _ in progress(range(2), desc="eval", leave=False, mininterval=0, maxinterval=0):
                pass
            outer.update(1)
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert "epoch 1 done" in lines
    assert all(line == "epoch 1 done" or line.startswith(("train:", "eval:")) for line in lines), lines
    assert lines[-1].startswith("train: 100%|") and any(line.startswith("eval: 100%|") for line in lines)


def test_a_terminal_bar_keeps_tqdms_interval_and_a_hidden_bar_writes_nothing(monkeypatch) -> None:
    monkeypatch.setattr(progress_module.sys, "stderr", FakeTerminal())
    with progress(total=3) as bar:
        assert bar.mininterval == 0.1
    hidden_out = io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", hidden_out)
    with progress(total=3, show=False) as hidden:
        hidden.update(3)
    assert hidden.disable and hidden_out.getvalue() == ""


@pytest.mark.usefixtures("library_bars_on")
def test_transformers_bars_in_a_redirected_log_are_plain_lines_and_the_hook_is_restored(monkeypatch) -> None:
    """What loading a model writes into a batch job's log: transformers' "Loading weights" bar
    as plain lines (no carriage return or cursor move), and nothing changed after the block."""
    from transformers.utils import logging as hf_logging

    out = io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", out)
    previous = hf_logging.set_tqdm_hook(None)
    try:
        with progress_module.library_bars_as_lines():
            for _ in hf_logging.tqdm(range(3), desc="Loading weights", mininterval=0):
                pass
            hf_logging.disable_progress_bar()  # transformers' own switch still hides its bars
            try:
                for _ in hf_logging.tqdm(range(2), desc="Hidden"):
                    pass
            finally:
                hf_logging.enable_progress_bar()
        assert hf_logging.set_tqdm_hook(None) is None  # the block's hook is gone again
        text = out.getvalue()
        assert "\r" not in text and "\x1b" not in text and "Hidden" not in text
        lines = text.splitlines()
        assert lines and all(line.startswith("Loading weights:") for line in lines)
        assert lines[-1].startswith("Loading weights: 100%|") and "3/3" in lines[-1]
        terminal = FakeTerminal()
        monkeypatch.setattr(progress_module.sys, "stderr", terminal)
        with progress_module.library_bars_as_lines():  # a terminal: transformers' bar as tqdm draws it
            for _ in hf_logging.tqdm(range(2), desc="Loading weights", mininterval=0):
                pass
        assert "\r" in terminal.getvalue()  # redrawn in place, not as lines
    finally:
        hf_logging.set_tqdm_hook(previous)

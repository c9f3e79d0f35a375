"""Progress bars: throttled when stderr is redirected, hidden on ranks other than 0."""

from __future__ import annotations

import io

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
        return out.getvalue().count("\r")

    ours = run(lambda out: progress(total=4))
    plain = run(lambda out: tqdm(total=4, file=out))
    assert ours <= 2 < plain
    with progress(total=1) as bar:
        assert bar.mininterval == bar.maxinterval == REDIRECTED_INTERVAL_S == 30.0


def test_a_terminal_bar_keeps_tqdms_interval_and_a_hidden_bar_writes_nothing(monkeypatch) -> None:
    monkeypatch.setattr(progress_module.sys, "stderr", FakeTerminal())
    with progress(total=3) as bar:
        assert bar.mininterval == 0.1
    hidden_out = io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", hidden_out)
    with progress(total=3, show=False) as hidden:
        hidden.update(3)
    assert hidden.disable and hidden_out.getvalue() == ""

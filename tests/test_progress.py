"""Progress bars: throttled when stderr is redirected, hidden on ranks other than 0."""

from __future__ import annotations

import io

from ilora import progress as progress_module
from ilora.progress import REDIRECTED_INTERVAL_S, progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_redirected_bar_redraws_at_most_every_30_s(monkeypatch) -> None:
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())
    with progress(total=3) as bar:
        assert bar.mininterval == REDIRECTED_INTERVAL_S == 30.0
        for _ in range(3):
            bar.update(1)  # within 30 s: no redraw between the first and the closing line
    assert progress_module.sys.stderr.getvalue().count("\r") <= 2


def test_a_terminal_bar_keeps_tqdms_interval_and_a_hidden_bar_writes_nothing(monkeypatch) -> None:
    monkeypatch.setattr(progress_module.sys, "stderr", FakeTerminal())
    with progress(total=3) as bar:
        assert bar.mininterval == 0.1
    hidden_out = io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", hidden_out)
    with progress(total=3, show=False) as hidden:
        hidden.update(3)
    assert hidden.disable and hidden_out.getvalue() == ""

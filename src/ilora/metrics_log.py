"""Metrics to CSV and TensorBoard: one `MetricsLog` per CSV file, same rows in both."""

from __future__ import annotations

import csv
import io
from pathlib import Path


class MetricsLog:
    """Appends rows to ``<dir>/<name>.csv`` and the same scalars to TensorBoard (``<dir>/tb``).

    The CSV columns are the keys of the first row; later rows may omit some (left empty)
    but may not add new ones. A resumed run passes ``purge_step`` (TensorBoard then hides
    the interrupted run's events from that step on) and puts the CSV back with `restore`.
    Without ``purge_step`` the run starts from its first step: an earlier run's CSV of this
    name and, when this log opens the writer, its TensorBoard event files are removed (an
    ``--overwrite`` that kept them would mix two runs in one curve).
    """

    def __init__(self, out_dir: str | Path, name: str = "metrics", writer=None, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"{name}.csv"
        self.prefix = "" if name == "metrics" else f"{name}/"
        if purge_step is None:
            self.path.unlink(missing_ok=True)
            if writer is None:
                for events in (out_dir / "tb").glob("events.out.tfevents.*"):
                    events.unlink()
        self.writer = writer or SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=purge_step)
        self.fields: list[str] | None = None

    def log(self, row: dict[str, float | int | str], step: int) -> None:
        if self.fields is None:
            self.fields = list(row)
            with self.path.open("w", newline="", encoding="utf-8") as fh:
                csv.DictWriter(fh, self.fields).writeheader()
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, self.fields).writerow(row)
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self.writer.add_scalar(self.prefix + key.replace("@", "_at_"), value, step)
        self.writer.flush()

    def text(self) -> str:
        """The CSV written so far ("" before the first row): what a checkpoint stores."""
        if self.fields is None or not self.path.is_file():
            return ""
        with self.path.open(newline="", encoding="utf-8") as fh:
            return fh.read()

    def restore(self, text: str) -> None:
        """Put the CSV back as `text` returned it (a resumed run appends after those rows only)."""
        if not text:
            self.fields = None
            self.path.unlink(missing_ok=True)
            return
        with self.path.open("w", newline="", encoding="utf-8") as fh:
            fh.write(text)
        self.fields = next(csv.reader(io.StringIO(text)))

    def close(self) -> None:
        self.writer.close()


class NullLog:
    """A `MetricsLog` that writes nothing: what ranks other than 0 log to in a distributed run."""

    def log(self, row: dict[str, float | int | str], step: int) -> None:
        pass

    def text(self) -> str:
        return ""

    def restore(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

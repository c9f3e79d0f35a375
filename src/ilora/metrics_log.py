"""Metrics to CSV and TensorBoard: one `MetricsLog` per CSV file, same rows in both."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLog:
    """Appends rows to ``<dir>/<name>.csv`` and the same scalars to TensorBoard (``<dir>/tb``).

    The CSV columns are the keys of the first row; later rows may omit some (left empty)
    but may not add new ones.
    """

    def __init__(self, out_dir: str | Path, name: str = "metrics", writer=None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"{name}.csv"
        self.prefix = "" if name == "metrics" else f"{name}/"
        self.writer = writer or SummaryWriter(log_dir=str(out_dir / "tb"))
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

    def close(self) -> None:
        self.writer.close()

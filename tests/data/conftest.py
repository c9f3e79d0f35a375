"""Fixtures for the data-layer tests: the shared data directory and legacy-file writers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
LASTFM = SHARED / "datasets" / "lastfm"


@pytest.fixture
def lastfm_dir() -> Path:
    """The real LastFM data; the test is skipped only if ../shared is missing."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return LASTFM


def _legacy_frame(rows: list[tuple[list[int], int]], num_items: int, width: int = 4, order: tuple[str, ...] = ("seq", "len_seq", "next")) -> pd.DataFrame:
    """LastFM-style frame: ``(history, next)`` -> padded ``seq`` lists, ``len_seq``, ``next``."""
    columns = {
        "seq": [list(h) + [num_items] * (width - len(h)) for h, _ in rows],
        "len_seq": [max(len(h), 1) for h, _ in rows],
        "next": [t for _, t in rows],
    }
    return pd.DataFrame({name: columns[name] for name in order})


@pytest.fixture
def legacy_frame() -> Callable[..., pd.DataFrame]:
    """The LastFM-style frame builder (see `_legacy_frame`)."""
    return _legacy_frame


@pytest.fixture
def write_lastfm_like(tmp_path: Path) -> Callable[..., Path]:
    """Write a LastFM-like directory (id2name.txt + .df pickles) and return it."""

    def write(
        titles: list[str],
        splits: dict[str, pd.DataFrame],
        directory: Path | None = None,
    ) -> Path:
        directory = directory or tmp_path / "lastfm_like"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "id2name.txt").write_text("".join(f"{i}::{t}\n" for i, t in enumerate(titles)), encoding="utf-8")
        names = {"train": "train_data.df", "val": "Val_data.df", "test": "Test_data.df"}
        for name, frame in splits.items():
            frame.to_pickle(directory / names[name])
        return directory

    return write


@pytest.fixture
def small_lastfm(write_lastfm_like: Callable[..., Path]) -> Path:
    """6 items, padding 6, width 4; train has one no-history row (row 0)."""
    titles = ["Morcheeba", "Enigma", "Café Del Mar", "Fläsh", "A::B", "Zed"]
    train = _legacy_frame([([], 0), ([0], 1), ([0, 1], 2), ([0, 1, 2], 3), ([1, 2, 3, 4], 5)], 6)
    val = _legacy_frame([([3, 4, 5], 0)], 6)
    test = _legacy_frame([([5, 4], 1), ([2, 3, 1, 0], 4)], 6)
    return write_lastfm_like(titles, {"train": train, "val": val, "test": test})


@pytest.fixture
def np_rng() -> np.random.Generator:
    return np.random.default_rng(1234)

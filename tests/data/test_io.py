"""`load_dataset`: format detection, overrides, the min_len filter."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ilora.data import load_dataset
from ilora.data.io import detect_format
from ilora.data.native import write_native
from ilora.data.synthetic import make_synthetic
from ilora.errors import ConfigError, DataError


@pytest.fixture
def native_dir(tmp_path: Path) -> Path:
    return write_native(make_synthetic(users=50, items=30, seed=2), tmp_path / "native")


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "logs"
    directory.mkdir()
    pd.DataFrame({"user": [1, 1, 1, 1, 2, 2], "item": [1, 2, 3, 4, 1, 3], "timestamp": [1, 2, 3, 4, 1, 2]}).to_csv(
        directory / "interactions.csv", index=False
    )
    return directory


def test_detect_each_format(native_dir: Path, small_lastfm: Path, log_dir: Path) -> None:
    assert detect_format(native_dir) == "native"
    assert detect_format(native_dir / "dataset.json") == "native"
    assert detect_format(small_lastfm) == "llara"
    assert detect_format(small_lastfm / "Val_data.df") == "llara"
    assert detect_format(log_dir) == "interactions"
    assert detect_format(log_dir / "interactions.csv") == "interactions"


def test_load_each_format_sets_source_and_format(native_dir: Path, small_lastfm: Path, log_dir: Path) -> None:
    for path, fmt, kwargs in ((native_dir, "native", {}), (small_lastfm, "llara", {"allow_pickle": True}), (log_dir, "interactions", {})):
        ds = load_dataset(path, **kwargs)
        assert ds.source == str(path)
        assert ds.load_info["format"] == fmt
        ds.validate()
    assert load_dataset(small_lastfm / "Test_data.df", allow_pickle=True).source == str(small_lastfm / "Test_data.df")


def test_options_of_interaction_logs_are_refused_for_stored_datasets(native_dir: Path, small_lastfm: Path, log_dir: Path) -> None:
    """--max-len / --items used to be ignored silently for native and LLaRA data."""
    with pytest.raises(ConfigError, match="max_len only applies to interaction logs; this is a native dataset"):
        load_dataset(native_dir, max_len=5)
    with pytest.raises(ConfigError, match="items only applies to interaction logs; this is a llara dataset"):
        load_dataset(small_lastfm, allow_pickle=True, items=log_dir / "items.csv")
    assert load_dataset(log_dir, max_len=2).max_len == 2 and load_dataset(log_dir).max_len == 10


def test_a_df_file_that_is_not_a_split_file_is_refused_not_replaced_by_its_directory(small_lastfm: Path) -> None:
    """Naming my_other_split.df used to read the directory's train/val/test files and report them as that file."""
    other = small_lastfm / "my_other_split.df"
    other.write_bytes((small_lastfm / "Val_data.df").read_bytes())
    for fmt in ("auto", "llara"):
        with pytest.raises(DataError, match=r"my_other_split\.df: not an iLoRA/LLaRA split file .*whole directory"):
            load_dataset(other, format=fmt, allow_pickle=True)
    assert load_dataset(small_lastfm / "Val_data.df", allow_pickle=True).splits["train"] is not None


def test_no_samples_left_after_min_len_is_refused(native_dir: Path) -> None:
    """The check used to run before the filter: convert --min-len wrote a dataset nothing could read back."""
    longest = max(int(split.length.max()) for split in load_dataset(native_dir).splits.values() if split is not None)
    assert load_dataset(native_dir, min_len=longest)
    with pytest.raises(DataError, match=rf"no samples in any split \(expected at least one sample with at least {longest + 1} history items"):
        load_dataset(native_dir, min_len=longest + 1)


def test_ambiguous_directory_needs_explicit_format(native_dir: Path, small_lastfm: Path) -> None:
    for name in ("train_data.df", "id2name.txt"):
        (native_dir / name).write_bytes((small_lastfm / name).read_bytes())
    with pytest.raises(DataError, match="several formats"):
        load_dataset(native_dir, allow_pickle=True)
    assert load_dataset(native_dir, format="native").load_info["format"] == "native"
    assert load_dataset(native_dir, format="llara", allow_pickle=True).num_items == 6


def test_nothing_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"missing: not found$"):
        load_dataset(tmp_path / "missing")
    monkeypatch.chdir(tmp_path)  # a relative path says what it was resolved against
    with pytest.raises(DataError, match="^" + re.escape(f"missing: not found (relative to the working directory {tmp_path})") + "$"):
        load_dataset("missing")
    with pytest.raises(DataError, match="no dataset found"):
        load_dataset(tmp_path)
    with pytest.raises(ConfigError):
        load_dataset(tmp_path, format="parquet")


@pytest.mark.parametrize("min_len", [1, 2, 3, 5])
def test_min_len_filter_matches_reference(native_dir: Path, min_len: int) -> None:
    full = load_dataset(native_dir)
    ds = load_dataset(native_dir, min_len=min_len)
    for name in ("train", "val", "test"):
        src = full.splits[name]
        keep = [i for i in range(len(src)) if src.length[i] >= min_len]
        np.testing.assert_array_equal(ds.splits[name].history, src.history[keep])
        np.testing.assert_array_equal(ds.splits[name].target, src.target[keep])
        counts = ds.load_info["splits"][name]
        assert counts["dropped_below_min_len"] == len(src) - len(keep)
        assert counts["rows_len_ge_3"] == sum(1 for i in range(len(src)) if src.length[i] >= 3)
    with pytest.raises(ConfigError):
        load_dataset(native_dir, min_len=0)


def test_real_lastfm_with_reference_filter(lastfm_dir: Path) -> None:
    ds = load_dataset(lastfm_dir, allow_pickle=True, min_len=3)
    frames = {n: pd.read_pickle(lastfm_dir / f) for n, f in (("train", "train_data.df"), ("val", "Val_data.df"), ("test", "Test_data.df"))}
    for name, frame in frames.items():  # the reference loaders' filter, applied with pandas
        assert len(ds.splits[name]) == int((frame["len_seq"] >= 3).sum())
    assert len(ds.splits["train"]) == 47872

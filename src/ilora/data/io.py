"""`load_dataset`: one entry point for every on-disk dataset format.

Formats (``format="auto"`` picks one from what is at ``path``):

* ``native``: a directory with ``dataset.json`` (`ilora.data.native`), or that file;
* ``llara``: an iLoRA/LLaRA directory with ``train_data.df`` / ``Val_data.df`` /
  ``Test_data.df`` (`ilora.data.legacy`), or one of those files (which stands for its
  whole directory; another ``.df`` name is an error); needs ``allow_pickle``;
* ``interactions``: a directory with ``interactions.csv|parquet``, or a ``.csv`` /
  ``.parquet`` log (`ilora.data.interactions`).

A directory that matches more than one format is an error (name the format explicitly).
So is a dataset without a single sample in any split once ``min_len`` has filtered it; one empty split is fine (commands
that evaluate a split refuse an empty one, see `ilora.cli.common.load_data`).

``min_len`` drops samples with fewer history items in every split (the reference
iLoRA/LLaRA loaders use ``len_seq >= 3``: ``min_len=3``); the default 1 keeps every
sample. Filtering renumbers samples, and candidate sets are keyed by sample index, so
compare runs only at the same ``min_len``. ``load_info`` on the result records, per
split, ``rows_in_source``, ``rows_len_ge_3`` (before the filter), ``dropped_no_history``
and ``dropped_below_min_len``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from ilora.data.dataset import SeqDataset, validate_prompt_titles
from ilora.data.interactions import is_interactions_path, read_interactions
from ilora.data.legacy import LEGACY_SPLIT_FILES, is_legacy_dir, read_legacy
from ilora.data.native import META_FILE, is_native_dir, read_native
from ilora.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Format = Literal["auto", "native", "llara", "interactions"]
FORMATS: tuple[str, ...] = ("auto", "native", "llara", "interactions")


def not_found(path: Path) -> DataError:
    """A missing dataset path; a relative one says what it was resolved against."""
    where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
    return DataError(path, f"not found{where}")


def detect_format(path: str | Path) -> str:
    """``native``, ``llara`` or ``interactions`` for ``path``; a `DataError` if none or several fit."""
    path = Path(path)
    if not path.exists():
        raise not_found(path)
    if path.is_file():
        if path.name == META_FILE:
            return "native"
        if path.suffix == ".df":
            return "llara"
        if is_interactions_path(path):
            return "interactions"
        raise DataError(path, "unknown dataset file", expected=f"{META_FILE}, a .df split file, or a .csv/.parquet log")
    found = [
        name
        for name, test in (("native", is_native_dir), ("llara", is_legacy_dir), ("interactions", is_interactions_path))
        if test(path)
    ]
    if not found:
        raise DataError(
            path,
            "no dataset found",
            expected=f"{META_FILE} (native), {', '.join(LEGACY_SPLIT_FILES.values())} (llara) "
            "or interactions.csv|parquet (interactions)",
        )
    if len(found) > 1:
        raise DataError(path, f"looks like several formats ({', '.join(found)}); choose one with --format / format=")
    return found[0]


def _dataset_dir(path: Path) -> Path:
    return path.parent if path.is_file() else path


def _legacy_dir(path: Path) -> Path:
    """The iLoRA/LLaRA directory ``path`` names: itself, or the directory of one of its split files."""
    if path.is_file() and path.name.lower() not in {name.lower() for name in LEGACY_SPLIT_FILES.values()}:
        raise DataError(
            path,
            "not an iLoRA/LLaRA split file (a split file stands for its whole directory, which is what is read)",
            expected=f"{', '.join(LEGACY_SPLIT_FILES.values())}, or the directory that holds them",
        )
    return _dataset_dir(path)


def filter_min_len(ds: SeqDataset, min_len: int) -> SeqDataset:
    """Drop samples with fewer than ``min_len`` history items (in place); record the counts."""
    if min_len < 1:
        raise ConfigError(f"min_len must be >= 1, got {min_len}")
    info = ds.load_info.setdefault("splits", {})
    for name, split in ds.splits.items():
        if split is None:
            info[name] = None
            continue
        counts = info.get(name) or {"rows_in_source": len(split), "dropped_no_history": 0}
        counts["rows_len_ge_3"] = int((split.length >= 3).sum())
        keep = split.length >= min_len
        counts["dropped_below_min_len"] = int((~keep).sum())
        info[name] = counts
        if not keep.all():
            ds.splits[name] = split.subset(np.flatnonzero(keep))
    ds.load_info["min_len"] = min_len
    return ds


def load_dataset(
    path: str | Path,
    *,
    format: Format | str = "auto",
    allow_pickle: bool = False,
    min_len: int = 1,
    max_len: int | None = None,
    items: str | Path | None = None,
) -> SeqDataset:
    """Read the dataset at ``path`` (see the module docstring).

    Args:
        format: ``auto`` (detect), ``native``, ``llara`` or ``interactions``.
        allow_pickle: needed to read legacy ``.df`` pickles (restricted unpickler).
        min_len: drop samples with fewer history items (1: keep all; 3: the reference filter).
        max_len: history window for ``interactions`` logs (default 10; other formats store
            theirs, and giving it for them is a `ConfigError`, not ignored).
        items: explicit items file for ``interactions`` logs (likewise refused for others).
    """
    path = Path(path)
    if format not in FORMATS:
        raise ConfigError(f"unknown dataset format {format!r} (expected one of {', '.join(FORMATS)})")
    if min_len < 1:
        raise ConfigError(f"min_len must be >= 1, got {min_len}")
    if not path.exists():
        raise not_found(path)
    chosen = detect_format(path) if format == "auto" else format
    if chosen != "interactions" and (max_len is not None or items is not None):
        given = [name for name, v in (("max_len", max_len), ("items", items)) if v is not None]
        verb = "applies" if len(given) == 1 else "apply"
        raise ConfigError(
            f"{path}: {' and '.join(given)} only {verb} to interaction logs; this is a {chosen} dataset (it stores its own history width and titles)"
        )
    if chosen == "native":
        ds = read_native(_dataset_dir(path))
    elif chosen == "llara":
        ds = read_legacy(_legacy_dir(path), allow_pickle=allow_pickle)
    else:
        ds = read_interactions(path, items=items, max_len=10 if max_len is None else max_len)
    ds.source = str(path)
    _warn_about_titles(ds)
    ds = filter_min_len(ds, min_len)
    if not any(len(split) for split in ds.splits.values() if split is not None):
        kept = "with a history" if min_len == 1 else f"with at least {min_len} history items (--min-len)"
        raise DataError(path, "no samples in any split", expected=f"at least one sample {kept}")
    return ds


def _warn_about_titles(ds: SeqDataset) -> None:
    """Log (not raise) the first title the teacher would refuse; the data itself is kept verbatim."""
    try:
        validate_prompt_titles(ds.catalog)
    except DataError as exc:
        log.warning("warning: %s; the dataset is read as it is, but `ilora teacher` will refuse it", exc)

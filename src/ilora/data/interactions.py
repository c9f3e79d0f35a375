"""Raw interaction logs -> leave-one-out, sliding-window splits.

Input files
-----------
* Interactions: CSV (UTF-8, header) or Parquet with columns ``user``, ``item``,
  ``timestamp`` (extra columns are ignored). Keys may be integers or strings; they are
  compared as text (``7`` in Parquet matches ``"7"`` in a CSV; ``"007"`` does not, nor does
  ``"7 "``: a key with spaces around it is kept as written, with a warning naming the first).
  Timestamps are finite numbers or ISO-8601 date-times (all rows of one kind; NaN,
  infinities, booleans and NaT are errors naming the row).
* Items (optional): CSV or Parquet with columns ``item``, ``title``.

A CSV line with more fields than the header is an error; a shorter one is read as if its
missing last fields were empty (pandas cannot tell the two apart), which is an error for
``user``, ``item`` and ``timestamp`` and goes unnoticed for an extra column. A log that
yields no sample at all (no user with two interactions) is an error.

Rows repeating an earlier row's user, item and timestamp are dropped, with a warning naming
the first (an event logged twice would otherwise be a sample whose target is its own last
history item); the same item at another time is a repeat consumption and is kept. The
counts (users, interactions, duplicates dropped, users with one interaction, who give no
sample) are in ``load_info["log"]``, shown by ``ilora data stats``.

``path`` may be a directory holding ``interactions.csv`` or ``interactions.parquet`` and,
optionally, ``items.csv`` or ``items.parquet``; or the interactions file itself, with the
items file looked up beside it under those names; or the items file is given explicitly.

Item ids
--------
With an items file, item ``i`` is the ``i``-th row of the items file (0-based; every
listed item is in the catalog, even if nobody interacted with it; an interaction with an
unlisted item is an error). Without one, ids follow the order of first appearance in the
interactions file and the title is the item key.

Splits (the iLoRA/LLaRA convention, per user)
--------------------------------------------
Each user's interactions are sorted by timestamp (ties keep file order): ``s_0 .. s_{T-1}``.
A sample predicts ``s_t`` from the window ``s_{max(0, t-max_len)} .. s_{t-1}`` (at most
``max_len`` most recent items, oldest first), for every ``t >= 1`` (``t = 0`` has no
history and gives no sample):

* test: ``t = T-1`` (the last interaction),
* val: ``t = T-2`` (the second last),
* train: ``1 <= t <= T-3`` (one sliding-window sample per earlier interaction).

So a user with ``T`` interactions gives ``max(0, T-3)`` train samples, one val sample if
``T >= 3`` and one test sample if ``T >= 2``. Samples are ordered by user (order of first
appearance in the file), then by time. `leave_one_out` is the reusable core (also used by
`ilora.data.synthetic`).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ilora.data.dataset import MAX_HISTORY_LEN, Catalog, SeqDataset, Split
from ilora.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INTERACTION_FILES = ("interactions.csv", "interactions.parquet")
ITEM_FILES = ("items.csv", "items.parquet")
TABLE_SUFFIXES = (".csv", ".parquet")


# --------------------------------------------------------------------------- the split


def leave_one_out(lengths: np.ndarray, items: np.ndarray, *, max_len: int, padding_id: int) -> dict[str, Split]:
    """Per-user sequences (concatenated, ``lengths[u]`` items each) -> train/val/test splits.

    See the module docstring for the exact rule. Vectorised: no Python loop over samples.
    """
    if not 1 <= max_len <= MAX_HISTORY_LEN:
        raise ConfigError(f"max_len must be between 1 and {MAX_HISTORY_LEN}, got {max_len}")
    lengths = np.asarray(lengths, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if lengths.sum() != len(items):
        raise ValueError(f"lengths sum to {lengths.sum()} but there are {len(items)} items")
    starts = np.cumsum(lengths) - lengths
    t = np.arange(len(items)) - np.repeat(starts, lengths)
    total = np.repeat(lengths, lengths)
    roles = {
        "train": (t >= 1) & (t <= total - 3),
        "val": (t >= 1) & (t == total - 2),
        "test": (t >= 1) & (t == total - 1),
    }
    positions = np.arange(max_len)[None, :]
    splits = {}
    for name, mask in roles.items():
        p = np.flatnonzero(mask)
        length = np.minimum(t[p], max_len)
        index = p[:, None] - length[:, None] + positions
        valid = positions < length[:, None]
        history = np.where(valid, items[np.clip(index, 0, max(len(items) - 1, 0))], padding_id)
        splits[name] = Split(history.reshape(len(p), max_len), length, items[p])
    return splits


def sequences_to_splits(sequences: Sequence[Sequence[int]], *, num_items: int, max_len: int) -> dict[str, Split]:
    """`leave_one_out` for a list of per-user item sequences (already in time order)."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    items = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if sequences else np.zeros(0, np.int64)
    return leave_one_out(lengths, items, max_len=max_len, padding_id=num_items)


# --------------------------------------------------------------------------- files


def find_interaction_files(path: str | Path, items: str | Path | None = None) -> tuple[Path, Path | None]:
    """The interactions file and the items file (or None) for ``path`` (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in INTERACTION_FILES if (path / n).is_file()]
        if len(found) != 1:
            what = "both " + " and ".join(INTERACTION_FILES) if found else "no interactions file"
            raise DataError(path, what, expected=f"exactly one of {', '.join(INTERACTION_FILES)}")
        interactions, folder = found[0], path
    elif path.is_file():
        if path.suffix not in TABLE_SUFFIXES:
            raise DataError(path, "unsupported interactions file type", expected="a .csv or .parquet file")
        interactions, folder = path, path.parent
    else:
        raise DataError(path, "not found")
    if items is not None:
        items = Path(items)
        if not items.is_file():
            raise DataError(items, "items file not found")
        return interactions, items
    beside = [folder / n for n in ITEM_FILES if (folder / n).is_file()]
    if len(beside) > 1:
        raise DataError(folder, "both items.csv and items.parquet", expected="at most one items file")
    return interactions, (beside[0] if beside else None)


def _undecodable(path: Path, encoding: str) -> DataError:
    """The error for the first byte of ``path`` that is not ``encoding`` text, with its line."""
    raw = path.read_bytes()
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return DataError(path, f"undecodable text at byte {exc.start} (line {line})", expected=f"{encoding} text")
    return DataError(path, "undecodable text", expected=f"{encoding} text")


def _read_csv(path: Path) -> pd.DataFrame:
    """Every cell as text; a line with more fields than the header is an error (a shorter one
    reads as if its missing fields were empty)."""
    try:
        # header=None: pandas then checks every line against the first one, including the
        # first data line (with a header row, an extra field there silently becomes the index).
        cells = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", header=None)
    except UnicodeDecodeError:
        raise _undecodable(path, "utf-8") from None
    except pd.errors.EmptyDataError:
        raise DataError(path, "the file is empty", expected="a header line and rows") from None
    header = [str(c) for c in cells.iloc[0].tolist()]
    if len(set(header)) != len(header):
        raise DataError(path, f"duplicate column names in the header {header}", expected="distinct column names")
    frame = cells.iloc[1:].reset_index(drop=True)
    frame.columns = header
    return frame


def _at(path: Path, row: int) -> dict[str, int | None]:
    """``DataError`` position of data row ``row`` (0-based, header excluded), with its line in
    the file where that is certain (`_csv_line`)."""
    return {"row": row, "line": _csv_line(path, row)}


def _csv_line(path: Path, row: int) -> int | None:
    """The 1-based line of data row ``row`` of a CSV whose records are one non-blank line each
    (header on line 1), so the line is ``row + 2``; None for Parquet, or a CSV with blank
    lines or a quoted cell spanning lines, where records and lines part (run on errors only)."""
    if path.suffix == ".parquet":
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    if any(not line.strip() for line in lines):
        return None
    records = sum(1 for _ in csv.reader(io.StringIO(text, newline="")))
    return row + 2 if records == len(lines) else None


def read_table(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """CSV (every cell as text, nothing turned into NaN but empty cells) or Parquet; checks columns."""
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = _read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(path, f"not a readable table ({str(exc).strip().splitlines()[0]})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            path, f"missing column(s) {', '.join(map(repr, missing))} (has {', '.join(repr(str(c)) for c in frame.columns)})",
            expected=f"columns {', '.join(columns)}",
        )
    frame = frame[list(columns)].reset_index(drop=True)
    for column in columns:
        blank = frame[column].isna().to_numpy() | (frame[column].astype(str).str.len() == 0).to_numpy()
        if blank.any():
            raise DataError(path, f"missing {column}", **_at(path, int(np.flatnonzero(blank)[0])))
    return frame


def _short(value: object) -> str:
    """A one-line repr of at most 60 characters (an array or nested list would span lines)."""
    text = " ".join(repr(value).split()) if isinstance(value, (str, int, float, np.integer, np.floating)) else f"<a {type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _keys(path: Path, series: pd.Series, column: str) -> np.ndarray:
    """Item/user keys as text (integers or strings only), as written: a key with spaces around
    it is another key than without them, with a warning naming the first."""
    if series.dtype.kind in "iu":
        return series.astype(str).to_numpy(dtype=object)
    values = series.tolist()
    for row, value in enumerate(values):
        if not isinstance(value, (str, int, np.integer)) or isinstance(value, (bool, np.bool_)):
            raise DataError(path, f"{column} key {_short(value)} is a {type(value).__name__}", **_at(path, row), expected="an integer or a string")
    keys = np.array([str(v) for v in values], dtype=object)
    padded = np.flatnonzero(pd.Series(keys).str.strip().to_numpy(dtype=object) != keys)
    if padded.size:
        row = int(padded[0])
        line = _csv_line(path, row)  # reads the file again: once, for the first such key only
        log.warning(
            "%s: %d %s key(s) begin or end with whitespace, kept as written (%r and %r are different %ss); the first: row %d%s",
            path, padded.size, column, keys[row], keys[row].strip(), column, row, f" (line {line})" if line else "",
        )
    return keys


def _parses_as_number(value: str) -> bool:
    """Text that `float` reads, finite or not (``nan``, ``inf`` included); not a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _is_finite_number(value: str) -> bool:
    """A finite number or the text of one (not a bool, not ``nan`` / ``inf``)."""
    return _parses_as_number(value) and bool(np.isfinite(float(value)))


def _is_iso_time(value: str) -> bool:
    try:
        parsed = pd.to_datetime(value, utc=True, format="ISO8601")
    except (TypeError, ValueError):
        return False
    return not pd.isna(parsed)


def _first_non_finite(path: Path, series: pd.Series, times: np.ndarray) -> None:
    """A `DataError` naming the first row whose numeric timestamp is NaN or infinite."""
    if times.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(times))
        if bad.size:
            row = int(bad[0])
            raise DataError(path, f"timestamp {series.tolist()[row]!r} is not finite", **_at(path, row), expected="a finite number")


def _times(path: Path, series: pd.Series) -> np.ndarray:
    """Timestamps as sortable numbers (finite numbers as they are; ISO-8601 date-times as ns since epoch).

    Text columns take the kind of their first row; the first row of another kind is an error.
    NaN, infinities and booleans are errors naming the row.
    """
    if series.dtype.kind in "iuf":
        times = series.to_numpy()
        _first_non_finite(path, series, times)
        return times
    if series.dtype.kind == "M":
        return series.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    values = series.tolist()
    if series.dtype.kind == "b":
        raise DataError(path, f"timestamp {values[0]!r} is a bool", **_at(path, 0), expected="a number or an ISO-8601 date-time")
    numeric = bool(values) and _parses_as_number(values[0])
    try:
        if numeric:
            times = pd.to_numeric(series).to_numpy()
            if times.dtype.kind not in "iuf" or any(isinstance(v, (bool, np.bool_)) for v in values):
                raise ValueError("not all numbers")
            _first_non_finite(path, series, times)
            return times
        parsed = pd.to_datetime(series, utc=True, format="ISO8601").dt.tz_localize(None)
        if parsed.isna().any():
            raise ValueError("not a date-time")
        return parsed.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    except (TypeError, ValueError):
        pass
    check, kind = (_is_finite_number, "a finite number like row 0") if numeric else (_is_iso_time, "an ISO-8601 date-time like row 0")
    row = next((r for r, value in enumerate(values) if not check(value)), None)
    if row is None:
        raise DataError(path, "unreadable timestamp column", expected="all numbers or all ISO-8601 date-times")
    raise DataError(path, f"timestamp {values[row]!r}", **_at(path, row), expected=kind)


def read_items_table(path: Path) -> tuple[pd.Index, Catalog]:
    """Items file -> (key index, catalog); ids follow the file's row order."""
    frame = read_table(path, ("item", "title"))
    keys = _keys(path, frame["item"], "item")
    duplicated = pd.Index(keys).duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        first = int(np.flatnonzero(keys == keys[row])[0])
        raise DataError(path, f"duplicate item key {keys[row]!r} (first in row {first})", **_at(path, row))
    titles = frame["title"].tolist()
    for row, title in enumerate(titles):  # a list, dict or float would otherwise become its repr as a title
        if not isinstance(title, (str, int, np.integer)) or isinstance(title, (bool, np.bool_)):
            raise DataError(path, f"title {_short(title)} is a {type(title).__name__}", **_at(path, row), expected="text (or an integer)")
    return pd.Index(keys), Catalog(tuple(str(t) for t in titles), source=str(path))


def read_interactions(path: str | Path, *, items: str | Path | None = None, max_len: int = 10) -> SeqDataset:
    """Read interaction logs and split them (see the module docstring)."""
    log_path, items_path = find_interaction_files(path, items)
    frame = read_table(log_path, ("user", "item", "timestamp"))
    users = _keys(log_path, frame["user"], "user")
    item_keys = _keys(log_path, frame["item"], "item")
    times = _times(log_path, frame["timestamp"])
    if items_path is not None:
        index, catalog = read_items_table(items_path)
        item_ids = index.get_indexer(item_keys)
        unknown = np.flatnonzero(item_ids < 0)
        if unknown.size:
            row = int(unknown[0])
            raise DataError(
                log_path, f"item {item_keys[row]!r} is not in {items_path.name}", **_at(log_path, row), expected=f"an item key listed in {items_path}"
            )
    else:
        item_ids, uniques = pd.factorize(item_keys, sort=False)
        catalog = Catalog(tuple(str(k) for k in uniques), source=str(log_path))
        log.info("%s: no items file; titles are the item keys", log_path)
    user_codes, user_uniques = pd.factorize(users, sort=False)
    item_ids = np.asarray(item_ids)
    duplicate = pd.DataFrame({"user": user_codes, "item": item_ids, "time": times}).duplicated().to_numpy()
    if duplicate.any():  # a logged event recorded twice would be a sample whose target is its own last history item
        row = int(np.flatnonzero(duplicate)[0])
        line = _csv_line(log_path, row)  # reads the file again: once, for the first duplicate only
        where = f"row {row}" + (f" (line {line})" if line else "")
        log.warning("%s: dropped %d duplicate interaction(s) (same user, item and timestamp as an earlier row; the first: %s)",
                    log_path, int(duplicate.sum()), where)
        keep = ~duplicate
        user_codes, item_ids, times = user_codes[keep], item_ids[keep], times[keep]
    order = np.lexsort((times, user_codes))
    lengths = np.bincount(user_codes, minlength=len(user_uniques))
    splits = leave_one_out(lengths, item_ids[order], max_len=max_len, padding_id=catalog.padding_id)
    if not any(len(s) for s in splits.values()):
        raise DataError(
            log_path, f"no samples: {len(frame)} interactions, and no user has two", expected="users with at least 2 interactions"
        )
    source = Path(path)
    counts = {name: {"rows_in_source": len(s), "dropped_no_history": 0} for name, s in splits.items()}
    info = {
        "format": "interactions", "splits": counts,
        "log": {  # what the split leaves out of the log: duplicate rows, and users whose one interaction has no history
            "users": len(user_uniques), "interactions": len(frame), "duplicates_dropped": int(duplicate.sum()),
            "users_with_one_interaction": int((lengths == 1).sum()),
        },
    }
    return SeqDataset(catalog, dict(splits), source=str(source), load_info=info)


def is_interactions_path(path: Path) -> bool:
    """A directory with an interactions file, or a .csv / .parquet file."""
    if path.is_dir():
        return any((path / n).is_file() for n in INTERACTION_FILES)
    return path.is_file() and path.suffix in TABLE_SUFFIXES

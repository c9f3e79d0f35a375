"""Reader for iLoRA / LLaRA dataset directories (legacy pandas pickles).

Layout of a directory (as published in the iLoRA and LLaRA repositories, ``data/ref/<name>/``):

* ``train_data.df``, ``Val_data.df``, ``Test_data.df``: pandas DataFrames saved with
  ``to_pickle``. Columns ``seq``, ``len_seq``, ``next`` in any order (extra columns of
  numbers, bools, strings or Python objects are ignored; date, timedelta, category and
  nullable-integer columns, MultiIndex axes and the Python-backed strings pandas 3 writes
  without pyarrow are refused: their pickles need pandas code). Protocols 3 to 5 only. ``seq`` is the history, left-aligned and padded to a fixed width with the id
  ``num_items``; ``len_seq`` is the number of real items; ``next`` is the target.
  Names match without regard to case (``val_data.df`` is read too). A missing file means
  that split is absent (``None``). DLLM2Rec's folders hold ``val_data.csv`` and
  ``test_data.csv`` instead, which this reader does not read.
* The catalog, one of (``id2name.txt`` wins if both exist):

  - ``id2name.txt`` (LastFM, Steam): UTF-8 lines ``id::name`` with ids ``0 .. n-1``;
  - ``u.item`` (MovieLens 100K): latin-1 lines ``id|title|...`` with ids ``1 .. n``; the
    ``.df`` files use ``id - 1``. Titles lose a trailing year ``" (1995)"`` and a trailing
    article moves to the front (``"Usual Suspects, The"`` -> ``"The Usual Suspects"``),
    as the reference loaders do (they cut the last 7 characters; we only cut a real year).

MovieLens variant: each history element is an ``(item_id, rating)`` tuple of NumPy ints,
padded with ``(num_items, 0)``, and ``next`` is such a tuple too; only the item id is kept.
Every element must then be such a pair (exactly two entries); ids must fit in int64 (a
larger unsigned id is reported with its real value).

Rows without any history item (the reference files store one per user, for the user's first
item: ``len_seq == 1`` and an all-padding ``seq``; ``len_seq == 0`` with one is the same row)
cannot be a sample; they are dropped and counted (``dropped_no_history`` in `read_legacy`'s ``load_info``). Every other inconsistency
is a `DataError` naming the file, the row (0-based position in the DataFrame) and the id.

Pickles can run code, so reading needs ``allow_pickle=True``, and even then nothing of
pandas runs on the file: `ilora.data.frame_pickle` reads it as data (its docstring lists
the allow-list of globals and the checks). Every cell is then checked in Python (a flat
list of integer ids, or of ``(id, rating)`` pairs) before NumPy sees the column.
"""

from __future__ import annotations

import logging
import re
import reprlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ilora.data.dataset import MAX_HISTORY_LEN, Catalog, SeqDataset, Split, validate_split
from ilora.data.frame_pickle import read_frame_pickle
from ilora.data.safe_pickle import require_opt_in
from ilora.errors import DataError

log = logging.getLogger(__name__)

LEGACY_SPLIT_FILES = {"train": "train_data.df", "val": "Val_data.df", "test": "Test_data.df"}
ID2NAME = "id2name.txt"
MOVIELENS_ITEMS = "u.item"
COLUMNS = ("seq", "len_seq", "next")


def is_legacy_dir(path: Path) -> bool:
    """True if ``path`` is a directory holding at least one iLoRA/LLaRA split file."""
    return path.is_dir() and bool(split_files(path))


def split_files(directory: Path) -> dict[str, Path]:
    """The split files present in ``directory``, by split, matched without regard to case:
    LLaRA writes ``Val_data.df``, a copy may hold ``val_data.df``. Two files for one split
    (``Val_data.df`` beside ``val_data.df``) are a `DataError` naming both."""
    names: dict[str, list[Path]] = {}
    for entry in directory.iterdir():
        if entry.is_file():
            names.setdefault(entry.name.lower(), []).append(entry)
    found = {}
    for split, name in LEGACY_SPLIT_FILES.items():
        matches = sorted(names.get(name.lower(), []))
        if len(matches) > 1:
            raise DataError(directory, f"two {split} split files, {' and '.join(m.name for m in matches)}", expected="one of them")
        if matches:
            found[split] = matches[0]
    return found


# --------------------------------------------------------------------------- pickles


def read_dataframe_pickle(path: Path, *, allow_pickle: bool) -> pd.DataFrame:
    """The ``seq``, ``len_seq`` and ``next`` columns of a ``.df`` pickle (those it has); opt-in required.

    The file is read as data (`ilora.data.frame_pickle`). The ``seq`` lists may hold at most
    as many ids as the file has bytes: an honest pickle spends at least two bytes on each,
    while rows that share one list through the pickle memo could otherwise make a small
    file ask for a history matrix of gigabytes.
    """
    require_opt_in(path, allow_pickle)
    data = path.read_bytes()
    _labels, _rows, columns = read_frame_pickle(path, data, COLUMNS)
    seq = columns.get("seq")
    if seq is not None and seq.dtype == object:
        ids = sum(len(v) for v in seq.tolist() if _is_cell(v))
        if ids > len(data):
            raise DataError(path, f"the seq lists hold {ids} ids in a file of {len(data)} bytes (rows share lists)", expected="one list per row")
    # the column's own dtype: pandas would otherwise infer one from an object column (strings)
    return pd.DataFrame({name: pd.Series(np.asarray(values), dtype=values.dtype, copy=False) for name, values in columns.items()})


# --------------------------------------------------------------------------- catalogs


def _decode(path: Path, encoding: str) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = len(_LINE_BREAK.findall(raw[: exc.start].decode(encoding, errors="replace")))  # \r\n, \n and \r, as the lines are split
        raise DataError(path, f"undecodable text at byte {exc.start}", line=line + 1, expected=f"{encoding} text") from None
    return _LINE_BREAK.split(text.removeprefix("\ufeff"))


_LINE_BREAK = re.compile(r"\r\n|\n|\r")  # Unix, Windows and old Mac line ends
_ID = re.compile(r"[+-]?[0-9]{1,18}")  # ASCII digits only: int() would also take "1_0" and other scripts' digits; 64-bit


def _catalog_id(path: Path, key: str, line: int, expected: str) -> int:
    if not _ID.fullmatch(key.strip()):
        raise DataError(path, f"non-integer id {key.strip()[:40]!r}", line=line + 1, expected=expected)
    return int(key.strip())


def _catalog_from_pairs(path: Path, pairs: list[tuple[int, int, str]], first_id: int, hint_numbering: bool = True) -> Catalog:
    """``(line index, id, title)`` -> Catalog; ids must be ``first_id .. first_id + n - 1``.
    ``hint_numbering``: an out-of-range error on ids that run one past that range asks whether
    the file numbers from ``first_id + 1`` (not for ids shifted on reading, as MovieLens')."""
    if not pairs:
        raise DataError(path, "the item catalog is empty", expected="at least one item")
    seen: dict[int, int] = {}
    for line, item, _ in pairs:
        if item in seen:
            raise DataError(path, f"duplicate catalog id (first on line {seen[item] + 1})", line=line + 1, item=item)
        seen[item] = line
    titles: list[str | None] = [None] * len(pairs)
    ids = [item for _, item, _ in pairs]
    one_based = hint_numbering and min(ids) == first_id + 1 and max(ids) == first_id + len(pairs)
    for line, item, title in pairs:
        index = item - first_id
        if not 0 <= index < len(pairs):
            hint = f"; the ids run {first_id + 1}..{first_id + len(pairs)}: numbered from {first_id + 1}?" if one_based else ""
            missing = [i for i in range(first_id, first_id + len(pairs)) if i not in seen]  # as many as ids outside the range
            named = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DataError(
                path,
                f"catalog id out of range: {'id' if len(missing) == 1 else 'ids'} {named} {'is' if len(missing) == 1 else 'are'} missing "
                f"(ids must have no gaps{hint})",
                line=line + 1,
                item=item,
                expected=f"ids {first_id}..{first_id + len(pairs) - 1}",
            )
        titles[index] = title
    return Catalog(tuple(t for t in titles if t is not None), source=str(path))


def read_id2name(path: Path) -> Catalog:
    """``id::name`` lines (UTF-8, ids 0-based, no gaps); blank lines are skipped."""
    pairs = []
    for line, text in enumerate(_decode(path, "utf-8")):
        if not text.strip():
            continue
        key, sep, name = text.partition("::")
        if not sep:
            raise DataError(path, f"no '::' separator: {text[:60]!r}", line=line + 1, expected="id::name")
        pairs.append((line, _catalog_id(path, key, line, "id::name"), name.strip()))
    return _catalog_from_pairs(path, pairs, first_id=0)


_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_ARTICLE = re.compile(r"^(.*), (The|A|An)$")


def movielens_title(raw: str) -> str:
    """``"Usual Suspects, The (1995)"`` -> ``"The Usual Suspects"``."""
    title = _YEAR.sub("", raw.strip())
    match = _ARTICLE.match(title)
    return f"{match.group(2)} {match.group(1)}" if match else title


def read_movielens_items(path: Path) -> Catalog:
    """MovieLens ``u.item`` (latin-1, ``id|title|...``, ids 1-based) -> 0-based catalog."""
    pairs = []
    for line, text in enumerate(_decode(path, "latin-1")):
        if not text.strip():
            continue
        fields = text.split("|")
        if len(fields) < 2:
            raise DataError(path, f"no '|' separator: {text[:60]!r}", line=line + 1, expected="id|title|...")
        pairs.append((line, _catalog_id(path, fields[0], line, "id|title|...") - 1, movielens_title(fields[1])))
    return _catalog_from_pairs(path, pairs, first_id=0, hint_numbering=False)


def read_legacy_catalog(directory: Path) -> Catalog:
    """``id2name.txt`` if present, else ``u.item``; a `DataError` if neither exists."""
    if (directory / ID2NAME).is_file():
        return read_id2name(directory / ID2NAME)
    if (directory / MOVIELENS_ITEMS).is_file():
        return read_movielens_items(directory / MOVIELENS_ITEMS)
    raise DataError(directory, "no item catalog", expected=f"{ID2NAME} (id::name) or {MOVIELENS_ITEMS} (MovieLens)")


# --------------------------------------------------------------------------- frames -> arrays


def _is_int(value: Any) -> bool:
    """An integer id: an int, a NumPy integer, or a float holding a whole number (not bool)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (float, np.floating)):
        return bool(np.isfinite(value)) and float(value).is_integer()
    return isinstance(value, (int, np.integer))


def _as_ids(array: np.ndarray) -> np.ndarray | None:
    """int64 view of an integer array, or of a float array of whole numbers; None otherwise
    (also for unsigned values that do not fit in int64)."""
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        return None
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "f" and np.isfinite(array).all() and (array == np.round(array)).all():
        return array.astype(np.int64)
    return None


def _short(value: Any) -> str:
    """A bounded description of a cell value for an error message (no deep recursion)."""
    if isinstance(value, (int, float, str, bytes, np.generic)) or value is None:
        return reprlib.repr(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, np.generic)) for v in value[:8]):
        return reprlib.repr(tuple(value) if isinstance(value, tuple) else list(value))
    return f"a {type(value).__name__} of length {len(value)}" if hasattr(value, "__len__") else f"a {type(value).__name__}"


def _first_bad_cell(path: Path, column: str, values: list[Any], *, pairs: bool) -> DataError | None:
    """The error for the first element of ``values`` (rows of a column) that is not an integer
    id (or, with ``pairs``, an ``(id, rating)`` pair); None if every element is one.

    Run before NumPy sees the cells: a pickle can make a cell any object graph (lists
    shared through the memo, nested 2**depth times when expanded), and only flat lists of
    numbers may reach ``np.array``.
    """
    for row, value in enumerate(values):
        elements = value if column == "seq" else [value]
        if not _is_cell(elements):
            return DataError(path, f"{column} is {_a(value)}, not a list", row=row, expected="a list of ids")
        for element in elements:
            if pairs and not (isinstance(element, (tuple, list)) and len(element) == 2):
                return DataError(path, f"{_short(element)} in column {column} is not an (id, rating) pair", row=row)
            item = element[0] if pairs else element
            if not _is_int(item):
                return DataError(path, f"non-integer value {_short(item)} in column {column}", row=row, expected="integers")
            if not -(2**63) <= int(item) < 2**63:
                return DataError(path, f"value {item} in column {column} does not fit in int64", row=row)
            if pairs and not isinstance(element[1], (int, float, np.integer, np.floating)):
                return DataError(path, f"rating {_short(element[1])} in column {column} is not a number", row=row)
    return None


def _is_cell(value: Any) -> bool:
    """A list-like cell: a list, a tuple or a 1-D array (a 0-d array has no length)."""
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)


def _a(value: Any) -> str:
    return f"a {type(value).__name__}" if not isinstance(value, np.ndarray) else f"a {value.ndim}-d array"


def _first_non_int(path: Path, column: str, values: list[Any], *, pairs: bool) -> DataError:
    """`_first_bad_cell`'s error, or a generic one for cells that are numbers of mixed shapes."""
    return _first_bad_cell(path, column, values, pairs=pairs) or DataError(
        path, f"column {column} cannot be read as integer ids", expected="integers of one shape"
    )


def _history_matrix(path: Path, values: list[Any], pairs: bool) -> np.ndarray:
    """The ``seq`` column -> int64 ``(n, width)``, or a `DataError` for ragged / non-integer rows."""
    if not values:
        return np.zeros((0, 0), dtype=np.int64)
    widths = [len(v) if _is_cell(v) else -1 for v in values]
    for row, width in enumerate(widths):
        if width == -1:
            raise DataError(path, f"seq is {_a(values[row])}, not a list", row=row, expected="a padded list of ids")
        if width == 0:
            raise DataError(path, "empty history list", row=row, expected="a padded list of ids")
        if width != widths[0]:
            raise DataError(path, f"seq has {width} entries, row 0 has {widths[0]}", row=row, expected="one padded width")
    if widths[0] > MAX_HISTORY_LEN:
        raise DataError(path, f"seq has {widths[0]} entries", row=0, expected=f"a history width of at most {MAX_HISTORY_LEN}")
    bad = _first_bad_cell(path, "seq", values, pairs=pairs)
    if bad is not None:
        raise bad
    try:
        matrix = np.array(values)
    except (ValueError, TypeError):
        matrix = np.array([[0]], dtype=object)
    if pairs:
        matrix = matrix[:, :, 0] if matrix.ndim == 3 and matrix.shape[2] == 2 else np.array([[0]], dtype=object)
    ids = _as_ids(matrix) if matrix.ndim == 2 else None  # cells that are arrays (of pairs) stack deeper
    if ids is None:
        raise _first_non_int(path, "seq", values, pairs=pairs)
    return ids


def _id_column(path: Path, series: pd.Series, column: str) -> np.ndarray:
    """An integer column (``len_seq`` / ``next``; MovieLens ``next`` tuples -> their item id)."""
    values = series.tolist()
    if series.dtype.kind in "iu":
        ids = _as_ids(series.to_numpy())
        if ids is None:
            raise _first_non_int(path, column, values, pairs=False)
        return ids
    pairs = bool(values) and isinstance(values[0], (tuple, list))
    bad = _first_bad_cell(path, column, values, pairs=pairs)
    if bad is not None:
        raise bad
    try:
        array = np.array([v[0] for v in values] if pairs else values)
    except (TypeError, IndexError, KeyError, ValueError):
        array = np.array([None], dtype=object)
    ids = _as_ids(array) if array.ndim == 1 else None
    if ids is None:
        raise _first_non_int(path, column, values, pairs=pairs)
    return ids


def frame_to_split(frame: pd.DataFrame, path: Path, catalog: Catalog) -> tuple[Split, dict[str, int]]:
    """Validate a legacy DataFrame and convert it; returns the split and its row counts.

    Rows with no history item (an all-padding ``seq`` with ``len_seq`` 1, as LLaRA's files hold a
    user's first interaction, or 0) are dropped and counted as ``dropped_no_history``; any
    other problem raises `DataError`.
    """
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}", expected=f"columns {', '.join(COLUMNS)}")
    seq = frame["seq"].tolist()
    first = next((v[0] for v in seq if _is_cell(v) and len(v)), None)
    pairs = isinstance(first, (tuple, list))
    history = _history_matrix(path, seq, pairs)
    length = _id_column(path, frame["len_seq"], "len_seq")
    target = _id_column(path, frame["next"], "next")
    no_history = (length <= 1) & (length >= 0) & (history == catalog.padding_id).all(axis=1) if history.size else np.zeros(0, bool)
    keep = np.flatnonzero(~no_history)
    split = Split(history[keep], length[keep], target[keep])
    validate_split(split, catalog, path, rows=keep)
    return split, {"rows_in_source": len(frame), "dropped_no_history": int(no_history.sum())}


def read_legacy(directory: str | Path, *, allow_pickle: bool = False) -> SeqDataset:
    """Read an iLoRA/LLaRA directory (see the module docstring) into a `SeqDataset`."""
    directory = Path(directory)
    if not is_legacy_dir(directory):
        raise DataError(directory, "no iLoRA/LLaRA split file", expected=", ".join(LEGACY_SPLIT_FILES.values()))
    present = split_files(directory)
    for path in present.values():
        require_opt_in(path, allow_pickle)
    catalog = read_legacy_catalog(directory)
    splits: dict[str, Split | None] = dict.fromkeys(LEGACY_SPLIT_FILES)
    counts: dict[str, dict[str, int] | None] = dict.fromkeys(LEGACY_SPLIT_FILES)
    for name, path in present.items():
        frame = read_dataframe_pickle(path, allow_pickle=allow_pickle)
        splits[name], counts[name] = frame_to_split(frame, path, catalog)
        if counts[name]["dropped_no_history"]:
            log.info("%s: dropped %d rows without any history item", path, counts[name]["dropped_no_history"])
    return SeqDataset(catalog, splits, source=str(directory), load_info={"format": "llara", "splits": counts})

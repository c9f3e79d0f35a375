"""Reader for iLoRA / LLaRA dataset directories (legacy pandas pickles).

Layout of a directory (as published in the iLoRA and LLaRA repositories, ``data/ref/<name>/``):

* ``train_data.df``, ``Val_data.df``, ``Test_data.df``: pandas DataFrames saved with
  ``to_pickle``. Columns ``seq``, ``len_seq``, ``next`` in any order (extra columns are
  ignored). ``seq`` is the history, left-aligned and padded to a fixed width with the id
  ``num_items``; ``len_seq`` is the number of real items; ``next`` is the target.
  Names match without regard to case (DLLM2Rec's folders write ``val_data.df``). A missing
  file means that split is absent (``None``).
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
item: ``len_seq == 1`` and an all-padding ``seq``) cannot be a sample; they are dropped and
counted (``dropped_no_history`` in `read_legacy`'s ``load_info``). Every other inconsistency
is a `DataError` naming the file, the row (0-based position in the DataFrame) and the id.

Pickles can run code, so reading needs ``allow_pickle=True`` and then goes through
`RestrictedUnpickler` with exactly these globals (a DataFrame of ints, lists and tuples of
NumPy ints needs nothing else):

* pandas: ``pandas.core.frame.DataFrame`` (our `_PickledDataFrame`: only the argument-less
  construction pickling uses, never a call that could ask for ``rows x columns`` cells),
  ``pandas.core.internals.managers.BlockManager``,
  ``pandas._libs.internals._unpickle_block`` (also under its pandas <= 1.3 name
  ``pandas.core.internals.blocks.new_block``), ``pandas.core.indexes.base._new_Index``,
  ``pandas.core.indexes.base.Index`` (also the removed ``pandas.core.indexes.numeric``
  ``Int64Index`` / ``UInt64Index``, read as ``Index``), ``pandas.core.indexes.range.RangeIndex``;
* NumPy, under both ``numpy.core`` (NumPy 1) and ``numpy._core`` (NumPy 2):
  ``multiarray._reconstruct`` (our `_reconstruct`: plain, empty ``(0,)`` ndarrays only, as
  pickling writes them, whose pickled state is checked before NumPy applies it, see
  `_CheckedArray`), ``multiarray.scalar`` and ``numeric._frombuffer`` (dtype checked, no
  object buffers); and ``numpy.ndarray`` (our `_ndarray`: the same checks when called),
  ``numpy.dtype`` (always a private copy: NumPy's ``dtype.__setstate__`` rewrites a
  descriptor in place, and every dtype is compared with a fresh one before use);
* ``builtins.slice`` (block placements), ``builtins.bytearray`` (protocol-4 buffers; our
  `_bytearray`: a copy of a bytes-like argument only, so a number cannot ask for gigabytes);
* pandas >= 3 writes the public names ``pandas.DataFrame`` / ``pandas.Index`` /
  ``pandas.RangeIndex`` and stores string column labels as Arrow arrays:
  ``pandas.StringDtype``, ``pandas.arrays.ArrowStringArray``, ``pyarrow.lib.py_buffer``,
  ``pyarrow.lib.type_for_alias`` and ``pyarrow.lib._restore_array`` (wrapped: every
  restored array is fully validated, so bad offsets cannot reach memory).
"""

from __future__ import annotations

import functools
import logging
import re
import reprlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ilora.data.dataset import MAX_HISTORY_LEN, Catalog, SeqDataset, Split, validate_split
from ilora.data.safe_pickle import canonical_dtype, private_dtype, require_opt_in, restricted_loads
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
    LLaRA writes ``Val_data.df``, DLLM2Rec's folders ``val_data.df``. Two files for one split
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


def _numpy_core_modules() -> list[Any]:
    """The NumPy core package under its current name, for both pickled spellings."""
    try:
        from numpy._core import multiarray, numeric  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return [multiarray, numeric]


def _restore_validated_array(data: Any) -> pa.Array:
    """``pyarrow.lib._restore_array`` followed by a full validation of offsets and buffers."""
    array = pa.lib._restore_array(data)
    try:
        array.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise ValueError(f"invalid Arrow array in pickle: {exc}") from None
    return array


def _scalar(dtype: Any, data: Any = None) -> Any:
    """``multiarray.scalar`` with a checked dtype."""
    return _numpy_core_modules()[0].scalar(canonical_dtype(dtype), *(() if data is None else (data,)))


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """``numeric._frombuffer`` with a checked, non-object dtype (NumPy checks the sizes)."""
    dtype = canonical_dtype(dtype)
    if dtype.hasobject or order not in ("C", "F"):
        raise ValueError("refused an object or oddly ordered buffer array in pickle")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


class _CheckedArray(np.ndarray):
    """The arrays a DataFrame pickle rebuilds: ``ndarray.__setstate__`` after checking the state.

    NumPy's own ``__setstate__`` trusts an object array's element list to match the shape;
    a shorter list crashes the interpreter (NumPy 2.4). Here the state must be
    ``(version, shape, dtype, fortran, data)`` with a plain shape, and ``data`` exactly
    ``prod(shape)`` objects (plain object dtype) or ``prod(shape) * itemsize`` bytes.
    """

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise ValueError("unsupported ndarray state in pickle")
        _version, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise ValueError(f"bad ndarray shape {shape!r:.80} in pickle")
        if not isinstance(fortran, bool):
            raise ValueError("bad ndarray order in pickle")
        dtype = canonical_dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if dtype.hasobject:
            if dtype != np.dtype(object) or not isinstance(data, list) or len(data) != count:
                raise ValueError(f"object array of shape {shape} with {type(data).__name__} data in pickle")
        elif not isinstance(data, (bytes, bytearray)) or len(data) != count * dtype.itemsize:
            raise ValueError(f"array of shape {shape} and dtype {dtype} with {len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__} bytes")
        super().__setstate__((1, shape, dtype, fortran, data))


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """``numpy.core.multiarray._reconstruct`` for plain ndarrays only, giving a `_CheckedArray`.

    Pickling always writes ``_reconstruct(ndarray, (0,), b"b")`` and sends the real shape
    with the state, so any other shape (which would allocate before any check) is refused;
    the placeholder dtype goes through `canonical_dtype` like every other dtype.
    """
    if subtype is not np.ndarray and subtype is not _ndarray:
        raise ValueError(f"refused to rebuild an array of type {subtype!r:.80}")
    if not (isinstance(shape, tuple) and len(shape) == 1 and type(shape[0]) is int and shape[0] == 0):
        raise ValueError(f"refused initial ndarray shape {shape!r:.80} in pickle (expected (0,))")
    return np.ndarray.__new__(_CheckedArray, (0,), _placeholder_dtype(dtype))


def _placeholder_dtype(dtype: Any) -> np.dtype:
    """The dtype argument of `_reconstruct` / `_ndarray`: a short spec (``b"b"``) or a pickled dtype, checked."""
    if isinstance(dtype, bytes):
        dtype = dtype.decode("ascii", errors="replace")
    if isinstance(dtype, str):
        dtype = private_dtype(dtype)
    return canonical_dtype(dtype)


def _ndarray(shape: Any, dtype: Any = "f8", *args: Any) -> np.ndarray:
    """What the allow-list maps ``numpy.ndarray`` to: called, it builds what `_reconstruct` builds."""
    if args:
        raise ValueError("refused ndarray buffer arguments in pickle")
    return _reconstruct(np.ndarray, shape, dtype)


class _PickledDataFrame(pd.DataFrame):
    """What the allow-list maps ``DataFrame`` to: built only as pickling builds one.

    Pickling writes ``DataFrame.__new__(DataFrame)`` (NEWOBJ, no arguments) and then the
    state (the block manager). A call with arguments, such as ``DataFrame(None, index,
    columns)``, would let a few bytes ask pandas for ``rows x columns`` cells; it is refused.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "_PickledDataFrame":
        if args or kwargs:
            raise ValueError("refused a DataFrame(...) call with arguments in pickle")
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # only a REDUCE call gets here
        raise ValueError("refused a DataFrame(...) call in pickle")


def _bytearray(data: Any = b"") -> bytearray:
    """What the allow-list maps ``builtins.bytearray`` to: a copy of bytes-like data, never ``bytearray(n)``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"refused bytearray({type(data).__name__}) in pickle (bytes-like data only)")
    return bytearray(data)


class _IndexClass:
    """What the allow-list maps the Index classes to: a name `_new_Index` may rebuild, never a call.

    Pickling writes ``_new_Index(<class>, {...})``; a direct ``Index(RangeIndex(0, n),
    dtype=float)`` call would let a few bytes materialise ``n`` values, so it is refused.
    """

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"refused a direct {self.cls.__name__}(...) call in pickle")


def _checked_new_Index(cls: Any, d: Any) -> Any:
    """``pandas.core.indexes.base._new_Index`` for the forms pickling writes: a `RangeIndex`
    from its integer bounds (nothing materialised), any other index from data the pickle
    itself holds (an array or a list), never from a lazy range that a dtype would expand."""
    from pandas.api.extensions import ExtensionArray
    from pandas.core.indexes.base import _new_Index
    from pandas.core.indexes.range import RangeIndex

    if not isinstance(cls, _IndexClass) or not isinstance(d, dict):
        raise ValueError(f"refused _new_Index({type(cls).__name__}, {type(d).__name__}) in pickle")
    if issubclass(cls.cls, RangeIndex):
        if not set(d) <= {"start", "stop", "step", "name"} or not all(type(d.get(k, 0)) is int for k in ("start", "stop", "step")):
            raise ValueError("refused a RangeIndex that is not start/stop/step integers in pickle")
    elif not isinstance(d.get("data"), (np.ndarray, ExtensionArray, list, tuple)):
        raise ValueError(f"refused an Index built from {type(d.get('data')).__name__} in pickle (arrays or lists only)")
    return _new_Index(cls.cls, d)


@functools.cache
def dataframe_pickle_globals() -> dict[tuple[str, str], Any]:
    """The allow-list (module, name) -> object for DataFrame pickles (see the module docstring)."""
    from pandas._libs.internals import _unpickle_block
    from pandas.core.indexes.base import Index
    from pandas.core.indexes.range import RangeIndex
    from pandas.core.internals.managers import BlockManager

    allowed: dict[tuple[str, str], Any] = {
        ("pandas.core.frame", "DataFrame"): _PickledDataFrame,
        ("pandas", "DataFrame"): _PickledDataFrame,
        ("pandas.core.internals.managers", "BlockManager"): BlockManager,
        ("pandas._libs.internals", "_unpickle_block"): _unpickle_block,
        ("pandas.core.internals.blocks", "new_block"): _unpickle_block,
        ("pandas.core.indexes.base", "_new_Index"): _checked_new_Index,
        ("pandas.core.indexes.base", "Index"): _IndexClass(Index),
        ("pandas", "Index"): _IndexClass(Index),
        ("pandas.core.indexes.numeric", "Int64Index"): _IndexClass(Index),
        ("pandas.core.indexes.numeric", "UInt64Index"): _IndexClass(Index),
        ("pandas.core.indexes.range", "RangeIndex"): _IndexClass(RangeIndex),
        ("pandas", "RangeIndex"): _IndexClass(RangeIndex),
        # pandas 3 pickles string column labels as Arrow-backed arrays.
        ("pandas", "StringDtype"): pd.StringDtype,
        ("pandas.arrays", "ArrowStringArray"): pd.arrays.ArrowStringArray,
        ("pyarrow.lib", "_restore_array"): _restore_validated_array,
        ("pyarrow.lib", "py_buffer"): pa.py_buffer,
        ("pyarrow.lib", "type_for_alias"): pa.lib.type_for_alias,
        ("numpy", "ndarray"): _ndarray,
        ("numpy", "dtype"): private_dtype,
        ("builtins", "slice"): slice,
        ("builtins", "bytearray"): _bytearray,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = _scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    return allowed


def read_dataframe_pickle(path: Path, *, allow_pickle: bool) -> pd.DataFrame:
    """Read a ``.df`` pickle with the restricted unpickler; opt-in required."""
    require_opt_in(path, allow_pickle)
    frame = restricted_loads(path.read_bytes(), dataframe_pickle_globals(), path)
    if not isinstance(frame, pd.DataFrame):
        raise DataError(path, f"the pickle holds a {type(frame).__name__}", expected="a pandas DataFrame")
    try:  # a damaged stream can give a DataFrame without its internals
        frame = pd.DataFrame({c: frame[c].tolist() for c in frame.columns if c in COLUMNS})
    except Exception as exc:  # noqa: BLE001 - any failure here is a damaged file, not a bug
        raise DataError(path, f"damaged DataFrame ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    return frame


# --------------------------------------------------------------------------- catalogs


def _decode(path: Path, encoding: str) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n")
        raise DataError(
            path, f"undecodable text at byte {exc.start} (line {line + 1})", row=line, expected=f"{encoding} text"
        ) from None
    return text.removeprefix("\ufeff").split("\n")


def _catalog_from_pairs(path: Path, pairs: list[tuple[int, int, str]], first_id: int) -> Catalog:
    """``(line index, id, title)`` -> Catalog; ids must be ``first_id .. first_id + n - 1``."""
    if not pairs:
        raise DataError(path, "the item catalog is empty", expected="at least one item")
    seen: dict[int, int] = {}
    for line, item, _ in pairs:
        if item in seen:
            raise DataError(
                path, f"duplicate catalog id (line {line + 1}; first on line {seen[item] + 1})", row=line, item=item
            )
        seen[item] = line
    titles: list[str | None] = [None] * len(pairs)
    for line, item, title in pairs:
        index = item - first_id
        if not 0 <= index < len(pairs):
            raise DataError(
                path,
                f"catalog id out of range (line {line + 1}; ids must have no gaps)",
                row=line,
                item=item,
                expected=f"ids {first_id}..{first_id + len(pairs) - 1}",
            )
        titles[index] = title
    return Catalog(tuple(t for t in titles if t is not None), source=str(path))


def read_id2name(path: Path) -> Catalog:
    """``id::name`` lines (UTF-8, ids 0-based, no gaps); blank lines are skipped."""
    pairs = []
    for line, text in enumerate(_decode(path, "utf-8")):
        text = text.rstrip("\r")
        if not text.strip():
            continue
        key, sep, name = text.partition("::")
        if not sep:
            raise DataError(path, f"line {line + 1} has no '::' separator: {text[:60]!r}", row=line, expected="id::name")
        try:
            item = int(key.strip())
        except ValueError:
            raise DataError(path, f"non-integer id {key.strip()!r} (line {line + 1})", row=line, expected="id::name") from None
        pairs.append((line, item, name.strip()))
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
        text = text.rstrip("\r")
        if not text.strip():
            continue
        fields = text.split("|")
        if len(fields) < 2:
            raise DataError(path, f"line {line + 1} has no '|' separator: {text[:60]!r}", row=line, expected="id|title|...")
        try:
            item = int(fields[0].strip())
        except ValueError:
            raise DataError(path, f"non-integer id {fields[0]!r} (line {line + 1})", row=line, expected="id|title|...") from None
        pairs.append((line, item - 1, movielens_title(fields[1])))
    return _catalog_from_pairs(path, pairs, first_id=0)


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


def _first_non_int(path: Path, column: str, values: list[Any], *, pairs: bool) -> DataError:
    """The error for the first element of ``values`` (rows of a column) that is not an integer id."""
    for row, value in enumerate(values):
        elements = value if column == "seq" else [value]
        if not isinstance(elements, (list, tuple, np.ndarray)):
            return DataError(path, f"{column} is a {type(value).__name__}, not a list", row=row, expected="a list of ids")
        for element in elements:
            if pairs and not (isinstance(element, (tuple, list)) and len(element) == 2):
                return DataError(path, f"{_short(element)} in column {column} is not an (id, rating) pair", row=row)
            item = element[0] if pairs else element
            if not _is_int(item):
                return DataError(path, f"non-integer value {_short(item)} in column {column}", row=row, expected="integers")
            if not -(2**63) <= int(item) < 2**63:
                return DataError(path, f"value {item} in column {column} does not fit in int64", row=row)
    return DataError(path, f"column {column} cannot be read as integer ids", expected="integers of one shape")


def _history_matrix(path: Path, values: list[Any], pairs: bool) -> np.ndarray:
    """The ``seq`` column -> int64 ``(n, width)``, or a `DataError` for ragged / non-integer rows."""
    if not values:
        return np.zeros((0, 0), dtype=np.int64)
    widths = [len(v) if isinstance(v, (list, tuple, np.ndarray)) else -1 for v in values]
    for row, width in enumerate(widths):
        if width == -1:
            kind = type(values[row]).__name__
            raise DataError(path, f"seq is a {kind}, not a list", row=row, expected="a padded list of ids")
        if width == 0:
            raise DataError(path, "empty history list", row=row, expected="a padded list of ids")
        if width != widths[0]:
            raise DataError(path, f"seq has {width} entries, row 0 has {widths[0]}", row=row, expected="one padded width")
    if widths[0] > MAX_HISTORY_LEN:
        raise DataError(path, f"seq has {widths[0]} entries", row=0, expected=f"a history width of at most {MAX_HISTORY_LEN}")
    try:
        matrix = np.array(values)
    except (ValueError, TypeError):
        matrix = np.array([[0]], dtype=object)
    if pairs:
        matrix = matrix[:, :, 0] if matrix.ndim == 3 and matrix.shape[2] == 2 else np.array([[0]], dtype=object)
    ids = _as_ids(matrix)
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
    try:
        if pairs and not all(isinstance(v, (tuple, list)) and len(v) == 2 for v in values):
            raise ValueError("not all (id, rating) pairs")
        array = np.array([v[0] for v in values] if pairs else values)
    except (TypeError, IndexError, KeyError, ValueError):
        array = np.array([None], dtype=object)
    ids = _as_ids(array) if array.ndim == 1 else None
    if ids is None:
        raise _first_non_int(path, column, values, pairs=pairs)
    return ids


def frame_to_split(frame: pd.DataFrame, path: Path, catalog: Catalog) -> tuple[Split, dict[str, int]]:
    """Validate a legacy DataFrame and convert it; returns the split and its row counts.

    Rows with no history item (``len_seq == 1`` and an all-padding ``seq``) are dropped and
    counted as ``dropped_no_history``; any other problem raises `DataError`.
    """
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}", expected=f"columns {', '.join(COLUMNS)}")
    seq = frame["seq"].tolist()
    first = next((v[0] for v in seq if isinstance(v, (list, tuple, np.ndarray)) and len(v)), None)
    pairs = isinstance(first, (tuple, list))
    history = _history_matrix(path, seq, pairs)
    length = _id_column(path, frame["len_seq"], "len_seq")
    target = _id_column(path, frame["next"], "next")
    no_history = (length == 1) & (history == catalog.padding_id).all(axis=1) if history.size else np.zeros(0, bool)
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

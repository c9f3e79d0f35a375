"""Reading a pandas DataFrame pickle (an iLoRA/LLaRA ``.df`` file) as data, without running pandas on it.

Pickles can run code, and pandas' own unpickling trusts its input: a block placed past the
last column makes pandas write outside its arrays (a crash in a 600-byte file), and an
axis or an Arrow array sized by a number makes it allocate what that number asks. So
nothing of pandas or pyarrow runs here. `RestrictedUnpickler` resolves exactly these
globals, and nothing else:

* pandas and pyarrow names become inert records (`_Record`) that keep the arguments
  and the ``BUILD`` state the pickle gives them: ``pandas.core.frame.DataFrame`` /
  ``pandas.DataFrame``, ``pandas.core.internals.managers.BlockManager``,
  ``pandas._libs.internals._unpickle_block`` (``pandas.core.internals.blocks.new_block``
  in pandas <= 1.3), ``pandas.core.indexes.base._new_Index``, the index classes
  ``pandas.core.indexes.base.Index`` / ``pandas.Index`` (and the removed
  ``pandas.core.indexes.numeric`` ``Int64Index`` / ``UInt64Index``),
  ``pandas.core.indexes.range.RangeIndex`` / ``pandas.RangeIndex``; for the Arrow
  string labels pandas >= 3 writes, ``pandas.StringDtype``,
  ``pandas.arrays.ArrowStringArray``, ``pyarrow.lib._restore_array``,
  ``pyarrow.lib.py_buffer`` and ``pyarrow.lib.type_for_alias``.
* NumPy, under both ``numpy.core`` (NumPy 1) and ``numpy._core`` (NumPy 2), builds real
  arrays, each checked before NumPy sees it: ``multiarray._reconstruct`` (plain, empty
  ``(0,)`` arrays only, as pickling writes them; the state is checked by `_CheckedArray`),
  ``numpy.ndarray`` (the same when called), ``multiarray.scalar`` and
  ``numeric._frombuffer`` (dtype checked, no object buffers), ``numpy.dtype`` (a private
  stand-in, see `ilora.data.safe_pickle.PickledDtype`).
* ``builtins.slice`` (block placements: integer bounds only) and ``builtins.bytearray``
  (protocol-4 buffers: a copy of bytes-like data only, never ``bytearray(n)``).

The unpickler is CPython's pure-Python one (`ilora.data.safe_pickle.RestrictedUnpickler`:
a dict memo, and dict keys and set members that must be atoms). Every byte that these
constructors copy is charged to a `ByteBudget` of a few times the file's size, so a buffer
the file stores once cannot be copied a thousand times through the pickle memo; dtypes of
zero width (which hold no bytes at any length) are refused, and so is a frame with more
columns than the file has bytes. The records are then read by `frame_columns`, which checks what pandas
would have trusted: the frame's layout, that every block sits inside the columns and
every column is placed exactly once, that each block has one row per index entry, and
that Arrow labels are well-formed strings. Only then are the columns handed out as NumPy
arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ilora.data.safe_pickle import ByteBudget, PickledDtype, canonical_dtype, private_dtype, restricted_loads, short_repr
from ilora.errors import DataError

# --------------------------------------------------------------------------- NumPy, checked


def _numpy_core_modules() -> list[Any]:
    """The NumPy core package under its current name, for both pickled spellings."""
    try:
        from numpy._core import multiarray, numeric  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return [multiarray, numeric]


class _CheckedArray(np.ndarray):
    """The arrays a DataFrame pickle rebuilds: ``ndarray.__setstate__`` after checking the state.

    NumPy's own ``__setstate__`` trusts an object array's element list to match the shape;
    a shorter list crashes the interpreter (NumPy 2.4). Here the state must be
    ``(version, shape, dtype, fortran, data)`` with a plain shape, and ``data`` exactly
    ``prod(shape)`` objects (plain object dtype) or ``prod(shape) * itemsize`` bytes.
    """

    budget: ByteBudget | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise ValueError("unsupported ndarray state in pickle")
        _version, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise ValueError(f"bad ndarray shape {short_repr(shape)} in pickle")
        if not isinstance(fortran, bool):
            raise ValueError("bad ndarray order in pickle")
        dtype = canonical_dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if dtype.hasobject:
            if dtype != np.dtype(object) or not isinstance(data, list) or len(data) != count:
                raise ValueError(f"object array of shape {shape} with {type(data).__name__} data in pickle")
        elif not isinstance(data, (bytes, bytearray)) or len(data) != count * dtype.itemsize:
            size = len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__
            raise ValueError(f"array of shape {shape} and dtype {dtype} with {size} bytes")
        if self.budget is not None:  # an object array copies its list's pointers
            self.budget.charge(count * dtype.itemsize, "an array")
        super().__setstate__((1, shape, dtype, fortran, data))


def _placeholder_dtype(dtype: Any) -> np.dtype:
    """The dtype argument of ``_reconstruct`` / ``ndarray``: a short spec (``b"b"``) or a pickled dtype, checked."""
    if isinstance(dtype, bytes):
        dtype = dtype.decode("ascii", errors="replace")
    if isinstance(dtype, str):
        dtype = private_dtype(dtype)
    return canonical_dtype(dtype)


def int_slice(*bounds: Any) -> slice:
    """What the allow-list maps ``builtins.slice`` to: integer (or None) bounds only. A slice of
    slices nested 300,000 deep crashes CPython when it is freed (no recursion guard there)."""
    if not 1 <= len(bounds) <= 3 or not all(b is None or type(b) is int for b in bounds):
        raise ValueError(f"refused a slice of {', '.join(type(b).__name__ for b in bounds[:3])} (integers only)")
    return slice(*bounds)


def _numpy_globals(budget: ByteBudget) -> dict[tuple[str, str], Any]:
    """The NumPy and builtins part of the allow-list, charging ``budget`` for copied bytes."""
    array_type = type("_BudgetedArray", (_CheckedArray,), {"budget": budget})

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        # Pickling always writes _reconstruct(ndarray, (0,), b"b") and sends the real shape with
        # the state, so any other shape (which would allocate before any check) is refused.
        if subtype is not np.ndarray and subtype is not ndarray:
            raise ValueError(f"refused to rebuild an array of type {short_repr(subtype)}")
        if not (isinstance(shape, tuple) and len(shape) == 1 and type(shape[0]) is int and shape[0] == 0):
            raise ValueError(f"refused initial ndarray shape {short_repr(shape)} in pickle (expected (0,))")
        return np.ndarray.__new__(array_type, (0,), _placeholder_dtype(dtype))

    def ndarray(shape: Any, dtype: Any = "f8", *args: Any) -> np.ndarray:
        if args:
            raise ValueError("refused ndarray buffer arguments in pickle")
        return reconstruct(np.ndarray, shape, dtype)

    def scalar(dtype: Any, data: Any = None) -> Any:
        # as pickling writes NumPy scalars: the element's own bytes (a string one may be MiBs, and
        # the memo can hand the same bytes to many calls, so each copy is charged)
        dtype = canonical_dtype(dtype)
        if dtype.hasobject or not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise ValueError(f"refused a NumPy scalar of dtype {dtype.str} without exactly its {dtype.itemsize} bytes")
        budget.charge(len(data), "a scalar")
        return _numpy_core_modules()[0].scalar(dtype, data)

    def frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        dtype = canonical_dtype(dtype)
        if dtype.hasobject or order not in ("C", "F"):
            raise ValueError("refused an object or oddly ordered buffer array in pickle")
        budget.charge(memoryview(buf).nbytes, "a buffer array")
        return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()

    def bytearray_(data: Any = b"") -> bytearray:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"refused bytearray({type(data).__name__}) in pickle (bytes-like data only)")
        budget.charge(memoryview(data).nbytes, "a bytearray")
        return bytearray(data)

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): ndarray,
        ("numpy", "dtype"): private_dtype,
        ("builtins", "slice"): int_slice,
        ("builtins", "bytearray"): bytearray_,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


# --------------------------------------------------------------------------- pandas / pyarrow, as records


class _Record:
    """An inert stand-in for a pandas or pyarrow global: keeps the arguments and the ``BUILD`` state.

    ``NEWOBJ`` and ``REDUCE`` both land in ``__new__``; ``BUILD`` lands in ``__setstate__``.
    Nothing else happens: `frame_columns` decides what the records mean.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Record":
        record = object.__new__(cls)
        record.args, record.kwargs, record.state = args, kwargs, None
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise ValueError(f"two states for one {type(self).__name__} in pickle")
        self.state = state


def _record(name: str) -> type[_Record]:
    return type(name, (_Record,), {})


Frame = _record("DataFrame")
Manager = _record("BlockManager")
Block = _record("Block")
NewIndex = _record("_new_Index")
IndexClass = _record("Index")
RangeIndexClass = _record("RangeIndex")
StringDtype = _record("StringDtype")
ArrowStringArray = _record("ArrowStringArray")
ArrowArray = _record("ArrowArray")
ArrowBuffer = _record("ArrowBuffer")
ArrowType = _record("ArrowType")

_RECORDS: dict[tuple[str, str], type[_Record]] = {
    ("pandas.core.frame", "DataFrame"): Frame,
    ("pandas", "DataFrame"): Frame,
    ("pandas.core.internals.managers", "BlockManager"): Manager,
    ("pandas._libs.internals", "_unpickle_block"): Block,
    ("pandas.core.internals.blocks", "new_block"): Block,
    ("pandas.core.indexes.base", "_new_Index"): NewIndex,
    ("pandas.core.indexes.base", "Index"): IndexClass,
    ("pandas", "Index"): IndexClass,
    ("pandas.core.indexes.numeric", "Int64Index"): IndexClass,
    ("pandas.core.indexes.numeric", "UInt64Index"): IndexClass,
    ("pandas.core.indexes.range", "RangeIndex"): RangeIndexClass,
    ("pandas", "RangeIndex"): RangeIndexClass,
    ("pandas", "StringDtype"): StringDtype,
    ("pandas.arrays", "ArrowStringArray"): ArrowStringArray,
    ("pyarrow.lib", "_restore_array"): ArrowArray,
    ("pyarrow.lib", "py_buffer"): ArrowBuffer,
    ("pyarrow.lib", "type_for_alias"): ArrowType,
}


def dataframe_pickle_globals(budget: ByteBudget | None = None) -> dict[tuple[str, str], Any]:
    """The allow-list (module, name) -> object of one load (see the module docstring)."""
    return {**_RECORDS, **_numpy_globals(budget or ByteBudget.for_file(0))}


# --------------------------------------------------------------------------- records -> columns


class _Bad(Exception):
    """A layout problem found while reading the records; `frame_columns` turns it into a `DataError`."""


def _need(ok: bool, problem: str) -> None:
    if not ok:
        raise _Bad(problem)


def _only(record: Any, kind: type[_Record], *, args: int | None = None, state: bool | None = None) -> _Record:
    """``record`` as a ``kind`` record with ``args`` positional arguments, no keywords, and a state if asked."""
    _need(type(record) is kind, f"expected a pandas {kind.__name__}, found {_describe(record)}")
    _need(not record.kwargs, f"{kind.__name__} called with keyword arguments")
    if args is not None:
        _need(len(record.args) == args, f"{kind.__name__} with {len(record.args)} arguments (expected {args})")
    if state is not None:
        _need((record.state is not None) == state, f"{kind.__name__} {'without' if state else 'with'} a state")
    return record


def _describe(value: Any) -> str:
    return f"a {type(value).__name__}"


def _int(value: Any, what: str) -> int:
    _need(type(value) is int, f"{what} is {_describe(value)}, not an integer")
    return value


def _arrow_bytes(record: Any) -> memoryview:
    buffer = _only(record, ArrowBuffer, args=1)
    _need(isinstance(buffer.args[0], (bytes, bytearray)), "an Arrow buffer that holds no bytes")
    return memoryview(buffer.args[0])


def _arrow_strings(record: Any) -> list[str]:
    """An ``ArrowStringArray`` record (pandas >= 3 column labels) -> its strings, checked like Arrow would."""
    array = _only(record, ArrowStringArray, args=0, state=True)
    _need(isinstance(array.state, dict) and "_pa_array" in array.state, "an ArrowStringArray without its data")
    restored = _only(array.state["_pa_array"], ArrowArray, args=1)
    data = restored.args[0]
    _need(isinstance(data, tuple) and len(data) == 7, "an Arrow array in an unknown layout")
    type_, length, null_count, offset, buffers, children, dictionary = data
    alias = _only(type_, ArrowType, args=1).args[0]
    _need(type(alias) is str and alias in ("string", "utf8", "large_string", "large_utf8"), f"an Arrow array of type {short_repr(alias)} (strings only)")
    length, offset = _int(length, "the Arrow array's length"), _int(offset, "the Arrow array's offset")
    _need(type(null_count) is int and null_count == 0, "Arrow labels with missing values")
    _need(type(children) is list and not children and dictionary is None, "nested or dictionary Arrow labels")
    _need(length >= 0 and offset >= 0, "a negative Arrow length or offset")
    _need(isinstance(buffers, list) and len(buffers) == 3 and buffers[0] is None, "an Arrow string array in an unknown layout")
    width = 8 if alias.startswith("large") else 4
    offsets_bytes, text = _arrow_bytes(buffers[1]), bytes(_arrow_bytes(buffers[2]))
    _need(offsets_bytes.nbytes >= (offset + length + 1) * width, "an Arrow offsets buffer shorter than its length")
    offsets = np.frombuffer(offsets_bytes, dtype=f"<i{width}", count=offset + length + 1)[offset:]
    _need(bool(length == 0 or (np.all(np.diff(offsets) >= 0) and offsets[0] >= 0 and offsets[-1] <= len(text))), "Arrow string offsets out of range")
    try:
        return [text[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    except UnicodeDecodeError:
        raise _Bad("an Arrow string label that is not UTF-8") from None


def _index_values(record: Any) -> range | list[Any] | np.ndarray:
    """A ``_new_Index(cls, state)`` record -> a range (RangeIndex) or the index's values."""
    new = _only(record, NewIndex, args=2)
    cls, state = new.args
    _need(isinstance(state, dict), "an index state that is not a dict")
    if cls is RangeIndexClass:
        _need(set(state) <= {"start", "stop", "step", "name"}, "a RangeIndex with unknown fields")
        start, stop, step = (_int(state.get(k, d), f"RangeIndex {k}") for k, d in (("start", 0), ("stop", 0), ("step", 1)))
        _need(step != 0, "a RangeIndex with step 0")
        return range(start, stop, step)
    _need(cls is IndexClass, f"an index of class {_describe(cls)}")
    data = state.get("data")
    if type(data) is ArrowStringArray:
        return _arrow_strings(data)
    _need(isinstance(data, np.ndarray) and data.ndim == 1, f"an index built from {_describe(data)} (1-D arrays only)")
    _need(data.dtype.kind in "biufO", f"an index of dtype {data.dtype.str} (numbers or objects only)")
    return data


def _blocks(manager: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """A BlockManager record in either layout -> ([(values, placement)], axes).

    pandas >= 1.3 writes ``BlockManager(blocks, axes)`` with ``_unpickle_block(values,
    placement, ndim)`` blocks; earlier pandas writes its ``__setstate__`` form, whose
    ``"0.14.1"`` entry holds the axes and ``{"values", "mgr_locs"}`` blocks.
    """
    _need(type(manager) is Manager and not manager.kwargs, f"a frame whose data is {_describe(manager)}")
    if manager.args:
        _need(len(manager.args) == 2 and manager.state is None, "a BlockManager call in an unknown form")
        blocks, axes = manager.args
        _need(isinstance(blocks, (tuple, list)), "BlockManager blocks that are not a sequence")
        pairs = []
        for block in blocks:
            block = _only(block, Block, args=3, state=False)
            values, placement, ndim = block.args
            _need(type(ndim) is int and ndim == 2, f"a block of {short_repr(ndim)} dimensions in a DataFrame")
            pairs.append((values, placement))
        return pairs, axes
    state = manager.state
    _need(isinstance(state, tuple) and len(state) >= 4 and isinstance(state[3], dict), "a BlockManager state in an unknown form (pandas before 0.14.1?)")
    inner = state[3].get("0.14.1")
    _need(isinstance(inner, dict) and isinstance(inner.get("blocks"), list), "a BlockManager state without its 0.14.1 entry")
    pairs = []
    for block in inner["blocks"]:
        _need(isinstance(block, dict) and set(block) == {"values", "mgr_locs"}, "a block state in an unknown form")
        pairs.append((block["values"], block["mgr_locs"]))
    return pairs, inner.get("axes")


def _positions(placement: Any, columns: int, width: int) -> list[int]:
    """A block's ``width`` column positions (a slice or an integer array), each inside ``0 .. columns - 1``.

    The count is checked against the block's own width (data the file holds) before any
    list is made, so a slice cannot ask for more positions than the file has values.
    """
    if isinstance(placement, slice):
        start, stop, step = placement.start, placement.stop, 1 if placement.step is None else placement.step
        for name, value in (("start", start), ("stop", stop), ("step", step)):
            _int(value, f"a block placement's {name}")
        span = range(start, stop, step) if step > 0 else range(0)
        _need(step > 0 and start >= 0 and (not span or span[-1] < columns), f"a block placed at {start}:{stop}:{step} in a frame of {columns} columns")
        _need(len(span) == width, f"a block of {width} columns placed at {len(span)} positions")
        return list(span)
    _need(isinstance(placement, np.ndarray) and placement.ndim == 1 and placement.dtype.kind in "iu", f"a block placement that is {_describe(placement)}")
    _need(len(placement) == width, f"a block of {width} columns placed at {len(placement)} positions")
    positions = placement.tolist()
    _need(all(0 <= p < columns for p in positions), f"a block placed outside the frame's {columns} columns")
    return positions


def _length(index: range | list[Any] | np.ndarray, what: str) -> int:
    try:
        return len(index)
    except OverflowError:
        raise _Bad(f"{what} longer than any array") from None


def frame_columns(frame: Any, wanted: tuple[str, ...], max_columns: int) -> tuple[list[Any], int, dict[str, np.ndarray]]:
    """The records of an unpickled DataFrame -> (column labels, rows, the ``wanted`` columns as 1-D arrays).

    Raises `_Bad` (via `read_frame_pickle`, a `DataError`) for anything pandas would have
    had to trust: an unknown layout, a block outside the columns, a column placed twice or
    never, a block whose shape disagrees with the axes. A wanted column held by something
    other than a NumPy block (an Arrow string array) is refused too. Nothing is sized by
    an axis alone: the axes must agree with the blocks, whose values the file holds, and
    there may be at most ``max_columns`` columns (a block of no rows holds no bytes at any
    width, so the file's size is the bound).
    """
    frame = _only(frame, Frame, args=0, state=True)
    state = frame.state
    _need(isinstance(state, dict) and ("_mgr" in state or "_data" in state), "a DataFrame state in an unknown form")
    pairs, axes = _blocks(state.get("_mgr", state.get("_data")))  # pandas < 1.1 named it _data
    _need(isinstance(axes, (list, tuple)) and len(axes) == 2, "a DataFrame without two axes")
    label_index = _index_values(axes[0])
    count = _length(label_index, "a column index")
    _need(count <= max_columns, f"{count} columns in a file of {max_columns} bytes")
    rows = _length(_index_values(axes[1]), "a row index")
    blocks = []
    for values, placement in pairs:
        if isinstance(values, np.ndarray):
            _need(values.ndim == 2 and values.shape[1] == rows, f"a block of shape {values.shape} in a frame of {rows} rows")
            _need(values.dtype.kind in "biufcO", f"a block of dtype {values.dtype.str} (numbers, bools or objects only)")
            width = values.shape[0]
        else:  # an extension array (pandas >= 3 strings): one column
            _need(type(values) is ArrowStringArray, f"a block of {_describe(values)}")
            width = 1
        blocks.append((values, _positions(placement, count, width)))
    _need(sum(len(positions) for _, positions in blocks) == count, f"blocks that place {sum(len(p) for _, p in blocks)} columns in a frame of {count}")
    _need(len({p for _, positions in blocks for p in positions}) == count, "a column placed in two blocks")
    labels = list(label_index)  # no longer than the blocks' own columns
    odd = next((label for label in labels if not isinstance(label, (str, int, np.integer))), None)
    _need(odd is None, f"a column label that is {_describe(odd)}")
    _need(all(sum(label == name for label in labels) <= 1 for name in wanted), f"a column among {', '.join(wanted)} named twice")
    columns: dict[str, np.ndarray] = {}
    for values, positions in blocks:
        for j, p in enumerate(positions):
            if labels[p] in wanted:
                _need(isinstance(values, np.ndarray), f"column {labels[p]} holds strings")
                columns[labels[p]] = values[j]
    return labels, rows, columns


READ_PROTOCOLS = (3, 4, 5)


def read_frame_pickle(path: Path, data: bytes, wanted: tuple[str, ...]) -> tuple[list[Any], int, dict[str, np.ndarray]]:
    """Unpickle ``data`` (the bytes of ``path``) as a DataFrame; see `frame_columns`. Opt-in is the caller's.
    Protocols 3 to 5 only (earlier ones pickle bytes through ``_codecs.encode``, which is refused)."""
    if data[:1] == b"\x80" and len(data) > 1 and data[1] not in READ_PROTOCOLS:  # without the header: not a pickle pandas writes
        raise DataError(path, f"pickle protocol {data[1]}", expected="protocol 3, 4 or 5, as pandas' to_pickle writes")
    budget = ByteBudget.for_file(len(data))
    frame = restricted_loads(data, dataframe_pickle_globals(budget), path, buildable=(_Record, _CheckedArray, PickledDtype))
    if type(frame) is not Frame:
        raise DataError(path, f"the pickle holds {_describe(frame)}", expected="a pandas DataFrame")
    try:
        return frame_columns(frame, wanted, max_columns=len(data))
    except _Bad as exc:
        raise DataError(path, f"not a DataFrame pickle this reader accepts: {exc}") from None
    except (TypeError, ValueError) as exc:  # a record holding what no pickling of a DataFrame writes
        raise DataError(path, f"not a DataFrame pickle this reader accepts ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None

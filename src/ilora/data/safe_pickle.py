"""Restricted unpickling for legacy files (pandas ``.df`` DataFrames, LLaRA SASRec checkpoints).

Pickles can run arbitrary code. This project never unpickles anything unless the user
opted in (``--allow-pickle`` / ``allow_pickle=True``), and even then only through
`RestrictedUnpickler`, which resolves a global only if it is in an explicit allow-list
(module, name) -> object. Anything else is refused with an `UnsafePickleError` that
names the file and the refused global; nothing from the file runs.

Allow-listed globals must also be safe on hostile arguments. NumPy's ``dtype`` is the
trap: its ``__setstate__`` trusts the pickled state (a malformed one crashes the
interpreter; on ``numpy.dtype("i8", False, False)``, the process-wide builtin descriptor,
it rewrites that descriptor in place). The allow-lists map ``numpy.dtype`` to
`private_dtype`, a `PickledDtype` stand-in whose own ``__setstate__`` checks the state,
and `canonical_dtype` turns it into a real dtype where an array or scalar is built.
"""

from __future__ import annotations

import io
import pickle
import reprlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ilora.errors import IloraError

PICKLE_OPT_IN_HINT = (
    "pickles can execute code; pass --allow-pickle (`ilora run`: data.allow_pickle: true; Python: allow_pickle=True) to read it with a restricted "
    "unpickler, or convert it once with `ilora data convert SRC DST --allow-pickle`"
)
CHECKPOINT_OPT_IN_HINT = (
    "pickles can execute code; pass --allow-pickle (Python: allow_pickle=True) to read it with a restricted "
    "unpickler (once: `ilora rec import-llara` writes the model as safetensors)"
)


class UnsafePickleError(IloraError):
    """A pickle referenced a global outside the allow-list, or opt-in was missing."""


_ATOMS = (str, bytes, int, float, bool, type(None))

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 40, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def short_repr(value: Any) -> str:
    """A bounded repr of a value read from a file, for error messages: ``f"{x!r:.80}"`` would
    build the whole repr first, which a shared (memoised) nested list makes exponential."""
    return _SHORT.repr(value)


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that only resolves globals from ``allowed``.

    It is CPython's pure-Python unpickler, for two guards the C one cannot take: its memo is
    a dict (the C memo is an array that a 9-byte file can size to gigabytes), and dict keys
    and set members must be atoms (str, bytes, numbers, None): hashing a tuple graph shared
    through the memo would take 2**depth steps. The real LastFM train file (2.4 MB) loads
    in about 0.4 s.

    Args:
        file: the open binary stream.
        allowed: mapping ``(module, name) -> object`` of the only globals the file may use.
        path: the file's name, for error messages.
        persistent_load: optional handler for persistent ids (torch zip checkpoints).
    """

    def __init__(
        self,
        file: BinaryIO,
        allowed: Mapping[tuple[str, str], Any],
        path: str | Path,
        persistent_load: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(file)
        self._allowed = allowed
        self._path = str(path)
        if persistent_load is not None:
            self.persistent_load = persistent_load  # type: ignore[assignment]

    dispatch = dict(pickle._Unpickler.dispatch)

    @staticmethod
    def _atoms(keys: Any) -> None:
        for key in keys:
            if type(key) not in _ATOMS:
                raise pickle.UnpicklingError(f"refused a dict key or set member of type {type(key).__name__} (atoms only)")

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._atoms((key,))
        self.stack[-1][key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._atoms(items[::2])
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._atoms(items)
        target = self.stack[-1]
        if not isinstance(target, set):
            raise pickle.UnpicklingError(f"ADDITEMS on a {type(target).__name__}")
        target.update(items)

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        self._atoms(items)
        self.append(frozenset(items))

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refused to load global {module}.{name} "
                "(not in the allow-list of data classes; nothing from the file was executed)"
            ) from None


class ByteBudget:
    """What one load may still copy for array, buffer and tensor data.

    The pickle memo lets a file name one stored buffer (or storage) again and again, and an
    allow-listed constructor that copies its argument would copy it each time: a megabyte
    stored once could become gigabytes. Each copy is charged here; `for_file` allows a few
    times the file's size (honest pickles copy each stored buffer about once).
    """

    FILE_MULTIPLE = 4
    FLOOR = 1 << 20

    def __init__(self, limit: int) -> None:
        self.limit = self.left = limit

    @classmethod
    def for_file(cls, size: int) -> "ByteBudget":
        return cls(cls.FILE_MULTIPLE * size + cls.FLOOR)

    def charge(self, size: int, what: str) -> None:
        """Raise ``ValueError`` if copying ``size`` more bytes (for ``what``) would exceed the budget."""
        if size > self.left:
            raise ValueError(
                f"{what} of {size} bytes would take the data built from this pickle past {self.limit} bytes "
                "(a few times the file's size: the file reuses a stored buffer)"
            )
        self.left -= size


_DTYPE_KINDS = "biufcOUS"
_MAX_ITEMSIZE = 4 * 2**20  # a string element of 2**20 characters


class PickledDtype:
    """What a pickle's ``numpy.dtype(spec, align, copy)`` gives here: a stand-in, not a dtype.

    NumPy's ``dtype.__setstate__`` trusts its state: a malformed one crashes the
    interpreter, and on a builtin descriptor it rewrites the process-wide dtype. So the
    pickle's ``BUILD`` state lands in this object's `__setstate__`, which checks it and
    derives a fresh dtype (`dtype`) from the spec, the byte order and the element size.
    Plain numbers, bytes / unicode strings and objects only; records, sub-arrays and
    dates are refused.
    """

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, str) or len(spec) > 8:
            raise ValueError(f"refused dtype spec {short_repr(spec)} in pickle")
        base = np.dtype(spec)
        if base.kind not in _DTYPE_KINDS or base.fields is not None or base.subdtype is not None:
            raise ValueError(f"refused dtype {spec!r} in pickle (plain numbers, strings and objects only)")
        if base.itemsize > _MAX_ITEMSIZE:
            raise ValueError(f"refused dtype {spec!r} in pickle (elements of at most {_MAX_ITEMSIZE} bytes)")
        self.dtype = base

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
            raise ValueError(f"malformed dtype state {short_repr(state)} in pickle")
        _version, order, subarray, names, fields, elsize, alignment, flags, *_meta = state
        if subarray is not None or names is not None or fields is not None or order not in ("<", ">", "|", "="):
            raise ValueError(f"refused dtype state {short_repr(state)} in pickle")
        if not all(type(v) is int for v in (elsize, alignment, flags)):
            raise ValueError(f"malformed dtype state {short_repr(state)} in pickle")
        dtype = self.dtype
        if flags != dtype.flags or (dtype.itemsize and (elsize not in (-1, dtype.itemsize) or alignment not in (-1, dtype.alignment))):
            raise ValueError(f"dtype state {short_repr(state)} does not match {dtype.str!r} in pickle")
        if dtype.itemsize == 0 and dtype.kind in "US":  # flexible: the size comes with the state
            width = elsize // (4 if dtype.kind == "U" else 1)
            if width < 1 or width > 2**20 or elsize % (4 if dtype.kind == "U" else 1):
                raise ValueError(f"bad string dtype size {elsize} in pickle")
            dtype = np.dtype(f"{dtype.kind}{width}")
        if order in "<>" and dtype.itemsize > 1:
            dtype = dtype.newbyteorder(order)
        self.dtype = dtype


def private_dtype(spec: Any, align: Any = False, copy: Any = True) -> PickledDtype:
    """What the allow-lists map ``numpy.dtype`` to (see `PickledDtype`)."""
    return PickledDtype(spec, align, copy)


def canonical_dtype(dtype: Any) -> np.dtype:
    """The checked NumPy dtype of a pickled dtype (a `PickledDtype`, or a plain dtype given as
    such); never a zero-width one."""
    if isinstance(dtype, PickledDtype):
        dtype = dtype.dtype
    elif not isinstance(dtype, np.dtype) or dtype.kind not in _DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"refused dtype {short_repr(dtype)} in pickle (plain numbers, strings and objects only)")
    if dtype.itemsize == 0:  # a string dtype whose width never came: arrays of it hold no bytes at any length
        raise ValueError(f"refused the zero-width dtype {dtype.str!r} in pickle")
    return np.dtype(dtype.str)


def require_opt_in(path: str | Path, allow_pickle: bool, hint: str = PICKLE_OPT_IN_HINT) -> None:
    """Raise a clear error unless the user explicitly allowed pickles (``hint``: what to do)."""
    if not allow_pickle:
        raise UnsafePickleError(f"{path}: is a pickle; {hint}")


def restricted_loads(data: bytes, allowed: Mapping[tuple[str, str], Any], path: str | Path) -> Any:
    """Unpickle ``data`` with only the ``allowed`` globals resolvable."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed, path).load()
    except IloraError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure on a malformed stream is bad input, not a bug
        # A damaged stream fails in many ways: UnpicklingError, EOFError, OverflowError for an
        # absurd length, MemoryError, or an allow-listed constructor (pandas, NumPy) rejecting
        # its arguments with ValueError / AssertionError / SystemError.
        detail = " ".join(str(exc).split())[:200]
        raise IloraError(f"{path}: not a readable pickle ({type(exc).__name__}: {detail})") from None

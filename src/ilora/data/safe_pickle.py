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
import struct
import sys
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
_INT_BYTES = 9  # a two's-complement integer of 9 bytes holds every int64 and uint64 value
_INT_DIGITS = 22  # the same as text (sign, digits, a trailing L)


class _ShortRepr(reprlib.Repr):
    """`reprlib` with every type it does not know shown by name: the builtin repr of a slice,
    an OrderedDict or an array would render a shared (memoised) graph in full."""

    def repr_instance(self, x: Any, level: int) -> str:
        return f"<{type(x).__name__}>"

    def repr_int(self, x: int, level: int) -> str:
        return repr(x) if -(2**64) < x < 2**64 else "<a huge int>"

    def repr_float(self, x: float, level: int) -> str:  # atoms: their repr is short (an eps, a max_norm)
        return repr(x)

    def repr_bool(self, x: bool, level: int) -> str:
        return repr(x)


_SHORT = _ShortRepr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 40, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 4


def atom_set(members: Any = (), *, budget: "ByteBudget | None" = None) -> set:
    """What the allow-lists map ``builtins.set`` to: a set of atoms only (hashing a tuple graph
    shared through the memo would take 2**depth steps), its members charged to ``budget`` (a
    memoised list named again and again would otherwise build a new set each time)."""
    members = list(members) if isinstance(members, (list, tuple)) else None
    if members is None or any(type(m) not in _ATOMS for m in members):
        raise ValueError("refused a set(...) call on anything but a list of plain values")
    if budget is not None:
        budget.charge(64 * len(members), "set members")
    return set(members)


def short_repr(value: Any) -> str:
    """A bounded repr of a value read from a file, for error messages: ``f"{x!r:.80}"`` would
    build the whole repr first, which a shared (memoised) nested list makes exponential."""
    return _SHORT.repr(value)


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that only resolves globals from ``allowed``, and reads the rest warily.

    It is CPython's pure-Python unpickler, for guards the C one cannot take:

    * its memo is a dict (the C memo is an array that a 9-byte file can size to gigabytes);
    * dict keys and set members must be atoms (str, bytes, numbers, None): hashing a tuple
      graph shared through the memo would take 2**depth steps;
    * ``SETITEM(S)`` may only fill a dict and ``APPEND(S)`` a list (``arr[True] = v`` on an
      array would write, and convert, every element), and ``BUILD`` may only set the state of
      the ``buildable`` types (torch's own ``Tensor.__setstate__`` resizes a storage);
    * integers fit in 64 bits (a memoised million-digit key costs its size at every hash);
    * ``BYTEARRAY8`` reads its bytes before allocating them (CPython allocates the length the
      file states first);
    * a call (``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX``) takes a tuple of arguments (and a dict of
      keywords), charged to the object budget like a container: a callee that keeps its
      arguments (the records of `ilora.data.frame_pickle`) would otherwise hold a new copy of
      one memoised tuple per three-byte call;
    * the containers it creates, its marks and its memo entries are charged to an object
      budget of 16 times ``size`` (the file's length) plus 16 MiB: a file of one-byte
      ``EMPTY_SET`` (or ``MARK``) opcodes would otherwise become 216 (70) bytes per byte.

    The real LastFM train file (2.4 MB) loads in about 0.6 s.

    Args:
        file: the open binary stream.
        allowed: mapping ``(module, name) -> object`` of the only globals the file may use.
        path: the file's name, for error messages.
        size: the stream's length in bytes (the object budget's base).
        buildable: the types ``BUILD`` may set the state of.
        persistent_load: optional handler for persistent ids (torch zip checkpoints).
    """

    OBJECT_MULTIPLE = 16
    OBJECT_FLOOR = 16 << 20

    def __init__(
        self,
        file: BinaryIO,
        allowed: Mapping[tuple[str, str], Any],
        path: str | Path,
        *,
        size: int,
        buildable: tuple[type, ...] = (),
        persistent_load: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(file)
        self._allowed = allowed
        self._path = str(path)
        self._buildable = buildable
        self._objects = ByteBudget(self.OBJECT_MULTIPLE * size + self.OBJECT_FLOOR)
        if persistent_load is not None:
            self.persistent_load = persistent_load  # type: ignore[assignment]

    dispatch = dict(pickle._Unpickler.dispatch)

    @staticmethod
    def _atoms(keys: Any) -> None:
        for key in keys:
            if type(key) not in _ATOMS:
                raise pickle.UnpicklingError(f"refused a dict key or set member of type {type(key).__name__} (atoms only)")

    def _new(self, obj: Any, extra: int = 0) -> Any:
        self._objects.charge(sys.getsizeof(obj) + extra, f"a {type(obj).__name__}")
        return obj

    def _target(self, kind: type) -> Any:
        target = self.stack[-1]
        if not isinstance(target, kind):
            raise pickle.UnpicklingError(f"refused to add items to a {type(target).__name__} (only to a {kind.__name__})")
        return target

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._atoms((key,))
        self._objects.charge(64, "a dict entry")
        self._target(dict)[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._atoms(items[::2])
        self._objects.charge(32 * len(items), "dict entries")
        target = self._target(dict)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_dict(self) -> None:
        items = self.pop_mark()  # first: it rebinds self.append to the outer stack
        self._atoms(items[::2])
        self.append(self._new({items[i]: items[i + 1] for i in range(0, len(items), 2)}))

    def load_append(self) -> None:
        value = self.stack.pop()
        self._objects.charge(8, "a list entry")
        self._target(list).append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._objects.charge(8 * len(items), "list entries")
        self._target(list).extend(items)

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._atoms(items)
        self._objects.charge(64 * len(items), "set members")
        self._target(set).update(items)

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        self._atoms(items)
        self.append(self._new(frozenset(items)))

    def load_empty_list(self) -> None:
        self.append(self._new([]))

    def load_empty_dictionary(self) -> None:
        self.append(self._new({}))

    def load_empty_set(self) -> None:
        self.append(self._new(set()))

    def load_list(self) -> None:
        items = self.pop_mark()  # first: it rebinds self.append to the outer stack
        self.append(self._new(items))

    def load_tuple(self) -> None:
        items = self.pop_mark()
        self.append(self._new(tuple(items)))

    def load_tuple1(self) -> None:
        self.stack[-1] = self._new((self.stack[-1],))

    def load_tuple2(self) -> None:
        self.stack[-2:] = [self._new((self.stack[-2], self.stack[-1]))]

    def load_tuple3(self) -> None:
        self.stack[-3:] = [self._new((self.stack[-3], self.stack[-2], self.stack[-1]))]

    def load_mark(self) -> None:
        self._objects.charge(64, "a mark")  # a new stack and a metastack slot per one-byte opcode
        super().load_mark()

    def _memo_put(self, put: Callable[[Any], None]) -> None:
        self._objects.charge(100, "a memo entry")
        put(self)

    def load_put(self) -> None:
        self._memo_put(pickle._Unpickler.load_put)

    def load_binput(self) -> None:
        self._memo_put(pickle._Unpickler.load_binput)

    def load_long_binput(self) -> None:
        self._memo_put(pickle._Unpickler.load_long_binput)

    def load_memoize(self) -> None:
        self._memo_put(pickle._Unpickler.load_memoize)

    def load_build(self) -> None:
        if not isinstance(self.stack[-2], self._buildable):
            raise pickle.UnpicklingError(f"refused to set the state of a {type(self.stack[-2]).__name__}")
        super().load_build()

    def load_bytearray8(self) -> None:
        (length,) = struct.unpack("<Q", self.read(8))
        data = self.read(length)  # what the file holds, never the length it states
        if len(data) != length:
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {length} bytes, the file holds {len(data)}")
        self.append(bytearray(data))

    def load_long1(self) -> None:
        n = self.read(1)[0]
        if n > _INT_BYTES:
            raise pickle.UnpicklingError(f"refused an integer of {n} bytes (64-bit integers only)")
        self.append(pickle.decode_long(self.read(n)))

    def load_long4(self) -> None:
        (n,) = struct.unpack("<i", self.read(4))
        if not 0 <= n <= _INT_BYTES:
            raise pickle.UnpicklingError(f"refused an integer of {n} bytes (64-bit integers only)")
        self.append(pickle.decode_long(self.read(n)))

    def load_long(self) -> None:
        text = self.readline()[:-1]
        if len(text) > _INT_DIGITS:
            raise pickle.UnpicklingError("refused a long text integer (64-bit integers only)")
        self.append(int(text.removesuffix(b"L"), 0))

    def load_int(self) -> None:
        text = self.readline()
        if len(text) > _INT_DIGITS:
            raise pickle.UnpicklingError("refused a long text integer (64-bit integers only)")
        self.append({b"00\n": False, b"01\n": True}.get(text) if text in (b"00\n", b"01\n") else int(text, 0))

    def _charge_call(self, args: Any, kwargs: Any = None) -> None:
        if type(args) is not tuple or (kwargs is not None and type(kwargs) is not dict):
            raise pickle.UnpicklingError(
                f"refused a call with arguments of type {type(args).__name__}"
                + ("" if kwargs is None else f" and keywords of type {type(kwargs).__name__}")
                + " (a tuple and a dict only)"
            )
        self._objects.charge(64 + 8 * len(args) + 100 * len(kwargs or ()), "a call's arguments")

    def load_reduce(self) -> None:
        self._charge_call(self.stack[-1])
        super().load_reduce()

    def load_newobj(self) -> None:
        self._charge_call(self.stack[-1])
        super().load_newobj()

    def load_newobj_ex(self) -> None:
        self._charge_call(self.stack[-2], self.stack[-1])
        super().load_newobj_ex()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.FROZENSET[0]] = load_frozenset
    dispatch[pickle.EMPTY_LIST[0]] = load_empty_list
    dispatch[pickle.EMPTY_DICT[0]] = load_empty_dictionary
    dispatch[pickle.EMPTY_SET[0]] = load_empty_set
    dispatch[pickle.LIST[0]] = load_list
    dispatch[pickle.TUPLE[0]] = load_tuple
    dispatch[pickle.TUPLE1[0]] = load_tuple1
    dispatch[pickle.TUPLE2[0]] = load_tuple2
    dispatch[pickle.TUPLE3[0]] = load_tuple3
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.MARK[0]] = load_mark
    dispatch[pickle.PUT[0]] = load_put
    dispatch[pickle.BINPUT[0]] = load_binput
    dispatch[pickle.LONG_BINPUT[0]] = load_long_binput
    dispatch[pickle.MEMOIZE[0]] = load_memoize
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
    dispatch[pickle.LONG1[0]] = load_long1
    dispatch[pickle.LONG4[0]] = load_long4
    dispatch[pickle.LONG[0]] = load_long
    dispatch[pickle.INT[0]] = load_int

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


def restricted_loads(data: bytes, allowed: Mapping[tuple[str, str], Any], path: str | Path, buildable: tuple[type, ...] = ()) -> Any:
    """Unpickle ``data`` with only the ``allowed`` globals resolvable and only ``buildable``
    types given a ``BUILD`` state (`RestrictedUnpickler`)."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed, path, size=len(data), buildable=buildable).load()
    except IloraError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure on a malformed stream is bad input, not a bug
        # A damaged stream fails in many ways: UnpicklingError, EOFError, OverflowError for an
        # absurd length, MemoryError, or an allow-listed constructor (pandas, NumPy) rejecting
        # its arguments with ValueError / AssertionError / SystemError.
        detail = " ".join(str(exc).split())[:200]
        raise IloraError(f"{path}: not a readable pickle ({type(exc).__name__}: {detail})") from None

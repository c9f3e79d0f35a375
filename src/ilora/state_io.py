"""Saving nested training state without pickle: tensors -> safetensors, the rest -> JSON.

Optimiser and scheduler ``state_dict()`` objects are nested dicts/lists of tensors and
plain values. `save_state` writes every tensor into one ``.safetensors`` file under a
path-like key and the remaining structure into a ``.json`` file that refers to those
keys; `load_state` rebuilds the exact structure. Nothing is ever unpickled. Writes are
atomic (temporary file, fsync, rename).

Skeleton format (JSON): a tensor is ``{"__tensor__": key}``; a dict with int keys is
``{"__int_keys__": {"<int>": value}}``; a tuple is ``{"__tuple__": [values]}``; a dict with
str keys is itself, or ``{"__str_keys__": {...}}`` when one of its keys is such a marker
(only a one-key dict whose key is a marker is read as a marker). Dict keys are all str
or all int (not bool); anything else is an `IloraError`. The tensor key is the dotted path
(``optimizer.state.0.exp_avg``), with ``#1``, ``#2``... appended when two paths spell the
same key (``{"a.b": x, "a": {"b": y}}``); the skeleton names the key, so files written
before the suffix existed read the same way. Tensors that share memory (tied weights,
views of one buffer) are saved as separate copies, as safetensors requires.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ilora.errors import IloraError

_TENSOR = "__tensor__"
_INT_KEYS = "__int_keys__"
_TUPLE = "__tuple__"
_STR_KEYS = "__str_keys__"
_MARKERS = frozenset({_TENSOR, _INT_KEYS, _TUPLE, _STR_KEYS})
_RESERVED_TENSOR_KEYS = frozenset({"__metadata__"})  # the safetensors header's own entry


def _unique_key(path: str, tensors: dict[str, torch.Tensor]) -> str:
    """``path`` (or ``root``), with ``#n`` appended if that key is already taken."""
    base = path or "root"
    key, n = base, 0
    while key in tensors or key in _RESERVED_TENSOR_KEYS:
        n += 1
        key = f"{base}#{n}"
    return key


def _dict_kind(obj: dict[Any, Any], prefix: str) -> str:
    """``"int"`` or ``"str"`` for a dict's keys; an `IloraError` for bool, mixed or other keys."""
    if all(isinstance(k, int) and not isinstance(k, bool) for k in obj) and obj:
        return "int"
    if all(isinstance(k, str) for k in obj):
        return "str"
    kinds = sorted({type(k).__name__ for k in obj})
    raise IloraError(f"state at {prefix or '<root>'!r}: dict keys are {', '.join(kinds)}; only all-str or all-int keys can be saved")


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = _unique_key(prefix, tensors)
        tensors[key] = obj
        return {_TENSOR: key}
    if isinstance(obj, dict):
        kind = _dict_kind(obj, prefix)
        body = {str(k): _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors) for k, v in obj.items()}
        if kind == "int":
            return {_INT_KEYS: body}
        return {_STR_KEYS: body} if _MARKERS.intersection(body) else body
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"state at {prefix!r}: cannot store a {type(obj).__name__} without pickle")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    if isinstance(obj, dict):
        marker = next(iter(obj)) if len(obj) == 1 else None
        if marker == _TENSOR:
            key = obj[_TENSOR]
            if not isinstance(key, str) or key not in tensors:
                raise IloraError(f"{path}: refers to tensor {key!r:.80}, which the .safetensors file does not hold")
            return tensors[key]
        if marker == _INT_KEYS:
            return {int(k): _unflatten(v, tensors, path) for k, v in obj[_INT_KEYS].items()}
        if marker == _TUPLE:
            return tuple(_unflatten(v, tensors, path) for v in obj[_TUPLE])
        if marker == _STR_KEYS:
            obj = obj[_STR_KEYS]
        return {k: _unflatten(v, tensors, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors, path) for v in obj]
    return obj


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors, each owning its whole storage (copies where memory is shared)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        storage = t.untyped_storage()
        whole = t.storage_offset() == 0 and t.numel() * t.element_size() == storage.nbytes()
        if t.numel() and (storage.data_ptr() in seen or not whole):
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _parse_json(path: Path) -> Any:
    """Parsed JSON; an `IloraError` naming the file if it is not valid or nested too deeply."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IloraError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise IloraError(f"{path}: JSON nested too deeply to read") from None


def strict_json(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON: a NaN or infinite number (e.g. hr@1 when no generated output was
    valid) becomes ``null``, numpy values Python ones, anything else unknown its ``str``."""
    return json.dumps(_strict(obj), indent=indent, sort_keys=False, allow_nan=False, default=str)


def _strict(value: Any) -> Any:
    """``value`` with numpy scalars and arrays as Python values and non-finite floats as None."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return _strict(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _temporary_beside(path: Path) -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file next to ``path``, created as ``open`` creates
    files (mode 0o666 less the umask, or what a default ACL gives): mkstemp's 0o600 would
    survive the rename and leave results a shared cluster's colleagues cannot read."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary_beside(path)
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        save_file(_unshared(tensors), tmp, metadata=metadata)
        os.chmod(tmp, mode)  # safetensors writes a file of its own (0o600) in its place
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; `IloraError` naming it, and ``what`` it should hold,
    when it is missing or not a safetensors file (other errors, e.g. out of memory, pass through)."""
    path = Path(path)
    if not path.is_file():
        raise IloraError(f"{path}: not found ({what})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise IloraError(f"{path}: not a readable safetensors file ({what}; {' '.join(str(exc).split())[:200]})") from None


def save_state(state: Any, path_stem: str | Path) -> None:
    """Write ``state`` as ``<stem>.safetensors`` + ``<stem>.json``."""
    stem = Path(path_stem)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    save_tensors(tensors, stem.with_suffix(".safetensors"))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(skeleton))


def load_state(path_stem: str | Path) -> Any:
    """Inverse of `save_state`."""
    stem = Path(path_stem)
    js, st = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for f in (js, st):
        if not f.is_file():
            raise IloraError(f"{f}: missing state file")
    skeleton = _parse_json(js)
    tensors = load_tensors(st, "the tensors of a saved state")
    try:
        return _unflatten(skeleton, tensors, js)
    except (AttributeError, TypeError, ValueError, RecursionError) as exc:
        raise IloraError(f"{js}: not a state skeleton ({type(exc).__name__}: {str(exc)[:120]})") from None


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def replace_durably(source: str | Path, target: str | Path) -> None:
    """``os.replace(source, target)``, then the folder's entries flushed (`fsync_directory`): after
    a power loss the rename is on disk before anything written later that refers to the file."""
    os.replace(source, target)
    fsync_directory(Path(target).parent)


# How file systems that cannot flush a directory (some FUSE and network mounts) or a folder one may
# write but not read refuse it: nothing is lost but the ordering guarantee, so the write goes on.
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EACCES, errno.EBADF})


def fsync_directory(path: str | Path) -> None:
    """Flush a directory's entries to disk (after a rename into it) where its file system can;
    any other failure (EIO: the disk lost data) is an `IloraError` naming the directory."""
    try:
        fsync_file(path)
    except OSError as exc:
        if exc.errno not in _NO_DIRECTORY_FSYNC:
            raise IloraError(f"{path}: cannot flush the folder's entries to disk ({exc.strerror or exc})") from None


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data, or a directory's entries, to disk (before or after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str | Path, what: str = "file") -> dict[str, Any]:
    """A JSON object from ``path``; `IloraError` naming the file if it is missing or not an object."""
    path = Path(path)
    if not path.is_file():
        raise IloraError(f"{path}: {what} not found")
    data = _parse_json(path)
    if not isinstance(data, dict):
        raise IloraError(f"{path}: expected a JSON object")
    return data

"""Saving nested training state without pickle: tensors -> safetensors, the rest -> JSON.

Optimiser and scheduler ``state_dict()`` objects are nested dicts/lists of tensors and
plain values. `save_state` writes every tensor into one ``.safetensors`` file under a
path-like key and the remaining structure into a ``.json`` file that refers to those
keys; `load_state` rebuilds the exact structure. Nothing is ever unpickled. Writes are
atomic (temporary file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ilora.errors import IloraError

_TENSOR = "__tensor__"
_INT_KEYS = "__int_keys__"
_TUPLE = "__tuple__"


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        int_keys = all(isinstance(k, int) for k in obj) and len(obj) > 0
        if not int_keys and not all(isinstance(k, str) for k in obj):
            raise TypeError(f"state at {prefix!r}: keys must be all str or all int")
        body = {str(k): _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors) for k, v in obj.items()}
        return {_INT_KEYS: body} if int_keys else body
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"state at {prefix!r}: cannot store a {type(obj).__name__} without pickle")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _INT_KEYS in obj:
            return {int(k): _unflatten(v, tensors) for k, v in obj[_INT_KEYS].items()}
        if _TUPLE in obj:
            return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    try:
        skeleton = json.loads(js.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IloraError(f"{js}: not valid JSON ({exc})") from None
    return _unflatten(skeleton, load_file(str(st)))


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to disk (before renaming it into place)."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def read_json(path: str | Path, what: str = "file") -> dict[str, Any]:
    """A JSON object from ``path``; `IloraError` naming the file if it is missing or not an object."""
    path = Path(path)
    if not path.is_file():
        raise IloraError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IloraError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise IloraError(f"{path}: expected a JSON object")
    return data

"""Fixed candidate sets for ranking evaluation (target + sampled negatives).

For each sample, `candidate_sets` returns ``count`` distinct items: the target once plus
``count - 1`` negatives that are neither in the sample's history nor the target, in a
random order. The set is a pure function of ``(seed, split_name, sample index, history,
target, num_items, count)``: it does not depend on batch order, on which other samples
are asked for, or on the process (no global RNG).

How (counter-based, vectorised): a 64-bit key per sample is hashed from ``seed``, the
CRC-32 of ``split_name`` and the sample index (SplitMix64 finaliser). The sample's
pseudo-random stream is ``mix(key + (j + 1) * C) mod num_items`` for ``j = 0, 1, ...``;
the negatives are the first ``count - 1`` distinct stream values that are allowed, in
stream order (a uniform sample without replacement, up to the 2^-64 modulo bias). The
target goes to position ``mix(key ^ D) mod count``.

`save_candidates` / `load_candidates` persist them as ``.npy`` (never pickled).
"""

from __future__ import annotations

import io
import math
import zlib
from pathlib import Path

import numpy as np

from ilora.data.dataset import Split
from ilora.errors import ConfigError, DataError
from ilora.state_io import atomic_write_bytes

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM = np.uint64(0xD1B54A32D192ED03)
_POSITION = np.uint64(0x5851F42D4C957F2D)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, split_name: str, index: np.ndarray) -> np.ndarray:
    """The per-sample uint64 keys."""
    if not 0 <= seed < 2**64:
        raise ConfigError(f"seed must be in 0..2**64-1, got {seed}")
    base = _mix(np.array([seed], dtype=np.uint64) + _GOLDEN)
    base = _mix(base ^ np.uint64(zlib.crc32(split_name.encode("utf-8"))))
    return _mix(base + np.asarray(index, dtype=np.uint64) * _GOLDEN)


def _stream(keys: np.ndarray, start: int, stop: int, num_items: int) -> np.ndarray:
    steps = np.arange(start + 1, stop + 1, dtype=np.uint64) * _STREAM
    return (_mix(keys[:, None] + steps[None, :]) % np.uint64(num_items)).astype(np.int64)


def _first_occurrence(values: np.ndarray) -> np.ndarray:
    """Boolean mask: True where ``values[r, j]`` is the first of its value in row ``r``."""
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    first_sorted = np.ones_like(ordered, dtype=bool)
    first_sorted[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    return first


def _check_room(history: np.ndarray, target: np.ndarray, num_items: int, count: int, split_name: str, index: np.ndarray) -> None:
    """Every row must have ``count - 1`` allowed items; name the first row that has not."""
    combined = np.sort(np.concatenate([history, target[:, None]], axis=1), axis=1)
    distinct = (combined >= 0).sum(axis=1) - ((combined[:, 1:] == combined[:, :-1]) & (combined[:, 1:] >= 0)).sum(axis=1)
    room = num_items - distinct
    bad = np.flatnonzero(room < count - 1)
    if bad.size:
        r = int(bad[0])
        raise DataError(
            f"{split_name} split",
            f"only {int(room[r])} items are neither in the history nor the target; cannot draw {count - 1} negatives",
            row=int(index[r]),
            expected=f"count <= {int(room[r]) + 1} for this row (count={count}, num_items={num_items})",
        )


def _in_rows(values: np.ndarray, sorted_rows: np.ndarray) -> np.ndarray:
    """``values[r, j] in sorted_rows[r]`` for every (r, j), by one binary search over all rows
    (each row's values shifted into a range of its own, as wide as all values span); memory
    grows with the rows' lengths, not with their product as a broadcast comparison's does."""
    if values.size == 0 or sorted_rows.size == 0:
        return np.zeros(values.shape, dtype=bool)
    low = min(int(values.min()), int(sorted_rows.min()))
    span = max(int(values.max()), int(sorted_rows.max())) - low + 1
    shift = np.arange(len(values), dtype=np.int64)[:, None] * span - low
    flat = (sorted_rows + shift).ravel()
    queries = values + shift
    found = np.minimum(np.searchsorted(flat, queries), flat.size - 1)
    return flat[found] == queries


def _negatives(keys: np.ndarray, history: np.ndarray, target: np.ndarray, need: int, num_items: int) -> np.ndarray:
    """The first ``need`` distinct allowed values of each row's stream (none for ``need == 0``)."""
    out = np.empty((len(keys), need), dtype=np.int64)
    if need == 0:
        return out
    history = np.sort(history, axis=1)  # -1 (padding) first; ids in 0..num_items - 1
    pending = np.arange(len(keys))
    width = max(2 * need, 16)
    while pending.size:
        draws = _stream(keys[pending], 0, width, num_items)
        bad = _in_rows(draws, history[pending]) | (draws == target[pending][:, None])
        ok = ~bad & _first_occurrence(draws)
        done = ok.sum(axis=1) >= need
        if done.any():
            chosen = ok[done] & (np.cumsum(ok[done], axis=1) <= need)
            out[pending[done]] = draws[done][chosen].reshape(-1, need)
        pending, width = pending[~done], width * 2
    return out


def check_candidate_room(split: Split, num_items: int, *, count: int, split_name: str) -> None:
    """`DataError` naming the first row of ``split`` that has fewer than ``count - 1`` items
    outside its history and target, as `candidate_sets` would raise (without drawing). Only rows
    whose history is long enough to leave too little room are looked at (usually none)."""
    rows = np.flatnonzero(num_items - split.length.astype(np.int64) - 1 < count - 1)  # history + target: <= length + 1 items
    if rows.size:
        valid = np.arange(split.max_len)[None, :] < split.length[rows, None]
        _check_room(np.where(valid, split.history[rows], -1), split.target[rows], num_items, count, split_name, rows)


def candidate_sets(
    split: Split,
    num_items: int,
    *,
    count: int = 20,
    seed: int = 0,
    split_name: str,
    index: np.ndarray | None = None,
    chunk: int = 4096,
) -> np.ndarray:
    """int64 ``(len(split), count)`` candidate sets (see the module docstring).

    ``index`` gives the sample index each row of ``split`` stands for (default
    ``0 .. len(split) - 1``), so a subset gets exactly the rows of the full split.
    """
    if count < 1:
        raise ConfigError(f"count must be >= 1, got {count}")
    index = np.arange(len(split)) if index is None else np.asarray(index, dtype=np.int64)
    if index.shape != (len(split),):
        raise ValueError(f"index has shape {index.shape}, expected ({len(split)},)")
    valid = np.arange(split.max_len)[None, :] < split.length[:, None]
    history = np.where(valid, split.history, -1)
    _check_room(history, split.target, num_items, count, split_name, index)
    keys = sample_keys(seed, split_name, index)
    out = np.empty((len(split), count), dtype=np.int64)
    for lo in range(0, len(split), chunk):
        rows = slice(lo, lo + chunk)
        negatives = _negatives(keys[rows], history[rows], split.target[rows], count - 1, num_items)
        position = (_mix(keys[rows] ^ _POSITION) % np.uint64(count)).astype(np.int64)
        is_target = np.arange(count)[None, :] == position[:, None]
        block = np.empty((len(position), count), dtype=np.int64)
        block[is_target] = split.target[rows]
        block[~is_target] = negatives.ravel()
        out[rows] = block
    return out


def save_candidates(path: str | Path, candidates: np.ndarray) -> Path:
    """Write an int64 ``(n, count)`` array to ``path`` (``.npy``, no pickle), atomically."""
    path = Path(path)
    if path.suffix != ".npy":
        raise ConfigError(f"{path}: candidate files are .npy")
    array = np.asarray(candidates)
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise ValueError(f"candidates must be a 2-D integer array, got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.int64, copy=False), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())  # unique temporary name, fsync, rename
    return path


def load_candidates(path: str | Path, *, rows: int | None = None, num_items: int | None = None) -> np.ndarray:
    """Read a `save_candidates` file; optionally check the row count and the id range."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "candidate file not found")
    try:
        with open(path, "rb") as fh:  # the header's shape checked against the file's size before NumPy allocates it
            if fh.read(6) == b"\x93NUMPY":
                fh.seek(0)
                version = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(fh)
                if dtype.itemsize * math.prod(shape) > path.stat().st_size:
                    raise DataError(path, f"its header claims a {dtype} array of shape {shape}, more than the file holds")
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise DataError(path, f"not a plain .npy array ({' '.join(str(exc).split())[:200] or type(exc).__name__})") from None
    if not isinstance(array, np.ndarray):  # np.load opens a zip file as an .npz archive
        array.close()
        raise DataError(path, "is a zip (.npz) archive, not a .npy array", expected="a .npy file from save_candidates")
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise DataError(path, f"holds a {array.dtype} array of shape {array.shape}", expected="2-D integer array")
    if rows is not None and len(array) != rows:
        raise DataError(path, f"{len(array)} rows", expected=f"{rows} rows (one per sample)")
    if num_items is not None and array.size:
        bad = np.argwhere((array < 0) | (array >= num_items))
        if bad.size:
            r, c = map(int, bad[0])
            raise DataError(path, "candidate outside the catalog", row=r, item=int(array[r, c]), expected=f"0 <= id < {num_items}")
    return array.astype(np.int64, copy=False)

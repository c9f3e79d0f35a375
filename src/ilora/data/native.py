"""The project's own on-disk format (written by ``ilora data convert`` / ``ilora data synth``).

A directory holding:

* ``dataset.json``: ``{"format": "ilora-native", "version": 1, "num_items": N,
  "padding_id": N, "max_len": L, "splits": {"train": {"rows": R} | null, ...},
  "items_file": "items.csv", "source": "...", "converted_from": {...}}``. It is the source of truth: a split
  listed as ``null`` is absent and must have no file. ``items_file`` is ``items.csv`` or
  ``items.json`` inside the directory, nothing else (no path can point elsewhere).
* ``train.parquet`` / ``val.parquet`` / ``test.parquet``: columns ``history``
  (``list<int64>``: only the real items, oldest first, no padding), ``length`` (int64,
  equal to the list's length) and ``target`` (int64). Row ``i`` is sample ``i``.
* ``items.csv`` (UTF-8, header ``id,title``, ids ``0 .. N-1`` in order) or ``items.json``
  (a JSON list of ``{"id": i, "title": "..."}``).

``converted_from`` (optional, informational) records how the written dataset was read:
``{"format": "llara", "source": "...", "min_len": 3, "splits": {"train": {"rows_in_source":
N, "dropped_no_history": K, "dropped_below_min_len": M}, ...}}``, with the earlier record
nested as its own ``converted_from`` when the source was itself a converted native dataset.
A dataset converted with ``--min-len 3`` holds the same samples, in the same order, as its
source read with ``--min-len 3``, so its candidate sets are the same too; this record is how
``ilora data stats`` can say so.

``max_len`` is at most ``MAX_HISTORY_LEN`` (4096) on both sides: a crafted value cannot make
the reader allocate ``rows x max_len`` ids beyond that.

No pickles anywhere. `write_native` writes into a temporary sibling directory
(``.<name>.<hex>.tmp``), fsyncs its files and the directory, and renames it into place, so
a failure never leaves partial output behind. Overwriting renames the old dataset aside
(``.<name>.old-<hex>``) first and renames it back if the second rename fails; should the
process die between the two renames, the old dataset survives under that name (`read_native`
on the missing directory names it), and the next `write_native` to the same place sweeps
such leftovers.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ilora.data.dataset import MAX_HISTORY_LEN, SPLITS, Catalog, SeqDataset, Split, validate_split
from ilora.errors import DataError, IloraError
from ilora.state_io import fsync_directory, fsync_file

NATIVE_FORMAT = "ilora-native"
NATIVE_VERSION = 1
META_FILE = "dataset.json"
ITEMS_CSV = "items.csv"
ITEMS_JSON = "items.json"


def is_native_dir(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


# --------------------------------------------------------------------------- writing


def _split_table(split: Split) -> pa.Table:
    """Split -> Arrow table with unpadded ``history`` lists."""
    mask = np.arange(split.max_len)[None, :] < split.length[:, None]
    offsets = np.zeros(len(split) + 1, dtype=np.int32)
    np.cumsum(split.length, out=offsets[1:])
    history = pa.ListArray.from_arrays(pa.array(offsets), pa.array(split.history[mask], type=pa.int64()))
    return pa.table({"history": history, "length": split.length, "target": split.target})


def _write_items_csv(catalog: Catalog, path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title"])
        writer.writerows(enumerate(catalog.titles))


def conversion_record(ds: SeqDataset) -> dict[str, Any] | None:
    """How ``ds`` was read, for ``dataset.json``'s ``converted_from``; None if not read from disk or made."""
    info = ds.load_info
    if not info.get("format"):
        return None
    record = {
        "format": info["format"],
        "source": ds.source,
        "min_len": info.get("min_len", 1),
        "splits": {name: (info.get("splits") or {}).get(name) for name in SPLITS},
    }
    if info.get("log"):
        record["log"] = info["log"]
    if info.get("converted_from"):
        record["converted_from"] = info["converted_from"]
    return record


def _write_files(ds: SeqDataset, directory: Path) -> None:
    splits_meta: dict[str, Any] = {}
    for name in SPLITS:
        split = ds.splits.get(name)
        splits_meta[name] = None if split is None else {"rows": len(split)}
        if split is not None:
            pq.write_table(_split_table(split), directory / f"{name}.parquet")
    _write_items_csv(ds.catalog, directory / ITEMS_CSV)
    meta = {
        "format": NATIVE_FORMAT,
        "version": NATIVE_VERSION,
        "num_items": ds.num_items,
        "padding_id": ds.padding_id,
        "max_len": ds.max_len,
        "splits": splits_meta,
        "items_file": ITEMS_CSV,
        "source": ds.source,
    }
    record = conversion_record(ds)
    if record is not None:
        meta["converted_from"] = record
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fsync_tree(directory: Path) -> None:
    """fsync every file in ``directory`` and then the directory itself."""
    for path in directory.iterdir():
        fsync_file(path)
    fsync_directory(directory)


def _leftovers(out: Path) -> list[Path]:
    """Siblings ``.<name>.<hex>.tmp`` / ``.<name>.old-<hex>`` that an interrupted write left."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:[0-9a-f]{{8}}\.tmp|old-[0-9a-f]{{8}})")
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and restored on failure."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    fsync_directory(out.parent)
    shutil.rmtree(old, ignore_errors=True)  # a leftover is swept by the next write


def check_native_target(out: Path, overwrite: bool) -> None:
    """`IloraError` unless `write_native` may write to ``out``: absent, or (with ``overwrite``)
    an empty directory or a native dataset. A command checks it before reading its source."""
    if out.exists():
        if not overwrite:
            raise IloraError(f"{out}: already exists (pass --overwrite to replace it)")
        if not out.is_dir() or not (is_native_dir(out) or not any(out.iterdir())):
            raise IloraError(f"{out}: refusing to overwrite: it is not an ilora native dataset directory")


def write_native(ds: SeqDataset, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Validate ``ds`` and write it to ``out_dir`` atomically (temp dir + rename).

    ``out_dir`` must not exist, unless ``overwrite`` is set and it is empty or a native
    dataset (never some other directory); then it is replaced as a whole. Leftovers of an
    interrupted earlier write to ``out_dir`` are removed first (see the module docstring).
    """
    out = Path(out_dir)
    check_native_target(out, overwrite)
    ds.validate()
    if ds.max_len > MAX_HISTORY_LEN:
        raise IloraError(f"{out}: max_len={ds.max_len} is over the limit of {MAX_HISTORY_LEN} history items")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(out):
        shutil.rmtree(stale)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()  # unlike tempfile.mkdtemp, honours the umask
    try:
        _write_files(ds, tmp)
        _fsync_tree(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------- reading


def _load_json(path: Path) -> Any:
    """Parsed JSON; a `DataError` naming the file if it is not valid or nested too deeply."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not valid JSON ({exc})") from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply to read") from None


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    meta = _load_json(path)
    if not isinstance(meta, dict) or meta.get("format") != NATIVE_FORMAT:
        raise DataError(path, "not an ilora native dataset description", expected=f'"format": "{NATIVE_FORMAT}"')
    if meta.get("version") != NATIVE_VERSION:
        raise DataError(path, f"unsupported version {meta.get('version')!r}", expected=f"version {NATIVE_VERSION}")
    for key in ("num_items", "padding_id", "max_len"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool):
            raise DataError(path, f"{key} is missing or not an integer")
    if meta["max_len"] < 1 or meta["num_items"] < 1:
        raise DataError(path, f"max_len={meta['max_len']}, num_items={meta['num_items']}", expected="both >= 1")
    if meta["max_len"] > MAX_HISTORY_LEN:
        raise DataError(path, f"max_len={meta['max_len']} is over the limit", expected=f"max_len <= {MAX_HISTORY_LEN}")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not set(splits) <= set(SPLITS):
        raise DataError(path, f"splits is {splits!r:.80}", expected='"splits": {"train": {"rows": N} | null, ...}')
    for name, entry in splits.items():
        rows = entry.get("rows") if isinstance(entry, dict) else None
        if entry is not None and not (isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0):
            raise DataError(path, f"splits.{name} is {entry!r:.80}", expected='null or {"rows": N} with N >= 0')
    _check_conversion_record(path, meta.get("converted_from"), "converted_from")
    items_file = meta.get("items_file", ITEMS_CSV)
    if items_file not in (ITEMS_CSV, ITEMS_JSON):
        raise DataError(path, f"items_file is {items_file!r:.80}", expected=f"{ITEMS_CSV!r} or {ITEMS_JSON!r} (a file in the dataset directory)")
    return meta


def _check_conversion_record(path: Path, record: Any, where: str) -> None:
    """``converted_from`` is absent, or a dict with a format name and an integer min_len >= 1 (recursively)."""
    if record is None:
        return
    min_len = record.get("min_len") if isinstance(record, dict) else None
    if not (isinstance(record, dict) and isinstance(record.get("format"), str) and isinstance(min_len, int) and not isinstance(min_len, bool) and min_len >= 1):
        raise DataError(path, f"{where} is {record!r:.80}", expected='absent, or {"format": "...", "min_len": N >= 1, ...}')
    _check_conversion_record(path, record.get("converted_from"), f"{where}.converted_from")


def _titles_from_rows(path: Path, rows: list[tuple[Any, Any]]) -> Catalog:
    titles = []
    for row, (item, title) in enumerate(rows):
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise DataError(path, f"id {item!r:.40} is a {type(item).__name__}", row=row, expected="integer ids 0..n-1 in order")
        try:
            item_id = int(item)
        except (TypeError, ValueError):
            raise DataError(path, f"non-integer id {item!r}", row=row, expected="integer ids 0..n-1 in order") from None
        if item_id != row:
            raise DataError(path, "ids must be 0..n-1 in order", row=row, item=item_id, expected=f"id {row}")
        if not isinstance(title, str):
            raise DataError(path, f"title is a {type(title).__name__}", row=row, item=item_id, expected="a string")
        titles.append(title)
    return Catalog(tuple(titles), source=str(path))


@contextmanager
def _any_field_size() -> Iterator[None]:
    """Lift the csv module's 128 KiB field limit (process-wide) while our own file is read.

    `write_native` writes titles of any length, so its reader must read them back.
    """
    previous = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def read_items_csv(path: Path) -> Catalog:
    """``id,title`` CSV (UTF-8, fields of any size) -> Catalog; ids must be 0..n-1 in file order."""
    try:
        with open(path, encoding="utf-8", newline="") as handle, _any_field_size():
            reader = csv.reader(handle)
            try:
                rows = list(reader)
            except csv.Error as exc:
                raise DataError(path, f"unreadable CSV at line {reader.line_num} ({exc})") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"undecodable text at byte {exc.start}", expected="UTF-8") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["id", "title"]:
        raise DataError(path, f"header is {rows[0] if rows else 'missing'}", expected="header id,title")
    body = rows[1:]
    for row, fields in enumerate(body):
        if len(fields) != 2:
            raise DataError(path, f"{len(fields)} fields", row=row, expected="2 fields: id,title")
    return _titles_from_rows(path, [(f[0], f[1]) for f in body])


def read_items_json(path: Path) -> Catalog:
    """JSON list of ``{"id", "title"}`` -> Catalog; ids must be the JSON integers 0..n-1 in list order."""
    data = _load_json(path)
    if not isinstance(data, list) or not all(isinstance(d, dict) and {"id", "title"} <= d.keys() for d in data):
        raise DataError(path, "not a list of items", expected='[{"id": 0, "title": "..."}, ...]')
    for row, entry in enumerate(data):
        if not isinstance(entry["id"], int) or isinstance(entry["id"], bool):
            raise DataError(path, f"id {entry['id']!r:.40} is not an integer", row=row, expected="integer ids 0..n-1 in order")
    return _titles_from_rows(path, [(d["id"], d["title"]) for d in data])


def _as_int64(path: Path, values: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    """An integer Arrow array as int64; a `DataError` naming the first value that does not fit."""
    array = values.to_numpy()
    if array.dtype == np.uint64:
        big = np.flatnonzero(array > np.iinfo(np.int64).max)
        if big.size:
            raise DataError(path, f"{name} value {int(array[big[0]])} does not fit in int64", expected="ids below 2**63")
    return array.astype(np.int64, copy=False)


def _int_column(path: Path, table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    if not pa.types.is_integer(column.type):
        raise DataError(path, f"column {name} has type {column.type}", expected="integers")
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(path, f"null {name}", row=row)
    return _as_int64(path, column, name)


def read_split_parquet(path: Path, catalog: Catalog, max_len: int) -> Split:
    """One ``<split>.parquet`` -> padded, validated `Split`."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(path, f"not a readable Parquet file ({exc})") from None
    missing = [c for c in ("history", "length", "target") if c not in table.column_names]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}", expected="columns history, length, target")
    history = table.column("history").combine_chunks()
    if not (pa.types.is_list(history.type) or pa.types.is_large_list(history.type)) or not pa.types.is_integer(
        history.type.value_type
    ):
        raise DataError(path, f"column history has type {history.type}", expected="list<int64>")
    if history.null_count:
        row = int(np.flatnonzero(history.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(path, "null history", row=row)
    length = _int_column(path, table, "length")
    target = _int_column(path, table, "target")
    counts = pc.list_value_length(history).to_numpy().astype(np.int64)
    values = pc.list_flatten(history)
    if values.null_count:
        row = int(np.repeat(np.arange(len(counts)), counts)[np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]])
        raise DataError(path, "null id in history", row=row)
    bad = np.flatnonzero(counts != length)
    if bad.size:
        r = int(bad[0])
        raise DataError(path, f"length={int(length[r])} but the history holds {int(counts[r])} ids", row=r)
    bad = np.flatnonzero(counts > max_len)
    if bad.size:
        r = int(bad[0])
        raise DataError(path, f"history of {int(counts[r])} ids", row=r, expected=f"at most max_len={max_len}")
    matrix = np.full((len(counts), max_len), catalog.padding_id, dtype=np.int64)
    rows = np.repeat(np.arange(len(counts)), counts)
    cols = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    matrix[rows, cols] = _as_int64(path, values, "history")
    split = Split(matrix, length, target)
    validate_split(split, catalog, path)
    return split


def read_native(directory: str | Path) -> SeqDataset:
    """Read a native dataset directory (see the module docstring)."""
    directory = Path(directory)
    if not is_native_dir(directory):
        saved = [p for p in _leftovers(directory) if ".old-" in p.name]
        if saved and not directory.exists():
            raise DataError(directory, f"missing; an interrupted overwrite left the previous dataset in {saved[-1]} (rename it back)")
        raise DataError(directory, "not an ilora native dataset", expected=f"a directory with {META_FILE}")
    meta = _read_meta(directory)
    items_file = directory / meta.get("items_file", ITEMS_CSV)
    if not items_file.is_file():
        raise DataError(items_file, "item catalog not found", expected=f"{ITEMS_CSV} or {ITEMS_JSON}")
    catalog = read_items_json(items_file) if items_file.suffix == ".json" else read_items_csv(items_file)
    meta_path = directory / META_FILE
    if catalog.num_items != meta["num_items"] or meta["padding_id"] != meta["num_items"]:
        raise DataError(
            meta_path,
            f"num_items={meta['num_items']}, padding_id={meta['padding_id']} but {items_file.name} has {catalog.num_items} items",
            expected="num_items == padding_id == number of catalog items",
        )
    splits: dict[str, Split | None] = {}
    for name in SPLITS:
        path, entry = directory / f"{name}.parquet", meta["splits"].get(name)
        if entry is None:
            if path.exists():
                raise DataError(path, f"{META_FILE} lists the {name} split as absent, but its file exists")
            splits[name] = None
            continue
        if not path.is_file():
            raise DataError(path, f"the {name} split is missing (listed in {META_FILE})")
        splits[name] = read_split_parquet(path, catalog, meta["max_len"])
        if isinstance(entry, dict) and entry.get("rows") not in (None, len(splits[name])):
            raise DataError(path, f"{len(splits[name])} rows, but {META_FILE} says {entry['rows']}")
    counts = {name: None if s is None else {"rows_in_source": len(s), "dropped_no_history": 0} for name, s in splits.items()}
    info: dict[str, Any] = {"format": "native", "splits": counts}
    if meta.get("converted_from"):
        info["converted_from"] = meta["converted_from"]
    return SeqDataset(catalog, splits, source=str(directory), load_info=info)

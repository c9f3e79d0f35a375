"""The teacher-outputs format (``ilora teacher export`` writes it, ``ilora distill`` reads it).

Directory layout::

    manifest.json                      what is here (below); written first, rewritten (atomically)
                                       as the export goes on (embeddings, each shard, each split's
                                       end, the DLLM2Rec files)
    train/part-00000.parquet ...       one row per sample of the split, in split order
    val/..., test/...                  only when exported
    item_embeddings.safetensors        "item_embeddings": float32 (num_items, llm_hidden)
    dllm2rec/myrank_train.txt          the same top-K, in DLLM2Rec's own files
    dllm2rec/confidence_train.txt
    dllm2rec/all_embeddings.pt         a plain tensor (torch.save), what DLLM2Rec loads
    dllm2rec/data/train_data.csv ...   the samples of those rows, for DLLM2Rec's ./data/<data>/

Parquet columns (one row per sample):

* ``index`` int64: the sample's position in its split (0-based, split order);
* ``topk_items`` list<int64>[K]: the teacher's top-K items, best first;
* ``topk_scores`` list<float32>[K]: their exact log-likelihoods (score protocol);
* ``topk_confidence`` list<float32>[K]: softmax of the scores over the whole candidate
  pool (the SASRec top-N plus the sample's fixed candidates), so a row sums to <= 1;
* ``gate`` list<float32>[E]: the per-sample expert weights;
* ``user_embedding`` list<float32>[d]: SASRec's user representation the gate read.

``manifest.json``::

    {"format": "ilora-teacher-outputs", "version": 1,
     "teacher": {"path": ..., "config_sha256": ..., "weights_sha256": ...},
     "dataset": {"source": ..., "catalog": <fingerprint>, "num_items": N},
     "top_k": K,
     "pool": {"sasrec_top_n": 50, "candidates": 20, "candidate_seed": S,
              "prompt_candidates": 20, "history_excluded": true},
     "confidence": "softmax of the pool's log-likelihoods",
     "gate": "learned",
     "options": {...every export option but the splits: what a resumed export must share...},
     "item_embeddings": {"file": "item_embeddings.safetensors", "dim": H, "method": ...,
                         "sha256": ...},
     "splits": {"train": {"rows": R, "complete": true, "samples": n, "samples_sha256": ...,
                          "shards": [{"file": "train/part-00000.parquet", "first_index": 0,
                                      "rows": r, "sha256": ...}, ...]}, ...},
     "dllm2rec": {"dir": "dllm2rec", "rows": R, "top_k": K, "confidence": ..., "train_samples": n,
                  "partial": false, "problems": [...], "data": ..., "files": {name: sha256, ...}}}

``pool.candidates`` fixed candidates (the ones the prompt shows, drawn with
``candidate_seed``) join the pool; ``prompt_candidates`` is how many the prompt shows;
SASRec's top-N excludes the sample's history. ``splits.<name>.samples`` and
``samples_sha256`` fingerprint the split exported, so a resume refuses other data;
``dllm2rec`` is present when the train split was exported; its ``problems`` lists what would
stop DLLM2Rec's main.py from reading the files as they are (empty when nothing would).

The fixed candidates contain each sample's target (they are the evaluation protocol's
candidate sets). For the train split that is the label the student learns anyway, but for an
exported val or test split every pool holds its answer: use those top-K lists for analysis,
never as features of a model evaluated on the same split.

Reading (`read_teacher_outputs`): list columns go straight from the Arrow buffers to
NumPy (no Python object per value); ``columns=`` reads only the list columns a caller
uses (the others are ``None`` in `SplitOutputs`). Every shard is checked against the
manifest (file present, sha256 unless ``verify=False``, rows = the next samples in
order) and every column read is checked: a list of the same width in every row of every
shard (``top_k`` for the three top-K columns, the first shard's width for ``gate`` and
``user_embedding``), no null row or value, integer item ids, float values, no NaN score
(``-inf`` is a valid score, ``+inf`` is not) and only finite confidences, gate weights and user
embeddings. A violation is a `DataError` naming the shard and its row.

``item_embeddings.sha256`` is required when ``item_embeddings.safetensors`` is read with
``verify=True`` (`ilora teacher export` writes the file and records it before any shard, so
every manifest that lists a shard has it): a manifest without it is refused rather than trusted unverified. A
directory without the embeddings file reads with ``item_embeddings = None`` (enough to
distil with ``w_ed = 0``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ilora.errors import DataError, IloraError
from ilora.state_io import file_sha256, read_json

FORMAT = "ilora-teacher-outputs"
VERSION = 1
MANIFEST = "manifest.json"
ITEM_EMBEDDINGS = "item_embeddings.safetensors"
SHARD_PATTERN = "part-{:05d}.parquet"  # shard i of a split: <split>/part-0000i.parquet
SHARD_NAME = r"part-\d{5,}\.parquet"  # what SHARD_PATTERN writes, as a regular expression
LIST_COLUMNS = {  # list column -> the dtype it is read as
    "topk_items": np.int64,
    "topk_scores": np.float32,
    "topk_confidence": np.float32,
    "gate": np.float32,
    "user_embedding": np.float32,
}
COLUMNS = ("index", *LIST_COLUMNS)
TOP_K_COLUMNS = ("topk_items", "topk_scores", "topk_confidence")  # rows of manifest["top_k"] values
FINITE_COLUMNS = ("topk_confidence", "gate", "user_embedding")  # scores may be -inf, never NaN or +inf


@dataclass
class SplitOutputs:
    """Teacher outputs of one split, as dense arrays (row i = sample i of the split);
    a column the reader was not asked for is ``None``."""

    topk_items: np.ndarray | None  # int64 (n, K)
    topk_scores: np.ndarray | None  # float32 (n, K)
    topk_confidence: np.ndarray | None  # float32 (n, K)
    gate: np.ndarray | None  # float32 (n, E)
    user_embedding: np.ndarray | None  # float32 (n, d)

    def __len__(self) -> int:
        for name in LIST_COLUMNS:
            value = getattr(self, name)
            if value is not None:
                return len(value)
        return 0


@dataclass
class TeacherOutputs:
    manifest: dict
    splits: dict[str, SplitOutputs] = field(default_factory=dict)
    item_embeddings: np.ndarray | None = None  # float32 (num_items, H)

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    def split(self, name: str) -> SplitOutputs:
        if name not in self.splits:
            raise IloraError(f"teacher outputs have no {name} split (exported: {', '.join(self.splits) or 'none'})")
        return self.splits[name]


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    manifest = read_json(path, "teacher-outputs manifest (run `ilora teacher export`)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IloraError(f"{path}: not an ilora teacher-outputs manifest")
    if manifest.get("version") != VERSION:
        raise IloraError(f"{path}: format version {manifest.get('version')} (this ilora reads {VERSION})")
    _check_splits(path, manifest.get("splits", {}))
    return manifest


_SPLIT_KEYS = {"rows": int, "complete": bool, "shards": list}
_SHARD_KEYS = {"file": str, "first_index": int, "rows": int, "sha256": str}


def _check_splits(path: Path, splits: object) -> None:
    """`IloraError` naming ``path`` and the key when the manifest's ``splits`` are not shaped
    as the module docstring says (what the reader and a resumed export index into)."""

    def check(value: object, keys: dict[str, type], where: str) -> None:
        if not isinstance(value, dict):
            raise IloraError(f"{path}: {where} is {type(value).__name__}, expected an object")
        for key, kind in keys.items():
            item = value.get(key)
            if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
                raise IloraError(f"{path}: {where}.{key} is {item!r}, expected {kind.__name__}")

    if not isinstance(splits, dict):
        raise IloraError(f"{path}: splits is {type(splits).__name__}, expected an object of split name -> entry")
    for name, info in splits.items():
        check(info, _SPLIT_KEYS, f"splits.{name}")
        for i, shard in enumerate(info["shards"]):
            check(shard, _SHARD_KEYS, f"splits.{name}.shards[{i}]")
            if not re.fullmatch(rf"{re.escape(str(name))}/{SHARD_NAME}", shard["file"]):  # never a path outside the export
                raise IloraError(f"{path}: splits.{name}.shards[{i}].file is {shard['file'][:80]!r}, expected {name}/part-NNNNN.parquet")


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def list_matrix(table: pa.Table, name: str, width: int | None, source: Path) -> np.ndarray:
    """List column ``name`` as an ``(n, width)`` array, straight from the Arrow buffers (no
    Python object per value; zero-copy for a one-chunk column without nulls).

    ``width=None`` takes row 0's length. Raises `DataError` naming ``source`` and the row for
    a column that is not a list, a null row, a row of another length, or a null value.
    """
    chunked = table.column(name)
    if not _is_list(chunked.type):
        raise DataError(source, f"column {name} is {chunked.type}", expected="a list column")
    column = chunked.combine_chunks()
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(source, f"column {name} is null", row=row, expected="a list of values")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if width is None:
        width = int(lengths[0]) if lengths.size else 0
    if lengths.size and (lengths != width).any():
        row = int(np.flatnonzero(lengths != width)[0])
        raise DataError(source, f"column {name} has {int(lengths[row])} values", row=row, expected=f"{width} values")
    values = column.flatten()
    if values.null_count:
        at = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(source, f"column {name} has a null value at position {at % width}", row=at // width)
    return values.to_numpy(zero_copy_only=False).reshape(len(column), width)


def _typed(matrix: np.ndarray, name: str, source: Path) -> np.ndarray:
    """``matrix`` as column ``name``'s dtype, after checking its value type and values."""
    dtype = LIST_COLUMNS[name]
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(matrix.dtype, np.integer):
        raise DataError(source, f"column {name} holds {matrix.dtype} values", expected="integer item ids")
    if np.issubdtype(dtype, np.floating) and not np.issubdtype(matrix.dtype, np.floating):
        raise DataError(source, f"column {name} holds {matrix.dtype} values", expected="floating-point numbers")
    matrix = matrix.astype(dtype, copy=False)
    if np.issubdtype(dtype, np.floating):
        bad = ~np.isfinite(matrix) if name in FINITE_COLUMNS else np.isnan(matrix) | np.isposinf(matrix)
        if bad.any():
            row, at = (int(i) for i in np.argwhere(bad)[0])
            wanted = "finite numbers" if name in FINITE_COLUMNS else "numbers (-inf allowed, not NaN or +inf)"
            raise DataError(source, f"column {name} holds {matrix[row, at]} at position {at}", row=row, expected=wanted)
    return matrix


def _shard_rows(path: Path) -> int:
    """The row count in a shard's Parquet footer (nothing else is read)."""
    try:
        return pq.read_metadata(path).num_rows
    except pa.ArrowException as exc:
        raise DataError(path, f"not a readable Parquet shard ({' '.join(str(exc).split())})") from None


def _read_shard(path: Path, columns: Sequence[str]) -> pa.Table:
    """The ``index`` column and ``columns`` of one shard (only those are read from disk)."""
    try:
        names = pq.read_schema(path).names
        missing = [c for c in ("index", *columns) if c not in names]
        if missing:
            raise DataError(path, f"missing column(s) {', '.join(missing)}", expected=f"columns {', '.join(COLUMNS)}")
        return pq.read_table(path, columns=["index", *columns])
    except pa.ArrowException as exc:
        raise DataError(path, f"not a readable Parquet shard ({' '.join(str(exc).split())})") from None


def _index(table: pa.Table, path: Path) -> np.ndarray:
    column = table.column("index")
    if not pa.types.is_integer(column.type) or column.null_count:
        raise DataError(path, f"column index is {column.type} with {column.null_count} null(s)", expected="int64 sample positions")
    return column.to_numpy().astype(np.int64, copy=False)


def _check_columns(columns: Sequence[str]) -> tuple[str, ...]:
    unknown = [c for c in columns if c not in LIST_COLUMNS]
    if not columns:
        raise ValueError("no teacher-output columns asked for (a split without columns would have no rows)")
    if unknown:
        raise ValueError(f"unknown teacher-output column(s) {', '.join(unknown)}; the list columns are {', '.join(LIST_COLUMNS)}")
    return tuple(dict.fromkeys(columns))


def read_split(
    directory: Path, name: str, info: dict, *, verify: bool = True, columns: Sequence[str] = tuple(LIST_COLUMNS), top_k: int | None = None
) -> SplitOutputs:
    """The ``columns`` (list columns) of all shards of one split, checked against the manifest
    entry ``info`` (rows, order, checksums) and ``top_k`` (the width of the top-K columns;
    ``None``: the first shard's), and each value checked (module docstring)."""
    columns = _check_columns(columns)
    if not info.get("complete"):
        written = f"{info['rows']} of {info['samples']} samples written; " if {"rows", "samples"} <= info.keys() else ""
        raise IloraError(f"{directory}: the {name} export is incomplete ({written}run the same `ilora teacher export` command again to finish it)")
    for shard in info["shards"]:  # every count checked against its file before anything is sized by it
        path, rows = directory / shard["file"], shard.get("rows")
        if type(rows) is not int or rows < 0:
            raise IloraError(f"{directory / MANIFEST}: shard {shard['file']} has rows {rows!r}, expected a count")
        if not path.is_file():
            raise IloraError(f"{path}: shard listed in the manifest is missing")
        stored = _shard_rows(path)
        if stored != rows:
            raise IloraError(f"{path}: holds {stored} rows, the manifest says {rows}")
    total = sum(shard["rows"] for shard in info["shards"])
    if total != info["rows"]:
        raise IloraError(f"{directory}: the {name} shards hold {total} rows, the manifest says {info['rows']}")
    widths: dict[str, int | None] = {c: top_k if c in TOP_K_COLUMNS else None for c in columns}
    arrays: dict[str, np.ndarray] = {}  # filled shard by shard: one shard's Arrow data in memory at a time
    start = 0
    for shard in info["shards"]:
        path = directory / shard["file"]
        if verify and file_sha256(path) != shard["sha256"]:
            raise IloraError(f"{path}: checksum does not match the manifest (corrupted or replaced)")
        table = _read_shard(path, columns)
        index = _index(table, path)
        stop = start + int(shard["rows"])
        if len(index) != shard["rows"] or not np.array_equal(index, np.arange(start, start + len(index))):
            raise IloraError(f"{path}: rows are not samples {start}..{stop - 1} in order")
        for col in columns:
            matrix = _typed(list_matrix(table, col, widths[col], path), col, path)
            if col not in arrays:  # the first shard with rows fixes the width every later shard must have
                if widths[col] is None and not len(matrix):
                    continue
                widths[col] = matrix.shape[1]
                arrays[col] = np.empty((total, widths[col]), LIST_COLUMNS[col])
            arrays[col][start:stop] = matrix
        start = stop
        del table
    for col in columns:
        arrays.setdefault(col, np.empty((0, widths[col] or 0), LIST_COLUMNS[col]))
    pa.default_memory_pool().release_unused()  # hand the shards' decoded buffers back: the arrays are what stays
    return SplitOutputs(**{c: arrays.get(c) for c in LIST_COLUMNS})


def read_item_embeddings(directory: Path, manifest: dict, *, verify: bool = True) -> np.ndarray | None:
    """``item_embeddings.safetensors`` as float32 ``(num_items, H)``; ``None`` when the file is
    absent and the manifest records none (an export that has none); an error when the manifest
    records one that is missing. With ``verify``, the manifest must hold its sha256 and the
    file must match it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = directory / ITEM_EMBEDDINGS
    if not path.is_file():
        if (manifest.get("item_embeddings") or {}).get("sha256"):
            raise IloraError(f"{path}: missing, though {directory / MANIFEST} records it (removed or not copied with the export?)")
        return None
    if verify:
        expected = (manifest.get("item_embeddings") or {}).get("sha256")
        if not expected:
            raise IloraError(
                f"{directory / MANIFEST}: no item_embeddings.sha256, so {path} cannot be verified "
                "(`ilora teacher export` always writes it; export again)"
            )
        if file_sha256(path) != expected:
            raise IloraError(f"{path}: checksum does not match the manifest (corrupted or replaced)")
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise DataError(path, f"not a readable safetensors file ({exc})") from None
    if "item_embeddings" not in tensors:
        raise DataError(path, "no tensor named item_embeddings", expected="item_embeddings: float32 (num_items, H)")
    return tensors["item_embeddings"].astype(np.float32, copy=False)


def read_teacher_outputs(
    directory: str | Path, splits: tuple[str, ...] = ("train",), *, verify: bool = True, columns: Sequence[str] | None = None,
    embeddings: bool = True,
) -> TeacherOutputs:
    """Read the manifest, the requested splits and (``embeddings``) the item embeddings.

    ``columns``: the list columns to read (default: all of `LIST_COLUMNS`); the others are
    ``None`` in each `SplitOutputs` and are neither read from disk nor checked. Without
    ``embeddings`` the item embeddings are neither read nor checked (``item_embeddings`` is
    None): a distillation with ``w_ed = 0`` needs none.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    columns = _check_columns(tuple(LIST_COLUMNS) if columns is None else columns)
    top_k = manifest.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise IloraError(f"{directory / MANIFEST}: top_k is {top_k!r}, expected a positive integer")
    out = TeacherOutputs(manifest)
    for name in splits:
        info = manifest.get("splits", {}).get(name)
        if info is None:
            raise IloraError(f"{directory}: no {name} split was exported")
        out.splits[name] = read_split(directory, name, info, verify=verify, columns=columns, top_k=top_k)
    out.item_embeddings = read_item_embeddings(directory, manifest, verify=verify) if embeddings else None
    return out

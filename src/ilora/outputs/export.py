"""`ilora teacher export`: write the teacher's outputs (format: `ilora.outputs.format`).

For every sample of each requested split:

* **Candidate pool**: the sample's fixed candidates (`ilora.data.candidate_sets`, the
  teacher's ``candidate_seed``, ``split_name`` = the split, ``--pool-candidates`` of
  them, target included) followed by SASRec's top-N items (``--pool-sasrec``, from
  ``teacher.rec.scores(history, length)``; the sample's history items are excluded, our
  choice: BIGRec, the teacher DLLM2Rec was tuned with, ranks every item; the padding id
  never has a score),
  deduplicated (first occurrence kept). Either part may be 0, not both. Pools differ in
  size; a batch pads them to its longest pool by repeating the first item and masks the
  padding out, so it is never scored into the softmax nor selected.
* **Prompt**: the training prompt (history + fixed candidates, no answer). The prompt
  lists the fixed candidate set drawn with ``count = --pool-candidates``; with
  ``--pool-candidates 0`` it lists the teacher's training ``num_candidates`` (as in
  training) although they are not in the pool.
* **Scores**: ``teacher.score_candidates`` (the exact log-likelihood of each pool item's
  title + eos given the prompt, gate ``--gate``), which runs ``teacher.run``: the same
  forward path as the training loss.
* **Top-K**: the K best pool items by score (a stable sort: ties keep pool order, i.e.
  fixed candidates first); ``topk_confidence`` = softmax of the scores over the whole
  pool (padding excluded), so a row sums to <= 1.
* ``gate`` = ``teacher.gates(history, length, --gate)``; ``user_embedding`` =
  ``teacher.rec.user_representation(history, length)`` (what the learned gate reads).

**Item embeddings** (``item_embeddings.safetensors``, float32 ``(num_items, H)``): for
each catalog item, its title tokens exactly as in the `TitleTable` (no bos, no eos, no
prompt) run through ``teacher.decode`` with the **uniform** gate (an item has no user,
so every expert weighs 1/E); the mean of the last hidden states over the title tokens.

**Streaming and resume.** Rows are written in Parquet shards of ``--shard-rows`` rows
(temporary name, fsync, rename); after every shard, ``manifest.json`` is rewritten
atomically with the shard's row count and sha256. Re-running the same command continues
after the last shard listed in the manifest; shard files the manifest does not list
(half-written ones) are deleted first. Every batch lies inside one shard and batches
start at the shard's first row, so a resumed export writes byte-identical shards. A
manifest written by another teacher (config or weights), dataset (catalog, split
samples) or options is refused unless ``overwrite=True``, which deletes the previous
outputs (only the files this module writes). At the end the DLLM2Rec files are written
from the train shards (`ilora.outputs.dllm2rec`).

**Several ranks** (``torchrun``): shards are dealt round-robin; each rank scores and writes
its own shards, rank 0 writes the manifest (after each round, listing its shards in
order), the item embeddings and the DLLM2Rec files. The files are the ones a single
process writes.

Determinism: the same teacher, data and options give identical files (no timestamps,
fixed batching, stable sorts), whatever the number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ilora.config import changed_entries, option
from ilora.data.candidates import candidate_sets, check_candidate_room
from ilora.data.dataset import SPLITS, SeqDataset, Split
from ilora.dir_lock import claims_out_dir
from ilora.distributed import SINGLE, Dist, check_ranks_agree
from ilora.errors import ConfigError, IloraError
from ilora.outputs.format import FORMAT, ITEM_EMBEDDINGS, MANIFEST, SHARD_NAME, SHARD_PATTERN, VERSION, file_sha256
from ilora.progress import progress
from ilora.rec.metrics import history_mask
from ilora.rec.sasrec import id_tensor
from ilora.state_io import atomic_write_text, fsync_file, replace_durably, save_tensors
from ilora.teacher.evaluate import batch_slices, check_window_fits

log = logging.getLogger(__name__)

CONFIDENCE = "softmax of the pool's log-likelihoods"
EMBEDDING_METHOD = (
    "mean of the teacher LLM's last hidden states over the item title's tokens "
    "(tokenised as in the TitleTable, no prompt), uniform gate"
)
ITEM_BATCH = 256  # titles per decoder call for the item embeddings (fixed: determinism)
SHARD_FILE = re.compile(rf"{SHARD_NAME}|\.{SHARD_NAME}\.tmp")  # a shard or its temporary file (`write_shard`)


@dataclass(frozen=True)
class ExportOptions:
    """What `export_teacher_outputs` computes (every field but ``splits`` must match to resume)."""

    splits: tuple[str, ...] = option(("train",), "splits to export (train, val, test)")
    top_k: int = option(10, "items kept per sample")
    pool_sasrec: int = option(50, "SASRec's top-N unseen items in the pool (0: none)")
    pool_candidates: int = option(20, "fixed candidates in the pool and the prompt, 0 (none in the pool) or >= 2")
    shard_rows: int = option(8192, "rows per Parquet shard")
    batch_size: int = option(16, "prompts per batch")
    gate: str = option("learned", "learned, uniform or expert:N")
    device: str = option("cpu", "device to score on (cpu or cuda)")
    limit: int = option(0, "export only the first N samples of each split (0: all; `ilora distill --train-limit N` trains on the train samples such a partial export covers)")

    def __post_init__(self) -> None:
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ConfigError(f"splits: expected distinct names among {', '.join(SPLITS)}, got {list(self.splits)}")
        for name in self.splits:
            if name not in SPLITS:
                raise ConfigError(f"unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        for name in ("top_k", "shard_rows", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for name in ("pool_sasrec", "pool_candidates", "limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        if self.pool_candidates == 1:
            raise ConfigError("pool-candidates: must be 0 (none) or >= 2 (the target and at least one other item), got 1")
        if self.pool_sasrec == 0 and self.pool_candidates == 0:
            raise ConfigError("pool-sasrec and pool-candidates are both 0: the candidate pool would be empty")

    def identity(self) -> dict:
        """The options a resumed export must share with the manifest."""
        out = asdict(self)
        del out["splits"]
        return out


# -- pools and top-K ------------------------------------------------------------------------


def guaranteed_pool_size(pool_candidates: int, pool_sasrec: int, num_items: int, max_len: int) -> int:
    """A lower bound on every sample's pool size.

    The fixed candidates are distinct, and so are SASRec's top-N unseen items (at least
    ``num_items - max_len`` items are unseen), so a pool holds at least the larger part.
    """
    return max(pool_candidates, min(pool_sasrec, num_items - max_len))


def check_pool(opts: ExportOptions, num_items: int, max_len: int) -> None:
    """ConfigError unless every sample's pool is guaranteed to hold ``top_k`` items."""
    if opts.pool_sasrec > num_items or opts.pool_candidates > num_items:
        raise ConfigError(f"pool-sasrec {opts.pool_sasrec} / pool-candidates {opts.pool_candidates}: the catalog has only {num_items} items")
    floor = guaranteed_pool_size(opts.pool_candidates, opts.pool_sasrec, num_items, max_len)
    if opts.top_k > floor:
        raise ConfigError(
            f"top-k {opts.top_k} exceeds the candidate pool size guaranteed for every sample ({floor} = the larger of "
            f"pool-candidates {opts.pool_candidates} and pool-sasrec {opts.pool_sasrec} capped at the "
            f"{num_items} - {max_len} items outside a history); lower --top-k or enlarge the pool"
        )


def check_export_input(dataset: SeqDataset, opts: ExportOptions, num_candidates: int) -> dict[str, Split]:
    """The splits to export (cut to ``opts.limit``), after what the export would refuse in them:
    a pool smaller than top-k (`check_pool`), and candidate sets of ``opts.pool_candidates``
    (0: the teacher's ``num_candidates``) that a row cannot fill, which the shards would otherwise
    find one by one after the manifest, the item embeddings and earlier shards were written.
    Cheap: commands run it before loading the teacher too."""
    splits = {}
    for name in opts.splits:
        split = dataset.split(name)
        splits[name] = split.subset(slice(0, opts.limit)) if opts.limit else split
    check_pool(opts, dataset.num_items, dataset.max_len)
    for name, split in splits.items():
        check_candidate_room(split, dataset.num_items, count=opts.pool_candidates or num_candidates, split_name=name)
    return splits


def sasrec_top_unseen(rec_scores: torch.Tensor, history: torch.Tensor, length: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SASRec's ``n`` best items per row that are not in the history: ``(B, n)`` ids and validity.

    A slot is invalid only when fewer than ``n`` items are outside the history.
    """
    seen = history_mask(history, length, rec_scores.shape[1])
    masked = rec_scores.float().masked_fill(seen, float("-inf"))
    values, order = torch.sort(masked, dim=1, descending=True, stable=True)
    return order[:, :n], torch.isfinite(values[:, :n])


def build_pools(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``(ids, valid)`` parts, drop duplicates (first occurrence kept) and invalid
    slots, compact each row to the left and pad to the longest row with its first item.

    Returns ``pool`` int64 ``(B, P)`` and ``mask`` bool ``(B, P)`` (False = padding).
    """
    ids = torch.cat([p[0] for p in parts], 1)
    valid = torch.cat([p[1] for p in parts], 1)
    m = ids.shape[1]
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]
    earlier = torch.ones(m, m, dtype=torch.bool, device=ids.device).tril(-1)  # [i, j]: j < i
    keep = valid & ~(same & earlier).any(2)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    size = keep.sum(1)
    width = int(size.max())
    pool = ids.gather(1, order)[:, :width]
    mask = torch.arange(width, device=ids.device)[None, :] < size[:, None]
    return torch.where(mask, pool, pool[:, :1]), mask


def sample_pools(teacher, history: torch.Tensor, length: torch.Tensor, fixed: torch.Tensor, opts: ExportOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples' candidate pools (module docstring): ``fixed`` when ``opts.pool_candidates``,
    then SASRec's top ``opts.pool_sasrec`` unseen items; `build_pools` of them."""
    parts = []
    if opts.pool_candidates:
        parts.append((fixed, torch.ones_like(fixed, dtype=torch.bool)))
    if opts.pool_sasrec:
        parts.append(sasrec_top_unseen(teacher.rec.scores(history, length), history, length, opts.pool_sasrec))
    return build_pools(parts)


@dataclass
class TopK:
    items: torch.Tensor  # int64 (B, K)
    scores: torch.Tensor  # float32 (B, K)
    confidence: torch.Tensor  # float32 (B, K)


def select_top_k(scores: torch.Tensor, pool: torch.Tensor, mask: torch.Tensor, k: int, rows: str = "sample", first_row: int = 0) -> TopK:
    """The ``k`` best real pool items of each row, with softmax-over-the-pool confidences.

    Raises `IloraError` naming the sample (``rows`` and ``first_row`` + batch row, e.g.
    ``"train sample 41"``) whose pool is smaller than ``k``, or that has a NaN score on a real
    pool item: NaN would sort first and turn every confidence of its row into NaN. ``-inf`` is
    a valid score."""
    size = mask.sum(1)
    if bool((size < k).any()):
        row = int((size < k).nonzero()[0, 0])
        raise IloraError(f"{rows} {first_row + row}: its candidate pool has {int(size[row])} items, fewer than top-k {k}")
    unrankable = (torch.isnan(scores) | (scores == float("inf"))) & mask
    hopeless = ~(torch.isfinite(scores) & mask).any(1)  # softmax of a row of -inf only: NaN confidences
    if bool((unrankable.any(1) | hopeless).any()):  # one device sync for both faults
        if bool(unrankable.any()):
            row, col = (int(i) for i in unrankable.nonzero()[0])
            raise IloraError(f"{rows} {first_row + row}: the teacher's score of pool item {int(pool[row, col])} is {float(scores[row, col])}; cannot rank it")
        row = int(hopeless.nonzero()[0, 0])
        raise IloraError(f"{rows} {first_row + row}: the teacher scores every item of its pool -inf; no confidence can be given")
    masked = scores.float().masked_fill(~mask, float("-inf"))
    confidence = torch.softmax(masked, dim=1)
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k]
    return TopK(pool.gather(1, order), masked.gather(1, order), confidence.gather(1, order))


# -- one batch ------------------------------------------------------------------------------


@torch.no_grad()
def score_pool(teacher, prompts, pool: torch.Tensor, mask: torch.Tensor, k: int, gate: str, rows: str = "sample", first_row: int = 0) -> TopK:
    """Score the pool items given the prompts (``teacher.score_candidates`` -> ``teacher.run``)."""
    return select_top_k(teacher.score_candidates(prompts, pool, gate), pool, mask, k, rows, first_row)


def _id_tensors(history: np.ndarray, length: np.ndarray, fixed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's history ids, lengths and fixed candidates as checked int64 tensors (`id_tensor`)."""
    return id_tensor(history, "history ids"), id_tensor(length, "history lengths"), id_tensor(fixed, "candidates")


@torch.no_grad()
def export_batch(
    bundle, history: np.ndarray, length: np.ndarray, fixed: np.ndarray, opts: ExportOptions, split: str = "", first_row: int = 0
) -> dict[str, np.ndarray]:
    """The output columns (except ``index``) of one batch of samples: rows ``first_row`` on of
    ``split`` (errors name them).

    ``fixed`` ``(B, C)`` are the fixed candidates shown in the prompt; they join the pool
    when ``opts.pool_candidates > 0``.
    """
    teacher = bundle.teacher
    history, length, fixed = _id_tensors(history, length, fixed)
    prompts = bundle.prompt_collator.build(history, length, fixed).to(opts.device)
    pool, mask = sample_pools(teacher, prompts.history, prompts.length, prompts.candidates, opts)
    top = score_pool(teacher, prompts, pool, mask, opts.top_k, opts.gate, f"{split} sample".strip(), first_row)
    gates = teacher.gates(prompts.history, prompts.length, opts.gate)
    user = teacher.rec.user_representation(prompts.history, prompts.length)
    as_np = lambda t, dtype: t.detach().to("cpu", torch.float32 if dtype is np.float32 else torch.int64).numpy().astype(dtype, copy=False)  # noqa: E731
    return {
        "topk_items": as_np(top.items, np.int64),
        "topk_scores": as_np(top.scores, np.float32),
        "topk_confidence": as_np(top.confidence, np.float32),
        "gate": as_np(gates, np.float32),
        "user_embedding": as_np(user, np.float32),
    }


# -- item embeddings ------------------------------------------------------------------------


@torch.no_grad()
def item_embeddings(teacher, device: str, batch: int = ITEM_BATCH) -> np.ndarray:
    """float32 ``(num_items, H)``: mean last hidden state over each title's tokens, uniform gate."""
    table = teacher.title_table
    n = table.num_items
    empty = (table.length[:n] == 0).nonzero()
    if empty.numel():
        raise IloraError(f"item {int(empty[0, 0])}: its title has no tokens, so it has no LLM embedding")
    embed = teacher.llm.get_input_embeddings()
    out = []
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        length = table.length[lo:hi].to(device)
        width = int(length.max())
        ids = table.ids[lo:hi, :width].to(device)
        mask = (torch.arange(width, device=device)[None, :] < length[:, None]).long()
        positions = torch.arange(width, device=device).expand(len(ids), -1)
        gates = torch.full((len(ids), teacher.num_experts), 1.0 / teacher.num_experts, device=device)
        hidden = teacher.decode(embed(ids), mask, positions, gates).hidden.float()
        out.append(((hidden * mask[..., None]).sum(1) / length[:, None].float()).cpu())
    return torch.cat(out).numpy()


# -- identity and manifest ------------------------------------------------------------------


def teacher_identity(teacher_dir: str | Path) -> dict:
    """sha256 of ``teacher_config.json`` and of the teacher's weight files together."""
    root = Path(teacher_dir)
    config = root / "teacher_config.json"
    if not config.is_file():
        raise IloraError(f"{root}: not a teacher checkpoint (no teacher_config.json)")
    files = sorted([*root.glob("*.safetensors"), *root.glob("rec/*.safetensors"), *root.glob("llm/*.safetensors")])
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\x00" + file_sha256(path).encode())
    return {"path": str(root.resolve()), "config_sha256": file_sha256(config), "weights_sha256": h.hexdigest()}


def new_manifest(teacher: dict, dataset: SeqDataset, opts: ExportOptions, cfg, hidden: int) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "teacher": teacher,
        "dataset": {"source": dataset.source, "catalog": dataset.catalog.sha256(), "num_items": dataset.num_items},
        "top_k": opts.top_k,
        "pool": {
            "sasrec_top_n": opts.pool_sasrec,
            "candidates": opts.pool_candidates,
            "candidate_seed": cfg.candidate_seed,
            "prompt_candidates": opts.pool_candidates or cfg.num_candidates,
            "history_excluded": True,
        },
        "confidence": CONFIDENCE,
        "gate": opts.gate,
        "options": opts.identity(),
        "item_embeddings": {"file": ITEM_EMBEDDINGS, "dim": hidden, "method": EMBEDDING_METHOD},
        "splits": {},
    }


IDENTITY_KEYS = (("teacher", "config_sha256"), ("teacher", "weights_sha256"), ("dataset", "catalog"), ("dataset", "num_items"),
                 ("top_k",), ("pool",), ("gate",), ("options",))


def _get(d: dict, keys: tuple[str, ...]):
    for key in keys:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def check_same_export(old: dict, new: dict, out: Path) -> None:
    """IloraError naming the first difference between a previous manifest and this export
    (for the export options, each option that differs: ``name: old -> new``)."""
    for keys in IDENTITY_KEYS:
        before, now = _get(old, keys), _get(new, keys)
        if before != now:
            what = ".".join(keys)
            if isinstance(before, dict) and isinstance(now, dict):
                change = "; ".join(changed_entries(before, now))
            else:
                change = f"{before!r} -> {now!r}"
            raise IloraError(f"{out}: holds an export that differs in {what} ({change}); use another --out, or --overwrite to replace it")


def _write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _shard_files(directory: Path) -> list[Path]:
    """The files in ``directory`` named as `write_shard` names its shards and their temporary
    files (``part-00000.parquet``, ``.part-00000.parquet.tmp``), and no others."""
    return sorted(p for p in directory.iterdir() if SHARD_FILE.fullmatch(p.name)) if directory.is_dir() else []


def _remove_outputs(out: Path) -> None:
    """Delete what an export writes here (and nothing else)."""
    from ilora.outputs.dllm2rec import DATA_FILES, DLLM2REC_DIR, DLLM2REC_FILES

    for name in SPLITS:
        for path in _shard_files(out / name):
            path.unlink()
    for path in (out / ITEM_EMBEDDINGS, *(out / DLLM2REC_DIR / f for f in DLLM2REC_FILES + DATA_FILES), out / MANIFEST):
        path.unlink(missing_ok=True)


def _refuse_foreign_manifest(path: Path) -> None:
    """`IloraError` unless ``path`` is one of our manifests (a JSON object whose ``format`` is
    ours, of any version or state): anything else may be another program's file, not ours to
    delete."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IloraError(
            f"{path}: not readable JSON ({exc.__class__.__name__}), so not known to be an ilora teacher-outputs manifest; "
            "--overwrite deletes only an export's own files: use another --out, or delete it yourself"
        ) from None
    what = f"format {manifest.get('format')!r}" if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IloraError(f"{path}: {what}, not an ilora teacher-outputs manifest; use another --out")


def prepare_out(out: Path, fresh: dict, overwrite: bool) -> dict:
    """The manifest to continue from: the previous one when it matches, else a fresh one.
    ``overwrite`` replaces an earlier export whatever its manifest's version or state; a
    ``manifest.json`` that is not ours (another format, none, not JSON) is refused."""
    if (out / MANIFEST).is_file():
        from ilora.outputs.format import read_manifest

        if not overwrite:
            old = read_manifest(out)
            check_same_export(old, fresh, out)
            old["teacher"]["path"] = fresh["teacher"]["path"]
            return old
        _refuse_foreign_manifest(out / MANIFEST)
        _remove_outputs(out)
    elif out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise IloraError(f"{out}: exists, is not empty and has no {MANIFEST}; use another --out, or --overwrite")
        _remove_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, fresh)
    return fresh


# -- shards ---------------------------------------------------------------------------------


def _list_column(rows: np.ndarray, dtype) -> pa.Array:
    n, width = rows.shape
    if n * width >= 2**31:  # np.arange would wrap the 32-bit offsets silently
        raise IloraError(f"a shard of {n} rows x {width} values passes Parquet's 32-bit list offsets; use a smaller --shard-rows (export.shard_rows in ilora run)")
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(rows, dtype=dtype).reshape(-1)))


def shard_table(index: np.ndarray, columns: dict[str, np.ndarray]) -> pa.Table:
    data = {"index": pa.array(index.astype(np.int64))}
    data["topk_items"] = _list_column(columns["topk_items"], np.int64)
    for name in ("topk_scores", "topk_confidence", "gate", "user_embedding"):
        data[name] = _list_column(columns[name], np.float32)
    return pa.table(data)


def write_shard(path: Path, table: pa.Table) -> str:
    """Write ``table`` to ``path`` atomically (temporary name, fsync, rename); return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="snappy")
    fsync_file(tmp)
    replace_durably(tmp, path)
    return file_sha256(path)


def _verified_shards(out: Path, name: str, info: dict, shard_rows: int, samples: int) -> int:
    """Check the listed shards (shard i is ``part-i`` holding rows ``i * shard_rows`` on, as
    many as `_export_shard` puts in it, its file unchanged), delete unlisted ones; return the
    next row to export."""
    listed = {s["file"] for s in info["shards"]}
    for number, shard in enumerate(info["shards"]):
        lo = number * shard_rows
        if lo >= samples:
            raise IloraError(
                f"{out / MANIFEST}: lists {len(info['shards'])} {name} shards, more than {samples} samples in shards of "
                f"{shard_rows} need; use --overwrite to start again"
            )
        expected = (f"{name}/{SHARD_PATTERN.format(number)}", lo, min(shard_rows, samples - lo))
        if tuple(shard.get(k) for k in ("file", "first_index", "rows")) != expected:
            raise IloraError(
                f"{out / MANIFEST}: the {name} split's shard {number} is {shard.get('file')!r} with {shard.get('rows')!r} rows "
                f"from row {shard.get('first_index')!r}, expected {expected[0]} with {expected[2]} rows from row {lo} "
                f"(of {samples}); use --overwrite to start again"
            )
        path = out / shard["file"]
        if not path.is_file() or file_sha256(path) != shard["sha256"]:
            raise IloraError(f"{path}: listed in the manifest but missing or changed; use --overwrite to start again")
    for path in _shard_files(out / name):
        if path.relative_to(out).as_posix() not in listed:
            path.unlink()
    return sum(s["rows"] for s in info["shards"])


def _shard(bundle, split: Split, name: str, number: int, opts: ExportOptions) -> tuple[int, int, Split, np.ndarray]:
    """Shard ``number`` of ``split``: its rows ``lo..hi-1``, their samples and the fixed
    candidates their prompts show (``opts.pool_candidates``, else the teacher's count)."""
    cfg = bundle.config
    lo = number * opts.shard_rows
    hi = min(lo + opts.shard_rows, len(split))
    part = split.subset(slice(lo, hi))
    shown = opts.pool_candidates or cfg.num_candidates
    fixed = candidate_sets(part, bundle.teacher.rec.num_items, count=shown, seed=cfg.candidate_seed, split_name=name, index=np.arange(lo, hi))
    return lo, hi, part, fixed


@torch.no_grad()
def check_export_window(bundle, name: str, split: Split, opts: ExportOptions) -> None:
    """`IloraError` before anything is written where the export would reach a batch that
    `ILoRATeacher.score_candidates` refuses (an LLM whose sliding window is shorter than the
    batch's padded prompts plus its longest pool answer; `check_window_fits`). From token
    counts and the pools, built as the export builds them (SASRec runs on every batch when
    ``pool_sasrec``); nothing is done for a model without a sliding window."""
    from ilora.teacher.model import attention_window

    window = attention_window(bundle.teacher.llm.config)
    if window is None or not len(split):
        return
    title_length = bundle.teacher.title_table.length
    prompt, answer, batches = [], [], []
    for number in range(math.ceil(len(split) / opts.shard_rows)):
        lo, hi, part, fixed = _shard(bundle, split, name, number, opts)
        prompt.append(bundle.prompt_collator.token_counts(part.history, part.length, fixed).numpy())
        for sl in batch_slices(hi - lo, opts.batch_size):
            history, length, shown = (t.to(opts.device) for t in _id_tensors(part.history[sl], part.length[sl], fixed[sl]))
            pool, _ = sample_pools(bundle.teacher, history, length, shown, opts)  # padding repeats a pool item
            answer.append(title_length[pool.cpu()].max(1).values.numpy() + 1)  # title + eos
            batches.append(slice(lo + sl.start, lo + sl.stop))
    check_window_fits(
        window, np.concatenate(prompt), np.concatenate(answer), batches, opts.batch_size,
        batch_option="--batch-size (ilora run: export.batch_size)", advice="", name=f"the {name} split",
    )


def _export_shard(bundle, split: Split, name: str, number: int, opts: ExportOptions, out: Path, advance: Callable[[int], object]) -> dict:
    """Score shard ``number`` of ``split`` (rows ``number * shard_rows`` on), write it; its
    manifest entry. ``advance(rows)`` after each batch (the progress bar)."""
    lo, hi, part, fixed = _shard(bundle, split, name, number, opts)
    cols: dict[str, list[np.ndarray]] = {}
    for sl in batch_slices(hi - lo, opts.batch_size):
        for key, value in export_batch(bundle, part.history[sl], part.length[sl], fixed[sl], opts, name, lo + sl.start).items():
            cols.setdefault(key, []).append(value)
        advance(sl.stop - sl.start)
    file = f"{name}/{SHARD_PATTERN.format(number)}"
    sha = write_shard(out / file, shard_table(np.arange(lo, hi), {k: np.concatenate(v) for k, v in cols.items()}))
    return {"file": file, "first_index": lo, "rows": hi - lo, "sha256": sha}


def _resume_point(out: Path, manifest: dict, name: str, split: Split, shard_rows: int) -> int | None:
    """The first row of ``split`` still to export (its manifest entry made if new), or None when
    complete. A split whose shards hold all its rows but that is not marked complete (stopped
    between its last shard and the manifest's last write) resumes at ``len(split)``: nothing
    is scored again, and the split is then marked complete."""
    digest = split.sha256()
    info = manifest["splits"].setdefault(name, {"rows": 0, "complete": False, "samples": len(split), "samples_sha256": digest, "shards": []})
    if info.get("samples") != len(split) or info.get("samples_sha256") != digest:
        raise IloraError(f"{out}: its {name} export was made from other {name} samples; use another --out, or --overwrite")
    start = _verified_shards(out, name, info, shard_rows, len(split))
    return None if info["complete"] else start


def export_split(
    bundle, out: Path, manifest: dict, name: str, split: Split, opts: ExportOptions, on_shard: Callable[[str, int], None] | None, ctx: Dist = SINGLE
) -> int:
    """Export one split shard by shard, continuing after the manifest's last shard; rows written now.

    With several ranks, shards go round-robin: in each round rank r writes the r-th next
    shard, then rank 0 lists the round's shards in the manifest, in order. Every shard
    holds the rows a single process puts in it, scored in the same batches.
    """
    # rank 0 checks the manifest and removes unlisted shard files before any rank writes one
    start = ctx.broadcast(_resume_point(out, manifest, name, split, opts.shard_rows) if ctx.is_main else None)
    if ctx.is_main and start != 0:
        done = f"already exported whole ({len(split)} samples)" if start is None else f"resumed after {start} of its {len(split)} samples"
        log.info("%s: the %s split %s, as its manifest lists", out, name, done)
    if start is None:
        return 0
    info = manifest["splits"][name] if ctx.is_main else None
    # the listed shards are 0..first-1 (`_verified_shards`): all of them once start is len(split)
    first, count = math.ceil(start / opts.shard_rows), math.ceil(len(split) / opts.shard_rows)
    written = 0
    bar = progress(total=len(split), initial=start, desc=f"export {name}", unit="sample", show=ctx.is_main)
    with bar:
        for round_first in range(first, count, ctx.world_size):
            number = round_first + ctx.rank
            entry = _export_shard(bundle, split, name, number, opts, out, bar.update) if number < count else None
            entries = [e for e in ctx.gather(entry) if e is not None]
            rows = sum(e["rows"] for e in entries)
            written += rows
            bar.update(rows - (entry["rows"] if entry else 0))  # the other ranks' rows (rank 0's bar moved with its batches)
            if ctx.is_main:
                info["shards"].extend(entries)
                info["rows"] = entries[-1]["first_index"] + entries[-1]["rows"]
                _write_manifest(out, manifest)
                if on_shard is not None:
                    for i in range(len(entries)):
                        on_shard(name, round_first + i)
    if ctx.is_main:
        info["complete"] = True
        info["rows"] = len(split)
        _write_manifest(out, manifest)
    return written


# -- the whole export -----------------------------------------------------------------------


@dataclass
class ExportResult:
    out: str
    rows: int
    written: int
    seconds: float
    samples_per_s: float
    splits: dict[str, int] = field(default_factory=dict)
    item_embeddings: list[int] = field(default_factory=list)
    dllm2rec: bool = False  # ``out`` holds DLLM2Rec's files (this export's train split, or an earlier one's)

    def to_dict(self) -> dict:
        return asdict(self)


def _ensure_item_embeddings(bundle, out: Path, manifest: dict, device: str) -> tuple[int, int]:
    info = manifest["item_embeddings"]
    path = out / ITEM_EMBEDDINGS
    if info.get("sha256") and path.is_file() and file_sha256(path) == info["sha256"]:
        return bundle.teacher.title_table.num_items, info["dim"]
    emb = item_embeddings(bundle.teacher, device)
    save_tensors({"item_embeddings": torch.from_numpy(emb)}, path)
    info.update(dim=int(emb.shape[1]), sha256=file_sha256(path))
    _write_manifest(out, manifest)
    return emb.shape


@claims_out_dir("out")
def export_teacher_outputs(
    bundle,
    dataset: SeqDataset,
    out: str | Path,
    opts: ExportOptions,
    *,
    teacher_dir: str | Path,
    overwrite: bool = False,
    on_shard: Callable[[str, int], None] | None = None,
    ctx: Dist = SINGLE,
) -> ExportResult:
    """Export (or resume exporting) the teacher outputs of ``opts.splits`` into ``out``.

    ``on_shard(split, shard_number)`` is called (on rank 0) after each shard is committed
    (used to test interruption). ``ctx``: this process's rank when the export is split
    across ranks (`export_split`); ``out`` must then be on a file system all ranks share.
    """
    from ilora.outputs.dllm2rec import dllm2rec_problems, write_dllm2rec
    from ilora.teacher.build import base_weights_sample
    from ilora.teacher.model import parse_gate_mode

    t0 = time.perf_counter()
    out = Path(out)
    parse_gate_mode(opts.gate, bundle.teacher.num_experts)
    splits = check_export_input(dataset, opts, bundle.config.num_candidates)
    if "train" in splits and ctx.is_main:
        for problem in dllm2rec_problems(dataset, opts.top_k):  # also listed in the manifest's dllm2rec entry
            log.warning("warning: DLLM2Rec's files: %s", problem)
    bundle.teacher.eval()
    for name, split in splits.items():  # on every rank, so that all refuse alike
        check_export_window(bundle, name, split, opts)
    hidden = bundle.teacher.llm.config.hidden_size
    identity = teacher_identity(teacher_dir)
    check_ranks_agree(ctx, lambda: {  # a rank with a stale copy would write shards of other rows, or run other rounds and hang
        "teacher": {k: identity[k] for k in ("config_sha256", "weights_sha256")},
        "llm": base_weights_sample(bundle.teacher.llm),
        "dataset": dataset.sha256(),
        "splits": {n: [len(s), s.sha256()] for n, s in splits.items()},
        "options": opts.identity(),
    }, "teacher, base LLM, dataset and export options")
    manifest, shape = None, None
    if ctx.is_main:  # rank 0 owns the manifest and the item embeddings
        manifest = prepare_out(out, new_manifest(identity, dataset, opts, bundle.config, hidden), overwrite)
        shape = _ensure_item_embeddings(bundle, out, manifest, opts.device)
    shape = ctx.broadcast(shape)
    written, scoring = 0, 0.0
    for name, split in splits.items():
        s0 = time.perf_counter()
        written += export_split(bundle, out, manifest, name, split, opts, on_shard, ctx)
        scoring += time.perf_counter() - s0
    holds_dllm2rec = None
    if ctx.is_main:
        if "train" in splits:
            manifest["dllm2rec"] = write_dllm2rec(out, manifest, dataset, splits["train"])
            _write_manifest(out, manifest)
        holds_dllm2rec = bool(manifest.get("dllm2rec"))  # written now, or by an earlier export of train into out
    holds_dllm2rec = ctx.broadcast(holds_dllm2rec)
    ctx.barrier()
    seconds = time.perf_counter() - t0
    return ExportResult(
        out=str(out),
        rows=sum(len(s) for s in splits.values()),
        written=written,
        seconds=round(seconds, 3),
        samples_per_s=round(written / scoring, 3) if written and scoring > 0 else 0.0,
        splits={n: len(s) for n, s in splits.items()},
        item_embeddings=[int(shape[0]), int(shape[1])],
        dllm2rec=holds_dllm2rec,
    )

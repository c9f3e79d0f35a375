"""The teacher-outputs format (``ilora teacher export`` writes it, ``ilora distill`` reads it).

Directory layout::

    manifest.json                      what is here (below); written last, atomically
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
     "item_embeddings": {"file": "item_embeddings.safetensors", "dim": H, "method": ...},
     "splits": {"train": {"rows": R, "complete": true, "samples": n, "samples_sha256": ...,
                          "shards": [{"file": "train/part-00000.parquet", "first_index": 0,
                                      "rows": r, "sha256": ...}, ...]}, ...},
     "dllm2rec": {"dir": "dllm2rec", "rows": R, "top_k": K, "confidence": ..., "train_samples": n,
                  "partial": false, "data": ..., "files": {name: sha256, ...}}}

``pool.candidates`` fixed candidates (the ones the prompt shows, drawn with
``candidate_seed``) join the pool; ``prompt_candidates`` is how many the prompt shows;
SASRec's top-N excludes the sample's history. ``splits.<name>.samples`` and
``samples_sha256`` fingerprint the split exported, so a resume refuses other data;
``dllm2rec`` is present when the train split was exported.

The fixed candidates contain each sample's target (they are the evaluation protocol's
candidate sets). For the train split that is the label the student learns anyway, but for an
exported val or test split every pool holds its answer: use those top-K lists for analysis,
never as features of a model evaluated on the same split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ilora.errors import IloraError
from ilora.state_io import file_sha256, read_json

FORMAT = "ilora-teacher-outputs"
VERSION = 1
MANIFEST = "manifest.json"
ITEM_EMBEDDINGS = "item_embeddings.safetensors"
COLUMNS = ("index", "topk_items", "topk_scores", "topk_confidence", "gate", "user_embedding")


@dataclass
class SplitOutputs:
    """Teacher outputs of one split, as dense arrays (row i = sample i of the split)."""

    topk_items: np.ndarray  # int64 (n, K)
    topk_scores: np.ndarray  # float32 (n, K)
    topk_confidence: np.ndarray  # float32 (n, K)
    gate: np.ndarray  # float32 (n, E)
    user_embedding: np.ndarray  # float32 (n, d)

    def __len__(self) -> int:
        return len(self.topk_items)


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
    if manifest.get("format") != FORMAT:
        raise IloraError(f"{path}: not an ilora teacher-outputs manifest")
    if manifest.get("version") != VERSION:
        raise IloraError(f"{path}: format version {manifest.get('version')} (this ilora reads {VERSION})")
    return manifest


def _column(table, name: str, path: Path, dtype) -> np.ndarray:
    if name not in table.column_names:
        raise IloraError(f"{path}: missing column {name}")
    values = table.column(name).to_pylist() if name != "index" else table.column(name).to_numpy()
    try:
        return np.asarray(values, dtype=dtype)
    except ValueError:
        raise IloraError(f"{path}: column {name} has rows of different lengths") from None


def read_split(directory: Path, name: str, info: dict, *, verify: bool = True) -> SplitOutputs:
    """All shards of one split, checked against the manifest (rows, order, checksums)."""
    if not info.get("complete"):
        raise IloraError(f"{directory}: the {name} export is incomplete (resume it with `ilora teacher export`)")
    parts: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
    expected = 0
    for shard in info["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise IloraError(f"{path}: shard listed in the manifest is missing")
        if verify and file_sha256(path) != shard["sha256"]:
            raise IloraError(f"{path}: checksum does not match the manifest (corrupted or replaced)")
        table = pq.read_table(path)
        index = _column(table, "index", path, np.int64)
        if len(index) != shard["rows"] or not np.array_equal(index, np.arange(expected, expected + len(index))):
            raise IloraError(f"{path}: rows are not samples {expected}..{expected + shard['rows'] - 1} in order")
        expected += len(index)
        parts["index"].append(index)
        for col, dtype in (("topk_items", np.int64), ("topk_scores", np.float32), ("topk_confidence", np.float32), ("gate", np.float32), ("user_embedding", np.float32)):
            parts[col].append(_column(table, col, path, dtype))
    if expected != info["rows"]:
        raise IloraError(f"{directory}: the {name} shards hold {expected} rows, the manifest says {info['rows']}")
    cat = {c: np.concatenate(v) if v else np.empty((0,)) for c, v in parts.items()}
    return SplitOutputs(cat["topk_items"], cat["topk_scores"], cat["topk_confidence"], cat["gate"], cat["user_embedding"])


def read_teacher_outputs(directory: str | Path, splits: tuple[str, ...] = ("train",), *, verify: bool = True) -> TeacherOutputs:
    """Read the manifest, the requested splits and the item embeddings."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    manifest = read_manifest(directory)
    out = TeacherOutputs(manifest)
    for name in splits:
        info = manifest.get("splits", {}).get(name)
        if info is None:
            raise IloraError(f"{directory}: no {name} split was exported")
        out.splits[name] = read_split(directory, name, info, verify=verify)
    emb = directory / ITEM_EMBEDDINGS
    if emb.is_file():
        expected = manifest.get("item_embeddings", {}).get("sha256")
        if verify and expected and file_sha256(emb) != expected:
            raise IloraError(f"{emb}: checksum does not match the manifest (corrupted or replaced)")
        out.item_embeddings = load_file(str(emb))["item_embeddings"].astype(np.float32)
    return out

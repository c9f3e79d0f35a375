"""The teacher outputs in DLLM2Rec's own files (what its ``main.py`` reads).

DLLM2Rec (istarryn/DLLM2Rec) reads, from ``./tocf/<data>/``:

* ``myrank_train.txt``: ``np.loadtxt`` (whitespace-separated numbers, one line per train
  sample) -> ``LongTensor`` ``(num_train_samples, k)``; row ``i`` is looked up for the
  sample with DataFrame index ``i`` of ``train_data.df``. We write the top-K item ids,
  best first, as integers separated by one space.
* ``confidence_train.txt``: ``np.loadtxt`` -> float ``(num_train_samples, k)``. DLLM2Rec
  weighs the top-K items by ``exp(-c)`` normalised over the row (its ``c`` is a distance:
  smaller is more confident). We write ``c = -log(topk_confidence)`` (``%.9g``), so
  DLLM2Rec's weights are exactly our softmax confidences renormalised over the top-K.
* ``all_embeddings.pt``: ``torch.load`` -> a plain float32 tensor ``(num_items, H)``,
  row = item id (DLLM2Rec indexes it with the history ids and skips the padding id
  ``num_items`` because it is ``>= size(0)``). Loadable with ``weights_only=True``.
  DLLM2Rec's code projects it with ``nn.Linear(4096, 64)``: a teacher whose LLM hidden
  size is not 4096 needs that layer's input size changed there.

Rows follow our train split's order. When the dataset reader dropped samples (e.g. the
LastFM rows with an empty history, or ``--min-len``), give DLLM2Rec the converted train
split (`ilora data convert`), not the original ``train_data.df``, so that row ``i`` is
sample ``i``. Files are written from the train shards, streaming (one shard in memory),
under temporary names, then renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ilora.errors import IloraError
from ilora.outputs.format import ITEM_EMBEDDINGS, file_sha256

DLLM2REC_DIR = "dllm2rec"
RANK_FILE = "myrank_train.txt"
CONFIDENCE_FILE = "confidence_train.txt"
EMBEDDINGS_FILE = "all_embeddings.pt"
DLLM2REC_FILES = (RANK_FILE, CONFIDENCE_FILE, EMBEDDINGS_FILE)
CONFIDENCE_NOTE = "-log(topk_confidence): DLLM2Rec weighs exp(-c), i.e. our softmax confidence"


def list_matrix(table, name: str, width: int, source: Path) -> np.ndarray:
    """A list column whose rows all hold ``width`` values, as an ``(n, width)`` array."""
    column = table.column(name).combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if lengths.size and (lengths != width).any():
        row = int(np.flatnonzero(lengths != width)[0])
        raise IloraError(f"{source}: row {row} of column {name} has {int(lengths[row])} values, expected {width}")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)


def dllm2rec_confidence(confidence: np.ndarray) -> np.ndarray:
    """``-log(p)`` in float64 (``+ 0.0`` turns ``-0.0`` into ``0.0``)."""
    with np.errstate(divide="ignore"):
        return -np.log(confidence.astype(np.float64)) + 0.0


def write_dllm2rec(out: str | Path, manifest: dict) -> dict:
    """Write the three DLLM2Rec files from the train shards and the item embeddings.

    Returns the manifest entry: directory, rows, k, the confidence convention and each
    file's sha256.
    """
    from safetensors.torch import load_file

    out = Path(out)
    info = manifest["splits"].get("train")
    if info is None or not info.get("complete"):
        raise IloraError(f"{out}: the train split is not completely exported; DLLM2Rec files need it")
    k = int(manifest["top_k"])
    target = out / DLLM2REC_DIR
    target.mkdir(parents=True, exist_ok=True)
    tmp = {name: target / f".{name}.tmp" for name in DLLM2REC_FILES}
    try:
        rows = 0
        with open(tmp[RANK_FILE], "w", encoding="ascii", newline="\n") as ranks, open(tmp[CONFIDENCE_FILE], "w", encoding="ascii", newline="\n") as conf:
            for shard in info["shards"]:
                path = out / shard["file"]
                table = pq.read_table(path, columns=["index", "topk_items", "topk_confidence"])
                index = table.column("index").to_numpy()
                if not np.array_equal(index, np.arange(rows, rows + len(index))):
                    raise IloraError(f"{path}: rows are not samples {rows}.. in order")
                np.savetxt(ranks, list_matrix(table, "topk_items", k, path), fmt="%d", delimiter=" ")
                np.savetxt(conf, dllm2rec_confidence(list_matrix(table, "topk_confidence", k, path)), fmt="%.9g", delimiter=" ")
                rows += len(index)
        embeddings = load_file(str(out / ITEM_EMBEDDINGS))["item_embeddings"].to(torch.float32).contiguous()
        torch.save(embeddings, tmp[EMBEDDINGS_FILE])
        for name, path in tmp.items():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(path, target / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return {
        "dir": DLLM2REC_DIR,
        "rows": rows,
        "top_k": k,
        "confidence": CONFIDENCE_NOTE,
        "files": {name: file_sha256(target / name) for name in DLLM2REC_FILES},
    }


def read_dllm2rec(directory: str | Path) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Read the files as DLLM2Rec does: ``(ranks int64 (n, k), c float64 (n, k), embeddings)``.

    ``exp(-c)`` gives back the softmax confidences.
    """
    directory = Path(directory)
    for name in DLLM2REC_FILES:
        if not (directory / name).is_file():
            raise IloraError(f"{directory / name}: missing (run `ilora teacher export` with the train split)")
    ranks = np.loadtxt(directory / RANK_FILE, ndmin=2).astype(np.int64)
    confidence = np.loadtxt(directory / CONFIDENCE_FILE, ndmin=2)
    embeddings = torch.load(directory / EMBEDDINGS_FILE, weights_only=True)
    return ranks, confidence, embeddings

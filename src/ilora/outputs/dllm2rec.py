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

Rows follow our train split's order, which is not always the order of the dataset's own
``train_data.df``: the readers drop samples (e.g. the 976 LastFM rows with an empty
history, or ``--min-len``), and row ``i`` of DLLM2Rec's files must be row ``i`` of the
``train_data.df`` it reads. So the samples are written too, in ``data/``, as what DLLM2Rec
reads from ``./data/<data>/``:

* ``data/train_data.csv``: the exported train samples, row ``i`` = row ``i`` of the files
  above; columns ``seq`` (the history as ``"[id, ...]"``, left-aligned, padded with the
  padding id = ``num_items`` to the dataset's width, as DLLM2Rec pads), ``len_seq``, ``next``;
* ``data/val_data.csv``, ``data/test_data.csv``: the val and test splits in the same
  columns (DLLM2Rec reads these CSVs as they are), when the dataset has them;
* ``data/data_statis.csv``: ``seq_size`` (history width) and ``item_num``.

DLLM2Rec reads ``train_data.df`` and ``data_statis.df`` as pandas pickles; they are not
written here because a pickle from this pandas need not load in DLLM2Rec's older one.
Convert the two CSVs in DLLM2Rec's own environment (README, "Teacher outputs"):
``pd.read_csv(..., converters={"seq": ast.literal_eval}).to_pickle(...)``.

Files are written streaming (one shard or one block of samples in memory) under
temporary names, then renamed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ilora.data.dataset import SeqDataset, Split
from ilora.errors import IloraError
from ilora.outputs.format import ITEM_EMBEDDINGS, file_sha256, list_matrix
from ilora.state_io import fsync_file, replace_durably

DLLM2REC_DIR = "dllm2rec"
RANK_FILE = "myrank_train.txt"
CONFIDENCE_FILE = "confidence_train.txt"
EMBEDDINGS_FILE = "all_embeddings.pt"
DATA_DIR = "data"
TRAIN_CSV, VAL_CSV, TEST_CSV, STATIS_CSV = "train_data.csv", "val_data.csv", "test_data.csv", "data_statis.csv"
DLLM2REC_FILES = (RANK_FILE, CONFIDENCE_FILE, EMBEDDINGS_FILE)
DATA_FILES = tuple(f"{DATA_DIR}/{name}" for name in (TRAIN_CSV, VAL_CSV, TEST_CSV, STATIS_CSV))
CONFIDENCE_NOTE = "-log(topk_confidence): DLLM2Rec weighs exp(-c), i.e. our softmax confidence"
CSV_BLOCK = 65536  # samples formatted at a time
EVALUATION_CSVS = (("val", VAL_CSV), ("test", TEST_CSV))  # the splits DLLM2Rec evaluates every epoch


def dllm2rec_problems(dataset: SeqDataset, top_k: int) -> list[str]:
    """What would stop DLLM2Rec's main.py from reading this export's files as they are (none: ``[]``)."""
    problems = []
    if top_k < 2:
        problems.append(
            f"top_k {top_k}: DLLM2Rec reads {RANK_FILE} with np.loadtxt, which loads a single column as a 1-D array "
            "that its [:, :K] slicing fails on (export with --top-k >= 2)"
        )
    written = evaluation_csvs(dataset)
    for name, csv in EVALUATION_CSVS:
        if csv not in written:
            state = "absent" if dataset.splits.get(name) is None else "empty"
            problems.append(f"the {name} split is {state}, so {DATA_DIR}/{csv} is not written; DLLM2Rec evaluates it every epoch")
    return problems


def evaluation_csvs(dataset: SeqDataset) -> dict[str, Split]:
    """The val and test splits that have samples, by the name of their DLLM2Rec CSV (an absent
    or empty split gets none)."""
    return {csv: dataset.split(name) for name, csv in EVALUATION_CSVS if dataset.splits.get(name) is not None and len(dataset.split(name))}


def dllm2rec_confidence(confidence: np.ndarray) -> np.ndarray:
    """``-log(p)`` in float64 (``+ 0.0`` turns ``-0.0`` into ``0.0``)."""
    with np.errstate(divide="ignore"):
        return -np.log(confidence.astype(np.float64)) + 0.0


def write_samples_csv(path: Path, split: Split, width: int, padding_id: int) -> None:
    """``split`` as DLLM2Rec's ``seq,len_seq,next`` CSV (``seq`` a bracketed id list), every
    ``seq`` padded on the right with ``padding_id`` to ``width`` ids: DLLM2Rec reads all splits
    at the one ``seq_size`` of ``data_statis``, whatever width each split was stored with."""
    if split.max_len > width:
        raise IloraError(f"{path}: the split's histories are {split.max_len} wide, more than the dataset's {width}")
    with open(path, "w", encoding="ascii", newline="\n") as fh:
        fh.write("seq,len_seq,next\n")
        for lo in range(0, len(split), CSV_BLOCK):
            hi = min(lo + CSV_BLOCK, len(split))
            history = np.full((hi - lo, width), padding_id, dtype=np.int64)  # one block padded at a time
            history[:, : split.max_len] = split.history[lo:hi]
            rows = zip(history.tolist(), split.length[lo:hi].tolist(), split.target[lo:hi].tolist())
            fh.writelines(f'"[{", ".join(map(str, seq))}]",{n},{t}\n' for seq, n, t in rows)


def write_dllm2rec_data(target: Path, dataset: SeqDataset, train: Split) -> dict[str, Path]:
    """The ``data/`` CSVs under temporary names in ``target``; returns final name -> temporary path."""
    (target / DATA_DIR).mkdir(parents=True, exist_ok=True)
    splits = {TRAIN_CSV: train, **evaluation_csvs(dataset)}
    tmp: dict[str, Path] = {}
    for csv, split in splits.items():
        tmp[f"{DATA_DIR}/{csv}"] = path = target / DATA_DIR / f".{csv}.tmp"
        write_samples_csv(path, split, dataset.max_len, dataset.padding_id)
    tmp[f"{DATA_DIR}/{STATIS_CSV}"] = path = target / DATA_DIR / f".{STATIS_CSV}.tmp"
    path.write_text(f"seq_size,item_num\n{dataset.max_len},{dataset.num_items}\n", encoding="ascii")
    return tmp


def write_dllm2rec(out: str | Path, manifest: dict, dataset: SeqDataset, train: Split) -> dict:
    """Write the three DLLM2Rec teacher files from the train shards and the item embeddings,
    and the ``data/`` CSVs of ``train`` (the exported train samples) and ``dataset``'s val/test.

    Returns the manifest entry: directory, rows, k, the confidence convention, whether the
    train split was exported whole, what would stop DLLM2Rec reading the files
    (`dllm2rec_problems`), and each file's sha256.
    """
    from safetensors.torch import load_file

    out = Path(out)
    info = manifest["splits"].get("train")
    if info is None or not info.get("complete"):
        raise IloraError(f"{out}: the train split is not completely exported; DLLM2Rec files need it")
    if info["rows"] != len(train):
        raise IloraError(f"{out}: the train export has {info['rows']} rows but {len(train)} train samples were given")
    k = int(manifest["top_k"])
    target = out / DLLM2REC_DIR
    target.mkdir(parents=True, exist_ok=True)
    tmp = {name: target / f".{name}.tmp" for name in DLLM2REC_FILES}
    try:
        tmp.update(write_dllm2rec_data(target, dataset, train))
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
            fsync_file(path)
            replace_durably(path, target / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    full = len(dataset.split("train"))
    return {
        "dir": DLLM2REC_DIR,
        "rows": rows,
        "top_k": k,
        "confidence": CONFIDENCE_NOTE,
        "train_samples": full,
        "partial": rows != full,
        "problems": dllm2rec_problems(dataset, k),
        "data": "data/train_data.csv row i = row i of myrank_train.txt / confidence_train.txt",
        "files": {name: file_sha256(target / name) for name in tmp},
    }


def read_dllm2rec(directory: str | Path) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Read the teacher files back: ``(ranks int64 (n, k), c float64 (n, k), embeddings)``.

    ``exp(-c)`` gives back the softmax confidences. Unlike DLLM2Rec's ``np.loadtxt``, a
    single column (``--top-k 1``) reads as ``(n, 1)`` here (``ndmin=2``), and the embeddings
    load with ``weights_only=True``.
    """
    directory = Path(directory)
    for name in DLLM2REC_FILES:
        if not (directory / name).is_file():
            raise IloraError(f"{directory / name}: missing (run `ilora teacher export` with the train split)")
    ranks = np.loadtxt(directory / RANK_FILE, ndmin=2).astype(np.int64)
    confidence = np.loadtxt(directory / CONFIDENCE_FILE, ndmin=2)
    embeddings = torch.load(directory / EMBEDDINGS_FILE, weights_only=True)
    return ranks, confidence, embeddings

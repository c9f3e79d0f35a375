"""DLLM2Rec's files, read back exactly the way DLLM2Rec's main.py reads them."""

from __future__ import annotations

import ast
import csv
import os

import numpy as np
import pandas as pd
import pytest
import torch

from ilora.data import make_synthetic
from ilora.outputs import read_teacher_outputs
from ilora.outputs.dllm2rec import dllm2rec_confidence, read_dllm2rec
from ilora.outputs.export import ExportOptions, export_teacher_outputs
from ilora.outputs.format import file_sha256, read_manifest
from ilora.rec.sasrec import SASRec, SASRecConfig
from ilora.teacher.build import build_teacher, save_teacher
from ilora.teacher.config import TeacherConfig

SMALL = dict(tiny_hidden=32, tiny_layers=2, tiny_heads=4, tiny_vocab=300, lora_dropout=0.0, max_title_tokens=8, num_candidates=6)
OPTS = ExportOptions(splits=("train", "val"), top_k=4, pool_sasrec=5, pool_candidates=4, limit=13, shard_rows=4, batch_size=3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    dataset = make_synthetic(users=30, items=25, seed=4)
    torch.manual_seed(0)
    rec = SASRec(SASRecConfig(num_items=dataset.num_items, max_len=dataset.max_len, hidden=16, dropout=0.0)).eval()
    bundle = build_teacher(TeacherConfig(**SMALL), dataset.catalog, rec)
    root = tmp_path_factory.mktemp("dllm2rec")
    save_teacher(bundle, root / "teacher", dataset.catalog)
    export_teacher_outputs(bundle, dataset, root / "out", OPTS, teacher_dir=root / "teacher")
    return dataset, bundle, root


def dllm2rec_main_reads(tocf: str):
    """The reading lines of DLLM2Rec's main.py (istarryn/DLLM2Rec), re-implemented."""
    all_candidate = np.loadtxt(os.path.join(tocf, "myrank_train.txt"))
    all_candidate = torch.LongTensor(all_candidate)  # [train_data_num, k]
    llm_confidence = np.loadtxt(os.path.join(tocf, "confidence_train.txt"))
    llm_confidence = torch.tensor(llm_confidence, dtype=torch.float)  # [train_data_num, k]
    llm_all_emb = torch.load(os.path.join(tocf, "all_embeddings.pt"), weights_only=True)  # [num_item, H]
    return all_candidate, llm_confidence, llm_all_emb


def test_dllm2rec_reads_our_top_k_confidences_and_embeddings(exported):
    dataset, bundle, root = exported
    ours = read_teacher_outputs(root / "out", ("train",))
    train = ours.split("train")
    ranks, confidence, emb = dllm2rec_main_reads(str(root / "out" / "dllm2rec"))
    assert ranks.shape == (13, 4) and torch.equal(ranks, torch.from_numpy(train.topk_items))
    torch.testing.assert_close(torch.exp(-confidence), torch.from_numpy(train.topk_confidence), rtol=1e-6, atol=1e-9)
    # DLLM2Rec's importance weights: exp(-c) + 1e-8, normalised over the top-K
    weight = torch.exp(-confidence) + 1e-8
    weight = weight / weight.sum(1, keepdim=True)
    p = torch.from_numpy(train.topk_confidence)
    torch.testing.assert_close(weight, p / p.sum(1, keepdim=True), rtol=1e-5, atol=1e-7)
    assert type(emb) is torch.Tensor and emb.dtype == torch.float32
    assert emb.shape == (dataset.num_items, bundle.teacher.llm.config.hidden_size)
    assert torch.equal(emb, torch.from_numpy(ours.item_embeddings))
    # DLLM2Rec's lookup: history ids below size(0) get their row, the padding id (num_items) is skipped
    seq = torch.from_numpy(dataset.split("train").history[:13])
    mask = seq < emb.size(0)
    assert torch.equal(mask, seq != dataset.padding_id)


def test_files_are_streamed_over_every_shard_in_order_and_listed_in_the_manifest(exported):
    _, _, root = exported
    manifest = read_manifest(root / "out")
    assert len(manifest["splits"]["train"]["shards"]) == 4  # 13 rows in shards of 4
    entry = manifest["dllm2rec"]
    assert entry["rows"] == 13 and entry["top_k"] == 4
    for name, sha in entry["files"].items():
        assert file_sha256(root / "out" / "dllm2rec" / name) == sha
    lines = (root / "out" / "dllm2rec" / "myrank_train.txt").read_text().splitlines()
    train = read_teacher_outputs(root / "out").split("train")
    assert lines == [" ".join(str(int(i)) for i in row) for row in train.topk_items]
    assert not list((root / "out" / "dllm2rec").rglob(".*"))  # no temporary files left


def test_data_files_line_up_row_by_row_with_the_teacher_files(exported, tmp_path):
    """DLLM2Rec reads row i of its train_data.df with row i of myrank_train.txt: our
    data/train_data.csv, converted as README says, is the exported samples in export order."""
    dataset, bundle, root = exported
    data = root / "out" / "dllm2rec" / "data"
    pd.read_csv(data / "train_data.csv", converters={"seq": ast.literal_eval}).to_pickle(tmp_path / "train_data.df")
    pd.read_csv(data / "data_statis.csv").to_pickle(tmp_path / "data_statis.df")
    statis = pd.read_pickle(tmp_path / "data_statis.df")  # what DLLM2Rec's main.py does next
    assert statis["seq_size"][0] == dataset.max_len and statis["item_num"][0] == dataset.num_items
    train_data = pd.read_pickle(tmp_path / "train_data.df")
    assert train_data.shape[0] == 13 and list(train_data.index) == list(range(13))
    batch = train_data.sample(n=6, random_state=0)  # DLLM2Rec: rows by index, teacher rows all_candidate[index]
    seq = torch.LongTensor(list(batch["seq"].values))
    len_seq = torch.LongTensor(list(batch["len_seq"].values))
    rows = torch.as_tensor(batch.index)
    train = dataset.split("train")
    assert torch.equal(seq, torch.from_numpy(train.history[rows.numpy()]))  # padded with num_items, like DLLM2Rec
    assert list(batch["next"].values) == train.target[rows.numpy()].tolist()
    # independent of the split arrays: the SASRec user embedding of the CSV's row equals the one
    # the teacher export stored for the teacher row of the same index
    stored = read_teacher_outputs(root / "out").split("train").user_embedding[rows.numpy()]
    with torch.no_grad():
        user = bundle.teacher.rec.user_representation(seq, len_seq)
    np.testing.assert_allclose(user.numpy(), stored, rtol=1e-5, atol=1e-6)
    # val/test: the CSVs DLLM2Rec's myevaluate reads directly
    with open(data / "val_data.csv") as fh:
        rows_read = list(csv.DictReader(fh))
    val = dataset.split("val")
    assert [ast.literal_eval(r["seq"]) for r in rows_read] == val.history.tolist()
    assert [int(r["len_seq"]) for r in rows_read] == val.length.tolist()
    assert [float(r["next"]) for r in rows_read] == val.target.astype(float).tolist()
    entry = read_manifest(root / "out")["dllm2rec"]
    assert entry["partial"] is True and entry["train_samples"] == len(train) and entry["rows"] == 13
    assert entry["problems"] == []  # a partial export is consistent: its train_data.csv holds the rows exported


def test_read_dllm2rec_and_the_confidence_convention(exported):
    _, _, root = exported
    ranks, c, emb = read_dllm2rec(root / "out" / "dllm2rec")
    train = read_teacher_outputs(root / "out").split("train")
    assert np.array_equal(ranks, train.topk_items) and emb.shape[0] == 25
    np.testing.assert_allclose(np.exp(-c), train.topk_confidence, rtol=1e-6)
    values = dllm2rec_confidence(np.array([[1.0, 0.5, 0.0]], dtype=np.float32))
    assert values[0, 0] == 0.0 and not np.signbit(values[0, 0])
    assert values[0, 1] == pytest.approx(np.log(2.0)) and values[0, 2] == np.inf


def test_same_options_give_identical_files(exported, tmp_path):
    dataset, bundle, root = exported
    export_teacher_outputs(bundle, dataset, tmp_path / "again", OPTS, teacher_dir=root / "teacher")
    first = sorted(p.relative_to(root / "out") for p in (root / "out").rglob("*") if p.is_file())
    second = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        if rel.name != "manifest.json":
            assert file_sha256(root / "out" / rel) == file_sha256(tmp_path / "again" / rel), rel
    a, b = read_manifest(root / "out"), read_manifest(tmp_path / "again")
    assert a["splits"] == b["splits"] and a["dllm2rec"] == b["dllm2rec"]


def test_every_csv_is_as_wide_as_data_statis_says_when_splits_differ_in_width(tmp_path):
    """DLLM2Rec reads every split at data_statis' seq_size (its positional table has that many
    rows): a split stored narrower than the dataset is padded on the right with the padding id."""
    from ilora.data.dataset import Catalog, SeqDataset, Split
    from ilora.outputs.dllm2rec import write_dllm2rec_data

    catalog = Catalog(tuple(f"artist {i}" for i in range(7)))
    pad = 7
    train = Split(np.array([[0, 1, pad], [2, pad, pad]]), np.array([2, 1]), np.array([3, 4]))
    val = Split(np.array([[0, 1, 2, 3, 4]]), np.array([5]), np.array([6]))
    dataset = SeqDataset(catalog, {"train": train, "val": val, "test": None})
    tmp = write_dllm2rec_data(tmp_path, dataset, train)
    read = lambda name: list(csv.DictReader(open(tmp[f"data/{name}"])))  # noqa: E731
    assert [ast.literal_eval(r["seq"]) for r in read("train_data.csv")] == [[0, 1, pad, pad, pad], [2, pad, pad, pad, pad]]
    assert [ast.literal_eval(r["seq"]) for r in read("val_data.csv")] == [[0, 1, 2, 3, 4]]
    assert [int(r["len_seq"]) for r in read("train_data.csv")] == [2, 1]
    assert read("data_statis.csv") == [{"seq_size": "5", "item_num": "7"}]

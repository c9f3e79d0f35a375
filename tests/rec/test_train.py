"""SASRec training: losses, negative sampling, selection on val only, outputs, determinism."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from ilora.data.dataset import Catalog, SeqDataset, Split
from ilora.errors import ConfigError, IloraError
from ilora.rec.evaluate import evaluate_popularity, evaluate_sasrec, load_ranks
from ilora.rec.sasrec import SASRec, SASRecConfig, load_sasrec
from ilora.rec.train import TEST_RANKS_FILE, RecTrainConfig, sample_negatives, sasrec_loss, train_sasrec

N_ITEMS, WIDTH = 40, 6


def make_split(n: int, seed: int) -> Split:
    """Sequences that mostly step to the next id (``next = last + 1 mod N``)."""
    rng = np.random.default_rng(seed)
    length = rng.integers(1, WIDTH + 1, n)
    history = np.full((n, WIDTH), N_ITEMS)
    target = np.empty(n, dtype=np.int64)
    for i in range(n):
        item = int(rng.integers(N_ITEMS))
        for j in range(int(length[i])):
            history[i, j] = item
            item = (item + 1) % N_ITEMS if rng.random() < 0.9 else int(rng.integers(N_ITEMS))
        target[i] = item
    return Split(history, length, target)


def make_dataset(with_val: bool = True) -> SeqDataset:
    catalog = Catalog(tuple(f"item {i}" for i in range(N_ITEMS)))
    splits = {"train": make_split(800, 0), "val": make_split(80, 1) if with_val else None, "test": make_split(80, 2)}
    return SeqDataset(catalog, splits, source="synthetic")


def quick_cfg(**kw) -> RecTrainConfig:
    base = dict(epochs=6, batch_size=64, hidden=16, lr=5e-3, eval_candidates=5, patience=0, threads=1)
    base.update(kw)
    return RecTrainConfig(**base)


def test_ce_loss_is_softmax_cross_entropy() -> None:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=N_ITEMS, max_len=WIDTH, hidden=8)).eval()
    s = make_split(10, 3)
    hist, length, target = (torch.from_numpy(a) for a in (s.history, s.length, s.target))
    loss = sasrec_loss(model, hist, length, target, quick_cfg(loss="ce"), torch.Generator())
    scores = model.scores(hist, length).tolist()
    manual = 0.0
    for row, t in zip(scores, target.tolist()):
        manual += math.log(sum(math.exp(x) for x in row)) - row[t]
    assert loss.item() == pytest.approx(manual / len(scores), rel=1e-5)


def test_bce_loss_is_target_vs_sampled_negatives() -> None:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=N_ITEMS, max_len=WIDTH, hidden=8)).eval()
    s = make_split(10, 3)
    hist, length, target = (torch.from_numpy(a) for a in (s.history, s.length, s.target))
    cfg = quick_cfg(loss="bce", negatives=3)
    loss = sasrec_loss(model, hist, length, target, cfg, torch.Generator().manual_seed(7))
    negs = sample_negatives(hist, length, target, N_ITEMS, 3, torch.Generator().manual_seed(7)).tolist()
    scores = model.scores(hist, length).tolist()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    terms = []
    for row, t, ns in zip(scores, target.tolist(), negs):
        terms.append(-math.log(sig(row[t])))
        terms.extend(-math.log(1 - sig(row[j])) for j in ns)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_negatives_avoid_history_and_target() -> None:
    s = make_split(20, 4)
    hist, length, target = (torch.from_numpy(a) for a in (s.history, s.length, s.target))
    negs = sample_negatives(hist, length, target, N_ITEMS, 500, torch.Generator().manual_seed(0))
    assert negs.shape == (20, 500)
    for i in range(20):
        forbidden = set(s.history[i, : s.length[i]].tolist()) | {int(s.target[i])}
        drawn = set(negs[i].tolist())
        assert not drawn & forbidden
        assert drawn == set(range(N_ITEMS)) - forbidden  # every allowed item can be drawn


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_training_learns_selects_on_val_and_writes_outputs(tmp_path) -> None:
    ds = make_dataset()
    cfg = quick_cfg()
    result = train_sasrec(ds, cfg, tmp_path / "run")
    out = tmp_path / "run"
    for name in ("model.safetensors", "config.json", "train_config.json", "metrics.csv", "result.json"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == result["epochs_run"] == 6
    best = max(range(len(rows)), key=lambda i: (float(rows[i]["val_ndcg@10"]), -i))
    assert result["best_epoch"] == best + 1
    assert result["val"]["ndcg@10"] == pytest.approx(float(rows[best]["val_ndcg@10"]))
    # The saved model is the selected one.
    model = load_sasrec(out)
    again = evaluate_sasrec(model, ds, "val", count=5)
    assert again["ndcg@10"] == pytest.approx(result["val"]["ndcg@10"])
    assert again["cand_hr@1"] == pytest.approx(result["val"]["cand_hr@1"])
    # It learned the successor pattern, far beyond popularity.
    pop = evaluate_popularity(ds, "val", count=5)
    assert result["val"]["hr@1"] > 0.5 > pop["hr@1"] + 0.3
    assert result["val"]["cand_hr@1"] > pop["cand_hr@1"] + 0.3
    assert "test" in result and result["test"]["num_samples"] == 80
    # every test sample's rank, for paired comparisons: the metrics recomputed from them by hand
    ranks = load_ranks(out / TEST_RANKS_FILE).tolist()
    assert len(ranks) == 80
    for k in (1, 5, 10, 20):
        assert result["test"][f"hr@{k}"] == pytest.approx(sum(r < k for r in ranks) / 80)
        assert result["test"][f"ndcg@{k}"] == pytest.approx(sum(1 / math.log2(r + 2) for r in ranks if r < k) / 80)


def test_test_split_does_not_influence_training(tmp_path) -> None:
    ds = make_dataset()
    cfg = quick_cfg(epochs=3)
    first = train_sasrec(ds, cfg, tmp_path / "a")
    test = ds.splits["test"]
    ds.splits["test"] = Split(test.history, test.length, (test.target + 1) % N_ITEMS)
    second = train_sasrec(ds, cfg, tmp_path / "b")
    assert first["best_epoch"] == second["best_epoch"]
    a, b = load_sasrec(tmp_path / "a").state_dict(), load_sasrec(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first["test"]["hr@1"] != second["test"]["hr@1"]


def test_deterministic_given_seed_and_max_steps(tmp_path) -> None:
    ds = make_dataset()
    runs = [train_sasrec(ds, quick_cfg(max_steps=15, loss="bce", negatives=2, seed=s), tmp_path / f"r{i}") for i, s in enumerate((3, 3, 4))]
    assert all(r["steps"] == 15 for r in runs)
    models = [load_sasrec(tmp_path / f"r{i}").state_dict() for i in range(3)]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    assert not all(torch.equal(models[0][k], models[2][k]) for k in models[0])


def test_max_steps_zero_means_no_limit_as_for_the_teacher(tmp_path) -> None:
    ds = make_dataset()
    steps_per_epoch = -(-len(ds.splits["train"]) // 64)
    unlimited = train_sasrec(ds, quick_cfg(epochs=2, max_steps=0), tmp_path / "zero")
    assert unlimited["steps"] == 2 * steps_per_epoch
    with pytest.raises(ConfigError, match="max_steps must be >= 0"):
        quick_cfg(max_steps=-1).validate()


def test_bce_training_reduces_loss(tmp_path) -> None:
    ds = make_dataset()
    train_sasrec(ds, quick_cfg(epochs=4, loss="bce", negatives=4, eval_candidates=0), tmp_path / "bce")
    rows = read_csv(tmp_path / "bce" / "metrics.csv")
    assert float(rows[-1]["train_loss"]) < 0.8 * float(rows[0]["train_loss"])
    assert "val_cand_hr@1" not in rows[0]


def test_without_val_split_keeps_last_epoch_and_says_so(tmp_path, caplog) -> None:
    ds = make_dataset(with_val=False)
    with caplog.at_level("WARNING", logger="ilora.rec.train"):
        result = train_sasrec(ds, quick_cfg(epochs=2), tmp_path / "noval")
    assert result["best_epoch"] == 2 and "last epoch" in result["selected_by"] and "val" not in result
    assert "has no validation split: training all 2 epochs without early stopping" in caplog.text


def test_early_stopping(tmp_path) -> None:
    ds = make_dataset()
    # A vanishing learning rate keeps the val score flat, so patience triggers.
    result = train_sasrec(ds, quick_cfg(epochs=50, lr=1e-9, patience=2, eval_candidates=0), tmp_path / "es")
    assert result["epochs_run"] < 50
    assert result["epochs_run"] - result["best_epoch"] == 2


def test_config_validation(tmp_path) -> None:
    with pytest.raises(ConfigError, match="monitor"):
        train_sasrec(make_dataset(), quick_cfg(monitor="cand_hr@1", eval_candidates=0), tmp_path / "x")
    # one candidate has no cand_hr@1 (it would be 1 by construction): it used to fail with a KeyError after an epoch
    with pytest.raises(ConfigError, match=r"eval_candidates must be 0 \(no candidate metrics\) or >= 2"):
        train_sasrec(make_dataset(), quick_cfg(monitor="cand_hr@1", eval_candidates=1), tmp_path / "x")
    with pytest.raises(ConfigError, match="batch_size"):
        quick_cfg(batch_size=0).validate()
    for field, value in (("seed", -1), ("seed", 2**64 - 1), ("cand_seed", -1)):
        with pytest.raises(ConfigError, match=f"{field} must be in"):
            quick_cfg(**{field: value}).validate()
    assert not (tmp_path / "x").exists()


def test_test_candidate_sets_the_data_cannot_fill_fail_before_training(tmp_path) -> None:
    """They used to be drawn after training, leaving a model nothing would resume or overwrite."""
    ds = make_dataset(with_val=False)
    longest = max(len(set(row[:n].tolist())) for row, n in zip(ds.split("test").history, ds.split("test").length))
    count = N_ITEMS - longest + 1  # the target plus more negatives than the fullest history leaves
    with pytest.raises(IloraError, match=r"test split, row \d+: only \d+ items"):
        train_sasrec(ds, quick_cfg(eval_candidates=count), tmp_path / "late")
    assert not (tmp_path / "late").exists()
    # drawn up front, the sets still say where they came from, and are the ones `rec eval` draws
    result = train_sasrec(ds, quick_cfg(epochs=1, eval_candidates=5, cand_seed=7), tmp_path / "ok")
    assert result["test"]["cand_seed"] == 7 and result["test"]["cand_count"] == 5
    again = evaluate_sasrec(load_sasrec(tmp_path / "ok"), ds, "test", count=5, cand_seed=7)
    assert again["cand_hr@1"] == result["test"]["cand_hr@1"]


def test_a_ranks_file_holding_anything_else_is_refused(tmp_path) -> None:
    from ilora.state_io import save_tensors

    save_tensors({"ranks": torch.tensor([0.5, 1.0])}, tmp_path / "floats.safetensors")
    save_tensors({"ranks": torch.tensor([1, 2]), "extra": torch.tensor([3])}, tmp_path / "extra.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for name in ("floats", "extra", "junk"):
        with pytest.raises(IloraError, match=f"{name}.safetensors"):
            load_ranks(tmp_path / f"{name}.safetensors")

"""`distill` / ``ilora distill``: identity at zero weights, an oracle teacher helps, mismatches fail."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import save_file

from ilora.cli.main import main
from ilora.data import make_synthetic, write_native
from ilora.distill import DistillConfig, distill
from ilora.distill.student import student_factory
from ilora.distill.train import DistillationLoss, check_teacher_outputs
from ilora.errors import IloraError
from ilora.outputs.format import FORMAT, ITEM_EMBEDDINGS, MANIFEST, VERSION, SplitOutputs, TeacherOutputs, file_sha256
from ilora.rec.sasrec import load_sasrec
from ilora.rec.train import train_sasrec

K = 10


def oracle_outputs(dataset, *, width: int = 12, seed: int = 0, shuffle: bool = False) -> TeacherOutputs:
    """Top-K = the true next item at rank 0 (confidence 0.98) + random other items; random item embeddings.

    ``shuffle`` pairs each train sample with another sample's row (a mis-wired teacher).
    """
    train = dataset.split("train")
    n, items = len(train), dataset.num_items
    rng = np.random.default_rng(seed)
    top = np.empty((n, K), dtype=np.int64)
    for i in range(n):
        others = rng.choice(np.setdiff1d(np.arange(items), [train.target[i]]), K - 1, replace=False)
        top[i] = np.r_[train.target[i], others]
    if shuffle:
        top = top[rng.permutation(n)]
    conf = np.full((n, K), 0.02 / (K - 1), dtype=np.float32)
    conf[:, 0] = 0.98
    emb = rng.normal(size=(items, width)).astype(np.float32)
    split = SplitOutputs(top, np.log(conf), conf, np.zeros((n, 2), np.float32), np.zeros((n, 3), np.float32))
    manifest = {"format": FORMAT, "version": VERSION, "top_k": K, "dataset": {"num_items": items}, "item_embeddings": {"dim": width}}
    return TeacherOutputs(manifest, {"train": split}, emb)


def quick(**kw) -> DistillConfig:
    base = dict(epochs=2, batch_size=64, hidden=16, eval_candidates=0, patience=0, threads=1, dropout=0.2)
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def small():
    return make_synthetic(users=60, items=40, seed=1)


def test_zero_weights_give_the_baseline_exactly(small, tmp_path) -> None:
    """lambda_d = 0 and w_ed = 0, with the teacher term and the hook both in place: same weights, same metrics."""
    outputs = oracle_outputs(small)
    cfg = quick(lambda_d=0.0, w_ed=0.0)
    targets = check_teacher_outputs(small, outputs, cfg)
    embeddings = torch.from_numpy(outputs.item_embeddings)
    base = train_sasrec(small, cfg.rec_config(), tmp_path / "base")
    student = train_sasrec(
        small,
        cfg.rec_config(),
        tmp_path / "student",
        extra_loss=DistillationLoss(targets, cfg, None),
        model_factory=student_factory(embeddings, w_ed=0.0, seed=cfg.seed),
    )
    a, b = load_sasrec(tmp_path / "base").state_dict(), load_sasrec(tmp_path / "student").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert student["test"] == base["test"] and student["val"] == base["val"]
    # ... and a nonzero weight does change the student
    train_sasrec(
        small, cfg.rec_config(), tmp_path / "moved", extra_loss=DistillationLoss(targets, quick(lambda_d=0.5), None)
    )
    c = load_sasrec(tmp_path / "moved").state_dict()
    assert not torch.equal(a["output.weight"], c["output.weight"])


def test_distill_runs_both_students_and_reports_gains(small, tmp_path) -> None:
    result = distill(small, oracle_outputs(small), quick(epochs=1, lambda_d=0.0, w_ed=0.0), tmp_path / "d")
    assert result["distilled"]["test"] == result["baseline"]["test"]
    assert set(result["gain"]) == {f"{m}@{k}" for m in ("hr", "ndcg") for k in (1, 5, 10, 20)}
    for key, gain in result["gain"].items():
        assert gain == (None if result["baseline"]["test"][key] == 0 else 0.0)
    written = json.loads((tmp_path / "d" / "result.json").read_text())
    assert written["gain"] == result["gain"] and written["teacher"]["top_k_exported"] == K
    assert (tmp_path / "d" / "baseline" / "model.safetensors").is_file()
    assert load_sasrec(tmp_path / "d" / "distilled").num_items == small.num_items

    paired = result["gain_interval"]["metrics"]
    assert result["gain_interval"]["samples"] == small.split("test").target.shape[0]
    for key, gain in result["gain"].items():  # identical students: no sample moves
        assert paired[key]["better"] == paired[key]["worse"] == 0
        assert paired[key]["interval"] == (None if gain is None else [0.0, 0.0])

    nonzero = distill(small, oracle_outputs(small), quick(epochs=1, dro_alpha=0.5), tmp_path / "e")
    base, dist = nonzero["baseline"]["test"], nonzero["distilled"]["test"]
    assert dist != base  # the teacher's terms changed what the student learned
    for key, gain in nonzero["gain"].items():
        expected = None if base[key] == 0 else (dist[key] - base[key]) / base[key]
        assert gain == pytest.approx(expected) if expected is not None else gain is None
        assert nonzero["gain_interval"]["metrics"][key]["gain"] == (pytest.approx(gain) if gain is not None else None)


def test_resume_refuses_other_options_or_other_teacher_targets(small, tmp_path) -> None:
    """A finished (or interrupted) run is only taken up again with its own options and teacher rows."""
    first = distill(small, oracle_outputs(small), quick(epochs=1), tmp_path / "d")
    config = (tmp_path / "d" / "distill_config.json").read_text()
    with pytest.raises(IloraError, match=r"cannot resume with other options .*lambda_d: 0.8 -> 0.0"):
        distill(small, oracle_outputs(small), quick(epochs=1, lambda_d=0.0), tmp_path / "d", resume=True)
    assert (tmp_path / "d" / "distill_config.json").read_text() == config  # refused before anything was written
    # the same options with another teacher's rows: refused by the distilled student's record
    with pytest.raises(IloraError, match="distill.teacher_targets_sha256"):
        distill(small, oracle_outputs(small, seed=1), quick(epochs=1), tmp_path / "d", resume=True)
    again = distill(small, oracle_outputs(small), quick(epochs=1), tmp_path / "d", resume=True)
    assert again["distilled"]["test"] == first["distilled"]["test"] and again["baseline"] == first["baseline"]
    # a run directory without distill_config.json (e.g. lost) still refuses other options per student
    (tmp_path / "d" / "distill_config.json").unlink()
    with pytest.raises(IloraError, match="distill.lambda_d"):
        distill(small, oracle_outputs(small), quick(epochs=1, lambda_d=0.1), tmp_path / "d", resume=True)


@pytest.mark.slow
def test_an_oracle_teacher_clearly_helps_and_a_miswired_one_hurts(tmp_path) -> None:
    """The true next item at rank 0 helps on test; the same rows given to the wrong samples hurt.

    ``follow=0.3`` keeps hr@10 well below its ceiling on this synthetic data (with the
    default 0.6 the baseline already finds most predictable next items in its top 10).
    """
    data = make_synthetic(users=600, items=400, seed=0, follow=0.3, stay=0.4)
    cfg = quick(epochs=3, batch_size=128, hidden=32, w_ed=0.0)
    result = distill(data, oracle_outputs(data), cfg, tmp_path / "oracle")
    base, dist = result["baseline"]["test"], result["distilled"]["test"]
    assert dist["hr@10"] > base["hr@10"] + 0.015, (base, dist)
    assert dist["ndcg@10"] > base["ndcg@10"] + 0.015, (base, dist)

    shuffled = check_teacher_outputs(data, oracle_outputs(data, shuffle=True), cfg)
    wrong = train_sasrec(data, cfg.rec_config(), tmp_path / "wrong", extra_loss=DistillationLoss(shuffled, cfg, None))
    assert wrong["test"]["hr@10"] < base["hr@10"] - 0.05, (base, wrong["test"])


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda o: o.manifest["dataset"].update(num_items=41), "exported for 41 items, but .* has 40"),
        (lambda o: setattr(o.splits["train"], "topk_items", o.splits["train"].topk_items[:-1]), r"shape \(\d+, 10\), expected \(\d+, K\)"),
        (lambda o: setattr(o.splits["train"], "topk_items", o.splits["train"].topk_items[:, :5]), "5 items per train row, but top_k=10: pass --top-k 5 \\(or less\\), or export again with --top-k 10"),
        (lambda o: setattr(o.splits["train"], "topk_confidence", o.splits["train"].topk_confidence[:, :9]), "confidences have shape"),
        (lambda o: o.splits["train"].topk_items.__setitem__((3, 2), 40), r"train row 3, position 2: id 40 is not an item"),
        (lambda o: o.splits["train"].topk_confidence.__setitem__((1, 0), np.nan), r"train row 1, position 0: confidence nan"),
        (lambda o: setattr(o, "item_embeddings", o.item_embeddings[:39]), r"item embeddings have shape \(39, 12\), expected \(40, H\)"),
        (lambda o: setattr(o, "item_embeddings", None), "no item embeddings"),
        (lambda o: o.manifest["item_embeddings"].update(dim=4096), "12 wide, the manifest says 4096"),
        (lambda o: o.splits.pop("train"), "no train split"),
    ],
)
def test_mismatched_outputs_are_clear_errors(small, tmp_path, change, match) -> None:
    outputs = oracle_outputs(small)
    change(outputs)
    with pytest.raises(IloraError, match=match):
        distill(small, outputs, quick(), tmp_path / "x")
    assert not (tmp_path / "x" / "baseline").exists()  # checked before any training


def test_outputs_of_the_same_number_of_other_train_samples_are_rejected(small) -> None:
    """The manifest's fingerprint of the exported samples must be that of the train split."""
    from ilora.data.dataset import Split

    train = small.split("train")
    outputs = oracle_outputs(small)
    outputs.manifest["splits"] = {"train": {"samples": len(train), "samples_sha256": train.sha256()}}
    check_teacher_outputs(small, outputs, quick())  # the exported samples: accepted
    order = np.random.default_rng(0).permutation(len(train))
    reordered = Split(train.history[order], train.length[order], train.target[order])
    outputs.manifest["splits"]["train"]["samples_sha256"] = reordered.sha256()
    with pytest.raises(IloraError, match="exported for other train samples"):
        check_teacher_outputs(small, outputs, quick())


def test_other_dataset_is_rejected_and_no_embeddings_needed_without_ed(small) -> None:
    other = make_synthetic(users=70, items=40, seed=2)
    with pytest.raises(IloraError, match="one row per train sample"):
        check_teacher_outputs(other, oracle_outputs(small), quick())
    outputs = oracle_outputs(small)
    outputs.item_embeddings = None
    assert check_teacher_outputs(small, outputs, quick(w_ed=0.0)).embeddings is None


def write_outputs_dir(outputs: TeacherOutputs, directory) -> None:
    """A teacher-outputs directory as `ilora.outputs.format` documents it (one shard)."""
    (directory / "train").mkdir(parents=True)
    split = outputs.splits["train"]
    n = len(split)
    table = pa.table(
        {
            "index": pa.array(np.arange(n), pa.int64()),
            "topk_items": pa.array(split.topk_items.tolist(), pa.list_(pa.int64())),
            "topk_scores": pa.array(split.topk_scores.tolist(), pa.list_(pa.float32())),
            "topk_confidence": pa.array(split.topk_confidence.tolist(), pa.list_(pa.float32())),
            "gate": pa.array(split.gate.tolist(), pa.list_(pa.float32())),
            "user_embedding": pa.array(split.user_embedding.tolist(), pa.list_(pa.float32())),
        }
    )
    shard = directory / "train" / "part-00000.parquet"
    pq.write_table(table, shard)
    save_file({"item_embeddings": outputs.item_embeddings}, str(directory / ITEM_EMBEDDINGS))
    manifest = dict(outputs.manifest)
    emb = {"file": ITEM_EMBEDDINGS, "dim": int(outputs.item_embeddings.shape[1]), "sha256": file_sha256(directory / ITEM_EMBEDDINGS)}
    manifest["item_embeddings"] = emb
    manifest["splits"] = {
        "train": {"rows": n, "complete": True, "shards": [{"file": "train/part-00000.parquet", "first_index": 0, "rows": n, "sha256": file_sha256(shard)}]}
    }
    (directory / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


def test_a_control_seed_trains_the_baseline_again_and_reports_what_the_seed_alone_moves(small, tmp_path) -> None:
    """control_seed: a third student, the baseline with another seed (checked against plain SASRec
    training with that seed), its gain over the baseline and that gain's interval; the other two
    students are those of a run without it."""
    import dataclasses

    from ilora.errors import ConfigError

    outputs = oracle_outputs(small)
    cfg = quick(epochs=1, control_seed=5)
    result = distill(small, outputs, cfg, tmp_path / "d")
    alone = train_sasrec(small, dataclasses.replace(cfg.rec_config(), seed=5), tmp_path / "alone")
    control, base = result["control"], result["baseline"]["test"]
    assert control["seed"] == 5 and control["test"] == alone["test"]
    assert control["test"] != base  # another seed alone moves the metrics
    for key, gain in control["gain"].items():
        expected = None if base[key] == 0 else (control["test"][key] - base[key]) / base[key]
        assert gain == (pytest.approx(expected) if expected is not None else None)
        assert control["gain_interval"]["metrics"][key]["gain"] == (pytest.approx(gain) if gain is not None else None)
    assert control["gain_interval"]["samples"] == small.split("test").target.shape[0]
    assert json.loads((tmp_path / "d" / "result.json").read_text())["control"]["gain"] == control["gain"]
    plain = distill(small, outputs, quick(epochs=1), tmp_path / "e")
    assert "control" not in plain
    assert plain["baseline"]["test"] == result["baseline"]["test"] and plain["distilled"]["test"] == result["distilled"]["test"]
    again = distill(small, outputs, cfg, tmp_path / "d", resume=True)  # finished students are not trained again
    assert again["control"]["test"] == control["test"] and again["control"]["steps"] == control["steps"]
    with pytest.raises(ConfigError, match="control_seed must differ from seed"):
        quick(seed=3, control_seed=3).validate()
    with pytest.raises(ConfigError, match="control_seed must be in 0..2"):  # before any student trains
        quick(control_seed=-1).validate()
    # an earlier run's control: refused by a fresh run without it, removed by --overwrite without it
    with pytest.raises(IloraError, match="control"):
        distill(small, outputs, quick(epochs=1), tmp_path / "d")
    rerun = distill(small, outputs, quick(epochs=1), tmp_path / "d", overwrite=True)
    assert "control" not in rerun and not (tmp_path / "d" / "control").exists()


def test_cli_prints_one_json_object(small, tmp_path, capsys) -> None:
    data_dir = tmp_path / "data"
    write_native(small, data_dir)
    write_outputs_dir(oracle_outputs(small), tmp_path / "outputs")
    argv = ["distill", str(data_dir), "--teacher-outputs", str(tmp_path / "outputs"), "--out", str(tmp_path / "run"), "--json"]
    argv += ["--epochs", "1", "--seed", "3", "--batch-size", "128", "--device", "cpu", "hidden=16", "eval_candidates=0", "threads=1"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["config"]["seed"] == 3 and result["config"]["hidden"] == 16 and result["config"]["lambda_d"] == 0.8
    assert result["teacher"]["embedding_dim"] == 12
    assert set(result["gain"]) >= {"hr@10", "ndcg@10"} and result["baseline"]["steps"] == result["distilled"]["steps"]

    # without --json: a table with each gain and its interval, read back from result.json's numbers
    assert main([a for a in argv if a != "--json"] + ["--resume"]) == 0
    table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    written = json.loads((tmp_path / "run" / "result.json").read_text())
    ndcg = written["gain_interval"]["metrics"]["ndcg@10"]
    low, high = (f"{100 * x:+.1f}%" for x in ndcg["interval"])
    assert table["ndcg@10"].split()[-3:] == [low, "to", high] and f"{100 * written['gain']['ndcg@10']:+.1f}%" in table["ndcg@10"]

    # with a control seed the table adds the control's gain and its interval to each row
    control_argv = [a if a != str(tmp_path / "run") else str(tmp_path / "run3") for a in argv if a != "--json"] + ["control_seed=4"]
    assert main(control_argv) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "run3" / "result.json").read_text())["control"]
    row = {line.split()[0]: line for line in out.splitlines()}["ndcg@10"]
    low, high = (f"{100 * x:+.1f}%" for x in written["gain_interval"]["metrics"]["ndcg@10"]["interval"])
    assert "control (seed 4)" in out and row.split()[-4:] == [f"{100 * written['gain']['ndcg@10']:+.1f}%,", low, "to", high]

    assert main(argv[:3] + [str(tmp_path / "nowhere"), "--out", str(tmp_path / "run2"), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and "manifest" in err


def test_hook_rows_index_the_full_train_split(small, tmp_path) -> None:
    """With ``train_min_len`` filtering samples, ``rows`` still point at the full split's rows."""
    train = small.split("train")
    seen: list[int] = []

    def record(batch) -> torch.Tensor:
        rows = batch.rows.cpu().numpy()
        assert np.array_equal(train.target[rows], batch.target.cpu().numpy())
        assert np.array_equal(train.history[rows], batch.history.cpu().numpy())
        seen.extend(rows.tolist())
        return batch.logits.new_zeros(())

    train_sasrec(small, quick(epochs=1, train_min_len=3).rec_config(), tmp_path / "r", extra_loss=record)
    assert sorted(seen) == np.flatnonzero(train.length >= 3).tolist() and len(seen) < len(train)


def test_ranks_of_another_run_are_refused_and_missing_ones_reported(small, tmp_path) -> None:
    from ilora.rec.evaluate import load_ranks, save_ranks

    cfg = quick(epochs=1, lambda_d=0.0, w_ed=0.0)
    distill(small, oracle_outputs(small), cfg, tmp_path / "d")
    ranks_file = tmp_path / "d" / "distilled" / "test_ranks.safetensors"
    ranks = load_ranks(ranks_file)
    save_ranks(ranks + 25, ranks_file)  # another run's ranks beside this result.json
    with pytest.raises(IloraError, match="do not give the metrics of .*result.json"):
        distill(small, oracle_outputs(small), cfg, tmp_path / "d", resume=True)
    ranks_file.unlink()  # a student finished before runs saved their ranks
    result = distill(small, oracle_outputs(small), cfg, tmp_path / "d", resume=True)
    assert "train it again" in result["gain_interval"]["unavailable"]


def test_a_partial_or_unfinished_export_is_named_as_such(small, tmp_path) -> None:
    """The manifest entries as the exporter writes them: with --limit 64 the split exported is the
    first 64 samples (rows = samples = 64, options.limit = 64); an interrupted export has fewer
    rows than samples."""
    n = len(small.split("train"))
    outputs = oracle_outputs(small)
    outputs.manifest["options"] = {"limit": 64}
    outputs.manifest.setdefault("splits", {})["train"] = {"rows": 64, "samples": 64, "complete": True}
    train = outputs.splits["train"]
    train.topk_items, train.topk_confidence = train.topk_items[:64], train.topk_confidence[:64]
    with pytest.raises(IloraError, match=f"a partial export \\(made with --limit 64: 64 of {n} train samples\\).* trains on \\({n}\\): pass --train-limit 64"):
        distill(small, outputs, quick(), tmp_path / "x")
    outputs = oracle_outputs(small)
    outputs.manifest.setdefault("splits", {})["train"] = {"rows": 64, "samples": n, "complete": False}
    with pytest.raises(IloraError, match=f"an unfinished export \\(64 of {n} train samples written\\); run the same"):
        distill(small, outputs, quick(), tmp_path / "x")


def first_rows(outputs: TeacherOutputs, n: int) -> TeacherOutputs:
    """The first ``n`` train rows of ``outputs``, as a full export of a train split of ``n`` samples."""
    t = outputs.splits["train"]
    rows = SplitOutputs(t.topk_items[:n], t.topk_scores[:n], t.topk_confidence[:n], t.gate[:n], t.user_embedding[:n])
    return TeacherOutputs(dict(outputs.manifest), {"train": rows}, outputs.item_embeddings)


def test_train_limit_trains_every_student_on_the_first_n_samples(small, tmp_path) -> None:
    """train_limit N: the students of a run on the whole dataset are those of a run on a dataset whose
    train split is its first N samples (val and test whole), with the first N teacher rows, whether
    the rows come from a full export or from one made with --limit M >= N."""
    import dataclasses

    from ilora.errors import ConfigError

    train = small.split("train")
    n = len(train)
    full = oracle_outputs(small)
    partial = first_rows(full, 30)  # as `ilora teacher export --limit 30` writes it
    partial.manifest["options"] = {"limit": 30}
    partial.manifest["splits"] = {"train": {"rows": 30, "samples": 30, "complete": True, "samples_sha256": train.subset(slice(0, 30)).sha256()}}
    for case, (limit, outputs) in enumerate(((30, partial), (20, partial), (20, full))):
        cut = dataclasses.replace(small, splits={**small.splits, "train": train.subset(slice(0, limit))})
        expected = distill(cut, first_rows(full, limit), quick(epochs=1), tmp_path / f"ref{case}")
        result = distill(small, outputs, quick(epochs=1, train_limit=limit), tmp_path / f"limit{case}")
        for student in ("baseline", "distilled"):
            assert result[student]["test"] == expected[student]["test"] and result[student]["steps"] == expected[student]["steps"]
    assert expected["baseline"]["test"] != distill(small, full, quick(epochs=1), tmp_path / "all")["baseline"]["test"]
    # a distillation recorded before train_limit was an option resumes: its record lacks the key
    done = tmp_path / "all"
    record = json.loads((done / "distill_config.json").read_text())
    del record["train_limit"]
    (done / "distill_config.json").write_text(json.dumps(record))
    assert "train_limit" not in (done / "distilled" / "train_config.json").read_text()  # the data fingerprint holds it
    distill(small, full, quick(epochs=1), done, resume=True)
    with pytest.raises(IloraError, match=f"--limit 30: 30 of {n} train samples.* trains on \\(31\\): pass --train-limit 30"):
        distill(small, partial, quick(train_limit=31), tmp_path / "x")
    partial.manifest["splits"]["train"]["samples_sha256"] = train.subset(slice(1, 31)).sha256()
    with pytest.raises(IloraError, match="exported for other train samples than .*'s first 30 "):
        distill(small, partial, quick(train_limit=30), tmp_path / "x")
    with pytest.raises(ConfigError, match=f"train_limit={n + 1}: .*train split has only {n} samples"):
        distill(small, full, quick(train_limit=n + 1), tmp_path / "x")
    with pytest.raises(ConfigError, match="train_limit must be >= 0"):
        distill(small, full, quick(train_limit=-1), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_fresh_distillation_refuses_an_earlier_runs_students_unless_overwrite(small, tmp_path) -> None:
    cfg = quick(epochs=1)
    first = distill(small, oracle_outputs(small), cfg, tmp_path / "d")
    config = (tmp_path / "d" / "distill_config.json").read_text()
    with pytest.raises(IloraError, match=r"baseline: holds a finished run \(result.json\); pass --resume .* --overwrite to start over"):
        distill(small, oracle_outputs(small), quick(epochs=1, lambda_d=0.5), tmp_path / "d")
    assert (tmp_path / "d" / "distill_config.json").read_text() == config  # refused before anything was written
    again = distill(small, oracle_outputs(small), cfg, tmp_path / "d", overwrite=True)
    assert again["baseline"]["test"] == first["baseline"]["test"]  # trained again from the start, same seed


def test_top_k_beyond_the_catalog_is_a_config_error(small, tmp_path) -> None:
    from ilora.errors import ConfigError

    with pytest.raises(ConfigError, match=f"top_k={small.num_items + 1} is more than the catalog's {small.num_items} items"):
        distill(small, oracle_outputs(small), quick(top_k=small.num_items + 1), tmp_path / "x")


def test_impossible_candidate_sets_are_refused_before_out_is_written(small, tmp_path):
    """A resume with corrected options must not meet a distill_config.json of a run that never trained."""
    with pytest.raises(IloraError, match="cannot draw 4999 negatives"):
        distill(small, oracle_outputs(small), quick(eval_candidates=5000), tmp_path / "d")
    with pytest.raises(IloraError, match="min_len=999"):
        distill(small, oracle_outputs(small), quick(train_min_len=999), tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_a_distillation_without_embedding_distillation_needs_no_embeddings_file(small, tmp_path, capsys) -> None:
    """w_ed = 0 reads no item embeddings, so an export copied without its (large) embeddings file
    still distils; with w_ed > 0 the missing file is named."""
    data_dir = tmp_path / "data"
    write_native(small, data_dir)
    write_outputs_dir(oracle_outputs(small), tmp_path / "outputs")
    (tmp_path / "outputs" / ITEM_EMBEDDINGS).unlink()
    argv = ["distill", str(data_dir), "--teacher-outputs", str(tmp_path / "outputs"), "--json"]
    argv += ["--epochs", "1", "--device", "cpu", "hidden=16", "eval_candidates=0", "threads=1"]
    assert main(argv + ["--out", str(tmp_path / "ranking_only"), "w_ed=0"]) == 0
    assert json.loads(capsys.readouterr().out)["teacher"]["embedding_dim"] is None
    assert main(argv + ["--out", str(tmp_path / "with_ed")]) == 2
    assert "item_embeddings.safetensors: missing, though" in capsys.readouterr().err

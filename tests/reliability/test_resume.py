"""Crash-safe training: kill -9 mid-run, resume, and get bit for bit what an uninterrupted run gets.

For `teacher train`, `rec train` and `distill`: an uninterrupted run of the real entry point
(``python -m ilora.cli.main ... --checkpoint-every 2``) is the reference. A second run of
the same command is started in a subprocess whose only difference is a pause: when it has
written the state of a later checkpoint into its temporary directory (before the manifest
and the rename), it stops and the test kills it with SIGKILL. So the kill lands after
optimiser steps that no intact checkpoint holds, with a partial checkpoint on disk. Then
``--resume`` must skip the partial one, continue from the newest intact checkpoint
(mid-epoch), and end with tensors equal (``torch.equal``) to the reference's, the same
metrics CSV rows (no duplicates) and the same metrics.

The checkpoint directory itself is tested against the manifest rules: a corrupted or
incomplete newest checkpoint is skipped, only the newest two are kept.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ilora.checkpointing import CheckpointManager, verify_checkpoint
from ilora.data import make_synthetic, write_native
from ilora.errors import IloraError

REPO = Path(__file__).resolve().parents[2]

# `python -m ilora.cli.main ARGS`, except that it blocks once it has written the state of
# checkpoint step BLOCK_AT (in a directory whose path contains BLOCK_IN) and touched MARKER.
PAUSING_MAIN = """
import os, runpy, sys, time
from pathlib import Path
import ilora.checkpointing as ck
at, where, marker = int(os.environ["BLOCK_AT"]), os.environ.get("BLOCK_IN", ""), Path(os.environ["MARKER"])
real_save_state = ck.save_state
def pausing_save_state(state, stem):
    real_save_state(state, stem)
    if f"step-{at:09d}" in str(stem) and where in str(stem):
        marker.write_text(str(stem))
        time.sleep(600)
ck.save_state = pausing_save_state
sys.argv = ["ilora"] + sys.argv[1:]
runpy.run_module("ilora.cli.main", run_name="__main__")
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ilora.cli.main", *args] if not env else [sys.executable, "-c", PAUSING_MAIN, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=open(log, "w"))


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return json.loads(out)


def interrupted_then_resumed(args: list[str], out: Path, tmp: Path, block_at: int, block_in: str = "", run: str = "") -> tuple[dict, dict]:
    """Reference run (in parallel) and a run killed at checkpoint ``block_at`` then resumed; their results.

    ``run`` names the part of the result (a distillation student) that was interrupted.
    """
    ref_args = [a if a != str(out) else str(out) + "_ref" for a in args]
    marker = tmp / f"blocked_{out.name}"
    ref = _start(ref_args, tmp / "ref.log")
    victim = _start(args, tmp / "victim.log", BLOCK_AT=str(block_at), BLOCK_IN=block_in, MARKER=str(marker))
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert victim.poll() is None, f"the run ended before checkpoint {block_at}: {(tmp / 'victim.log').read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the checkpoint"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    partial = Path(marker.read_text()).parent
    assert partial.is_dir() and partial.name.startswith(".tmp-step-") and not (partial / "manifest.json").exists()
    resumed = _finish(_start(args + ["--resume"], tmp / "resume.log"), tmp / "resume.log")
    assert (resumed[run] if run else resumed)["resumed_from"] == block_at - 2, (tmp / "resume.log").read_text()[-2000:]
    assert not partial.exists(), "the partial checkpoint was not cleaned up"
    return _finish(ref, tmp / "ref.log"), resumed


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb) and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{a.name}: {key} differs"


def csv_rows(path: Path, drop: tuple[str, ...] = ()) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "data"
    write_native(make_synthetic(users=6, items=30, seed=0), path)  # 88 train samples
    return path


@pytest.fixture(scope="module")
def rec_dir(data_dir) -> Path:
    from ilora.data import load_dataset
    from ilora.rec.train import RecTrainConfig, train_sasrec

    out = data_dir.parent / "rec"
    train_sasrec(load_dataset(data_dir), RecTrainConfig(epochs=1, hidden=16, eval_candidates=0, threads=1), out)
    return out


@pytest.mark.slow  # three CLI subprocesses
def test_teacher_killed_mid_epoch_resumes_bit_for_bit(data_dir, rec_dir, tmp_path) -> None:
    out = tmp_path / "teacher"
    args = ["teacher", "train", str(data_dir), "--rec", str(rec_dir), "--out", str(out), "--json", "--checkpoint-every", "2",
            "--epochs", "2", "--batch-size", "16", "--micro-batch-size", "8", "--seed", "3",
            "tiny_hidden=16", "tiny_layers=1", "tiny_heads=2", "tiny_vocab=300", "num_candidates=5", "val_samples=4",
            "lora_dropout=0.3", "warmup_ratio=0.2", "select_metric=mean_target_logprob"]
    # 6 steps per epoch: checkpoints 2, 4, 6 (after epoch 1's validation), 8; killed while writing 10.
    ref, resumed = interrupted_then_resumed(args, out, tmp_path, block_at=10)
    ref_out = Path(str(out) + "_ref")
    # the saved teacher is the last epoch's, trained after the resume
    assert ref["best_val"]["mean_target_logprob"] == ref["history"][-1]["val_mean_target_logprob"]
    for name in ("adapter_model.safetensors", "gate.safetensors", "projector.safetensors"):
        assert_same_tensors(ref_out / name, out / name)
    assert resumed["history"] == ref["history"] and resumed["best_val"] == ref["best_val"] and resumed["steps"] == 12
    assert csv_rows(out / "metrics.csv") == csv_rows(ref_out / "metrics.csv") and len(csv_rows(out / "metrics.csv")) == 2
    timing = ("samples_per_s", "tokens_per_s")
    assert csv_rows(out / "train_steps.csv", timing) == csv_rows(ref_out / "train_steps.csv", timing)
    assert [r["step"] for r in csv_rows(out / "train_steps.csv")] == [str(s) for s in range(1, 13)]
    assert [p.name for p in CheckpointManager(out, 2).checkpoints()] == ["step-000000010", "step-000000008"]


@pytest.mark.slow  # two CLI subprocesses
def test_a_second_run_on_a_live_runs_out_is_refused_and_changes_nothing(data_dir, rec_dir, tmp_path) -> None:
    """A `--resume` typed while the first run still trains (the mistake that once had two
    teacher runs writing one directory) is refused, naming the live run's pid."""
    out = tmp_path / "teacher"
    args = ["teacher", "train", str(data_dir), "--rec", str(rec_dir), "--out", str(out), "--json", "--checkpoint-every", "2",
            "--epochs", "1", "--batch-size", "8", "tiny_hidden=16", "tiny_layers=1", "tiny_heads=2", "tiny_vocab=300",
            "num_candidates=5", "val_samples=4"]
    marker = tmp_path / "blocked"
    live = _start(args, tmp_path / "live.log", BLOCK_AT="4", MARKER=str(marker))
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert live.poll() is None, (tmp_path / "live.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "timed out waiting for the checkpoint"
            time.sleep(0.05)
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        second = _start(args + ["--resume"], tmp_path / "second.log")
        second.communicate(timeout=240)
        log = (tmp_path / "second.log").read_text()
        assert second.returncode == 2, log[-3000:]
        assert f"error: {out}: another process" in log and "is writing here; wait until it ends, or use another --out" in log
        from ilora.dir_lock import holder_pid

        pid = holder_pid(out)  # None where the system cannot tell
        assert pid in (live.pid, None) and (pid is None or f"(pid {live.pid})" in log)
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
        assert live.poll() is None
    finally:
        live.kill()
        live.wait()


@pytest.mark.slow  # three CLI subprocesses
def test_sasrec_killed_mid_epoch_resumes_bit_for_bit(data_dir, tmp_path) -> None:
    out = tmp_path / "sasrec"
    args = ["rec", "train", str(data_dir), "--out", str(out), "--json", "--checkpoint-every", "2", "--epochs", "4",
            "--batch-size", "16", "--loss", "bce", "--negatives", "3", "--dropout", "0.3", "--seed", "5",
            "hidden=16", "threads=1", "patience=0", "eval_candidates=5"]
    # 6 steps per epoch; killed while writing checkpoint 16 (epoch 3, after 4 of its steps); resumes from 14.
    ref, resumed = interrupted_then_resumed(args, out, tmp_path, block_at=16)
    ref_out = Path(str(out) + "_ref")
    assert_same_tensors(ref_out / "model.safetensors", out / "model.safetensors")
    assert csv_rows(out / "metrics.csv") == csv_rows(ref_out / "metrics.csv")
    assert [r["epoch"] for r in csv_rows(out / "metrics.csv")] == ["1", "2", "3", "4"]
    for key in ("val", "test", "best_epoch", "steps"):
        assert resumed[key] == ref[key]


def _outputs_dir(dataset, directory: Path) -> None:
    """Teacher outputs as `ilora.outputs.format` documents them: one shard, random but fixed top-K."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    from ilora.outputs.format import FORMAT, ITEM_EMBEDDINGS, MANIFEST, VERSION, file_sha256

    n, items, k = len(dataset.split("train")), dataset.num_items, 6
    rng = np.random.default_rng(0)
    top = np.stack([rng.choice(items, k, replace=False) for _ in range(n)])
    conf = rng.dirichlet(np.ones(k), size=n).astype(np.float32)
    (directory / "train").mkdir(parents=True)
    table = pa.table({
        "index": pa.array(np.arange(n), pa.int64()),
        "topk_items": pa.array(top.tolist(), pa.list_(pa.int64())),
        "topk_scores": pa.array(np.log(conf).tolist(), pa.list_(pa.float32())),
        "topk_confidence": pa.array(conf.tolist(), pa.list_(pa.float32())),
        "gate": pa.array(np.full((n, 2), 0.5).tolist(), pa.list_(pa.float32())),
        "user_embedding": pa.array(np.zeros((n, 3)).tolist(), pa.list_(pa.float32())),
    })
    pq.write_table(table, directory / "train" / "part-00000.parquet")
    save_file({"item_embeddings": rng.normal(size=(items, 8)).astype(np.float32)}, str(directory / ITEM_EMBEDDINGS))
    shard = {"file": "train/part-00000.parquet", "first_index": 0, "rows": n, "sha256": file_sha256(directory / "train" / "part-00000.parquet")}
    manifest = {"format": FORMAT, "version": VERSION, "top_k": k, "dataset": {"num_items": items},
                "item_embeddings": {"file": ITEM_EMBEDDINGS, "dim": 8, "sha256": file_sha256(directory / ITEM_EMBEDDINGS)}, "splits": {"train": {"rows": n, "complete": True, "shards": [shard]}}}
    (directory / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


@pytest.mark.slow  # three CLI subprocesses
def test_distill_killed_in_the_second_student_resumes_bit_for_bit(data_dir, tmp_path) -> None:
    from ilora.data import load_dataset
    from ilora.outputs.format import read_teacher_outputs

    outputs = tmp_path / "outputs"
    _outputs_dir(load_dataset(data_dir), outputs)
    assert len(read_teacher_outputs(outputs, ("train",)).split("train")) == 88
    out = tmp_path / "distill"
    args = ["distill", str(data_dir), "--teacher-outputs", str(outputs), "--out", str(out), "--json", "--checkpoint-every", "2",
            "--epochs", "2", "--batch-size", "16", "--seed", "2", "--top-k", "4", "hidden=16", "threads=1", "eval_candidates=0",
            "patience=0", "dropout=0.3"]
    # each student: 6 steps per epoch; killed in the distilled student while writing checkpoint 10 -> resumes from 8
    ref, resumed = interrupted_then_resumed(args, out, tmp_path, block_at=10, block_in="distilled", run="distilled")
    ref_out = Path(str(out) + "_ref")
    for student in ("baseline", "distilled"):
        assert_same_tensors(ref_out / student / "model.safetensors", out / student / "model.safetensors")
        assert csv_rows(out / student / "metrics.csv") == csv_rows(ref_out / student / "metrics.csv")
        assert resumed[student]["test"] == ref[student]["test"]
    assert resumed["gain"] == ref["gain"]
    assert resumed["baseline"]["resumed_from"] is None  # it had finished: not trained again


# -- the checkpoint directory -------------------------------------------------------------------


def _state(step: int) -> dict:
    return {"w": torch.full((3,), float(step)), "step": step, "csv": "a,b\r\n1,2\r\n"}


def test_only_intact_checkpoints_are_resumed_and_two_are_kept(tmp_path) -> None:
    manager = CheckpointManager(tmp_path, every=2)
    assert manager.latest() is None and manager.due(4) and not manager.due(3) and not CheckpointManager(tmp_path, 0).due(4)
    for step in (2, 4, 6):
        manager.save(step, _state(step))
    assert [p.name for p in manager.checkpoints()] == ["step-000000006", "step-000000004"]
    latest = manager.latest()
    assert latest.step == 6 and torch.equal(latest.load()["w"], torch.full((3,), 6.0)) and latest.load()["csv"] == "a,b\r\n1,2\r\n"

    # a flipped byte in the newest checkpoint: it is skipped, the older one is resumed
    blob = latest.path / "state.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IloraError, match="sha256"):
        verify_checkpoint(latest.path)
    assert manager.latest().step == 4

    # a newer directory without a manifest (as if renamed by hand, or a foreign copy) is not picked up
    fake = manager.path_for(8)
    fake.mkdir()
    (fake / "state.json").write_text("{}")
    assert manager.latest().step == 4
    # saving step 6 again replaces the damaged one; the manifest records the step of its directory
    manager.save(6, _state(6))
    assert manager.latest().step == 6
    manifest = json.loads((manager.path_for(6) / "manifest.json").read_text())
    assert manifest["step"] == 6 and set(manifest["files"]) == {"state.json", "state.safetensors"}
    # manifests that are valid JSON but malformed: skipped like damaged ones, never an uncaught error
    for damage in (
        lambda m: m["files"].update({"state.json": "not-a-dict"}),
        lambda m: m["files"].pop("state.safetensors"),
        lambda m: m["files"].update({"../escape": {"sha256": "0", "bytes": 0}}),
    ):
        broken = dict(manifest, files=dict(manifest["files"]))
        damage(broken)
        (manager.path_for(6) / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(IloraError, match="manifest"):
            verify_checkpoint(manager.path_for(6))
        assert manager.latest() is None  # skipped (step 4 was pruned by the save of 6; 8 has no manifest)
    (manager.path_for(6) / "manifest.json").write_text(json.dumps(manifest))
    assert manager.latest().step == 6
    manager.clear()
    assert manager.latest() is None and not manager.root.exists()


def _flip_last_byte(checkpoint: Path) -> None:
    blob = checkpoint / "state.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))


def test_the_resume_point_removes_the_newer_checkpoints_that_failed_verification(tmp_path) -> None:
    """Left in place, damaged newer checkpoints sort newest, and each save of the resumed run
    pruned its own checkpoints (found by an independent review: nothing to resume from until
    the new run passed the damaged steps)."""
    manager = CheckpointManager(tmp_path, every=1)
    for step in (5, 6):
        manager.save(step, _state(step))
    for step in (5, 6):
        _flip_last_byte(manager.path_for(step))
    assert manager.resume_point() is None and manager.checkpoints() == []
    manager.save(1, _state(1))
    manager.save(2, _state(2))
    assert [c.name for c in manager.checkpoints()] == ["step-000000002", "step-000000001"]

    # only the newest damaged: the resume point is the one before it, and only the damaged one goes
    manager.save(3, _state(3))
    _flip_last_byte(manager.path_for(3))
    point = manager.resume_point()
    assert point.step == 2 and [c.name for c in manager.checkpoints()] == ["step-000000002"]
    manager.save(3, _state(3))
    assert manager.latest().step == 3 and len(manager.checkpoints()) == 2


def test_a_trainer_resuming_removes_the_damaged_newer_checkpoints(data_dir, tmp_path, caplog) -> None:
    """The trainers resume through `resume_point`: a damaged newest checkpoint is removed, the one
    before it resumed (teacher: tests/teacher/test_train.py goes through the same call)."""
    from ilora.data import load_dataset
    from ilora.rec.train import RecTrainConfig, train_sasrec

    dataset = load_dataset(data_dir)
    cfg = RecTrainConfig(epochs=1, max_steps=4, batch_size=16, hidden=16, eval_candidates=0, threads=1, checkpoint_every=1)
    out = tmp_path / "run"
    train_sasrec(dataset, cfg, out)
    (out / "result.json").unlink()
    manager = CheckpointManager(out, 1)
    newest, before = manager.checkpoints()[:2]
    _flip_last_byte(newest)
    with caplog.at_level("WARNING", logger="ilora.checkpointing"):
        assert train_sasrec(dataset, cfg, out, resume=True)["resumed_from"] == int(before.name.split("-")[1])
    assert f"removing {newest}: it did not verify" in caplog.text


def test_resume_refuses_a_finished_run_without_its_config_and_names_a_checkpoint_that_does_not_fit(data_dir, tmp_path) -> None:
    """A finished run whose train_config.json is gone was resumed (retrained) instead of refused;
    a verified checkpoint without the keys a run restores gave a bare KeyError."""
    from ilora.checkpointing import Checkpoint
    from ilora.data import load_dataset
    from ilora.rec.train import RecTrainConfig, train_sasrec

    dataset = load_dataset(data_dir)
    cfg = RecTrainConfig(epochs=1, max_steps=4, batch_size=16, hidden=16, eval_candidates=0, threads=1, checkpoint_every=2)
    out = tmp_path / "run"
    train_sasrec(dataset, cfg, out)
    (out / "train_config.json").unlink()
    with pytest.raises(IloraError, match="holds a finished run's result.json but not its train_config.json"):
        train_sasrec(dataset, cfg, out, resume=True)

    out = tmp_path / "partial"
    train_sasrec(dataset, cfg, out)
    (out / "result.json").unlink()
    manager = CheckpointManager(out, 2)
    newest = manager.latest()
    assert newest is not None
    state = newest.load()
    del state["optimizer"]
    manager.clear()
    manager.save(newest.step, state)  # verifies, but lacks what a run restores
    with pytest.raises(IloraError, match=rf"step-{newest.step:09d}: its state does not fit this run \(KeyError: 'optimizer'\)"):
        train_sasrec(dataset, cfg, out, resume=True)
    assert isinstance(manager.latest(), Checkpoint)


def test_a_fresh_run_never_deletes_an_earlier_one_without_overwrite(data_dir, tmp_path) -> None:
    """rec train refuses an --out holding a finished run or an interrupted run's checkpoints
    unless --overwrite (teacher train: tests/teacher/test_train.py; distill:
    tests/distill/test_distill.py); nothing is removed."""
    from ilora.data import load_dataset
    from ilora.rec.sasrec import load_sasrec
    from ilora.rec.train import RecTrainConfig, train_sasrec

    dataset = load_dataset(data_dir)
    cfg = RecTrainConfig(epochs=1, max_steps=4, batch_size=16, hidden=16, eval_candidates=0, threads=1, checkpoint_every=2)
    train_sasrec(dataset, cfg, tmp_path / "a")
    for state, remove in (("a finished run", None), ("an interrupted run's checkpoints", "result.json")):
        if remove:
            (tmp_path / "a" / remove).unlink()
        before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "a").rglob("*"))
        with pytest.raises(IloraError, match=f"holds {state}.*; pass --resume .* --overwrite to start over"):
            train_sasrec(dataset, cfg, tmp_path / "a")
        assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "a").rglob("*")) == before
    assert train_sasrec(dataset, cfg, tmp_path / "a", overwrite=True)["resumed_from"] is None
    imported = tmp_path / "imported"  # a model directory without a run (rec import-llara writes these)
    load_sasrec(tmp_path / "a").save(imported)
    with pytest.raises(IloraError, match="holds an earlier run's model.safetensors; pass --overwrite to replace it"):
        train_sasrec(dataset, cfg, imported)
    with pytest.raises(IloraError, match="holds an earlier run's model.safetensors but no checkpoint or finished run to resume"):
        train_sasrec(dataset, cfg, imported, resume=True)  # --resume would otherwise train over it from the start
    assert sorted(p.name for p in imported.iterdir()) == ["config.json", "model.safetensors"]

    from ilora.cli.main import main

    with pytest.raises(SystemExit) as exit_info:  # one or the other
        main(["rec", "train", str(data_dir), "--out", str(tmp_path / "a"), "--resume", "--overwrite"])
    assert exit_info.value.code == 2


def test_resume_refuses_other_options(data_dir, tmp_path) -> None:
    from ilora.data import load_dataset
    from ilora.rec.train import RecTrainConfig, train_sasrec

    dataset = load_dataset(data_dir)
    cfg = RecTrainConfig(epochs=1, max_steps=4, batch_size=16, hidden=16, eval_candidates=0, threads=1, checkpoint_every=2)
    train_sasrec(dataset, cfg, tmp_path / "a")
    (tmp_path / "a" / "result.json").unlink()  # as if it had been killed after its last checkpoint
    other = RecTrainConfig(epochs=1, max_steps=4, batch_size=16, hidden=16, eval_candidates=0, threads=1, checkpoint_every=2, lr=0.01)
    with pytest.raises(IloraError, match=r"lr: 0\.001 -> 0\.01"):
        train_sasrec(dataset, other, tmp_path / "a", resume=True)
    # options that do not change the computation may differ
    same = RecTrainConfig(epochs=1, max_steps=4, batch_size=16, hidden=16, eval_candidates=0, threads=1, checkpoint_every=3)
    result = train_sasrec(dataset, same, tmp_path / "a", resume=True)
    assert result["resumed_from"] == 2
    # resuming a finished run trains nothing and returns its result
    (tmp_path / "a" / "model.safetensors").unlink()
    assert train_sasrec(dataset, same, tmp_path / "a", resume=True) == result
    assert not (tmp_path / "a" / "model.safetensors").exists()
    # ... but not with other data (same catalog, other samples), finished or interrupted
    from ilora.data.dataset import SeqDataset

    train = dataset.split("train")
    fewer = SeqDataset(dataset.catalog, {**dataset.splits, "train": train.subset(slice(0, len(train) - 1))}, source="fewer")
    with pytest.raises(IloraError, match="dataset_sha256"):
        train_sasrec(fewer, same, tmp_path / "a", resume=True)
    (tmp_path / "a" / "result.json").unlink()
    with pytest.raises(IloraError, match="dataset_sha256"):
        train_sasrec(fewer, same, tmp_path / "a", resume=True)


def test_restoring_names_the_checkpoint_but_lets_out_of_memory_through(tmp_path) -> None:
    from ilora.checkpointing import restoring

    with pytest.raises(IloraError, match=r"step-000000002: its state does not fit this run \(KeyError: 'optimizer'\)"):
        with restoring(tmp_path / "step-000000002"):
            {}["optimizer"]
    with pytest.raises(torch.OutOfMemoryError):  # not the checkpoint's fault: shown as it is
        with restoring(tmp_path / "step-000000002"):
            raise torch.OutOfMemoryError("CUDA out of memory")

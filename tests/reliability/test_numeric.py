"""Numeric faults: a NaN/inf loss or gradient stops the run naming the step, after saving the state before it.

The faults are injected (a loss that turns NaN at the k-th call, a gradient hook that
turns NaN at the k-th backward). Expected, for SASRec (so also for the distillation
students, which share its loop) and the teacher:

* by default: `IloraError` naming step k (one ``error:`` line from the CLI), and an
  intact checkpoint of step k-1; resuming from it once the fault is gone ends exactly
  where a run that never saw the fault ends;
* with ``skip_nonfinite``: the step is skipped, i.e. the weights are those of a run
  that stopped one step earlier.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ilora.rec.train as rec_train
from ilora.checkpointing import CheckpointManager, verify_checkpoint
from ilora.cli.main import main
from ilora.data import load_dataset, make_synthetic, write_native
from ilora.errors import IloraError
from ilora.rec.sasrec import SASRec
from ilora.rec.train import RecTrainConfig, train_sasrec


def nan_from_call(real, k: int):
    """``real`` whose k-th call (1-based) returns NaN; every other call is passed through."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == k else value

    return wrapped


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic(users=6, items=30, seed=0)  # 88 train samples


def rec_cfg(**kw) -> RecTrainConfig:
    base = dict(epochs=2, batch_size=16, hidden=16, eval_candidates=0, threads=1, dropout=0.3, patience=0)
    base.update(kw)
    return RecTrainConfig(**base)


def test_sasrec_nan_loss_stops_at_its_step_and_resumes_from_the_state_before(dataset, tmp_path, monkeypatch) -> None:
    train_sasrec(dataset, rec_cfg(), tmp_path / "clean")
    with monkeypatch.context() as m:
        m.setattr(rec_train, "recommendation_loss", nan_from_call(rec_train.recommendation_loss, 8))
        with pytest.raises(IloraError, match=r"non-finite loss nan at step 8 \(epoch 2\).*step-000000007"):
            train_sasrec(dataset, rec_cfg(), tmp_path / "run")
    checkpoints = CheckpointManager(tmp_path / "run", 0)
    assert [p.name for p in checkpoints.checkpoints()] == ["step-000000007"]  # written although checkpoint_every=0
    assert verify_checkpoint(checkpoints.path_for(7)) == 7
    result = train_sasrec(dataset, rec_cfg(), tmp_path / "run", resume=True)
    assert result["resumed_from"] == 7 and result["skipped_steps"] == []
    assert same_tensors(tmp_path / "clean" / "model.safetensors", tmp_path / "run" / "model.safetensors")
    assert (tmp_path / "clean" / "metrics.csv").read_text() == (tmp_path / "run" / "metrics.csv").read_text()


def test_cli_reports_the_fault_on_one_line(dataset, tmp_path, monkeypatch, capsys) -> None:
    write_native(dataset, tmp_path / "data")
    monkeypatch.setattr(rec_train, "recommendation_loss", nan_from_call(rec_train.recommendation_loss, 3))
    argv = ["rec", "train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--epochs", "1", "hidden=16", "threads=1"]
    assert main(argv + ["--batch-size", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: non-finite loss nan at step 3 (epoch 1)")
    assert "Traceback" not in "\n".join(err)


class NanGradientSASRec(SASRec):
    """SASRec whose item-embedding gradient is NaN at the k-th backward pass."""

    k = 2

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.backwards = 0
        self.item_emb.weight.register_hook(self._hook)

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        self.backwards += 1
        return grad * float("nan") if self.backwards == self.k else grad


def test_nan_gradient_with_a_finite_loss_is_caught_too(dataset, tmp_path) -> None:
    with pytest.raises(IloraError, match=r"non-finite gradient norm nan at step 2 "):
        train_sasrec(dataset, rec_cfg(), tmp_path / "run", model_factory=NanGradientSASRec)
    assert CheckpointManager(tmp_path / "run", 0).latest().step == 1


def test_skip_nonfinite_drops_exactly_that_step(dataset, tmp_path, monkeypatch) -> None:
    no_val = dataclasses.replace(dataset, splits={k: v for k, v in dataset.splits.items() if k != "val"})
    train_sasrec(no_val, rec_cfg(max_steps=2), tmp_path / "two_steps")
    monkeypatch.setattr(rec_train, "recommendation_loss", nan_from_call(rec_train.recommendation_loss, 3))
    result = train_sasrec(no_val, rec_cfg(max_steps=3, skip_nonfinite=True), tmp_path / "skipped")
    assert result["skipped_steps"] == [3] and result["steps"] == 3
    # the skipped update is the only difference: the weights are those after two steps
    assert same_tensors(tmp_path / "two_steps" / "model.safetensors", tmp_path / "skipped" / "model.safetensors")
    # NaN gradients are skipped the same way
    result = train_sasrec(no_val, rec_cfg(max_steps=3, skip_nonfinite=True), tmp_path / "grad", model_factory=NanGradientSASRec)
    assert result["skipped_steps"] == [2]


# -- the teacher ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_setup(tmp_path_factory, dataset):
    root = tmp_path_factory.mktemp("numeric_teacher")
    write_native(dataset, root / "data")
    data = load_dataset(root / "data")
    train_sasrec(data, RecTrainConfig(epochs=1, hidden=16, eval_candidates=0, threads=1), root / "rec")
    return data, root / "rec"


def teacher_cfg(**kw):
    from ilora.teacher.config import TeacherConfig

    # constant lr and no curriculum (both depend on the total steps), so runs of different lengths take the same steps
    base = dict(epochs=1, batch_size=8, warmup_ratio=0.0, min_lr_ratio=1.0, curriculum=False, tiny_hidden=16, tiny_layers=1, tiny_heads=2, tiny_vocab=300, num_candidates=5, val_samples=4)
    base.update(kw)
    return TeacherConfig(**base)


def test_teacher_nan_loss_stops_or_is_skipped(teacher_setup, tmp_path, monkeypatch) -> None:
    from ilora.teacher.model import ILoRATeacher
    from ilora.teacher.train import train_teacher

    data, rec = teacher_setup
    monkeypatch.setattr(ILoRATeacher, "loss", nan_from_call(ILoRATeacher.loss, 3))
    with pytest.raises(IloraError, match=r"non-finite loss nan at step 3 \(epoch 1\)"):
        train_teacher(data, teacher_cfg(max_steps=4), rec, tmp_path / "stop")
    assert CheckpointManager(tmp_path / "stop", 0).latest().step == 2

    monkeypatch.undo()
    train_teacher(data, teacher_cfg(max_steps=2), rec, tmp_path / "two_steps")
    monkeypatch.setattr(ILoRATeacher, "loss", nan_from_call(ILoRATeacher.loss, 3))
    summary = train_teacher(data, teacher_cfg(max_steps=3, skip_nonfinite=True), rec, tmp_path / "skipped")
    assert summary["skipped_steps"] == [3] and summary["steps"] == 3
    for name in ("adapter_model.safetensors", "gate.safetensors", "projector.safetensors"):
        assert same_tensors(tmp_path / "two_steps" / name, tmp_path / "skipped" / name), name

"""Determinism on CPU: the same seed and options give the same metrics and weights, bit for bit.

SASRec (dropout, sampled negatives, shuffling) and the teacher (LoRA dropout, curriculum
flags, shuffling) are each trained twice in one process with the same seed: the
validation/test metrics, the metrics CSV and every saved tensor must be equal. A third run
with another seed must differ, so the comparison is not vacuous.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ilora.data import make_synthetic
from ilora.rec.train import RecTrainConfig, train_sasrec


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def equal_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic(users=8, items=30, seed=0)


def rec_cfg(seed: int) -> RecTrainConfig:
    return RecTrainConfig(epochs=2, batch_size=16, hidden=16, dropout=0.3, loss="bce", negatives=2, eval_candidates=5, seed=seed, threads=1)


def test_sasrec_same_seed_same_metrics(dataset, tmp_path) -> None:
    runs = {name: train_sasrec(dataset, rec_cfg(seed), tmp_path / name) for name, seed in (("a", 4), ("b", 4), ("c", 5))}
    for key in ("val", "test", "best_epoch"):
        assert runs["a"][key] == runs["b"][key]
    assert (tmp_path / "a" / "metrics.csv").read_text() == (tmp_path / "b" / "metrics.csv").read_text()
    assert equal_tensors(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
    assert not equal_tensors(tmp_path / "a" / "model.safetensors", tmp_path / "c" / "model.safetensors")
    assert (tmp_path / "a" / "metrics.csv").read_text() != (tmp_path / "c" / "metrics.csv").read_text()


def test_teacher_same_seed_same_metrics(dataset, tmp_path) -> None:
    from ilora.teacher.config import TeacherConfig
    from ilora.teacher.train import train_teacher

    train_sasrec(dataset, RecTrainConfig(epochs=1, hidden=16, eval_candidates=0, threads=1), tmp_path / "rec")

    def cfg(seed: int) -> TeacherConfig:
        return TeacherConfig(epochs=1, max_steps=5, batch_size=8, micro_batch_size=4, lora_dropout=0.3, tiny_hidden=16, tiny_layers=1,
                             tiny_heads=2, tiny_vocab=300, num_candidates=5, val_samples=6, seed=seed)

    runs = {name: train_teacher(dataset, cfg(seed), tmp_path / "rec", tmp_path / name) for name, seed in (("a", 1), ("b", 1), ("c", 2))}
    assert runs["a"]["history"] == runs["b"]["history"] and runs["a"]["best_val"] == runs["b"]["best_val"]
    for name in ("adapter_model.safetensors", "gate.safetensors", "projector.safetensors"):
        assert equal_tensors(tmp_path / "a" / name, tmp_path / "b" / name), name
    assert runs["a"]["history"] != runs["c"]["history"]
    assert not equal_tensors(tmp_path / "a" / "adapter_model.safetensors", tmp_path / "c" / "adapter_model.safetensors")

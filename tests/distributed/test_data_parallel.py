"""Data-parallel teacher training and sharded export on torch.distributed (gloo, 2 CPU processes).

The reference is always a single-process run of the same command (``python -m ilora``);
the distributed run is ``torchrun --standalone --nproc_per_node 2 -m ilora`` (the real
launcher, rendezvous and CLI). Training with the same global batch must give the same
loss trajectory and the same final adapter, gate and projector weights, up to float
summation order (stated tolerances); the export must give the same files, byte for byte.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ilora.data import make_synthetic, write_native
from ilora.distributed import SINGLE, Dist
from ilora.teacher.train import rank_micro_batches

REPO = Path(__file__).resolve().parents[2]
LOSS_RTOL = 1e-5  # per-step loss and gradient norm, 2 ranks vs 1 process (float32 sums in another order)
WEIGHT_ATOL = 1e-5  # final trained tensors after 6 AdamW steps at lr 7e-4

# 88 train samples; batch 16 -> 6 steps, the last one of 8 samples.
TRAIN = ["--epochs", "1", "--batch-size", "16", "--micro-batch-size", "4", "--seed", "3",
         "tiny_hidden=16", "tiny_layers=1", "tiny_heads=2", "tiny_vocab=300", "num_candidates=5", "val_samples=6",
         "lora_dropout=0", "warmup_ratio=0.2", "select_metric=mean_target_logprob"]


def _env() -> dict[str, str]:
    # PYTHONFAULTHANDLER: should a rank abort, its Python stack is in the stderr the assertion shows
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def ilora(args: list[str], ranks: int = 1, log: Path | None = None) -> dict:
    """Run ``ilora ARGS --json`` in one process, or under torchrun with ``ranks`` processes; its JSON."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "ilora", *args, "--json"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "ilora", *args, "--json"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    if log is not None:
        log.write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def losses(run_dir: Path, column: str = "loss") -> list[float]:
    with (run_dir / "train_steps.csv").open(newline="") as fh:
        return [float(row[column]) for row in csv.DictReader(fh)]


def assert_same_trajectory(run: Path, reference: Path) -> None:
    """Per-step loss and gradient norm (before clipping: a wrong gradient scale shows here,
    where AdamW's scale invariance would hide it in the weights)."""
    for column in ("loss", "grad_norm"):
        np.testing.assert_allclose(losses(run, column), losses(reference, column), rtol=LOSS_RTOL, atol=0, err_msg=column)


def assert_close_tensors(a: Path, b: Path, atol: float) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb) and ta
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=atol, msg=f"{a.name}: {key}")


def assert_same_teacher(a: Path, b: Path) -> None:
    for name in ("adapter_model.safetensors", "gate.safetensors", "projector.safetensors"):
        assert_close_tensors(a / name, b / name, WEIGHT_ATOL)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A synthetic dataset and a SASRec trained on it."""
    from ilora.data import load_dataset
    from ilora.rec.train import RecTrainConfig, train_sasrec

    root = tmp_path_factory.mktemp("ddp")
    write_native(make_synthetic(users=6, items=30, seed=0), root / "data")  # 88 train samples
    train_sasrec(load_dataset(root / "data"), RecTrainConfig(epochs=1, hidden=16, eval_candidates=0, threads=1), root / "rec")
    return root


@pytest.fixture(scope="module")
def single_teacher(work) -> tuple[Path, dict]:
    out = work / "teacher_1"
    return out, ilora(["teacher", "train", str(work / "data"), "--rec", str(work / "rec"), "--out", str(out), *TRAIN])


# -- splitting work ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_chunks_cover_the_items_in_order(n: int, world: int) -> None:
    items = list(range(n))
    chunks = [Dist(rank=r, world_size=world).chunk(items) for r in range(world)]
    assert [x for c in chunks for x in c] == items
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def test_a_rank_without_samples_runs_one_with_weight_zero() -> None:
    idx, flags = np.array([7]), np.array([True])
    assert [(list(i), list(f), c) for i, f, c in rank_micro_batches(idx, flags, 4, Dist(rank=0, world_size=2))] == [([7], [True], True)]
    assert [(list(i), c) for i, _, c in rank_micro_batches(idx, flags, 4, Dist(rank=1, world_size=2))] == [([7], False)]
    idx, flags = np.arange(10), np.arange(10) % 2 == 0
    mine = rank_micro_batches(idx, flags, 2, Dist(rank=1, world_size=2))
    assert [list(i) for i, _, _ in mine] == [[5, 6], [7, 8], [9]] and all(c for _, _, c in mine)
    assert [list(f) for _, f, _ in mine] == [[False, True], [False, True], [False]]
    assert [list(i) for i, _, _ in rank_micro_batches(idx, flags, 4, SINGLE)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_the_process_group_waits_the_configured_time_in_a_collective(monkeypatch) -> None:
    """NCCL's default (10 minutes) is shorter than a 7B export's last round; the group gets
    ILORA_DIST_TIMEOUT_MIN (default 60) and a bad value is an error naming the variable."""
    import datetime

    import torch.distributed as dist

    from ilora.distributed import init_from_env
    from ilora.errors import ConfigError

    joined = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append((backend, kw)))
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ILORA_DIST_TIMEOUT_MIN", raising=False)
    assert init_from_env("cpu") == Dist(rank=1, world_size=2, local_rank=1)
    monkeypatch.setenv("ILORA_DIST_TIMEOUT_MIN", "2.5")
    init_from_env("cpu")
    assert joined == [("gloo", {"timeout": datetime.timedelta(minutes=60)}), ("gloo", {"timeout": datetime.timedelta(seconds=150)})]
    for bad in ("0", "-3", "soon", "nan", "inf"):
        monkeypatch.setenv("ILORA_DIST_TIMEOUT_MIN", bad)
        with pytest.raises(ConfigError, match=rf"ILORA_DIST_TIMEOUT_MIN='{bad}': expected a positive number of minutes"):
            init_from_env("cpu")
    assert len(joined) == 2


# -- training ------------------------------------------------------------------------------------


@pytest.mark.slow  # torchrun with 2 processes
def test_two_ranks_train_the_same_teacher_as_one_process(work, single_teacher, tmp_path) -> None:
    """Same global batch (16), micro-batches of 4 per rank, curriculum on (text-only micro-batches leave
    the projector unused on a rank), a last step of 8 samples: same losses, weights and validation."""
    one, ref = single_teacher
    two = tmp_path / "teacher_2"
    result = ilora(["teacher", "train", str(work / "data"), "--rec", str(work / "rec"), "--out", str(two), *TRAIN], ranks=2)
    assert result["world_size"] == 2 and ref["world_size"] == 1 and result["steps"] == ref["steps"] == 6
    assert_same_trajectory(two, one)
    assert_same_teacher(one, two)
    for key in ("hr@1", "mrr", "mean_target_logprob"):
        assert result["best_val"][key] == pytest.approx(ref["best_val"][key], rel=1e-5, abs=1e-6)
    # rank 0 alone wrote: one metrics row per step, one TensorBoard directory, no stray files
    assert len(losses(two)) == 6 and len(list((two / "tb").iterdir())) == 1


@pytest.mark.slow  # torchrun with 2 processes, each compiling the decoder layers (inductor)
def test_two_ranks_with_compiled_layers_train_the_teacher_of_one_eager_process(work, single_teacher, tmp_path) -> None:
    """``--compile`` under DDP: the compiled decoder layers' gradients reach DDP's all-reduce, so two
    ranks give the eager single process's losses and weights (compiled kernels round differently:
    looser tolerances than the eager 2-rank test)."""
    one, _ = single_teacher
    two = tmp_path / "teacher_2_compiled"
    result = ilora(["teacher", "train", str(work / "data"), "--rec", str(work / "rec"), "--out", str(two), "--compile", *TRAIN], ranks=2)
    assert result["world_size"] == 2 and result["steps"] == 6
    for column in ("loss", "grad_norm"):
        np.testing.assert_allclose(losses(two, column), losses(one, column), rtol=1e-4, atol=0, err_msg=column)
    for name in ("adapter_model.safetensors", "gate.safetensors", "projector.safetensors"):
        assert_close_tensors(one / name, two / name, 1e-4)


@pytest.mark.slow  # torchrun with 2 processes
def test_a_rank_left_without_samples_still_matches(work, tmp_path) -> None:
    """Batch 29 over 88 samples: steps of 29, 29, 29 and 1 sample (rank 1 gets none in the last step)."""
    args = ["--epochs", "1", "--batch-size", "29", "--seed", "1", "tiny_hidden=16", "tiny_layers=1", "tiny_heads=2",
            "tiny_vocab=300", "num_candidates=5", "val_samples=4", "lora_dropout=0", "curriculum=false"]
    base = ["teacher", "train", str(work / "data"), "--rec", str(work / "rec")]
    ilora([*base, "--out", str(tmp_path / "one"), *args])
    ilora([*base, "--out", str(tmp_path / "two"), *args], ranks=2)
    assert len(losses(tmp_path / "one")) == 4
    assert_same_trajectory(tmp_path / "two", tmp_path / "one")
    assert_same_teacher(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow  # torchrun with 2 processes
def test_a_two_rank_run_resumes_in_one_process(work, single_teacher, tmp_path) -> None:
    """Checkpoints written by 2 ranks hold the global position: one process continues from them and
    ends where an uninterrupted single-process run ends."""
    one, _ = single_teacher
    out = tmp_path / "teacher"
    args = ["teacher", "train", str(work / "data"), "--rec", str(work / "rec"), "--out", str(out), *TRAIN, "--checkpoint-every", "2"]
    ilora(args, ranks=2)
    # Make it an interrupted run: keep only the checkpoint of step 2, drop the result.
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-000000002", "step-000000004"]
    shutil.rmtree(checkpoints[1])
    (out / "train_summary.json").unlink()
    resumed = ilora([*args, "--resume"])
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 6 and resumed["world_size"] == 1
    assert_same_trajectory(out, one)
    assert_same_teacher(one, out)


# -- export and evaluation ---------------------------------------------------------------------------


@pytest.mark.slow  # torchrun with 2 processes
def test_two_rank_export_writes_the_files_of_a_one_rank_export(work, single_teacher, tmp_path) -> None:
    """9 shards of 10 rows over 2 ranks (an uneven last round): same manifest entries (sha256 of every
    shard), same rows, same item embeddings and DLLM2Rec files as one process."""
    from dataclasses import fields

    from ilora.outputs.format import read_manifest, read_teacher_outputs

    teacher, _ = single_teacher
    args = ["teacher", "export", str(work / "data"), "--teacher", str(teacher), "--splits", "train,val", "--shard-rows", "10",
            "--batch-size", "4", "--top-k", "3", "--pool-sasrec", "5", "--pool-candidates", "5"]
    one = ilora([*args, "--out", str(tmp_path / "one")])
    two = ilora([*args, "--out", str(tmp_path / "two")], ranks=2)
    assert one["splits"] == two["splits"] == {"train": 88, "val": 6} and two["written"] == one["written"] == 94
    m1, m2 = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert len(m1["splits"]["train"]["shards"]) == 9
    o1, o2 = (read_teacher_outputs(tmp_path / d, ("train", "val")) for d in ("one", "two"))
    for name in ("train", "val"):
        assert m2["splits"][name] == m1["splits"][name]
        for column in fields(o1.split(name)):
            assert np.array_equal(getattr(o1.split(name), column.name), getattr(o2.split(name), column.name)), column.name
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    for rel in files:
        if rel.name != "manifest.json":  # it names its own directory
            assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


@pytest.mark.slow  # torchrun with 2 processes
def test_two_rank_eval_gives_the_metrics_of_one_process(work, single_teacher) -> None:
    teacher, _ = single_teacher
    args = ["teacher", "eval", str(work / "data"), "--teacher", str(teacher), "--split", "test", "--candidates", "5", "--batch-size", "2"]
    assert ilora(args, ranks=2) == ilora(args)


def test_commands_that_are_not_data_parallel_refuse_torchrun(work, monkeypatch, capsys) -> None:
    """Under torchrun a single-process command would run as N copies writing one --out: refused."""
    from ilora.cli.main import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["rec", "train", str(work / "data"), "--out", str(work / "never")]) == 2
    assert "`ilora rec train` does not run data-parallel" in capsys.readouterr().err and not (work / "never").exists()


@pytest.mark.slow  # torchrun with 2 processes
def test_a_one_process_run_resumes_on_two_ranks(work, single_teacher, tmp_path) -> None:
    one, _ = single_teacher
    out = tmp_path / "teacher"
    args = ["teacher", "train", str(work / "data"), "--rec", str(work / "rec"), "--out", str(out), *TRAIN, "--checkpoint-every", "2"]
    ilora(args)
    shutil.rmtree(out / "checkpoints" / "step-000000004")
    (out / "train_summary.json").unlink()
    resumed = ilora([*args, "--resume"], ranks=2)
    assert resumed["resumed_from"] == 2 and resumed["world_size"] == 2
    assert_same_trajectory(out, one)
    assert_same_teacher(one, out)


# rank 1's loss turns NaN at its 3rd call (step 2: micro-batches of 4, 2 per rank and step)
NAN_ON_RANK_1 = """
import os, sys
from ilora.teacher.model import ILoRATeacher
real, calls = ILoRATeacher.loss, {"n": 0}
def loss(self, *args, **kwargs):
    value = real(self, *args, **kwargs)
    if os.environ["RANK"] == "1" and self.training:
        calls["n"] += 1
        if calls["n"] == 3:
            return value * float("nan")
    return value
ILoRATeacher.loss = loss
from ilora.cli.main import main
sys.exit(main())
"""


@pytest.mark.slow  # torchrun with 2 processes
def test_a_nan_on_one_rank_stops_every_rank_after_the_last_good_checkpoint(work, tmp_path) -> None:
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    out = tmp_path / "teacher"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "teacher", "train", str(work / "data"), "--rec", str(work / "rec"), "--out", str(out), *TRAIN]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: non-finite loss nan at step 2 (epoch 1)") == 2, proc.stderr[-3000:]  # both ranks
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000000001"]  # written before anyone left
    assert not (out / "train_summary.json").exists()


@pytest.mark.slow  # torchrun with 2 processes
def test_an_interrupted_two_rank_export_resumes_in_one_process(work, single_teacher, tmp_path) -> None:
    """Cut a finished 2-rank export back to its first 2 rounds (4 shards listed, one unlisted shard file
    left behind), resume it in one process: the files of an uninterrupted single-process export."""
    teacher, _ = single_teacher
    args = ["teacher", "export", str(work / "data"), "--teacher", str(teacher), "--shard-rows", "10", "--batch-size", "4",
            "--top-k", "3", "--pool-sasrec", "5", "--pool-candidates", "5"]
    ilora([*args, "--out", str(tmp_path / "one")])
    ilora([*args, "--out", str(tmp_path / "two")], ranks=2)
    manifest_path = tmp_path / "two" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    info = manifest["splits"]["train"]
    for shard in info["shards"][5:]:
        (tmp_path / "two" / shard["file"]).unlink()
    info["shards"], info["rows"], info["complete"] = info["shards"][:4], 40, False  # shard 4 stays on disk, unlisted
    manifest.pop("dllm2rec", None)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    resumed = ilora([*args, "--out", str(tmp_path / "two")])
    assert resumed["written"] == 88 - 40
    for rel in sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file()):
        if rel.name != "manifest.json":
            assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["splits"] == json.loads(manifest_path.read_text())["splits"]


class _Gathered(Dist):
    """A rank of a 2-rank job whose gather returns given answers (no process group)."""

    def __init__(self, answers: list) -> None:
        super().__init__(rank=0, world_size=len(answers))
        object.__setattr__(self, "answers", answers)

    def gather(self, obj):
        return self.answers


STALE_DATA_ON_RANK_1 = """
import os, sys
if os.environ["RANK"] == "1":  # this node holds an older copy of the dataset
    sys.argv = [a.replace("/data", "/data_stale") if a.endswith("/data") else a for a in sys.argv]
from ilora.cli.main import main
sys.exit(main())
"""


@pytest.mark.slow  # torchrun with 2 processes, twice
def test_export_and_eval_refuse_a_rank_with_a_stale_copy_of_the_data(work, single_teacher, tmp_path) -> None:
    """Same catalog, fewer train rows on rank 1: export would run fewer rounds there and hang rank 0
    (or, with as many rows, write shards of other samples); eval would mix other samples into the
    metrics. Both fail on every rank, naming what differs, before any work."""
    from ilora.data import load_dataset
    from ilora.data.dataset import SeqDataset

    data = load_dataset(work / "data")
    stale = work / "data_stale"
    if not stale.exists():
        write_native(SeqDataset(data.catalog, {**data.splits, "train": data.split("train").subset(slice(0, 60))}, source="stale"), stale)
    script = tmp_path / "stale_rank_1.py"
    script.write_text(STALE_DATA_ON_RANK_1)
    teacher, _ = single_teacher
    for args, differ in (
        (["teacher", "export", str(work / "data"), "--teacher", str(teacher), "--out", str(tmp_path / "export"), "--shard-rows", "10",
          "--batch-size", "4", "--top-k", "3", "--pool-sasrec", "5", "--pool-candidates", "5"], "dataset, splits differ"),
        (["teacher", "eval", str(work / "data"), "--teacher", str(teacher), "--split", "train", "--candidates", "5", "--batch-size", "4",
          ], "candidates, split differ"),
    ):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert proc.stderr.count(f"rank 1 does not read what rank 0 reads ({differ})") == 2, proc.stderr[-3000:]  # both ranks
    assert not list((tmp_path / "export").glob("train/part-*"))  # nothing scored


def test_ranks_that_read_other_inputs_all_fail_naming_what_differs() -> None:
    from ilora.errors import IloraError
    from ilora.distributed import check_ranks_agree

    mine = {"dataset": "a1", "rec": "r1", "train_samples": 88, "llm": "l1"}
    check_ranks_agree(SINGLE, mine)  # one process: nothing to compare
    check_ranks_agree(_Gathered([mine, dict(mine)]), mine)
    stale = {**mine, "dataset": "a0", "train_samples": 87}
    with pytest.raises(IloraError, match=r"rank 1 does not read what rank 0 reads \(dataset, train_samples differ\)"):
        check_ranks_agree(_Gathered([mine, stale]), mine)


def test_the_llm_signature_tells_models_apart_without_reading_weights() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ilora.teacher.train import llm_signature

    small = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    a, b = LlamaForCausalLM(small), LlamaForCausalLM(small)  # other weights, same model: the same signature
    assert llm_signature(a) == llm_signature(b)
    deeper = LlamaForCausalLM(LlamaConfig(**{**small.to_dict(), "num_hidden_layers": 2}))
    assert llm_signature(deeper) != llm_signature(a)

"""Train SASRec on a dataset's train split, selecting weights on the validation split only.

`train_sasrec` runs Adam over shuffled mini-batches, one loss per sample at the last
valid position: ``ce`` (softmax cross-entropy over all items) or ``bce`` (LLaRA's
objective, and DLLM2Rec's without its DRO term: the target against ``negatives`` items
sampled uniformly among those neither in the history nor the target; with more than one
negative the positive is one of ``1 + negatives`` averaged terms). After every epoch it evaluates
the validation split, logs a row to ``metrics.csv`` and TensorBoard (``tb/``), and keeps
the best weights by ``cfg.monitor``; ``patience`` epochs without improvement stop it.
The test split is never used for any decision; its metrics are only reported at the end.
The same loop trains a distilled student (`ilora.distill`): ``model_factory`` builds the
model in place of a plain `SASRec` and ``extra_loss`` adds a term to each batch's loss,
computed from the same forward pass (see `TrainBatch`).
The output directory then holds ``model.safetensors``, ``config.json`` (the
architecture, what `ilora.rec.sasrec.load_sasrec` reads), ``train_config.json``,
``result.json`` and, with a test split, ``test_ranks.safetensors`` (the target's
full-ranking rank of every test sample; `ilora.rec.evaluate.load_ranks`).

Gradients are clipped to ``grad_clip`` (default 10: SASRec's gradient norm stays below 5
on LastFM and the synthetic data, so the default changes no ordinary run; clipping that
does not bind leaves every gradient bit for bit as it is). A step whose loss or gradient
norm is NaN/inf stops the run with `IloraError` naming the step, after a checkpoint of
the state before it (`ilora.checkpointing`); ``skip_nonfinite`` drops the step instead.

With ``checkpoint_every = N`` a checkpoint is written after every N-th optimizer step
(at an epoch's last step: after its validation) into ``checkpoints/``; ``resume=True``
continues from the newest intact one: weights, Adam state, best-so-far weights and
score, patience counter, the epoch's sample order and position in it, the running
train loss, every RNG (global, shuffling, negatives) and ``metrics.csv`` as it was then,
so the result is bit for bit that of an uninterrupted run. A run without ``resume``
refuses an ``out_dir`` holding an earlier run (result, checkpoints or model) unless
``overwrite``, which starts over and removes older checkpoints; resuming a finished run
returns its result.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from ilora.checkpointing import NonFiniteGuard, check_resume_config, finished_run_config, open_run, restore_rng_state, restoring, rng_state
from ilora.config import option, to_dict, torch_threads
from ilora.metrics_log import MetricsLog
from ilora.data.dataset import SeqDataset, Split
from ilora.dir_lock import claims_out_dir
from ilora.distributed import require_device
from ilora.errors import ConfigError, IloraError
from ilora.progress import progress
from ilora.rec.evaluate import evaluate_sasrec, fixed_candidates
from ilora.rec.metrics import history_mask
from ilora.rec.sasrec import WEIGHTS_FILE, SASRec, SASRecConfig
from ilora.state_io import atomic_write_text, read_json

TEST_RANKS_FILE = "test_ranks.safetensors"

log = logging.getLogger(__name__)

MONITORS = ("ndcg@10", "hr@10", "ndcg@20", "hr@20", "cand_hr@1")


@dataclass
class RecTrainConfig:
    """Options of `train_sasrec` / ``ilora rec train``."""

    epochs: int = option(30, "maximum number of passes over the train split")
    max_steps: int | None = option(None, "stop after this many optimizer steps in total (0 or none: no limit, as the teacher's max_steps)")
    batch_size: int = option(256, "training samples per optimizer step")
    lr: float = option(1e-3, "Adam learning rate")
    weight_decay: float = option(0.0, "Adam weight decay (L2)")
    loss: Literal["ce", "bce"] = option("ce", "ce: softmax cross-entropy over all items; bce: target vs sampled negatives (DLLM2Rec)")
    negatives: int = option(1, "negatives per sample for loss=bce (uniform over items not in the history or target)")
    hidden: int = option(64, "embedding / hidden size")
    heads: int = option(1, "attention heads")
    blocks: int = option(1, "attention + feed-forward blocks")
    dropout: float = option(0.1, "dropout rate")
    seed: int = option(0, "random seed (init, shuffling, negatives, dropout)")
    device: Literal["cpu", "cuda"] = option("cpu", "device to train on")
    patience: int = option(5, "stop after this many epochs without a better validation score (0: never stop early)")
    monitor: Literal["ndcg@10", "hr@10", "ndcg@20", "hr@20", "cand_hr@1"] = option(
        "ndcg@10", "validation metric that selects the best epoch"
    )
    eval_candidates: int = option(20, "candidate-set size for val/test cand_hr@1, >= 2 (0: skip candidate metrics)")
    cand_seed: int = option(0, "seed of the fixed val/test candidate sets (kept apart from `seed` so runs compare)")
    mask_history: bool = option(False, "leave history items out of the full ranking during evaluation")
    train_min_len: int = option(1, "train only on samples with at least this many history items (--min-len filters every split at load time)")
    eval_batch_size: int = option(1024, "samples per evaluation batch")
    threads: int | None = option(None, "CPU threads for torch (none: torch's default)")
    grad_clip: float = option(
        10.0, "clip the gradient norm to this (0: off); the default only stops blow-ups (ordinary SASRec steps stay below 5)"
    )
    checkpoint_every: int = option(0, "write a resumable checkpoint every N optimizer steps into checkpoints/ in the output folder (distill: in each student's: baseline/, distilled/, control/; 0: off)")
    skip_nonfinite: bool = option(False, "skip a step whose loss or gradient is NaN/inf instead of stopping the run")

    def validate(self, *, check_device: bool = True) -> None:
        """`ConfigError` for an option out of range; with ``check_device`` also for ``cuda``
        where torch sees no CUDA device (``ilora run`` checks devices per stage instead)."""
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 0, f"max_steps must be >= 0 (0 or unset: no limit), got {self.max_steps}"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.negatives >= 1, "negatives must be >= 1"),
            (self.patience >= 0, "patience must be >= 0"),
            (
                self.eval_candidates == 0 or self.eval_candidates >= 2,
                f"eval_candidates must be 0 (no candidate metrics) or >= 2 (the target and at least one other item; with 1, "
                f"cand_hr@1 is 1.0 for any model), got {self.eval_candidates}",
            ),
            (self.train_min_len >= 1, "train_min_len must be >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (math.isfinite(self.grad_clip) and self.grad_clip >= 0, "grad_clip must be a finite number >= 0"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1 (or unset: torch's default), got {self.threads}"),
            (min(self.hidden, self.heads, self.blocks) >= 1, "hidden, heads and blocks must be >= 1"),
            (self.hidden % max(self.heads, 1) == 0, f"hidden {self.hidden} must be divisible by heads {self.heads}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (0 <= self.seed < 2**63 - 1, f"seed must be in 0..2**63-2, got {self.seed}"),
            (0 <= self.cand_seed < 2**63, f"cand_seed must be in 0..2**63-1, got {self.cand_seed}"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ConfigError(problem)
        if self.monitor == "cand_hr@1" and self.eval_candidates < 2:
            raise ConfigError(f"monitor=cand_hr@1 needs eval_candidates >= 2 (with {self.eval_candidates} there is no cand_hr@1 to select by)")
        if check_device:
            require_device(self.device)


def sample_negatives(
    history: torch.Tensor, length: torch.Tensor, target: torch.Tensor, num_items: int, count: int, generator: torch.Generator
) -> torch.Tensor:
    """``(B, count)`` items drawn uniformly (with replacement) from those not in the history nor the target."""
    allowed = (~history_mask(history, length, num_items)).float()
    allowed[torch.arange(history.shape[0], device=history.device), target] = 0.0
    if bool((allowed.sum(dim=1) == 0).any()):
        raise IloraError("a sample's history and target cover every item; no negative can be sampled")
    return torch.multinomial(allowed, count, replacement=True, generator=generator)


@dataclass
class TrainBatch:
    """One training batch as an ``extra_loss`` hook sees it (all tensors on the training device).

    ``rows`` are the samples' positions in the dataset's full train split (before the
    ``train_min_len`` filter), i.e. the row numbers of per-sample side data such as
    teacher outputs. ``logits`` are the model's scores from the forward pass the
    recommendation loss uses (same dropout draw), with gradient.
    """

    logits: torch.Tensor  # (B, num_items)
    history: torch.Tensor  # (B, L)
    length: torch.Tensor  # (B,)
    target: torch.Tensor  # (B,)
    rows: torch.Tensor  # (B,) int64


ExtraLoss = Callable[[TrainBatch], torch.Tensor]
ModelFactory = Callable[[SASRecConfig], SASRec]


def sasrec_loss(
    model: SASRec,
    history: torch.Tensor,
    length: torch.Tensor,
    target: torch.Tensor,
    cfg: RecTrainConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean training loss of one batch (``cfg.loss``)."""
    return recommendation_loss(model.scores(history, length), history, length, target, cfg, generator)


def recommendation_loss(
    logits: torch.Tensor,
    history: torch.Tensor,
    length: torch.Tensor,
    target: torch.Tensor,
    cfg: RecTrainConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """`sasrec_loss` from already computed ``logits`` ``(B, num_items)``."""
    if cfg.loss == "ce":
        return F.cross_entropy(logits, target)
    negs = sample_negatives(history, length, target, logits.shape[1], cfg.negatives, generator)
    pos = logits.gather(1, target[:, None])
    neg = logits.gather(1, negs)
    scores = torch.cat([pos.reshape(-1), neg.reshape(-1)])
    labels = torch.cat([torch.ones(pos.numel(), device=logits.device), torch.zeros(neg.numel(), device=logits.device)])
    return F.binary_cross_entropy_with_logits(scores, labels)


def _train_split(dataset: SeqDataset, min_len: int) -> tuple[Split, np.ndarray]:
    """The train samples with at least ``min_len`` history items and their rows in the full split."""
    train = dataset.split("train")
    keep = np.flatnonzero(train.length >= min_len)
    if keep.size == 0:
        raise IloraError(f"{dataset.source or 'dataset'}: no train sample has at least train_min_len={min_len} history items")
    return (train if keep.size == len(train) else train.subset(keep)), keep


def _batch_loss(
    model: SASRec,
    history: torch.Tensor,
    length: torch.Tensor,
    target: torch.Tensor,
    rows: torch.Tensor,
    cfg: RecTrainConfig,
    generator: torch.Generator,
    extra_loss: ExtraLoss | None,
    device: torch.device,
) -> torch.Tensor:
    """Recommendation loss of one batch plus ``extra_loss`` (if any) from the same forward pass."""
    history, length, target = history.to(device), length.to(device), target.to(device)
    logits = model.scores(history, length)
    loss = recommendation_loss(logits, history, length, target, cfg, generator)
    if extra_loss is not None:
        loss = loss + extra_loss(TrainBatch(logits, history, length, target, rows.to(device)))
    return loss


def _metric_subset(metrics: dict[str, object], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if "@" in k}  # type: ignore[arg-type]


@dataclass
class _Progress:
    """Where the loop is: everything besides weights, optimiser and RNGs that a checkpoint restores."""

    epoch: int = 1  # the current epoch (1-based)
    position: int = 0  # batches of this epoch done
    step: int = 0
    loss_sum: float = 0.0  # train loss summed over this epoch's batches
    batches: int = 0
    best_score: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    skipped: list[int] = field(default_factory=list)


class _Run:
    """The objects of one training run whose state a checkpoint holds."""

    def __init__(self, record: dict[str, object], model: SASRec, optimizer: torch.optim.Optimizer, order_gen: torch.Generator, sample_gen: torch.Generator) -> None:
        self.record, self.model, self.optimizer = record, model, optimizer
        self.order_gen, self.sample_gen = order_gen, sample_gen
        self.progress = _Progress()
        self.order: torch.Tensor | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.logger: MetricsLog | None = None

    def volatile(self) -> dict[str, object]:
        """The part of the state that changes within a step (taken before it, for the last good state)."""
        return {"progress": asdict(self.progress), "rng": rng_state(), "sample_rng": self.sample_gen.get_state()}

    def state(self, volatile: dict[str, object] | None = None) -> dict[str, object]:
        return {
            "config": self.record,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_state": self.best_state,
            "order": self.order,
            "order_rng": self.order_gen.get_state(),
            "metrics_csv": self.logger.text() if self.logger is not None else "",
            **(volatile or self.volatile()),
        }

    def restore(self, state: dict, where: Path) -> None:
        check_resume_config(state["config"], self.record, where)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best_state = state["best_state"]
        self.order = state["order"]
        self.order_gen.set_state(state["order_rng"])
        self.sample_gen.set_state(state["sample_rng"])
        restore_rng_state(state["rng"])
        self.progress = _Progress(**state["progress"])


def run_record(cfg: RecTrainConfig, run_options: dict[str, object] | None) -> dict[str, object]:
    """What defines a run: the options, plus ``run_options`` (keys must not be option names)."""
    record = to_dict(cfg)
    clash = sorted(set(record) & set(run_options or {}))
    if clash:
        raise ConfigError(f"run options {clash} have the names of SASRec training options")
    return {**record, **(run_options or {})}


def _finished_result(out: Path, record: dict[str, object]) -> dict[str, object] | None:
    """The result of a run that already finished in ``out`` with the same record, if any."""
    config = finished_run_config(out, "result.json")
    if config is None:
        return None
    check_resume_config(read_json(config, "train_config.json"), record, out)
    log.info("%s: training already finished; returning its result", out)
    return read_json(out / "result.json", "result.json")


def _has_val(dataset: SeqDataset) -> bool:
    return dataset.splits.get("val") is not None and len(dataset.split("val")) > 0


def split_candidates(dataset: SeqDataset, cfg: RecTrainConfig, name: str) -> np.ndarray | None:
    """The fixed candidate sets ``cfg`` evaluates split ``name`` with (None without samples in that
    split or with ``eval_candidates`` 0); raises for sets the data cannot fill (more candidates than
    items), so callers draw them before training, and before --out is touched."""
    if dataset.splits.get(name) is None or not len(dataset.split(name)) or not cfg.eval_candidates:
        return None
    return fixed_candidates(dataset.split(name), dataset.num_items, split_name=name, count=cfg.eval_candidates, seed=cfg.cand_seed)


def check_training_input(dataset: SeqDataset, cfg: RecTrainConfig) -> None:
    """Raise for what `train_sasrec` would refuse in ``dataset`` under ``cfg`` (no train sample
    with ``train_min_len`` history items, val or test candidate sets the data cannot fill),
    without training."""
    _train_split(dataset, cfg.train_min_len)
    for name in ("val", "test"):
        split_candidates(dataset, cfg, name)


@claims_out_dir("out_dir")
def train_sasrec(
    dataset: SeqDataset,
    cfg: RecTrainConfig,
    out_dir: str | Path,
    *,
    extra_loss: ExtraLoss | None = None,
    model_factory: ModelFactory | None = None,
    resume: bool = False,
    overwrite: bool = False,
    run_options: dict[str, object] | None = None,
) -> dict[str, object]:
    """Train, keep the best-by-validation weights, save them to ``out_dir``; return final metrics.

    Without a validation split the weights of the last epoch are kept. ``model_factory``
    (default `SASRec`) builds the model from its architecture, right after the global
    seed is set; ``extra_loss`` is added to every batch's recommendation loss.
    ``resume`` continues from the newest intact checkpoint in ``out_dir`` (none: from
    the start). ``run_options``: what else defines the run besides ``cfg`` (e.g. the
    ``extra_loss``'s options and the fingerprint of what it reads); recorded with the
    options and the dataset's fingerprint (`SeqDataset.sha256`) in ``train_config.json``
    and the checkpoints, and a resume with other values or other data is refused like one
    with other options. Runs with ``cfg.threads`` torch threads (`torch_threads`).
    """
    cfg.validate()  # before its threads are set: a bad count is named as the option
    with torch_threads(cfg.threads):
        return _train_sasrec(dataset, cfg, out_dir, extra_loss, model_factory, resume, overwrite, run_options)


def _train_sasrec(dataset, cfg, out_dir, extra_loss, model_factory, resume, overwrite, run_options) -> dict[str, object]:
    """`train_sasrec`'s work (``cfg`` validated)."""
    record = run_record(cfg, {**(run_options or {}), "dataset_sha256": dataset.sha256()})
    train, train_rows = _train_split(dataset, cfg.train_min_len)  # rejects bad input before --out is touched
    has_val = _has_val(dataset)
    val_cands, test_cands = (split_candidates(dataset, cfg, name) for name in ("val", "test"))
    out, checkpoints, finished = open_run(
        out_dir, cfg.checkpoint_every, resume, "result.json", lambda o: _finished_result(o, record), overwrite, others=(WEIGHTS_FILE,)
    )
    if finished is not None:
        return finished
    (out / TEST_RANKS_FILE).unlink(missing_ok=True)  # an earlier run's; this one writes its own at the end
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    if not has_val:
        log.warning("%s has no validation split: training all %d epochs without early stopping and keeping the last epoch's "
                    "weights", dataset.source or "the dataset", cfg.epochs)
    arch = SASRecConfig(
        num_items=dataset.num_items, max_len=dataset.max_len, hidden=cfg.hidden, heads=cfg.heads, blocks=cfg.blocks, dropout=cfg.dropout
    )
    model = (model_factory or SASRec)(arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = _Run(record, model, optimizer, generator, sample_gen)
    resumed_from, saved = None, None
    checkpoint = checkpoints.resume_point() if resume else None
    if checkpoint is not None:
        saved = checkpoint.load()
        with restoring(checkpoint.path):
            run.restore(saved, checkpoint.path)
        resumed_from = checkpoint.step
        log.info("resuming from %s (step %d)", checkpoint.path, checkpoint.step)
    elif resume:
        log.warning("%s: no intact checkpoint to resume from; training from the start", out)
    atomic_write_text(out / "train_config.json", json.dumps(record, indent=2) + "\n")

    # copies: a split's arrays may be read-only views of its Parquet file
    history = torch.tensor(train.history)
    length = torch.tensor(train.length)
    target = torch.tensor(train.target)
    rows = torch.tensor(train_rows)
    n = len(train)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    p = run.progress
    logger = run.logger = MetricsLog(out, purge_step=None if resumed_from is None else resumed_from + 1)
    if saved is not None:
        logger.restore(saved["metrics_csv"])
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    before: dict[str, object] = {}
    guard = NonFiniteGuard(cfg.skip_nonfinite, lambda: checkpoints.save(p.step, run.state(before)))
    guard.skipped = p.skipped
    epoch = p.epoch
    bar = progress(total=total, initial=p.step, desc="train sasrec", unit="step", leave=False)
    try:
        for epoch in range(p.epoch, cfg.epochs + 1):
            p.epoch = epoch
            model.train()
            if run.order is None:
                run.order = torch.randperm(n, generator=generator)
                p.position, p.loss_sum, p.batches = 0, 0.0, 0
            for b in range(p.position, steps_per_epoch):
                idx = run.order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                before = run.volatile()
                loss = _batch_loss(model, history[idx], length[idx], target[idx], rows[idx], cfg, sample_gen, extra_loss, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                if guard.ok(p.step + 1, loss.item(), float(grad_norm), f" (epoch {epoch})"):
                    optimizer.step()
                    p.loss_sum, p.batches = p.loss_sum + loss.item(), p.batches + 1
                p.step, p.position = p.step + 1, b + 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{p.loss_sum / max(p.batches, 1):.4f}", refresh=False)
                if cfg.max_steps and p.step >= cfg.max_steps:
                    break
                if p.position < steps_per_epoch and checkpoints.due(p.step):
                    checkpoints.save(p.step, run.state())
            row: dict[str, float | int] = {"epoch": epoch, "step": p.step, "train_loss": p.loss_sum / max(p.batches, 1)}
            if has_val:
                val = evaluate_sasrec(
                    model, dataset, "val", candidates=val_cands, count=0, mask_history=cfg.mask_history, batch_size=cfg.eval_batch_size
                )
                row.update(_metric_subset(val, "val_"))
                score = float(val[cfg.monitor])  # type: ignore[arg-type]
                if score > p.best_score:
                    p.best_score, p.best_epoch, p.bad_epochs = score, epoch, 0
                    run.best_state = copy.deepcopy(model.state_dict())
                else:
                    p.bad_epochs += 1
            logger.log(row, p.step)
            log.info("epoch %d step %d " + " ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "step")), epoch, p.step)
            if cfg.max_steps and p.step >= cfg.max_steps:
                break
            if has_val and cfg.patience and p.bad_epochs >= cfg.patience:
                log.info("early stop: no better val %s for %d epochs", cfg.monitor, p.bad_epochs)
                break
            run.order = None
            if epoch < cfg.epochs and checkpoints.due(p.step):
                p.epoch, p.position = epoch + 1, 0
                checkpoints.save(p.step, run.state())
    finally:
        bar.close()
        logger.close()

    best_state, best_epoch, step = run.best_state, p.best_epoch, p.step
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = epoch
    model.eval()
    model.to("cpu").save(out)
    result: dict[str, object] = {
        "best_epoch": best_epoch,
        "epochs_run": epoch,
        "steps": step,
        "selected_by": f"val {cfg.monitor}" if best_state is not None else "last epoch (no validation split)",
        "skipped_steps": list(p.skipped),
        "resumed_from": resumed_from,
        "out": str(out),
    }
    model.to(device)
    eval_kw = dict(mask_history=cfg.mask_history, batch_size=cfg.eval_batch_size)
    if has_val:
        result["val"] = evaluate_sasrec(model, dataset, "val", candidates=val_cands, count=0, **eval_kw)  # type: ignore[arg-type]
    if dataset.splits.get("test") is not None and len(dataset.split("test")) > 0:
        result["test"] = evaluate_sasrec(
            model, dataset, "test", candidates=test_cands, count=0, ranks_file=out / TEST_RANKS_FILE, **eval_kw  # type: ignore[arg-type]
        )
        if test_cands is not None:  # drawn before training, from cand_seed: say so, as evaluate_sasrec does when it draws them
            result["test"]["cand_seed"] = cfg.cand_seed
    atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    return result

"""Teacher training: `train_teacher(dataset, cfg, rec_dir, out_dir)`.

Each optimiser step takes ``batch_size`` samples of a seeded per-epoch permutation,
split into micro-batches (gradient accumulation). Prompts are assembled by the
`PromptCollator` inside DataLoader workers (``workers``); each sample's hybrid /
text-only flag comes from LLaRA's curriculum, drawn from ``(seed, step)`` only.
Loss: cross-entropy on the answer tokens. AdamW with iLoRA's param groups (gate at
0.3 x lr), linear warm-up + cosine decay, gradient clipping, bf16 autocast on CUDA.
Validation by the score protocol after every epoch; the best checkpoint by
``select_metric`` on validation only is written to ``out_dir`` (with the last
optimiser/scheduler/RNG state in ``out_dir/trainer_state.*``).

A step whose loss or gradient norm is NaN/inf stops the run with `IloraError` naming the
step, after a checkpoint of the state before it; ``skip_nonfinite`` drops the update
instead (the schedule still advances). With ``checkpoint_every = N`` a checkpoint
(`ilora.checkpointing`) is written after every N-th optimiser step (at an epoch's last
step: after its validation): adapter, gate and projector weights, AdamW and schedule
state, the best-so-far weights and metrics, the epoch and the position in it (the
order and curriculum flags are recomputed from ``(seed, epoch)`` and ``(seed, step)``),
every RNG, and both CSV logs. ``resume=True`` continues from the newest intact one and
ends bit for bit where an uninterrupted run ends (on CPU). A run without ``resume``
starts over and removes older checkpoints; resuming a finished run returns its summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ilora.checkpointing import NonFiniteGuard, check_resume_config, open_run, restore_rng_state, rng_state
from ilora.config import to_dict
from ilora.data.candidates import candidate_sets
from ilora.data.dataset import SeqDataset, Split
from ilora.errors import ConfigError, IloraError
from ilora.metrics_log import MetricsLog
from ilora.rec.sasrec import load_sasrec
from ilora.state_io import atomic_write_text, read_json, save_state
from ilora.teacher.adapters import adapter_state_dict, enable_gradient_checkpointing
from ilora.teacher.batch import draw_hybrid_flags
from ilora.teacher.build import build_teacher, save_teacher, trainable_parameters
from ilora.teacher.config import TeacherConfig
from ilora.teacher.evaluate import evaluate_teacher
from ilora.teacher.optim import build_scheduler, param_groups

log = logging.getLogger(__name__)

_PROTECTED_METRICS = ("hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr", "mean_target_logprob")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MicroBatches(torch.utils.data.Dataset):
    """The micro-batches of one epoch: item i is built by the collator from plan[i]."""

    def __init__(self, split: Split, candidates: np.ndarray, plan: list[tuple[np.ndarray, np.ndarray]], collator) -> None:
        self.split, self.candidates, self.plan, self.collator = split, candidates, plan, collator

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int):
        idx, hybrid = self.plan[i]
        s = self.split
        return self.collator.build(s.history[idx], s.length[idx], self.candidates[idx], s.target[idx], hybrid=hybrid)


def epoch_plan(n: int, cfg: TeacherConfig, epoch: int, first_step: int, total_steps: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Optimiser steps of one epoch, each a list of (sample indices, hybrid flags) micro-batches."""
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
    micro = cfg.micro_batch_size or cfg.batch_size
    steps = []
    for k, start in enumerate(range(0, n, cfg.batch_size)):
        idx = order[start : start + cfg.batch_size]
        step = first_step + k
        if cfg.curriculum:
            flags = draw_hybrid_flags(len(idx), step, total_steps, seed=cfg.seed).numpy()
        else:
            flags = np.ones(len(idx), dtype=bool)
        steps.append([(idx[j : j + micro], flags[j : j + micro]) for j in range(0, len(idx), micro)])
    return steps


def _val_subset(split: Split, limit: int) -> Split:
    return split if not limit or limit >= len(split) else split.subset(slice(0, limit))


def trainable_state(teacher, *, copy: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """The trained tensors: LoRA experts (peft keys), gate network, projector (``copy``: CPU clones)."""
    state = {"adapters": adapter_state_dict(teacher.llm), "gate": teacher.gate_net.state_dict(), "projector": teacher.projector.state_dict()}
    if copy:
        state = {part: {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()} for part, tensors in state.items()}
    return state


def load_trainable_state(teacher, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Inverse of `trainable_state`."""
    targets = adapter_state_dict(teacher.llm)
    if set(targets) != set(state["adapters"]):
        raise IloraError("checkpoint: its adapter layers are not this teacher's")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state["adapters"][key])
    teacher.gate_net.load_state_dict(state["gate"])
    teacher.projector.load_state_dict(state["projector"])


def _loader_generator(cfg: TeacherConfig, epoch: int) -> torch.Generator:
    """The DataLoader's own generator, so that starting an epoch (or resuming one) draws nothing from torch's."""
    return torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, epoch, 7]).integers(2**62)))


def _finished_summary(out: Path, cfg: TeacherConfig) -> dict | None:
    """The summary of a run that already finished in ``out`` with the same options, if any."""
    if not ((out / "train_summary.json").is_file() and (out / "train_config.json").is_file()):
        return None
    check_resume_config(read_json(out / "train_config.json"), to_dict(cfg), out)
    log.info("%s: training already finished; returning its summary", out)
    return read_json(out / "train_summary.json")


def train_teacher(dataset: SeqDataset, cfg: TeacherConfig, rec_dir: str | Path, out_dir: str | Path, *, resume: bool = False) -> dict:
    """Train the teacher (module docstring); ``resume`` continues from the newest intact checkpoint in ``out_dir``."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: no CUDA device is available")
    # Everything that can reject the input runs before --out is touched.
    seed_everything(cfg.seed)
    train, val = dataset.split("train"), _val_subset(dataset.split("val"), cfg.val_samples)
    n_items = dataset.num_items
    rec = load_sasrec(rec_dir)
    bundle = build_teacher(cfg, dataset.catalog, rec, cfg.device)
    teacher = bundle.teacher
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(teacher.llm, teacher.gate_state)
    train_cands = candidate_sets(train, n_items, count=cfg.num_candidates, seed=cfg.candidate_seed, split_name="train")
    val_cands = candidate_sets(val, n_items, count=cfg.num_candidates, seed=cfg.candidate_seed, split_name="val")
    out, checkpoints, finished = open_run(out_dir, cfg.checkpoint_every, resume, "train_summary.json", lambda o: _finished_summary(o, cfg))
    if finished is not None:
        return finished

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    params = trainable_parameters(teacher)
    groups = param_groups(params["adapters"], teacher.gate_net, teacher.projector, cfg.lr, cfg.router_lr_scale, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, int(cfg.warmup_ratio * total_steps), total_steps, cfg.min_lr_ratio)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cfg.device == "cuda" else contextlib.nullcontext()
    )
    # progress: everything besides weights, optimiser and RNGs that a checkpoint restores
    p = {"epoch": 0, "position": 0, "step": 0, "best": -math.inf, "best_metrics": None, "history": [], "skipped": []}
    best_weights = None
    saved, resumed_from = None, None
    checkpoint = checkpoints.latest() if resume else None
    if checkpoint is not None:
        saved = checkpoint.load()
        check_resume_config(saved["config"], to_dict(cfg), checkpoint.path)
        load_trainable_state(teacher, saved["weights"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        p, best_weights, resumed_from = saved["progress"], saved["best_weights"], checkpoint.step
        if best_weights is not None:  # the best teacher in out_dir may come from after the checkpoint
            current = trainable_state(teacher, copy=True)
            load_trainable_state(teacher, best_weights)
            save_teacher(bundle, out, dataset.catalog)
            load_trainable_state(teacher, current)
        restore_rng_state(saved["rng"])
        log.info("resuming from %s (step %d)", checkpoint.path, checkpoint.step)
    elif resume:
        log.warning("%s: no intact checkpoint to resume from; training from the start", out)
    purge = None if resumed_from is None else resumed_from + 1
    step_log = MetricsLog(out, "train_steps", purge_step=purge)
    epoch_log = MetricsLog(out, "metrics", writer=step_log.writer)
    if saved is not None:
        step_log.restore(saved["train_steps_csv"])
        epoch_log.restore(saved["metrics_csv"])
    atomic_write_text(out / "train_config.json", json.dumps(to_dict(cfg), indent=2))

    def state(progress: dict, rng: dict) -> dict:
        return {
            "config": to_dict(cfg), "weights": trainable_state(teacher), "best_weights": best_weights,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "progress": progress, "rng": rng,
            "train_steps_csv": step_log.text(), "metrics_csv": epoch_log.text(),
        }

    before: dict = {}
    guard = NonFiniteGuard(cfg.skip_nonfinite, lambda: checkpoints.save(p["step"], state(before["progress"], before["rng"])))
    guard.skipped = p["skipped"]
    all_params = [q for g in groups for q in g["params"]]
    bar = tqdm(total=total_steps, initial=p["step"], desc="train teacher", unit="step", file=sys.stderr, dynamic_ncols=True)
    for epoch in range(p["epoch"], cfg.epochs):
        p["epoch"] = epoch
        if p["step"] >= total_steps:
            break
        first = p["step"] - p["position"]
        plan = epoch_plan(len(train), cfg, epoch, first, total_steps)[: total_steps - first]
        flat = [mb for step_plan in plan[p["position"]:] for mb in step_plan]
        loader = torch.utils.data.DataLoader(
            MicroBatches(train, train_cands, flat, bundle.train_collator),
            batch_size=None,
            shuffle=False,
            num_workers=cfg.workers,
            pin_memory=cfg.device == "cuda",
            generator=_loader_generator(cfg, epoch),
        )
        batches = iter(loader)
        teacher.train()
        teacher.rec.eval()
        for k in range(p["position"], len(plan)):
            step_plan = plan[k]
            before = {"progress": json.loads(json.dumps(p)), "rng": rng_state()}
            started = time.perf_counter()
            n_step = sum(len(idx) for idx, _ in step_plan)
            total_loss, tokens = 0.0, 0
            for idx, _ in step_plan:
                batch = next(batches).to(cfg.device, non_blocking=True)
                with autocast:
                    loss = teacher.loss(batch)
                (loss * (len(idx) / n_step)).backward()
                total_loss += float(loss.detach()) * len(idx) / n_step
                tokens += int(batch.attention_mask.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(all_params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if guard.ok(p["step"] + 1, total_loss, float(grad_norm), f" (epoch {epoch + 1})"):
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            p["step"], p["position"] = p["step"] + 1, k + 1
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss:.3f}", samples_s=f"{n_step / elapsed:.1f}")
            step_log.log(
                {"step": p["step"], "epoch": epoch + 1, "loss": total_loss, "lr": scheduler.get_last_lr()[0],
                 "grad_norm": float(grad_norm), "samples_per_s": n_step / elapsed, "tokens_per_s": tokens / elapsed},
                p["step"],
            )
            if p["position"] < len(plan) and checkpoints.due(p["step"]):
                checkpoints.save(p["step"], state(p, rng_state()))
        metrics = evaluate_teacher(bundle, val, val_cands, dataset.catalog.titles, protocol="score", batch_size=cfg.eval_batch_size, device=cfg.device)
        row = {"epoch": epoch + 1, "step": p["step"], **{f"val_{k}": metrics[k] for k in _PROTECTED_METRICS}}
        epoch_log.log(row, p["step"])
        p["history"].append(row)
        if cfg.select_metric not in metrics:
            raise ConfigError(f"select_metric {cfg.select_metric!r}: not a score-protocol metric ({', '.join(_PROTECTED_METRICS)})")
        if metrics[cfg.select_metric] > p["best"]:
            p["best"], p["best_metrics"] = metrics[cfg.select_metric], metrics
            save_teacher(bundle, out, dataset.catalog)
            best_weights = trainable_state(teacher, copy=True)
        tqdm.write(f"epoch {epoch + 1}: val {cfg.select_metric} {metrics[cfg.select_metric]:.4f}", file=sys.stderr)
        if p["step"] < total_steps and epoch + 1 < cfg.epochs and checkpoints.due(p["step"]):
            p["epoch"], p["position"] = epoch + 1, 0
            checkpoints.save(p["step"], state(p, rng_state()))
        p["position"] = 0
    bar.close()
    save_state(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": p["step"], "rng": rng_state()},
        out / "trainer_state",
    )
    step_log.close()
    summary = {
        "steps": p["step"], "best_val": p["best_metrics"], "select_metric": cfg.select_metric, "history": p["history"],
        "skipped_steps": p["skipped"], "resumed_from": resumed_from, "out": str(out),
    }
    atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2))
    return summary

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
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ilora.config import to_dict
from ilora.data.candidates import candidate_sets
from ilora.data.dataset import SeqDataset, Split
from ilora.errors import ConfigError, IloraError
from ilora.metrics_log import MetricsLog
from ilora.rec.sasrec import load_sasrec
from ilora.state_io import atomic_write_text, save_state
from ilora.teacher.adapters import enable_gradient_checkpointing
from ilora.teacher.batch import draw_hybrid_flags
from ilora.teacher.build import build_teacher, save_teacher, trainable_parameters
from ilora.teacher.config import TeacherConfig
from ilora.teacher.evaluate import evaluate_teacher
from ilora.teacher.optim import build_scheduler

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


def train_teacher(dataset: SeqDataset, cfg: TeacherConfig, rec_dir: str | Path, out_dir: str | Path) -> dict:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: no CUDA device is available")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    params = trainable_parameters(teacher)
    groups = [
        {"name": "adapters", "params": params["adapters"], "lr": cfg.lr},
        {"name": "projector", "params": params["projector"], "lr": cfg.lr},
        {"name": "gate", "params": params["gate"], "lr": cfg.lr * cfg.router_lr_scale},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, int(cfg.warmup_ratio * total_steps), total_steps, cfg.min_lr_ratio)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cfg.device == "cuda" else contextlib.nullcontext()
    )
    step_log, epoch_log = MetricsLog(out, "train_steps"), None
    epoch_log = MetricsLog(out, "metrics", writer=step_log.writer)
    atomic_write_text(out / "train_config.json", json.dumps(to_dict(cfg), indent=2))

    best, best_metrics, step, history = -math.inf, None, 0, []
    bar = tqdm(total=total_steps, desc="train teacher", unit="step", file=sys.stderr, dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        if step >= total_steps:
            break
        plan = epoch_plan(len(train), cfg, epoch, step, total_steps)[: total_steps - step]
        flat = [mb for step_plan in plan for mb in step_plan]
        loader = torch.utils.data.DataLoader(
            MicroBatches(train, train_cands, flat, bundle.train_collator),
            batch_size=None,
            shuffle=False,
            num_workers=cfg.workers,
            pin_memory=cfg.device == "cuda",
        )
        batches = iter(loader)
        teacher.train()
        teacher.rec.eval()
        for step_plan in plan:
            started = time.perf_counter()
            n_step = sum(len(idx) for idx, _ in step_plan)
            total_loss, tokens = 0.0, 0
            for idx, _ in step_plan:
                batch = next(batches).to(cfg.device, non_blocking=True)
                with autocast:
                    loss = teacher.loss(batch)
                if not torch.isfinite(loss):
                    raise IloraError(f"non-finite loss at step {step + 1} (epoch {epoch + 1})")
                (loss * (len(idx) / n_step)).backward()
                total_loss += float(loss.detach()) * len(idx) / n_step
                tokens += int(batch.attention_mask.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for g in groups for p in g["params"]], cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss:.3f}", samples_s=f"{n_step / elapsed:.1f}")
            step_log.log(
                {"step": step, "epoch": epoch + 1, "loss": total_loss, "lr": scheduler.get_last_lr()[0],
                 "grad_norm": float(grad_norm), "samples_per_s": n_step / elapsed, "tokens_per_s": tokens / elapsed},
                step,
            )
        metrics = evaluate_teacher(bundle, val, val_cands, dataset.catalog.titles, protocol="score", batch_size=cfg.eval_batch_size, device=cfg.device)
        row = {"epoch": epoch + 1, "step": step, **{f"val_{k}": metrics[k] for k in _PROTECTED_METRICS}}
        epoch_log.log(row, step)
        history.append(row)
        if cfg.select_metric not in metrics:
            raise ConfigError(f"select_metric {cfg.select_metric!r}: not a score-protocol metric ({', '.join(_PROTECTED_METRICS)})")
        if metrics[cfg.select_metric] > best:
            best, best_metrics = metrics[cfg.select_metric], metrics
            save_teacher(bundle, out, dataset.catalog)
        tqdm.write(f"epoch {epoch + 1}: val {cfg.select_metric} {metrics[cfg.select_metric]:.4f}", file=sys.stderr)
    bar.close()
    save_state(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
         "torch_rng": torch.get_rng_state(), "numpy_rng": _numpy_rng_state(), "python_rng": _python_rng_state()},
        out / "trainer_state",
    )
    step_log.close()
    summary = {"steps": step, "best_val": best_metrics, "select_metric": cfg.select_metric, "history": history, "out": str(out)}
    atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2))
    return summary


def _numpy_rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]

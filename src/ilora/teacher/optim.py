"""Optimiser and schedule for the teacher: iLoRA's param groups, our own schedule.

Where it differs from iLoRA:

* Weight decay. iLoRA runs ``torch.optim.Adam`` with its ``weight_decay`` (default 1e-5) on
  the projector and router groups only, as L2 regularisation (added to the gradient, so it
  passes through Adam's moments), and none on the LLM's LoRA group. Ours is AdamW: decoupled
  decay (``p -= lr * weight_decay * p``, outside the moments) at one ``weight_decay`` for
  every group, LoRA experts included; the default 0 decays nothing. So by default our update
  is Adam's without any decay, and iLoRA's small L2 pull on the projector and router is not
  reproduced; a non-zero ``weight_decay`` is not iLoRA's regulariser either (decoupled, and
  on the experts too).
* Schedule. iLoRA's warm-up starts from, and its cosine ends at, fixed learning rates
  (``lr_warmup_start_lr``, ``lr_decay_min_lr``); ours starts at ``lr / warmup_steps`` and
  ends at ``min_lr_ratio * lr``.

What we do:

* Param groups: LoRA experts and projector at ``lr``; the gate network (router) at
  ``router_lr_scale * lr`` (iLoRA uses 0.3); every group with ``weight_decay``.
* AdamW with ``fused=True`` (`build_optimizer`): one kernel for all parameters' updates
  instead of torch's default ``foreach`` kernels per operation. The same update (`ilora bench
  step` checks both agree to 1e-5 and times them: the optimizer part 1.6-2.1x faster on the CPU,
  1.5-1.8x on an H200; bench/RESULTS.md). `load_optimizer_state` keeps it fused when resuming
  from a checkpoint written by another AdamW implementation.
* Schedule: linear warm-up over ``warmup_steps`` (step ``s`` < ``warmup_steps`` runs at
  ``(s + 1) / warmup_steps * lr``: the first at ``lr / warmup_steps``, the last at ``lr``), then
  cosine decay to ``min_lr_ratio * lr`` at ``total_steps``. ``warmup_steps`` is
  ``round(warmup_ratio * total_steps)`` (`warmup_length`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(adapters: list[nn.Parameter], gate: nn.Module, projector: nn.Module, lr: float, router_lr_scale: float, weight_decay: float) -> list[dict]:
    return [
        {"name": "adapters", "params": adapters, "lr": lr, "weight_decay": weight_decay},
        {"name": "projector", "params": list(projector.parameters()), "lr": lr, "weight_decay": weight_decay},
        {"name": "gate", "params": list(gate.parameters()), "lr": lr * router_lr_scale, "weight_decay": weight_decay},
    ]


def build_optimizer(groups: list[dict], weight_decay: float) -> torch.optim.AdamW:
    """The teacher's AdamW over ``groups`` (`param_groups`), fused. The dicts are copied: torch
    fills in the ones it is given, so a list that has served another optimizer stays unchanged."""
    return torch.optim.AdamW([dict(g) for g in groups], weight_decay=weight_decay, fused=True)


def teacher_optimizer(teacher, cfg) -> torch.optim.AdamW:
    """The trainer's optimizer for ``teacher`` under `TeacherConfig` ``cfg``: its LoRA experts,
    gate network and projector in `param_groups`, fused (`build_optimizer`)."""
    from ilora.teacher.adapters import adapter_parameters

    groups = param_groups(adapter_parameters(teacher.llm), teacher.gate_net, teacher.projector, cfg.lr, cfg.router_lr_scale, cfg.weight_decay)
    return build_optimizer(groups, cfg.weight_decay)


IMPLEMENTATION_FLAGS = ("fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping ``optimizer``'s own implementation flags:
    torch takes ``fused`` / ``foreach`` from the saved groups, so a checkpoint written by torch's
    default AdamW would otherwise resume unfused (and keep its ``step`` counters on the CPU).
    Moments, step counts and hyperparameters come from ``state``; the update rule is the same."""
    if len(state["param_groups"]) == len(optimizer.param_groups):  # else torch's own error names the mismatch
        flags = [{f: g[f] for f in IMPLEMENTATION_FLAGS if f in g} for g in optimizer.param_groups]
        state = {**state, "param_groups": [{**saved, **own} for saved, own in zip(state["param_groups"], flags)]}
    optimizer.load_state_dict(state)


def warmup_length(warmup_ratio: float, total_steps: int) -> int:
    """Warm-up steps for a ratio of the total, rounded (``int`` would truncate 0.29 * 100 to 28)."""
    return round(warmup_ratio * total_steps)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio)
    )

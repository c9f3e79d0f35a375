"""The teacher's optimiser groups and lr schedule against values written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ilora.teacher.optim import build_optimizer, build_scheduler, load_optimizer_state, param_groups, warmup_cosine, warmup_length


def reference_lr(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps (the first at base / warmup), then a
    half cosine from ``base`` down to ``min_ratio * base`` over the remaining steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    done = min((step - warmup) / max(total - warmup, 1), 1.0)
    floor = min_ratio * base
    return floor + (base - floor) * (1 + math.cos(math.pi * done)) / 2


@pytest.mark.parametrize("warmup,total,min_ratio", [(4, 20, 0.0), (0, 10, 0.1), (3, 3, 0.0), (5, 12, 0.25)])
def test_the_schedule_drives_each_step_at_the_reference_lr(warmup, total, min_ratio):
    p = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=0.5)
    scheduler = build_scheduler(optimizer, warmup, total, min_ratio)
    for step in range(total + (2 if warmup < total else 0)):  # past the end: the floor
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_lr(step, 0.5, warmup, total, min_ratio), abs=1e-12)
        assert warmup_cosine(step, warmup, total, min_ratio) * 0.5 == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_warmup_length_rounds_the_ratio():
    assert warmup_length(0.29, 100) == 29  # int() of the float product would give 28
    assert warmup_length(0.03, 50) == 2 and warmup_length(0.0, 50) == 0 and warmup_length(0.1, 5) == 0


def test_param_groups_give_the_gate_its_scaled_lr_and_every_group_the_weight_decay():
    adapters = [nn.Parameter(torch.zeros(2))]
    gate, projector = nn.Linear(3, 2), nn.Linear(2, 4)
    groups = param_groups(adapters, gate, projector, lr=1e-3, router_lr_scale=0.3, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert by_name["adapters"]["params"] == adapters and by_name["adapters"]["lr"] == 1e-3
    assert by_name["projector"]["params"] == list(projector.parameters()) and by_name["projector"]["lr"] == 1e-3
    assert by_name["gate"]["params"] == list(gate.parameters()) and by_name["gate"]["lr"] == pytest.approx(3e-4)
    assert all(g["weight_decay"] == 0.01 for g in groups)


def reference_adamw(p: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float, betas=(0.9, 0.999), eps=1e-8) -> torch.Tensor:
    """AdamW written out (Loshchilov & Hutter): decoupled decay, bias-corrected moments."""
    p, m, v = p.clone(), torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return p


def test_the_fused_optimizer_makes_adamw_steps_with_each_groups_lr():
    torch.manual_seed(0)
    adapters, gate, projector = [nn.Parameter(torch.randn(5, 3))], nn.Linear(3, 2), nn.Linear(2, 4)
    start = {name: t.detach().clone() for name, t in (("adapter", adapters[0]), ("gate", gate.weight), ("projector", projector.weight))}
    optimizer = build_optimizer(param_groups(adapters, gate, projector, lr=0.01, router_lr_scale=0.3, weight_decay=0.1), 0.1)
    assert all(group["fused"] for group in optimizer.param_groups)
    grads = {name: [torch.randn_like(t) for _ in range(3)] for name, t in start.items()}
    params = {"adapter": adapters[0], "gate": gate.weight, "projector": projector.weight}
    for step in range(3):
        for name, p in params.items():
            p.grad = grads[name][step]
        for extra in (gate.bias, projector.bias):
            extra.grad = torch.zeros_like(extra)
        optimizer.step()
    for name, p in params.items():
        lr = 0.01 * (0.3 if name == "gate" else 1.0)
        torch.testing.assert_close(p.detach(), reference_adamw(start[name], grads[name], lr, 0.1), rtol=1e-5, atol=1e-6)


def test_resuming_a_default_adamw_checkpoint_stays_fused_and_continues_its_moments():
    """A checkpoint written by torch's default AdamW (before the trainer fused it): the resumed
    optimizer is fused, and its next step is the uninterrupted run's third step."""
    torch.manual_seed(0)
    grads = [torch.randn(5, 3) for _ in range(3)]

    def model():
        torch.manual_seed(1)
        adapters, gate, projector = [nn.Parameter(torch.randn(5, 3))], nn.Linear(3, 2), nn.Linear(2, 4)
        return adapters, param_groups(adapters, gate, projector, lr=0.01, router_lr_scale=0.3, weight_decay=0.1)

    def step(optimizer, groups, g):
        for group in groups:
            for q in group["params"]:
                q.grad = torch.zeros_like(q)
        groups[0]["params"][0].grad = g
        optimizer.step()

    straight, groups = model()
    default = torch.optim.AdamW(groups, weight_decay=0.1)
    for g in grads:
        step(default, groups, g)

    resumed, groups2 = model()
    old = torch.optim.AdamW([dict(g) for g in groups2], weight_decay=0.1)  # torch fills in the dicts it is given
    for g in grads[:2]:
        step(old, groups2, g)
    fused = build_optimizer(groups2, 0.1)
    load_optimizer_state(fused, old.state_dict())
    assert all(group["fused"] for group in fused.param_groups)
    step(fused, groups2, grads[2])
    torch.testing.assert_close(resumed[0].detach(), straight[0].detach(), rtol=1e-6, atol=1e-7)

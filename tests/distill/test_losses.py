"""DLLM2Rec's distillation losses against slow per-sample Python references of their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ilora.distill.losses import (
    dro_loss,
    importance_weights,
    position_weights,
    propensity_scores,
    ranking_distillation_loss,
)
from ilora.distill.train import DistillConfig, DistillationLoss, TeacherTargets
from ilora.rec.train import TrainBatch

GAMMAS = dict(gamma_position=0.3, gamma_confidence=0.5, gamma_consistency=0.1)


# -- slow references ----------------------------------------------------------------------------


def ref_weights(items: list[int], conf: list[float], scores: list[float], beta: float, gp: float, gc: float, go: float) -> list[float]:
    """One sample's importance weights, straight from the documented formulas."""
    k = len(items)
    pos = [math.exp(-(r + 1) / beta) for r in range(k)]
    pos = [p / sum(pos) for p in pos]
    cw = [c + 1e-8 for c in conf]
    cw = [c / sum(cw) for c in cw]
    student_top = sorted(range(len(scores)), key=lambda j: -scores[j])[:k]
    cons = [(1.0 if item in student_top else 0.0) + 1e-8 for item in items]
    w = [gp * p + gc * c + go * o for p, c, o in zip(pos, cw, cons)]
    return [x / sum(w) for x in w]


def ref_rd(items: list[list[int]], weights: list[list[float]], scores: list[list[float]]) -> float:
    total = 0.0
    for row_items, row_w, row_s in zip(items, weights, scores):
        total += sum(w * -math.log(1.0 / (1.0 + math.exp(-row_s[i]))) for i, w in zip(row_items, row_w))
    return total / len(items)


def ref_dro(scores: list[float], target: int, ps: list[float], beta: float) -> float:
    """``log(sum_{j != t} exp(ps_j s_j^2 / beta) + exp(ps_t (s_t - 1)^2 / beta))`` in float64."""
    terms = [math.exp(ps[j] * scores[j] ** 2 / beta) for j in range(len(scores)) if j != target]
    terms.append(math.exp(ps[target] * (scores[target] - 1.0) ** 2 / beta))
    return math.log(math.fsum(terms))


# -- fixtures -----------------------------------------------------------------------------------


def batch(seed: int = 0, b: int = 6, n: int = 25, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct random scores and teacher rows that share some items with the student's top-K."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, n, generator=g) * 2
    student_top = logits.topk(k, dim=1).indices
    items = torch.empty(b, k, dtype=torch.long)
    for r in range(b):
        shared = student_top[r, : r % (k + 1)].tolist()  # 0..k items from the student's top-K
        rest = [int(i) for i in torch.randperm(n, generator=g) if int(i) not in student_top[r]]
        items[r] = torch.tensor((shared + rest)[:k])[torch.randperm(k, generator=g)]
    conf = torch.rand(b, k, generator=g) / k
    return logits, items, conf


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1.0, 0.5, 3.0])
def test_position_weights(beta: float) -> None:
    ref = [math.exp(-r / beta) for r in range(1, 11)]
    assert position_weights(10, beta).tolist() == pytest.approx([x / sum(ref) for x in ref], rel=1e-6)


@pytest.mark.parametrize("beta,gp,gc,go", [(1.0, 0.3, 0.5, 0.1), (2.0, 1.0, 0.0, 0.0), (0.7, 0.0, 0.2, 0.9)])
def test_importance_weights_match_reference(beta: float, gp: float, gc: float, go: float) -> None:
    logits, items, conf = batch()
    got = importance_weights(items, conf, logits, beta=beta, gamma_position=gp, gamma_confidence=gc, gamma_consistency=go)
    for r in range(len(items)):
        ref = ref_weights(items[r].tolist(), conf[r].tolist(), logits[r].tolist(), beta, gp, gc, go)
        assert got[r].tolist() == pytest.approx(ref, rel=1e-5, abs=1e-9)
    assert torch.allclose(got.sum(dim=1), torch.ones(len(items)))


def test_consistency_uses_current_scores_without_gradient() -> None:
    logits, items, conf = batch(1)
    logits.requires_grad_(True)
    w = importance_weights(items, conf, logits, beta=1.0, **GAMMAS)
    assert not w.requires_grad  # weights carry no gradient into the scores
    # an item entering the student's top-K raises its weight
    r, k = 0, items.shape[1]
    outsider = [c for c in range(k) if int(items[r, c]) not in logits[r].topk(k).indices.tolist()][0]
    boosted = logits.detach().clone()
    boosted[r, items[r, outsider]] = 100.0
    w2 = importance_weights(items, conf, boosted, beta=1.0, **GAMMAS)
    assert w2[r, outsider] > w[r, outsider]


def test_ranking_distillation_matches_reference() -> None:
    logits, items, conf = batch(2)
    w = importance_weights(items, conf, logits, beta=1.0, **GAMMAS)
    got = ranking_distillation_loss(logits, items, w)
    assert got.item() == pytest.approx(ref_rd(items.tolist(), w.tolist(), logits.tolist()), rel=1e-5)


def test_propensity_scores() -> None:
    targets = np.array([0, 0, 3, 1, 0, 3])
    got = propensity_scores(targets, 5).tolist()
    counts = [sum(1 for t in targets if t == i) + 1 for i in range(5)]
    assert got == pytest.approx([(c / sum(counts)) ** 0.05 for c in counts], rel=1e-6)


@pytest.mark.parametrize("scale,beta", [(1.0, 1.0), (1.5, 0.5), (12.0, 1.0)])
def test_dro_matches_reference(scale: float, beta: float) -> None:
    """Scale 12 puts exp arguments near 140: float32 ``exp`` would overflow without the shift."""
    logits, items, _ = batch(3, b=5, n=20, k=4)
    logits = logits / logits.abs().max() * scale
    ps = torch.rand(20, generator=torch.Generator().manual_seed(4)) * 0.5 + 0.5
    targets = items.clone()
    targets[0, 0] = int(logits[0].square().argmax())  # a target that is the row's largest term
    targets[1, 1] = int(logits[1].square().argmin())
    got = dro_loss(logits, targets, ps, beta)
    assert got.shape == targets.shape and torch.isfinite(got).all()
    for r in range(targets.shape[0]):
        for c in range(targets.shape[1]):
            ref = ref_dro(logits[r].tolist(), int(targets[r, c]), ps.tolist(), beta)
            assert got[r, c].item() == pytest.approx(ref, rel=1e-5)
    one = dro_loss(logits, targets[:, 0], ps, beta)
    assert torch.allclose(one, got[:, 0])


def test_dro_gradient() -> None:
    logits, items, _ = batch(5, b=3, n=8, k=3)
    logits = logits.double().requires_grad_(True)
    items[0, 0] = int(logits[0].detach().square().argmax())
    ps = torch.linspace(0.6, 1.0, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: dro_loss(x, items, ps, 1.0), (logits,))


@pytest.mark.parametrize("dro_alpha", [0.0, 0.7])
def test_hook_combines_terms(dro_alpha: float) -> None:
    logits, items, conf = batch(6, b=4, n=12, k=3)
    b, n = logits.shape
    rows = torch.tensor([3, 0, 5, 1])  # rows of the full train split, out of order
    all_items = torch.randint(0, n, (6, 3))
    all_conf = torch.rand(6, 3)
    all_items[rows], all_conf[rows] = items, conf
    target = torch.tensor([1, 4, 7, 2])
    cfg = DistillConfig(lambda_d=0.6, dro_alpha=dro_alpha, dro_beta=1.3, beta=1.0)
    ps = torch.linspace(0.7, 1.0, n)
    hook = DistillationLoss(TeacherTargets(all_items, all_conf, None), cfg, ps)
    got = hook(TrainBatch(logits, torch.zeros(b, 2, dtype=torch.long), torch.ones(b, dtype=torch.long), target, rows))

    s, ps_l = logits.tolist(), ps.tolist()
    w = [ref_weights(items[r].tolist(), conf[r].tolist(), s[r], 1.0, 0.3, 0.5, 0.1) for r in range(b)]
    rd = ref_rd(items.tolist(), w, s)
    if dro_alpha:
        rd += dro_alpha * sum(sum(w[r][c] * ref_dro(s[r], int(items[r, c]), ps_l, 1.3) for c in range(3)) for r in range(b)) / b
    expected = 0.6 * rd
    if dro_alpha:
        expected += dro_alpha * sum(ref_dro(s[r], int(target[r]), ps_l, 1.3) for r in range(b)) / b
    assert got.item() == pytest.approx(expected, rel=1e-5)

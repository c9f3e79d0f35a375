"""DLLM2Rec's distillation losses, vectorised over a batch.

Notation: ``logits`` ``(B, N)`` are the student's scores over the ``N`` items (from the
training forward pass), ``items`` ``(B, K)`` the teacher's top-K items of each sample,
best first, and ``confidence`` ``(B, K)`` the teacher's confidence in them (a
probability: higher is more confident).

Importance weights of the K items (`importance_weights`), as DLLM2Rec computes them:

* position ``w_p[r] = exp(-r / beta) / sum_r' exp(-r' / beta)`` for ranks ``r = 1..K``
  (the normalisation makes 0- or 1-based ranks give the same weights);
* confidence ``w_c = (c + 1e-8) / sum_K (c + 1e-8)``. DLLM2Rec's confidence file holds a
  distance ``d`` between the LLM's generated text and the item (lower = better) and
  uses ``exp(-d) + 1e-8``, normalised. Our confidence is a probability ``c``; reading
  ``d = -log c`` gives ``exp(-d) = c``, so the weight is ``c``, normalised the same way;
* consistency ``w_o = 1 + 1e-8`` if the item is also in the student's current top-K
  (from ``logits``, without gradient; ties broken by `torch.topk`), else ``1e-8``. Not
  normalised over the K items (as in DLLM2Rec);
* combined ``w = gamma_p * w_p + gamma_c * w_c + gamma_o * w_o``, then divided by its
  sum over the K items, so each sample's weights sum to 1.

Ranking distillation (`ranking_distillation_loss`):
``mean_b sum_k w[b, k] * -log sigmoid(logits[b, items[b, k]])``. DLLM2Rec also adds, for
every k, ``-log sigmoid(1 - s_neg)`` of the recommendation loss's sampled negative
(``sigmoid(1 - s)`` looks like a typo for ``1 - sigmoid(s)``); since the weights sum to
1 that term does not depend on the teacher at all, and it is left out here. It is not
nothing, though: in DLLM2Rec the distilled student alone gets it, an extra ``lambda_d``
(0.8) x ``-log sigmoid(1 - s_neg)`` on the sampled negative that its baseline lacks, so
part of a gain DLLM2Rec reports may come from that term and not from the teacher. Our
gain compares two students whose only difference is the teacher's signal.

DRO (`dro_loss`, optional, off by default in ``ilora distill``; DLLM2Rec turns it on
with ``alpha = 1``): for a target ``t`` with propensities ``ps`` (`propensity_scores`),
``log(sum_j exp(ps_j s_j^2 / beta) - exp(ps_t s_t^2 / beta) + exp(ps_t (s_t - 1)^2 / beta))``,
i.e. the log-sum-exp over the items of ``ps_j s_j^2 / beta`` with the target's term
replaced by ``ps_t (s_t - 1)^2 / beta``. It is computed with the maximum factored out,
so large scores do not overflow (DLLM2Rec exponentiates directly and adds ``1e-24``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

EPS = 1e-8


def position_weights(k: int, beta: float, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(K,)`` weights ``exp(-r / beta)`` for ranks ``r = 1..K``, summing to 1."""
    ranks = torch.arange(1, k + 1, dtype=torch.float32, device=device)
    return torch.softmax(-ranks / beta, dim=0)


def confidence_weights(confidence: torch.Tensor) -> torch.Tensor:
    """``(B, K)``: ``confidence + 1e-8``, each row divided by its sum."""
    w = confidence.float() + EPS
    return w / w.sum(dim=1, keepdim=True)


def consistency_weights(items: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``(B, K)``: ``1 + 1e-8`` where the teacher's item is in the student's top-K of ``logits``, else ``1e-8``."""
    with torch.no_grad():
        student_top = logits.topk(items.shape[1], dim=1).indices  # (B, K)
        common = (items.unsqueeze(2) == student_top.unsqueeze(1)).any(dim=2)
    return common.float() + EPS


def importance_weights(
    items: torch.Tensor,
    confidence: torch.Tensor,
    logits: torch.Tensor,
    *,
    beta: float,
    gamma_position: float,
    gamma_confidence: float,
    gamma_consistency: float,
) -> torch.Tensor:
    """``(B, K)`` combined weights of the teacher's items, each row summing to 1 (module docstring)."""
    w_p = position_weights(items.shape[1], beta, device=logits.device)[None, :]
    w_c = confidence_weights(confidence)
    w_o = consistency_weights(items, logits)
    w = gamma_position * w_p + gamma_confidence * w_c + gamma_consistency * w_o
    return w / w.sum(dim=1, keepdim=True)


def ranking_distillation_loss(logits: torch.Tensor, items: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_k weights[b, k] * -log sigmoid(logits[b, items[b, k]])``."""
    return -(weights * F.logsigmoid(logits.gather(1, items))).sum(dim=1).mean()


def propensity_scores(train_targets: np.ndarray, num_items: int) -> torch.Tensor:
    """``(N,)`` DLLM2Rec's propensities ``((count_i + 1) / sum_j (count_j + 1)) ** 0.05``.

    ``count_i`` is how often item ``i`` is a train target.
    """
    counts = np.bincount(np.asarray(train_targets, dtype=np.int64), minlength=num_items)[:num_items].astype(np.float64)
    ps = (counts + 1.0) / (counts + 1.0).sum()
    return torch.from_numpy(ps**0.05).float()


def dro_loss(logits: torch.Tensor, targets: torch.Tensor, propensity: torch.Tensor, beta: float) -> torch.Tensor:
    """DRO term per (sample, target): ``targets`` ``(B,)`` or ``(B, K)`` -> same shape (module docstring).

    The sum over the items other than the target is taken relative to the row's
    maximum; when the target *is* the row's maximum, relative to the second largest
    (summed with the maximum left out), so no difference of nearly equal sums is taken.
    """
    squeeze = targets.ndim == 1
    t = targets[:, None] if squeeze else targets  # (B, K)
    a = propensity[None, :] * logits.square() / beta  # (B, N)
    top2 = a.detach().topk(min(2, a.shape[1]), dim=1)
    m1, arg1 = top2.values[:, :1], top2.indices[:, :1]  # (B, 1)
    m2 = top2.values[:, 1:2] if a.shape[1] > 1 else torch.zeros_like(m1)
    s1 = torch.exp(a - m1).sum(dim=1, keepdim=True)  # (B, 1), >= 1
    without_max = a.scatter(1, arg1, float("-inf"))
    log_s2 = torch.log(torch.exp(without_max - m2).sum(dim=1, keepdim=True)) + m2  # log sum over j != argmax
    a_t = a.gather(1, t)  # (B, K)
    others_if_not_max = (s1 - torch.exp(a_t - m1)).clamp_min(torch.finfo(a.dtype).tiny)  # >= 1 where t != argmax
    log_rest = torch.where(t == arg1, log_s2, torch.log(others_if_not_max) + m1)
    c_t = propensity[t] * (logits.gather(1, t) - 1.0).square() / beta
    out = torch.logaddexp(log_rest, c_t)
    return out[:, 0] if squeeze else out

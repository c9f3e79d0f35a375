"""Ranking metrics: full-ranking HR@K / NDCG@K and candidate-set HR@1, vectorised in torch.

Ranks are pessimistic: the rank of the target (0 = first) is the number of *other*
items whose score is ``>=`` the target's, so ties never favour the target. Only the
``num_items`` real items take part (score matrices have no padding column). With
history masking, items of the sample's history (other than the target itself) are
left out of the ranking. HR@K is ``rank < K``; NDCG@K is ``1 / log2(rank + 2)`` when
``rank < K``, else 0 (one relevant item, so the ideal DCG is 1).
"""

from __future__ import annotations

import torch

from ilora.errors import IloraError

FULL_KS = (1, 5, 10, 20)
CAND_KS = (1, 5, 10)


def _check_scores(scores: torch.Tensor, target: torch.Tensor) -> None:
    if scores.ndim != 2 or target.shape != scores.shape[:1]:
        raise IloraError(f"expected scores (B, N) and target (B,); got {tuple(scores.shape)} and {tuple(target.shape)}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= scores.shape[1]):
        raise IloraError(f"target ids must be in 0..{scores.shape[1] - 1}")
    if torch.isnan(scores).any():
        raise IloraError("scores contain NaN; the model diverged or its weights are broken")


def history_mask(history: torch.Tensor, length: torch.Tensor, num_items: int) -> torch.Tensor:
    """Bool ``(B, num_items)``: True for the items in each sample's valid (first ``length``) history."""
    b, width = history.shape
    valid = torch.arange(width, device=history.device)[None, :] < length[:, None]
    bad = valid & ((history < 0) | (history >= num_items))
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise IloraError(f"history of sample {row}, position {col}: item id {int(history[row, col])}, expected 0..{num_items - 1}")
    # padding slots write into a spare column, dropped below, so they never clear a real item
    ids = history.masked_fill(~valid, num_items)
    seen = torch.zeros(b, num_items + 1, dtype=torch.bool, device=history.device)
    seen.scatter_(1, ids, True)
    return seen[:, :num_items]


def history_exclusion(history: torch.Tensor, length: torch.Tensor, target: torch.Tensor, num_items: int) -> torch.Tensor:
    """Bool ``(B, num_items)``: True for items in the sample's valid history, except the target."""
    excluded = history_mask(history, length, num_items)
    excluded[torch.arange(history.shape[0], device=history.device), target] = False
    return excluded


def full_ranks(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Pessimistic 0-based rank of ``target`` among all items (``exclude``: items left out)."""
    _check_scores(scores, target)
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_score = scores[rows, target]
    beats = scores >= target_score[:, None]
    beats[rows, target] = False
    if exclude is not None:
        beats &= ~exclude
    return beats.sum(dim=1)


def repeated_rows(candidates: torch.Tensor) -> torch.Tensor:
    """Bool ``(B,)``: rows of ``candidates`` ``(B, C)`` in which some id occurs twice."""
    ordered = torch.as_tensor(candidates).sort(dim=1).values
    return (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)


def candidate_ranks(scores: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Pessimistic 0-based rank of ``target`` within its row of ``candidates`` ``(B, C)``.

    Each row must contain the target exactly once and no id twice.
    """
    _check_scores(scores, target)
    candidates = torch.as_tensor(candidates, dtype=torch.long, device=scores.device)
    if candidates.ndim != 2 or candidates.shape[0] != scores.shape[0]:
        raise IloraError(f"candidate sets have shape {tuple(candidates.shape)}, expected ({scores.shape[0]}, C)")
    if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= scores.shape[1]):
        raise IloraError(f"candidate ids must be in 0..{scores.shape[1] - 1}")
    is_target = candidates == target[:, None]
    missing = (is_target.sum(dim=1) != 1).nonzero()
    if missing.numel():
        row = int(missing[0])
        raise IloraError(f"candidate set of sample {row} does not contain its target {int(target[row])} exactly once")
    dup = repeated_rows(candidates).nonzero()
    if dup.numel():
        raise IloraError(f"candidate set of sample {int(dup[0])} repeats an item")
    cand_scores = scores.gather(1, candidates)
    target_score = scores[torch.arange(scores.shape[0], device=scores.device), target]
    beats = (cand_scores >= target_score[:, None]) & ~is_target
    return beats.sum(dim=1)


def per_sample_metrics(ranks: torch.Tensor, ks: tuple[int, ...], prefix: str = "") -> dict[str, torch.Tensor]:
    """``{prefix}hr@K`` (1.0 or 0.0) and ``{prefix}ndcg@K`` of every sample, float64 ``(N,)`` each."""
    ranks = ranks.to(torch.float64)
    gains = 1.0 / torch.log2(ranks + 2.0)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = ranks < k
        out[f"{prefix}hr@{k}"] = hit.to(torch.float64)
        out[f"{prefix}ndcg@{k}"] = gains * hit
    return out


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...], prefix: str = "") -> dict[str, float]:
    """`per_sample_metrics` averaged over samples (0.0 for no samples)."""
    n = ranks.numel()
    return {name: float(values.sum()) / n if n else 0.0 for name, values in per_sample_metrics(ranks, ks, prefix).items()}

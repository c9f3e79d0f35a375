"""Ranking metrics against a slow per-sample Python reference (ties, padding, history masking)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ilora.data.dataset import Split
from ilora.errors import IloraError
from ilora.rec.evaluate import evaluate_scorer
from ilora.rec.metrics import candidate_ranks, full_ranks, history_exclusion, metrics_from_ranks

N_ITEMS, WIDTH, B = 30, 6, 40


def reference_metrics(scores, history, length, target, ks, mask_history, candidates=None) -> dict[str, float]:
    """Obviously-correct loops: pessimistic rank among real items, optional history exclusion."""
    hr = {k: 0.0 for k in ks}
    ndcg = {k: 0.0 for k in ks}
    for i in range(len(target)):
        t = int(target[i])
        s = [float(x) for x in scores[i]]
        if candidates is not None:
            pool = [int(c) for c in candidates[i]]
        else:
            pool = list(range(N_ITEMS))
            if mask_history:
                seen = {int(h) for h in history[i][: int(length[i])]}
                pool = [j for j in pool if j not in seen or j == t]
        rank = sum(1 for j in pool if j != t and s[j] >= s[t])
        for k in ks:
            if rank < k:
                hr[k] += 1
                ndcg[k] += 1 / math.log2(rank + 2)
    n = len(target)
    prefix = "cand_" if candidates is not None else ""
    out = {}
    for k in ks:
        out[f"{prefix}hr@{k}"] = hr[k] / n
        out[f"{prefix}ndcg@{k}"] = ndcg[k] / n
    return out


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    length = rng.integers(1, WIDTH + 1, B)
    history = rng.integers(0, N_ITEMS, (B, WIDTH))
    history[np.arange(WIDTH)[None, :] >= length[:, None]] = N_ITEMS  # padding id
    target = rng.integers(0, N_ITEMS, B)
    target[:5] = history[:5, 0]  # some targets also appear in the history
    scores = rng.integers(0, 4, (B, N_ITEMS)).astype(np.float32)  # heavy ties
    scores[5:10] = rng.normal(size=(5, N_ITEMS))  # and some without ties
    return scores, history, length, target


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mask_history", [False, True])
def test_full_ranking_matches_reference(seed: int, mask_history: bool) -> None:
    scores, history, length, target = random_case(seed)
    ks = (1, 5, 10, 20)
    split = Split(history, length, target)
    got = evaluate_scorer(
        lambda h, ln: torch.from_numpy(scores),  # one batch holds every sample
        split,
        N_ITEMS,
        mask_history=mask_history,
        batch_size=B,
    )
    want = reference_metrics(scores, history, length, target, ks, mask_history)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["num_samples"] == B and got["mask_history"] is mask_history


def test_batching_does_not_change_metrics() -> None:
    scores, history, length, target = random_case(3)
    split = Split(history, length, target)
    table = torch.from_numpy(scores)
    calls = []

    def scorer(h: torch.Tensor, ln: torch.Tensor) -> torch.Tensor:
        start = sum(calls)
        calls.append(len(h))
        return table[start : start + len(h)]

    got = evaluate_scorer(scorer, split, N_ITEMS, mask_history=True, batch_size=7)
    assert calls == [7] * 5 + [5]
    want = reference_metrics(scores, history, length, target, (1, 5, 10, 20), True)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12)


def test_ties_are_pessimistic() -> None:
    scores = torch.zeros(1, 5)
    assert int(full_ranks(scores, torch.tensor([2]))[0]) == 4  # all tied: last
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert int(full_ranks(scores, torch.tensor([1]))[0]) == 2
    assert int(full_ranks(scores, torch.tensor([0]))[0]) == 3
    out = metrics_from_ranks(torch.tensor([0, 1, 4]), (1, 5))
    assert out["hr@1"] == pytest.approx(1 / 3)
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 3)


def test_history_exclusion_ignores_padding_and_keeps_target() -> None:
    history = torch.tensor([[2, 3, 2, 5, 5], [4, 5, 5, 5, 5]])
    length = torch.tensor([3, 1])
    target = torch.tensor([3, 0])
    excl = history_exclusion(history, length, target, 5)
    assert excl.tolist() == [[False, False, True, False, False], [False, False, False, False, True]]


@pytest.mark.parametrize("seed", [0, 4])
def test_candidate_ranking_matches_reference(seed: int) -> None:
    scores, history, length, target = random_case(seed)
    rng = np.random.default_rng(seed + 100)
    count = 8
    cands = np.stack([rng.permutation(np.r_[t, rng.choice(np.setdiff1d(np.arange(N_ITEMS), [t]), count - 1, replace=False)]) for t in target])
    split = Split(history, length, target)
    got = evaluate_scorer(lambda h, ln: torch.from_numpy(scores), split, N_ITEMS, candidates=cands, batch_size=B)
    want = reference_metrics(scores, history, length, target, (1, 5), False, candidates=cands)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["cand_count"] == count and "cand_hr@10" not in got


def test_candidate_errors() -> None:
    scores = torch.randn(2, 6)
    target = torch.tensor([0, 1])
    with pytest.raises(IloraError, match="does not contain its target"):
        candidate_ranks(scores, target, torch.tensor([[0, 2, 3], [0, 2, 3]]))
    with pytest.raises(IloraError, match="repeats"):
        candidate_ranks(scores, target, torch.tensor([[0, 2, 2], [1, 2, 3]]))
    with pytest.raises(IloraError, match="candidate ids"):
        candidate_ranks(scores, target, torch.tensor([[0, 2, 6], [1, 2, 3]]))


def test_nan_scores_fail_loudly() -> None:
    scores = torch.zeros(1, 4)
    scores[0, 2] = float("nan")
    with pytest.raises(IloraError, match="NaN"):
        full_ranks(scores, torch.tensor([1]))


def test_a_history_id_outside_the_catalog_is_named_not_scattered():
    from ilora.rec.metrics import history_mask

    history = torch.tensor([[1, 2, 9], [3, 11, 9]])  # 9 pads the first row (length 2); 11 is outside 0..9
    with pytest.raises(IloraError, match="sample 1, position 1: item id 11, expected 0..9"):
        history_mask(history, torch.tensor([2, 3]), 10)
    assert history_mask(history[:1], torch.tensor([2]), 10).nonzero()[:, 1].tolist() == [1, 2]


def test_an_empty_split_is_an_error_not_zero_metrics() -> None:
    empty = Split(np.zeros((0, WIDTH), dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    with pytest.raises(IloraError, match="the split has no samples"):
        evaluate_scorer(lambda h, ln: torch.zeros(len(h), N_ITEMS), empty, N_ITEMS)

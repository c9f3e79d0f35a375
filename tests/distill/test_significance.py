"""The paired bootstrap of a distillation gain against a loop written out sample by sample."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ilora.distill.significance import paired_gain_intervals
from ilora.errors import IloraError


def metric(rank: int, name: str) -> float:
    kind, k = name.split("@")
    if rank >= int(k):
        return 0.0
    return 1.0 if kind == "hr" else 1.0 / math.log2(rank + 2)


def reference_interval(base: list[int], dist: list[int], name: str, resamples: int, seed: int, level: float):
    """Resample by resample: draw N sample indices, the same for both students, and take the
    relative gain of the two means (infinite when only the distilled student has hits there, 0
    when neither has); the interval's ends are the resamples' gains at the two tail quantiles,
    sorted and counted out by hand (the lower end rounded down, the upper up)."""
    rng = np.random.default_rng(seed)
    n, gains = len(base), []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        mb = sum(metric(base[i], name) for i in idx) / n
        md = sum(metric(dist[i], name) for i in idx) / n
        gains.append(md / mb - 1 if mb > 0 else (math.inf if md > 0 else 0.0))
    gains.sort()
    tail = (1 - level) / 2
    low = gains[math.floor(tail * (resamples - 1))]
    high = gains[math.ceil((1 - tail) * (resamples - 1))]
    return [low, None if math.isinf(high) else high]


def test_the_interval_and_counts_match_the_sample_by_sample_loop():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 30, size=57).tolist()
    dist = [max(0, r - int(rng.integers(-3, 6))) for r in base]  # mostly better, sometimes worse
    out = paired_gain_intervals(torch.tensor(base), torch.tensor(dist), ks=(5, 10, 20), resamples=300, seed=7, level=0.9)
    assert out["samples"] == 57 and out["resamples"] == 300
    for name in ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20"):
        m = out["metrics"][name]
        b = [metric(r, name) for r in base]
        d = [metric(r, name) for r in dist]
        assert m["gain"] == pytest.approx(sum(d) / sum(b) - 1)
        assert m["interval"] == pytest.approx(reference_interval(base, dist, name, 300, 7, 0.9), abs=1e-12)
        assert (m["better"], m["worse"], m["same"]) == (
            sum(x > y for x, y in zip(d, b)), sum(x < y for x, y in zip(d, b)), sum(x == y for x, y in zip(d, b))
        )


def test_identical_students_gain_nothing_and_a_better_one_excludes_zero():
    ranks = torch.tensor([0, 3, 7, 12, 25, 1, 4, 9] * 10)
    same = paired_gain_intervals(ranks, ranks.clone(), ks=(10,), resamples=200)["metrics"]["ndcg@10"]
    assert same["gain"] == 0.0 and same["interval"] == [0.0, 0.0] and (same["better"], same["worse"]) == (0, 0)
    better = paired_gain_intervals(ranks, ranks // 2, ks=(10,), resamples=200)["metrics"]["ndcg@10"]
    assert better["gain"] > 0 and better["interval"][0] > 0 and better["worse"] == 0


def test_a_baseline_without_hits_has_no_gain_and_mismatched_students_are_refused():
    out = paired_gain_intervals(torch.tensor([5, 6, 7]), torch.tensor([0, 6, 7]), ks=(1,), resamples=50)["metrics"]["hr@1"]
    assert out["gain"] is None and out["interval"] is None and out["better"] == 1
    with pytest.raises(IloraError, match="same test samples"):
        paired_gain_intervals(torch.tensor([1, 2, 3]), torch.tensor([1, 2]))
    assert paired_gain_intervals(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))["metrics"] == {}


def test_resamples_without_a_baseline_hit_make_the_upper_end_unbounded_not_smaller():
    """One baseline hit in 20 samples: about a third of the resamples miss it, and there only the
    distilled student scores. Dropping them would shrink the upper end; it is unbounded."""
    base = torch.tensor([0] + [5] * 19)
    dist = torch.tensor([0, 0, 0] + [5] * 17)
    m = paired_gain_intervals(base, dist, ks=(1,), resamples=400, seed=1)["metrics"]["hr@1"]
    assert m["gain"] == pytest.approx(2.0)
    assert m["interval"][1] is None and math.isfinite(m["interval"][0])
    assert m["interval"] == reference_interval(base.tolist(), dist.tolist(), "hr@1", 400, 1, 0.95)

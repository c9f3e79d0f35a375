"""Synthetic data: determinism, readable unique titles, real sequential signal."""

from __future__ import annotations

import numpy as np
import pytest

from ilora.data.synthetic import make_synthetic
from ilora.errors import ConfigError


def test_same_seed_same_dataset_other_seed_differs() -> None:
    a, b, c = (make_synthetic(users=200, items=100, seed=s) for s in (1, 1, 2))
    assert a.catalog == b.catalog
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(a.splits[name].history, b.splits[name].history)
        np.testing.assert_array_equal(a.splits[name].target, b.splits[name].target)
    assert a.catalog != c.catalog or not np.array_equal(a.splits["test"].target, c.splits["test"].target)


def test_titles_unique_and_readable() -> None:
    ds = make_synthetic(users=10, items=3000, seed=0)
    titles = ds.catalog.titles
    assert len(set(titles)) == len(titles) == 3000
    assert all(t and t[0].isupper() and 2 <= len(t.split()) <= 5 for t in titles)


def test_defaults_are_a_small_valid_dataset() -> None:
    ds = make_synthetic()
    ds.validate()
    assert ds.num_items == 500 and ds.max_len == 10
    assert len(ds.splits["test"]) == 1000 and len(ds.splits["val"]) == 1000
    assert 10_000 < len(ds.splits["train"]) < 30_000


def hit_rate(scores: np.ndarray, targets: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean())


def test_last_item_markov_model_beats_popularity_by_far() -> None:
    ds = make_synthetic(users=1000, items=500, seed=0)
    train, test, n = ds.splits["train"], ds.splits["test"], ds.num_items
    # a transition-count model fitted on train only
    last = train.history[np.arange(len(train)), train.length - 1]
    counts = np.zeros((n, n))
    np.add.at(counts, (last, train.target), 1)
    popularity = np.bincount(train.target, minlength=n).astype(float)
    test_last = test.history[np.arange(len(test)), test.length - 1]
    markov_scores = counts[test_last] + 1e-6 * popularity
    pop_scores = np.tile(popularity, (len(test), 1))
    markov, pop = hit_rate(markov_scores, test.target, 10), hit_rate(pop_scores, test.target, 10)
    assert markov > 0.5 and pop < 0.15 and markov > 4 * pop


@pytest.mark.parametrize(
    "options",
    [{"users": 0}, {"items": 1}, {"follow": 0.8, "stay": 0.3}, {"min_interactions": 1}, {"genres": 1000}, {"seed": -1}],
)
def test_bad_options(options: dict) -> None:
    with pytest.raises(ConfigError):
        make_synthetic(**{"users": 10, "items": 50, **options})

"""How sure is a distillation gain? A paired bootstrap over the test samples.

Both students are evaluated on the same test samples, so each sample gives a pair of
metric values (`ilora.rec.metrics.per_sample_metrics` of the two rank vectors that
`train_sasrec` writes to ``test_ranks.safetensors``). `paired_gain_intervals` resamples
the samples with replacement ``resamples`` times (the same resampled samples for both
students: a paired bootstrap) and reports, per metric, the relative gain
``mean(distilled) / mean(baseline) - 1`` on the full test set, the central ``level``
percentile interval of that gain over the resamples, and how many samples the distilled
student ranks better, worse or the same on that metric.

On LastFM's 122 test samples a single extra hit at HR@10 moves the gain by tens of percent;
an interval that straddles 0 says the measured gain could be noise. The interval covers
the sampling of test users only, not the students' training seeds.
"""

from __future__ import annotations

import numpy as np
import torch

from ilora.errors import IloraError
from ilora.rec.metrics import FULL_KS, per_sample_metrics

RESAMPLES = 2000
LEVEL = 0.95
INDEX_BUDGET = 20_000_000  # sample indices drawn at once (160 MB); memory beyond them is O(N x metrics)


def _bootstrap_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, columns)`` means of ``values`` (N, columns) over rows drawn with replacement
    (each resample: N indices, counted with `np.bincount`, so no resample is materialised)."""
    n = values.shape[0]
    chunk = max(1, min(resamples, INDEX_BUDGET // n))
    means = []
    for start in range(0, resamples, chunk):
        for row in rng.integers(0, n, size=(min(chunk, resamples - start), n)):
            means.append(np.bincount(row, minlength=n) @ values / n)
    return np.stack(means)


def _relative_gains(base: np.ndarray, distilled: np.ndarray) -> np.ndarray:
    """``distilled / base - 1`` per resample; +inf where only the distilled student has hits, 0
    where neither has any (nothing to compare: no change)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base > 0, distilled / base - 1, np.where(distilled > 0, np.inf, 0.0))


def metric_intervals(gain_interval: dict[str, object] | None) -> dict[str, dict[str, object]]:
    """The per-metric part of a `paired_gain_intervals` result; empty for None or an
    ``{"unavailable": ...}`` note."""
    return (gain_interval or {}).get("metrics", {})  # type: ignore[return-value]


def gain_text(gain: float | None, percent: str = " %") -> str:
    """A relative gain in percent (``percent`` is the unit as written); n/a for None."""
    return "n/a" if gain is None else f"{100 * gain:+.1f}{percent}"


def interval_text(interval: list[float | None] | None, percent: str = " %") -> str:
    """An interval of `paired_gain_intervals` in percent (``percent`` is the unit as written);
    an upper end of None is unbounded."""
    if interval is None:
        return "n/a"
    high = "unbounded" if interval[1] is None else f"{100 * interval[1]:+.1f}{percent}"
    return f"{100 * interval[0]:+.1f}{percent} to {high}"


def paired_gain_intervals(
    baseline_ranks: torch.Tensor,
    distilled_ranks: torch.Tensor,
    ks: tuple[int, ...] = FULL_KS,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, object]:
    """``{"samples", "resamples", "level", "seed", "metrics"}``; ``metrics`` holds, per metric
    (``hr@K``, ``ndcg@K``): ``gain`` (None when the baseline's mean is 0), ``interval`` (the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resamples' gains, the lower one
    rounded down and the upper one up to a resample's value; a resample whose baseline has no
    hit counts as an infinite gain, and an upper end that lands there is None: unbounded; the
    whole interval is None when the baseline's mean is 0) and ``better`` / ``worse`` / ``same``
    (samples)."""
    if baseline_ranks.shape != distilled_ranks.shape or baseline_ranks.ndim != 1:
        raise IloraError(
            f"paired comparison needs the two students' ranks on the same test samples; got {tuple(baseline_ranks.shape)} and {tuple(distilled_ranks.shape)}"
        )
    if not 0 < level < 1 or resamples < 1:
        raise IloraError(f"level must be in (0, 1) and resamples positive; got {level} and {resamples}")
    base = per_sample_metrics(baseline_ranks, ks)
    dist = per_sample_metrics(distilled_ranks, ks)
    names = list(base)
    n = baseline_ranks.numel()
    out: dict[str, dict[str, object]] = {}
    summary: dict[str, object] = {"samples": n, "resamples": resamples, "level": level, "seed": seed, "metrics": out}
    if n == 0:
        return summary
    b = np.stack([base[m].numpy() for m in names], axis=1)
    d = np.stack([dist[m].numpy() for m in names], axis=1)
    rng = np.random.default_rng(seed)
    # one draw of resampled rows for both students: row i of b and of d is the same sample
    both = _bootstrap_means(np.concatenate([b, d], axis=1), resamples, rng)
    boot_b, boot_d = both[:, : len(names)], both[:, len(names) :]
    tail = (1 - level) / 2
    for j, name in enumerate(names):
        full_b, full_d = b[:, j].mean(), d[:, j].mean()
        interval = None
        if full_b > 0:
            rel = _relative_gains(boot_b[:, j], boot_d[:, j])
            low, high = np.quantile(rel, tail, method="lower"), np.quantile(rel, 1 - tail, method="higher")
            interval = [float(low), None if np.isinf(high) else float(high)]
        out[name] = {
            "gain": None if full_b == 0 else float(full_d / full_b - 1),
            "interval": interval,
            "better": int((d[:, j] > b[:, j]).sum()),
            "worse": int((d[:, j] < b[:, j]).sum()),
            "same": int((d[:, j] == b[:, j]).sum()),
        }
    return summary

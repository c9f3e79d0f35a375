"""Evaluate a scorer on a split: full-ranking metrics plus candidate-set metrics.

A scorer maps a batch ``(history (B, L), length (B,))`` to scores ``(B, num_items)``.
`evaluate_sasrec` scores with a SASRec model; `evaluate_popularity` with the
train-split popularity baseline (how often each item is a train target). Both use the
same metrics (`ilora.rec.metrics`) and the same fixed candidate sets
(`ilora.data.candidates.candidate_sets`, seeded per split), so their numbers compare.
With ``ranks_file`` the target's full-ranking rank of every sample is also written there
(safetensors, key ``ranks``; `load_ranks`), for paired comparisons of two models on the
same samples (`ilora.distill.significance`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ilora.data.dataset import SeqDataset, Split
from ilora.errors import IloraError
from ilora.rec.metrics import CAND_KS, FULL_KS, candidate_ranks, full_ranks, history_exclusion, metrics_from_ranks
from ilora.rec.sasrec import SASRec, check_sasrec_items
from ilora.state_io import save_tensors

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fixed_candidates(
    split: Split,
    num_items: int,
    *,
    split_name: str,
    count: int = 20,
    seed: int = 0,
    out: str | Path | None = None,
) -> np.ndarray:
    """The fixed candidate sets of ``split`` (target + ``count - 1`` items not in the history).

    With ``out``, the sets are also written there (`ilora.data.candidates.save_candidates`).
    """
    from ilora.data.candidates import candidate_sets, save_candidates

    cands = candidate_sets(split, num_items, count=count, seed=seed, split_name=split_name)
    if out is not None:
        save_candidates(out, cands)
    return cands


def evaluate_scorer(
    scorer: Scorer,
    split: Split,
    num_items: int,
    *,
    candidates: np.ndarray | torch.Tensor | None = None,
    mask_history: bool = False,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    ranks_file: str | Path | None = None,
) -> dict[str, object]:
    """Full-ranking HR/NDCG@{1,5,10,20} and, given candidate sets, ``cand_hr@K``/``cand_ndcg@K``;
    with ``ranks_file``, the full-ranking ranks saved there (`save_ranks`). An empty split is
    an `IloraError`."""
    if batch_size < 1:
        raise IloraError(f"batch_size must be positive, got {batch_size}")
    n = len(split)
    if n == 0:
        raise IloraError("evaluation: the split has no samples; metrics over none are undefined")
    cand = None if candidates is None else torch.as_tensor(np.asarray(candidates), dtype=torch.long)
    if cand is not None and cand.shape[0] != n:
        raise IloraError(f"{cand.shape[0]} candidate sets for {n} samples")
    ranks, cranks = [], []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            # copies: a split's arrays may be read-only views of its Parquet file
            hist = torch.tensor(split.history[sl], device=device)
            length = torch.tensor(split.length[sl], device=device)
            target = torch.tensor(split.target[sl], device=device)
            scores = scorer(hist, length).float()
            if scores.shape != (len(target), num_items):
                raise IloraError(f"scorer returned shape {tuple(scores.shape)}, expected ({len(target)}, {num_items})")
            exclude = history_exclusion(hist, length, target, num_items) if mask_history else None
            ranks.append(full_ranks(scores, target, exclude).cpu())
            if cand is not None:
                cranks.append(candidate_ranks(scores, target, cand[sl].to(device)).cpu())
    result: dict[str, object] = {"num_samples": n, "mask_history": mask_history}
    all_ranks = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    result.update(metrics_from_ranks(all_ranks, FULL_KS))
    if ranks_file is not None:
        save_ranks(all_ranks, ranks_file)
    if cand is not None:
        count = int(cand.shape[1])
        result["cand_count"] = count
        all_cranks = torch.cat(cranks) if cranks else torch.zeros(0, dtype=torch.long)
        result.update(metrics_from_ranks(all_cranks, tuple(k for k in CAND_KS if k < count), prefix="cand_"))
    return result


def save_ranks(ranks: torch.Tensor, path: str | Path) -> None:
    """The ``(N,)`` ranks (0 = first) as a safetensors file, key ``ranks``, written atomically."""
    save_tensors({"ranks": ranks.to(torch.int64).contiguous()}, path)


def load_ranks(path: str | Path) -> torch.Tensor:
    """The ranks `save_ranks` wrote; `IloraError` naming the file if it holds anything else."""
    from ilora.state_io import load_tensors

    tensors = load_tensors(path, "SASRec's ranks from `rec eval --save-ranks`")
    ranks = tensors.get("ranks")
    found = ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in sorted(tensors.items())) or "nothing"
    if set(tensors) != {"ranks"} or ranks.ndim != 1 or ranks.dtype != torch.int64 or (ranks.numel() and int(ranks.min()) < 0):
        raise IloraError(f"{path}: expected one int64 vector 'ranks' of non-negative ranks, found {found}")
    return ranks


def sasrec_scorer(model: SASRec) -> Scorer:
    """A scorer calling ``model.scores`` (the caller sets eval mode and no_grad)."""
    return lambda history, length: model.scores(history, length)


def evaluate_sasrec(
    model: SASRec,
    dataset: SeqDataset,
    split: str = "test",
    *,
    candidates: np.ndarray | torch.Tensor | None = None,
    cand_seed: int = 0,
    count: int = 20,
    mask_history: bool = False,
    batch_size: int = 1024,
    candidates_out: str | Path | None = None,
    ranks_file: str | Path | None = None,
    source: str | Path = "SASRec",
) -> dict[str, object]:
    """Metrics of ``model`` (read from ``source``, which errors name) on ``dataset``'s ``split``
    (model put in eval mode, then restored).

    Candidate sets: ``candidates`` if given, else `fixed_candidates` with ``count`` and
    ``cand_seed`` (``count=0``: no candidate metrics), written to ``candidates_out`` if set.
    """
    data = dataset.split(split)
    check_sasrec_items(model, dataset.num_items, source, dataset.max_len)
    cands = _resolve_candidates(data, dataset.num_items, split, candidates, count, cand_seed, candidates_out)
    was_training = model.training
    model.eval()
    try:
        result = evaluate_scorer(
            sasrec_scorer(model),
            data,
            dataset.num_items,
            candidates=cands,
            mask_history=mask_history,
            batch_size=batch_size,
            device=next(model.parameters()).device,
            ranks_file=ranks_file,
        )
    finally:
        model.train(was_training)
    return {"split": split, **result, **({"cand_seed": cand_seed} if candidates is None and count else {})}


def popularity_scores(train: Split, num_items: int) -> torch.Tensor:
    """How often each item is the next item in the train split: ``(num_items,)`` float."""
    counts = np.bincount(train.target, minlength=num_items)[:num_items]
    return torch.from_numpy(counts.astype(np.float32))


def evaluate_popularity(
    dataset: SeqDataset,
    split: str = "test",
    *,
    candidates: np.ndarray | torch.Tensor | None = None,
    cand_seed: int = 0,
    count: int = 20,
    mask_history: bool = False,
    batch_size: int = 1024,
) -> dict[str, object]:
    """The train-popularity baseline on ``split``, with the same metrics as `evaluate_sasrec`."""
    data = dataset.split(split)
    pop = popularity_scores(dataset.split("train"), dataset.num_items)
    cands = _resolve_candidates(data, dataset.num_items, split, candidates, count, cand_seed, None)
    result = evaluate_scorer(
        lambda history, length: pop.expand(history.shape[0], -1),
        data,
        dataset.num_items,
        candidates=cands,
        mask_history=mask_history,
        batch_size=batch_size,
    )
    return {"split": split, **result}


def _resolve_candidates(
    data: Split,
    num_items: int,
    split: str,
    candidates: np.ndarray | torch.Tensor | None,
    count: int,
    seed: int,
    out: str | Path | None,
) -> np.ndarray | torch.Tensor | None:
    if candidates is not None:
        return candidates
    if count <= 0:
        return None
    return fixed_candidates(data, num_items, split_name=split, count=count, seed=seed, out=out)

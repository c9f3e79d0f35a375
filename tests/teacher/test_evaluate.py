"""Evaluation metrics of both protocols against slow, obviously-correct references written here."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ilora.errors import IloraError
from ilora.teacher.evaluate import generate_metrics, rank_of_target, same_answer_mask, score_metrics, target_columns

# -- score protocol ---------------------------------------------------------------------------


def reference_rank(row: list[float], target: int) -> int:
    """Position of the target when candidates are sorted by score, best first, the target
    placed after every candidate that ties with it (pessimistic)."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], j == target))
    return order.index(target)


def reference_metrics(scores: torch.Tensor, cols: torch.Tensor) -> dict[str, float]:
    totals = {"hr@1": 0.0, "hr@5": 0.0, "ndcg@5": 0.0, "ndcg@10": 0.0, "mrr": 0.0, "mean_target_logprob": 0.0}
    rows = scores.tolist()
    for row, col in zip(rows, cols.tolist(), strict=True):
        r = reference_rank(row, col)
        totals["hr@1"] += r == 0
        totals["hr@5"] += r < 5
        totals["ndcg@5"] += 1 / math.log2(r + 2) if r < 5 else 0.0
        totals["ndcg@10"] += 1 / math.log2(r + 2) if r < 10 else 0.0
        totals["mrr"] += 1 / (r + 1)
        totals["mean_target_logprob"] += row[col]
    return {k: v / len(rows) for k, v in totals.items()}


@pytest.mark.parametrize("seed", range(20))
def test_score_metrics_equal_a_brute_force_pessimistic_ranking(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n, c = 9, 12
    scores = -torch.randint(0, 4, (n, c), generator=gen).double()  # few values: many ties
    scores[torch.rand(n, c, generator=gen) < 0.15] = -math.inf  # -inf is a valid score
    cols = torch.randint(0, c, (n,), generator=gen)
    expected_rank = torch.tensor([reference_rank(row, col) for row, col in zip(scores.tolist(), cols.tolist(), strict=True)])
    assert torch.equal(rank_of_target(scores, cols), expected_rank)
    got, expected = score_metrics(scores, cols), reference_metrics(scores, cols)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["valid_ratio"] == 1.0


def test_a_tie_with_the_target_counts_against_it() -> None:
    scores = torch.tensor([[0.0, 0.0, 0.0], [-math.inf, -math.inf, -1.0], [-1.0, -math.inf, -math.inf]])
    assert rank_of_target(scores, torch.tensor([0, 1, 0])).tolist() == [2, 2, 0]


def test_a_candidate_with_the_targets_answer_ranks_above_it_whatever_the_rounding() -> None:
    scores = torch.tensor([[1.0, 1.0 - 1e-6, 0.5], [0.2, 0.9, 0.1]])
    same = torch.tensor([[True, True, False], [False, False, True]])  # row 0: columns 0 and 1 share an answer
    assert rank_of_target(scores, torch.tensor([0, 2])).tolist() == [0, 2]
    assert rank_of_target(scores, torch.tensor([0, 2]), same).tolist() == [1, 2]
    assert score_metrics(scores, torch.tensor([0, 2]), same)["hr@1"] == 0.0


def test_same_answer_mask_equals_a_token_by_token_comparison() -> None:
    """Titles equal once cut (same tokens up to their length, whatever lies past it) are twins."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(0, 3, (30, 4)))  # few tokens: many equal titles
    length = torch.as_tensor(rng.integers(1, 5, 30))
    table = SimpleNamespace(ids=ids, length=length)
    candidates = np.stack([rng.permutation(30)[:6] for _ in range(40)])
    target = candidates[np.arange(40), rng.integers(0, 6, 40)]
    got = same_answer_mask(table, candidates, target)
    tokens = [ids[i, : int(length[i])].tolist() for i in range(30)]
    expected = [[tokens[c] == tokens[t] for c in row] for row, t in zip(candidates.tolist(), target.tolist())]
    assert got.tolist() == expected
    assert 0 < sum(map(sum, expected)) - 40  # twins beyond the target itself occur


def test_nan_scores_are_an_error_naming_the_sample() -> None:
    scores = torch.randn(4, 5)
    scores[2, 3] = math.nan  # not the target's column: it would still rank the target wrongly
    with pytest.raises(IloraError, match="sample 2"):
        score_metrics(scores, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(IloraError, match="sample 0"):
        rank_of_target(torch.full((2, 3), math.nan), torch.tensor([0, 1]))


# -- generate protocol ------------------------------------------------------------------------


def reference_generate(texts: list[str], candidates: list[list[str]], targets: list[int]) -> dict[str, float]:
    """LLaRA's rule, written out: the output's first line (after stripping) is matched
    case-insensitively against every candidate title as a substring; exactly one match is a
    valid answer, correct when that title is the target's."""
    valid = correct = 0
    for text, titles, target in zip(texts, candidates, targets, strict=True):
        line = text.strip().partition("\n")[0].strip().lower()
        found = [title.strip().lower() for title in titles if title.strip().lower() in line]
        if len(found) == 1:
            valid += 1
            correct += found[0] == titles[target].strip().lower()
    n = len(texts)
    return {"valid_ratio": valid / n, "hr@1": correct / valid if valid else math.nan, "hr@1_all": correct / n}


WORDS = ["Muse", "Muse Band", "AC/DC", "enigma", "Moby", "Sigur Rós"]


@pytest.mark.parametrize("seed", range(10))
def test_generate_metrics_equal_llara_first_line_matching(seed: int) -> None:
    rng = random.Random(seed)
    n = 12
    candidates = [rng.sample(WORDS, 3) for _ in range(n)]
    targets = [rng.randrange(3) for _ in range(n)]
    pieces = WORDS + ["x", "\n", "MUSE", " ", "the answer is"]
    texts = ["".join(rng.choice([" ", ""]) + rng.choice(pieces) for _ in range(rng.randint(0, 4))) for _ in range(n)]
    got = generate_metrics(texts, candidates, targets)
    expected = reference_generate(texts, candidates, targets)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12, nan_ok=True), (key, texts)


def test_generate_metrics_edge_cases() -> None:
    cands = [["Muse", "Moby", "Enigma"]] * 5
    texts = [
        "  muse\n",  # valid, correct (case, spaces, newline)
        "\nMoby",  # leading blank line is stripped: valid, wrong
        "Enigma and Moby",  # two titles: invalid
        "nothing\nMuse",  # title only on the second line: invalid
        "",  # empty: invalid
    ]
    got = generate_metrics(texts, cands, [0] * 5)
    assert got == {"valid_ratio": 2 / 5, "hr@1": 1 / 2, "hr@1_all": 1 / 5}
    none_valid = generate_metrics(texts[2:], cands[2:], [0] * 3)
    assert none_valid["valid_ratio"] == 0 and none_valid["hr@1_all"] == 0 and math.isnan(none_valid["hr@1"])


# -- target columns ---------------------------------------------------------------------------


def test_target_columns_find_the_target_in_each_row() -> None:
    rng = np.random.default_rng(0)
    candidates = np.stack([rng.permutation(50)[:7] for _ in range(30)])
    cols = rng.integers(0, 7, 30)
    target = candidates[np.arange(30), cols]
    got = target_columns(candidates, target)
    expected = [next(j for j in range(7) if candidates[i, j] == target[i]) for i in range(30)]
    assert got.tolist() == expected


def test_target_columns_reject_a_row_without_the_target_or_with_it_twice() -> None:
    candidates = np.array([[1, 2, 3], [4, 5, 6], [7, 7, 8]])
    with pytest.raises(IloraError, match="row 1 .* 0 times"):
        target_columns(candidates, np.array([1, 9, 7]))
    with pytest.raises(IloraError, match="row 2 .* 2 times"):
        target_columns(candidates, np.array([1, 4, 7]))


def test_target_columns_reject_a_row_that_repeats_another_candidate() -> None:
    candidates = np.array([[1, 2, 3], [4, 5, 5]])
    with pytest.raises(IloraError, match=r"row 1 repeats an item \(\[4, 5, 5\]\)"):
        target_columns(candidates, np.array([1, 4]))



def test_target_columns_reject_candidate_rows_that_do_not_match_the_samples() -> None:
    """One candidate row per sample: other counts (a set from another split or --limit) are
    refused by name, including one row that would broadcast against several targets."""
    with pytest.raises(IloraError, match=r"shape \(3, 3\) for 2 targets; expected one row per sample"):
        target_columns(np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]]), np.array([1, 4]))
    with pytest.raises(IloraError, match=r"shape \(1, 3\) for 3 targets"):
        target_columns(np.array([[3, 5, 6]]), np.array([3, 5, 6]))
    with pytest.raises(IloraError, match="expected one row per sample"):
        target_columns(np.array([1, 2, 3]), np.array([1, 2, 3]))


@pytest.mark.parametrize("seed", range(10))
def test_twin_candidates_equal_a_pairwise_search(seed: int) -> None:
    """Rows holding two items with equal keys (any pair; with target, the target's pairs),
    against a search of every pair written here."""
    from ilora.teacher.evaluate import twin_candidates

    rng = np.random.default_rng(seed)
    keys = [f"title {k}" for k in rng.integers(0, 40, 60)]  # 60 items, 40 titles: many twins
    candidates = np.stack([rng.permutation(60)[:6] for _ in range(25)])
    target = candidates[np.arange(25), rng.integers(0, 6, 25)]
    any_pair = [r for r, row in enumerate(candidates.tolist()) if any(keys[a] == keys[b] for i, a in enumerate(row) for b in row[i + 1 :])]
    of_target = [r for r, row in enumerate(candidates.tolist()) if any(b != target[r] and keys[b] == keys[target[r]] for b in row)]
    found = twin_candidates(candidates, keys)
    assert [r for r, _, _ in found] == any_pair and 0 < len(of_target) < len(any_pair)
    assert all(a != b and keys[a] == keys[b] and {a, b} <= set(candidates[r]) for r, a, b in found)
    found = twin_candidates(candidates, keys, target)
    assert [r for r, _, _ in found] == of_target
    assert all(a == target[r] and b != a and keys[b] == keys[a] and b in candidates[r] for r, a, b in found)

def test_a_title_that_decodes_to_nothing_is_an_error_not_a_match_for_everything() -> None:
    from types import SimpleNamespace

    from ilora.teacher.evaluate import answer_texts

    table = SimpleNamespace(decoded=lambda tokenizer: ["Queen", " ", "Muse"])
    with pytest.raises(IloraError, match="item 1's title decodes to empty text"):
        answer_texts(SimpleNamespace(title_table=table, tokenizer=None))
    table.decoded = lambda tokenizer: ["Queen", "Muse"]
    assert answer_texts(SimpleNamespace(title_table=table, tokenizer=None)) == ["Queen", "Muse"]


def test_generation_records_name_items_not_columns_and_judge_as_the_metrics_do(monkeypatch):
    import ilora.teacher.evaluate as evaluate

    monkeypatch.setattr(evaluate, "answer_texts", lambda teacher: ["alpha", "beta", "gamma", "delta"])
    candidates = np.array([[2, 0, 3], [1, 3, 0], [0, 1, 2]])
    texts = ["Gamma is it\nbeta", "delta or beta", "nothing here"]
    records = evaluate.generation_records(None, texts, candidates, [0, 2, 1])
    assert records == [
        {"sample": 0, "target": 2, "target_answer": "gamma", "text": texts[0], "named": [2], "valid": True, "correct": True},  # first line only
        {"sample": 1, "target": 0, "target_answer": "alpha", "text": texts[1], "named": [1, 3], "valid": False, "correct": False},
        {"sample": 2, "target": 1, "target_answer": "beta", "text": texts[2], "named": [], "valid": False, "correct": False},
    ]
    metrics = evaluate.teacher_generate_metrics(None, texts, candidates, [0, 2, 1])
    assert metrics["valid_ratio"] == 1 / 3 and metrics["hr@1"] == 1.0

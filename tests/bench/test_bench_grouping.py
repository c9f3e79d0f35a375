"""`ilora bench grouping`: exact token accounting of length-grouped batches (no timing assertions)."""

from __future__ import annotations

import numpy as np
import torch

from ilora.bench.grouping import padded_tokens, run_bench


def test_padded_tokens_is_batch_size_times_longest_prompt() -> None:
    lengths = np.array([5, 9, 3, 7, 2])
    plan = [np.array([0, 1]), np.array([2, 3, 4])]
    assert padded_tokens(plan, lengths) == 2 * 9 + 3 * 7


def test_grouping_bench_counts_tokens_of_the_same_samples() -> None:
    r = run_bench(torch.device("cpu"), quick=True, steps=2, repeats=1, warmup=0)
    e = r["epoch_tokens"]
    assert r["name"] == "grouping" and r["sizes"]["batch_size"] == 8 and r["sizes"]["timed_steps"] == 2
    assert e["real"] <= e["grouped"] <= e["plain"]  # grouping never adds padding
    assert 0 <= e["padding_grouped"] <= e["padding_plain"] < 1
    assert e["real"] == round(r["sizes"]["prompt_tokens"]["mean"] * r["sizes"]["train_samples"])
    assert r["token_ratio"] == e["plain"] / e["grouped"] > 1
    assert r["timed_tokens"]["grouped"] <= r["timed_tokens"]["plain"]
    assert set(r["variants"]) == {"plain", "grouped"} and r["ratio"] > 0


def test_allow_pickle_without_data_is_refused_not_ignored(capsys) -> None:
    from ilora.cli.main import main

    assert main(["bench", "grouping", "--allow-pickle", "--no-record"]) == 2
    assert "--allow-pickle applies to --data's pickles" in capsys.readouterr().err

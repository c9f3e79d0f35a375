"""`ilora bench grouping`: what length-grouped batches (``group_by_length``) save.

Two measurements on one dataset's train split (``--data DIR``, e.g. the LastFM ``.df``
files with ``--allow-pickle``; default: the built-in synthetic dataset), with the
teacher's own prompts (a tiny random Llama's tokenizer trained on the titles, 20
candidates, answers included):

* **Tokens per epoch** (exact, no timing): the tokens a batch of B prompts occupies is
  B x its longest prompt. Summed over the epoch's batches in the trainer's order
  (`epoch_plan`) with and without grouping; ``padding`` is the fraction of those tokens
  that are padding.
* **Time** of the same samples trained both ways: the first ``steps`` global batches of
  the epoch's permutation as they come (``plain``) and after `length_grouped` (one window
  holding all of them), each batch assembled, run forward and backward through the
  teacher's loss (no optimiser step: the same work in both). Variants interleaved, medians.

``ratio`` = plain time / grouped time (> 1: grouping is faster); ``token_ratio`` = plain
tokens / grouped tokens over the whole epoch (what it can save at most in compute that
scales with tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ilora.bench.common import interleave, machine_info, ms, now_utc

BATCH = 16
CANDIDATES = 20


def padded_tokens(plan: list[np.ndarray], lengths: np.ndarray) -> int:
    """Tokens the batches of ``plan`` occupy: each batch is as long as its longest prompt."""
    return int(sum(int(lengths[idx].max()) * len(idx) for idx in plan if len(idx)))


def load(data: str | None, allow_pickle: bool):
    from ilora.data import load_dataset, make_synthetic

    if data is None:
        return make_synthetic(seed=0), "synthetic (ilora data synth defaults)"
    return load_dataset(data, allow_pickle=allow_pickle), str(Path(data).resolve())


def run_bench(
    device: torch.device,
    *,
    quick: bool = False,
    data: str | None = None,
    allow_pickle: bool = False,
    batch_size: int = BATCH,
    steps: int | None = None,
    warmup: int = 1,
    repeats: int = 3,
    budget_s: float | None = None,
) -> dict[str, Any]:
    from ilora.data.candidates import candidate_sets
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.build import build_teacher
    from ilora.teacher.config import TeacherConfig
    from ilora.teacher.train import epoch_plan, length_grouped, prompt_lengths

    steps = steps or (4 if quick else 32)
    batch_size = min(batch_size, 8) if quick else batch_size
    if quick:
        repeats = min(repeats, 2)
    budget_s = budget_s if budget_s is not None else (10.0 if quick else 120.0)
    dataset, source = load(data, allow_pickle)
    train = dataset.split("train")
    cfg = TeacherConfig(llm="tiny", tiny_hidden=64 if quick else 128, tiny_layers=2, batch_size=batch_size, num_candidates=CANDIDATES, device=device.type, lora_dropout=0.0)
    torch.manual_seed(0)
    rec = SASRec(SASRecConfig(num_items=dataset.num_items, max_len=dataset.max_len)).eval()
    bundle = build_teacher(cfg, dataset.catalog, rec, device.type)
    teacher, collator = bundle.teacher.train(), bundle.train_collator
    candidates = candidate_sets(train, dataset.num_items, count=CANDIDATES, seed=0, split_name="train")
    lengths = prompt_lengths(collator, train, candidates)

    # whole epoch, exact token counts
    real = int(lengths.sum())
    plain_epoch = padded_tokens([idx for idx, _ in epoch_plan(len(train), cfg, 0, 0, 10**9)], lengths)
    grouped_epoch = padded_tokens([idx for idx, _ in epoch_plan(len(train), cfg, 0, 0, 10**9, lengths)], lengths)

    # timed: the same samples, as they come and grouped
    order = np.random.default_rng([cfg.seed, 0]).permutation(len(train))[: steps * batch_size]
    grouped_order = length_grouped(order, lengths, batch_size, np.random.default_rng(1))
    plans = {name: [o[i : i + batch_size] for i in range(0, len(o), batch_size)] for name, o in (("plain", order), ("grouped", grouped_order))}
    if sorted(np.concatenate(plans["plain"]).tolist()) != sorted(np.concatenate(plans["grouped"]).tolist()):
        raise AssertionError("grouping bench: the two variants must train the same samples")

    def variant(name: str):
        def run(parts) -> None:
            for idx in plans[name]:
                batch = collator.build(train.history[idx], train.length[idx], candidates[idx], train.target[idx]).to(device)
                teacher.loss(batch).backward()
            teacher.zero_grad(set_to_none=True)

        return run

    times = interleave({name: variant(name) for name in plans}, device, warmup=warmup, repeats=repeats, budget_s=budget_s)
    window = {name: padded_tokens(plan, lengths) for name, plan in plans.items()}
    return {
        "name": "grouping",
        "time": now_utc(),
        "quick": quick,
        "machine": machine_info(device),
        "data": source,
        "sizes": {
            "train_samples": len(train),
            "batch_size": batch_size,
            "timed_steps": steps,
            "candidates": CANDIDATES,
            "llm": f"tiny random Llama, hidden {cfg.tiny_hidden}, {cfg.tiny_layers} layers, vocab {len(teacher.tokenizer)}",
            "prompt_tokens": {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max())},
        },
        "epoch_tokens": {
            "real": real,
            "plain": plain_epoch,
            "grouped": grouped_epoch,
            "padding_plain": 1 - real / plain_epoch,
            "padding_grouped": 1 - real / grouped_epoch,
        },
        "timed_tokens": window,
        "variants": {name: t.summary() for name, t in times.items()},
        "token_ratio": plain_epoch / grouped_epoch,
        "ratio": times["plain"].median / times["grouped"].median,
        "ratio_means": "plain / length-grouped median time of forward + backward over the same samples (> 1: grouping "
        "helps); token_ratio: plain / grouped padded tokens over a whole epoch",
    }


def markdown_table(result: dict[str, Any]) -> list[str]:
    e, s = result["epoch_tokens"], result["sizes"]
    lines = [
        f"Data: {result['data']}; {s['train_samples']} train samples, batch {s['batch_size']}, prompts of "
        f"{s['prompt_tokens']['min']}-{s['prompt_tokens']['max']} tokens (mean {s['prompt_tokens']['mean']:.0f}); {s['llm']}.",
        "",
        "| | tokens per epoch | padding | timed steps: tokens | median ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("plain", "grouped"):
        lines.append(
            f"| {name} | {e[name]:,} | {100 * e['padding_' + name]:.1f} % | {result['timed_tokens'][name]:,} "
            f"| {ms(result['variants'][name]['median_s'])} |"
        )
    lines += ["", f"`token_ratio` (epoch tokens plain / grouped) = {result['token_ratio']:.3f}."]
    return lines

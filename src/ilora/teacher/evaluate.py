"""Teacher evaluation: the score protocol and the generate protocol (iLoRA/LLaRA).

* score (default): every candidate's exact answer log-likelihood; the candidates are
  ranked by it (ties never favour the target). Reports ``hr@1``, ``hr@5``, ``ndcg@5``,
  ``ndcg@10``, ``mrr``, ``mean_target_logprob`` and ``valid_ratio`` = 1.
* generate: greedy generation, then the reference rule: an output is *valid* if exactly
  one candidate title occurs in it (case-insensitive substring, first line only, as
  LLaRA's validation and test steps take it). The first token is never eos (LLaRA's
  ``min_new_tokens=1``). Decoding stops at eos or after
  ``max_new_tokens``: by default the longest (truncated) title + 8 tokens, enough for any
  trained answer; LLaRA generates up to 64, which ``max_new_tokens=64`` reproduces.
  ``valid_ratio`` = valid / all; ``hr@1`` = correct / valid (the iLoRA/LLaRA
  definition, which ignores invalid outputs; NaN with no valid output, where LLaRA reports 0)
  and ``hr@1_all`` = correct / all.
  The titles matched (candidates and target alike) are the teacher's answer texts
  (`answer_texts`): each title as the teacher was trained to write it, i.e. truncated to
  ``max_title_tokens`` tokens and decoded as `ILoRATeacher.generate` decodes, so a
  teacher that writes the trained answer exactly is always matched, long titles included.

Candidates the protocol cannot tell apart (the target and another item with the same answer
tokens for score, two items with the same answer text up to case for generate) are counted in
a logged warning (`warn_about_twin_answers`); the score protocol ranks the target behind its
twins (`same_answer_mask`), the generate protocol counts an output naming both as invalid.

NaN scores are an error (`IloraError` naming the sample); ``-inf`` is a valid score. A split
without samples is an `IloraError` too (`require_samples`): it has no metrics to report.

Given a `Dist` of several ranks, each scores (or generates for) a contiguous share of the
batches and every rank gets the gathered results, in sample order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ilora.data.dataset import Split
from ilora.distributed import SINGLE, Dist
from ilora.errors import ConfigError, IloraError
from ilora.progress import progress
from ilora.rec.metrics import repeated_rows
from ilora.state_io import atomic_write_text, strict_json
from ilora.teacher.model import eval_mode

log = logging.getLogger(__name__)


def rank_of_target(scores: torch.Tensor, target_col: torch.Tensor, same_answer: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of the target among candidates; ties count against the target.

    ``same_answer`` (N, C) bool marks candidates whose answer is the target's (`same_answer_mask`):
    they rank above the target whatever their scores, which are equal only up to floating-point
    rounding (one answer scored at two places of a packed sequence can differ in the last bits).

    Raises `IloraError` naming the first sample (row) with a NaN score, since NaN compares
    false with everything and would rank the target first; ``-inf`` is ranked normally.
    """
    nan = torch.isnan(scores)
    if bool(nan.any()):
        row, col = (int(i) for i in nan.nonzero()[0])
        raise IloraError(f"sample {row}: candidate column {col} has a NaN score; cannot rank it")
    target = scores.gather(1, target_col[:, None])
    others = torch.ones_like(scores, dtype=torch.bool).scatter_(1, target_col[:, None], False)
    above = scores >= target
    if same_answer is not None:
        above = above | same_answer
    return (above & others).sum(1)


def answer_ids(table) -> torch.Tensor:
    """One id per item of a `TitleTable` (the padding row included), equal for items whose answer
    tokens (title cut to ``max_title_tokens``) are equal."""
    width = table.ids.shape[1]
    tokens = torch.where(torch.arange(width) < table.length[:, None], table.ids, -1)  # nothing past a title's length
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def same_answer_mask(table, candidates: np.ndarray, target: np.ndarray) -> torch.Tensor:
    """(N, C) bool: the candidates whose answer tokens equal the row's target's, the target
    itself included (`answer_ids`: (N, C) lookups, not (N, C, width) tokens)."""
    answer = answer_ids(table)
    return answer[torch.tensor(candidates)] == answer[torch.tensor(target)][:, None]


def score_metrics(scores: torch.Tensor, target_col: torch.Tensor, same_answer: torch.Tensor | None = None) -> dict[str, float]:
    """Ranking metrics of the score protocol from (N, C) scores and the target's column
    (``same_answer``: see `rank_of_target`)."""
    rank = rank_of_target(scores, target_col, same_answer).double()
    gain = 1.0 / torch.log2(rank + 2.0)
    return {
        "hr@1": float((rank < 1).double().mean()),
        "hr@5": float((rank < 5).double().mean()),
        "ndcg@5": float(torch.where(rank < 5, gain, 0.0).mean()),
        "ndcg@10": float(torch.where(rank < 10, gain, 0.0).mean()),
        "mrr": float((1.0 / (rank + 1.0)).mean()),
        "mean_target_logprob": float(scores.gather(1, target_col[:, None]).double().mean()),
        "valid_ratio": 1.0,
    }


def matched_candidates(text: str, candidate_titles: Sequence[str]) -> list[int]:
    """Indices of candidate titles occurring in the first line of ``text`` (case-insensitive)."""
    first_line = text.strip().split("\n")[0].strip().lower()
    return [i for i, title in enumerate(candidate_titles) if title.strip().lower() in first_line]


def judge_generation(text: str, titles: Sequence[str], target: int) -> tuple[list[int], bool, bool]:
    """(the candidate columns ``text`` names, valid: exactly one, correct: valid and naming the
    target's title): the generate protocol's verdict on one output."""
    hits = matched_candidates(text, titles)
    valid = len(hits) == 1
    return hits, valid, valid and titles[hits[0]].strip().lower() == titles[target].strip().lower()


def generate_metrics(texts: Sequence[str], candidate_titles: Sequence[Sequence[str]], target_col: Sequence[int]) -> dict[str, float]:
    """valid_ratio, hr@1 (correct / valid) and hr@1_all (correct / all). With no valid answer
    hr@1 is 0/0: NaN (undefined), not 0; hr@1_all is then 0."""
    verdicts = [judge_generation(text, titles, target)[1:] for text, titles, target in zip(texts, candidate_titles, target_col, strict=True)]
    return verdict_rates(verdicts)


def verdict_rates(verdicts: Sequence[tuple[bool, bool]]) -> dict[str, float]:
    """`generate_metrics` from each output's (valid, correct) verdict."""
    total, valid, correct = len(verdicts), sum(v for v, _ in verdicts), sum(c for _, c in verdicts)
    return {
        "valid_ratio": valid / total if total else math.nan,
        "hr@1": correct / valid if valid else math.nan,
        "hr@1_all": correct / total if total else math.nan,
    }


def batch_slices(n: int, size: int):
    """Slices of ``n`` rows in batches of ``size``, in order (the last may be shorter)."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def target_columns(candidates: np.ndarray, target: np.ndarray, num_items: int | None = None) -> np.ndarray:
    """Column of the target in each candidate row; `IloraError` naming the first row where
    the target does not occur exactly once or another item repeats (it would count twice in
    a rank and make a generated title match two candidates), or, given ``num_items``, where an
    id is outside the catalog."""
    if candidates.ndim != 2 or target.ndim != 1 or len(candidates) != len(target):
        raise IloraError(
            f"candidates have shape {candidates.shape} for {target.shape[0] if target.ndim else 1} targets; expected one row per sample "
            "(are the candidate sets from another split or --limit?)"
        )
    outside = np.argwhere((candidates < 0) | (candidates >= num_items)) if num_items is not None else np.empty((0, 2))
    if outside.size:
        r, k = (int(i) for i in outside[0])
        raise IloraError(f"candidate row {r}, position {k}: id {int(candidates[r, k])} is outside the catalog 0..{num_items - 1}")
    count = (candidates == target[:, None]).sum(1)
    if not (count == 1).all():
        row = int(np.flatnonzero(count != 1)[0])
        raise IloraError(f"candidate row {row} contains the target {int(target[row])} {int(count[row])} times, expected once")
    repeats = repeated_rows(torch.tensor(candidates)).nonzero()  # a copy: the candidates may be a read-only view
    if repeats.numel():
        row = int(repeats[0])
        raise IloraError(f"candidate row {row} repeats an item ({candidates[row].tolist()}); candidates must be distinct")
    return (candidates == target[:, None]).argmax(1)


def twin_candidates(candidates: np.ndarray, keys: Sequence, target: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """``(row, item, twin)`` for each candidate row holding two items with equal ``keys[item]``,
    the row's first such pair, in row order; with ``target``, only pairs of the row's target
    and another item (``item`` is then the target)."""
    found = []
    for r, row in enumerate(candidates.tolist()):
        if target is not None:
            mine = keys[int(target[r])]
            twin = next((item for item in row if item != target[r] and keys[item] == mine), None)
            if twin is not None:
                found.append((r, int(target[r]), twin))
            continue
        first: dict = {}
        for item in row:
            seen = first.setdefault(keys[item], item)
            if seen != item:
                found.append((r, seen, item))
                break
    return found


def warn_about_twin_answers(teacher, candidates: np.ndarray, target: np.ndarray, protocol: str) -> None:
    """Log a warning when candidate rows hold two items the protocol cannot tell apart.

    Score protocol: the target and another candidate with the same answer tokens (equal
    titles, or titles equal once cut to ``max_title_tokens``) score the same up to rounding,
    and the twin ranks above the target (`rank_of_target`). Generate protocol: two candidates
    with the same answer text up to case; an output naming one matches both and counts as
    invalid. LastFM's titles are distinct; catalogs that repeat titles are not."""
    table = teacher.title_table
    if protocol == "score":
        twins = twin_candidates(candidates, answer_ids(table).tolist(), target)
        effect = "the target and its twin score the same, and the twin ranks above the target"
    else:
        keys = [text.strip().lower() for text in answer_texts(teacher)]
        twins = twin_candidates(candidates, keys)
        effect = "an output naming one matches both and counts as invalid"
    if twins:
        row, a, b = twins[0]
        title = teacher.tokenizer.decode(table.ids[a, : int(table.length[a])].tolist(), skip_special_tokens=True)
        log.warning(
            "%s protocol: %d of %d candidate rows hold two items with the same answer (row %d: items %d and %d, %r): %s. "
            "Distinct titles (or a larger max_title_tokens) give metrics that tell them apart",
            protocol, len(twins), len(candidates), row, a, b, title, effect,
        )


def answer_texts(teacher) -> list[str]:
    """Every item's title as the teacher was trained to write it (the generate protocol matches these).

    Its `TitleTable` tokens (truncated to ``max_title_tokens``), decoded as
    `ILoRATeacher.generate` decodes its output. `IloraError` naming the item if a title decodes
    to nothing: an empty string is in every output and would match any generation.
    """
    texts = teacher.title_table.decoded(teacher.tokenizer)
    empty = [i for i, text in enumerate(texts) if not text.strip()]
    if empty:
        raise IloraError(f"item {empty[0]}'s title decodes to empty text with this tokenizer ({len(empty)} items do); the generate protocol cannot match it")
    return texts


def teacher_generate_metrics(teacher, texts: Sequence[str], candidates: np.ndarray, target_col: Sequence[int]) -> dict[str, float]:
    """`generate_metrics` of ``texts`` against each row's candidates as the teacher writes them (`answer_texts`)."""
    return verdict_rates([(r["valid"], r["correct"]) for r in generation_records(teacher, texts, candidates, target_col)])


def generation_records(teacher, texts: Sequence[str], candidates: np.ndarray, target_col: Sequence[int]) -> list[dict]:
    """One record per sample of what the generate protocol saw and decided: the output text, the
    candidate items it names, whether it is valid and correct (`judge_generation`), the target item
    and its answer text (the title as the teacher is trained to write it: what a correct output names)."""
    answers = answer_texts(teacher)
    records = []
    for sample, (text, row, target) in enumerate(zip(texts, candidates, target_col, strict=True)):
        hits, valid, correct = judge_generation(text, [answers[int(i)] for i in row], target)
        records.append({
            "sample": sample, "target": int(row[target]), "target_answer": answers[int(row[target])], "text": text,
            "named": [int(row[h]) for h in hits], "valid": valid, "correct": correct,
        })
    return records


def write_generations(directory: Path, split: str, gate: str, records: Sequence[dict]) -> str:
    """`generation_records` as JSON lines, one per sample, written atomically to
    ``directory/generations_<split>_<gate>.jsonl`` (``expert:N`` spelled ``expertN``); the file's name."""
    name = f"generations_{split}_{gate_file_tag(gate)}.jsonl"
    atomic_write_text(Path(directory) / name, "".join(strict_json(r) + "\n" for r in records))
    return name


def gate_file_tag(gate: str) -> str:
    """A gate mode as result file names spell it (``expert:1`` -> ``expert1``)."""
    return gate.replace(":", "")


def require_samples(split: Split, what: str) -> None:
    """`IloraError` if ``split`` has no samples: metrics over none are undefined (and there is
    nothing to concatenate), so ``what`` refuses it instead of reporting them."""
    if len(split) == 0:
        raise IloraError(f"{what}: the split has no samples (absent rows, or all dropped by --min-len or --limit); nothing to evaluate")


def _my_batches(n: int, size: int, ctx: Dist, desc: str):
    """This rank's contiguous share of the batches (all of them in one process), with a progress bar on rank 0."""
    mine = ctx.chunk(list(batch_slices(n, size)))
    return progress(mine, desc=desc, unit="batch", leave=False, show=ctx.is_main)


def _in_sample_order(ctx: Dist, per_batch: list) -> list:
    """Every rank's per-batch results, concatenated in rank order: the single-process order."""
    return [x for part in ctx.gather(per_batch) for x in part]


def check_scoring_window(
    bundle, split: Split, candidates: np.ndarray, batch_size: int, *, batch_option: str = "--batch-size (ilora run: eval.batch_size)",
    advice: str = ", or the generate protocol (--protocol generate)", name: str = "the split scored",
) -> None:
    """`IloraError`, before any model call, where `score_split` would reach a batch that
    `ILoRATeacher.score_candidates` refuses: an LLM with a sliding window shorter than the
    batch's padded prompts plus its longest answer. From token counts alone, over every batch
    (with several ranks too, so that all of them refuse alike). ``batch_option`` names the
    caller's batch size option, ``advice`` what else it could do, ``name`` the split."""
    from ilora.teacher.model import attention_window

    window = attention_window(bundle.teacher.llm.config)
    if window is None or not len(split):
        return
    prompt = bundle.prompt_collator.token_counts(split.history, split.length, candidates).numpy()
    answer = bundle.teacher.title_table.length.numpy()[candidates].max(axis=1) + 1  # title + eos
    check_window_fits(window, prompt, answer, batch_slices(len(split), batch_size), batch_size, batch_option=batch_option, advice=advice, name=name)


def check_window_fits(
    window: int, prompt: np.ndarray, answer: np.ndarray, batches, batch_size: int, *, batch_option: str, advice: str, name: str
) -> None:
    """`IloraError` unless every sample's prompt (``prompt[i]`` tokens) and longest answer
    (``answer[i]``, eos included) fit in ``window``, and so does every batch (slices of the
    samples) padded to its longest prompt plus its longest answer; the rest as
    `check_scoring_window`."""
    longest = int(np.argmax(prompt + answer))
    if prompt[longest] + answer[longest] > window:
        raise IloraError(
            f"the LLM attends through a sliding window of {window} tokens, and sample {longest} of {name}: its prompt ({prompt[longest]} tokens) "
            f"and longest candidate answer ({answer[longest]}) do not fit in it: the score protocol cannot apply the window. "
            "Use a model without a sliding window or with a longer one, or shorter prompts (fewer candidates or history items, "
            f"a smaller max_title_tokens){advice}"
        )
    for sl in batches:
        width = int(prompt[sl].max() + answer[sl].max())
        if width > window:
            raise IloraError(
                f"the LLM attends through a sliding window of {window} tokens, shorter than the padded prompts plus longest "
                f"answer of the batch of samples {sl.start}..{sl.stop - 1} of {name} ({width} tokens): the score protocol cannot apply "
                f"the window. Use a smaller {batch_option} (now {batch_size}; every sample fits alone)"
            )


@torch.no_grad()
def score_split(
    bundle, split: Split, candidates: np.ndarray, gate_mode: str = "learned", batch_size: int = 16, device: str = "cpu", desc: str = "score", ctx: Dist = SINGLE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) candidate log-likelihoods and the (N, E) gates used, batch by batch.

    With several ranks each scores a contiguous share of the same batches and every rank
    gets the gathered result, in sample order. An empty split is an `IloraError`.
    """
    require_samples(split, "scoring")
    check_scoring_window(bundle, split, candidates, batch_size)
    scores, gates = [], []
    with eval_mode(bundle.teacher) as teacher:
        for sl in _my_batches(len(split), batch_size, ctx, desc):
            batch = bundle.prompt_collator.build(split.history[sl], split.length[sl], candidates[sl]).to(device)
            scores.append(teacher.score_candidates(batch, batch.candidates, gate_mode).float().cpu())
            gates.append(teacher.gates(batch.history, batch.length, gate_mode).float().cpu())
    return torch.cat(_in_sample_order(ctx, scores)), torch.cat(_in_sample_order(ctx, gates))


def default_max_new_tokens(teacher) -> int:
    """The generate protocol's decoding limit: the longest (truncated) title + 8 tokens."""
    return int(teacher.title_table.length.max()) + 8


@torch.no_grad()
def generate_split(
    bundle, split: Split, candidates: np.ndarray, gate_mode: str = "learned", batch_size: int = 16, device: str = "cpu", max_new_tokens: int | None = None, ctx: Dist = SINGLE
) -> tuple[list[str], torch.Tensor]:
    """Greedy generations for every sample (prompt without answer) and the (N, E) gates used;
    split across ranks as `score_split`. ``max_new_tokens`` None: the longest title + 8.
    An empty split is an `IloraError`."""
    require_samples(split, "generation")
    limit = max_new_tokens or default_max_new_tokens(bundle.teacher)
    texts: list[list[str]] = []
    gates = []
    with eval_mode(bundle.teacher) as teacher:
        for sl in _my_batches(len(split), batch_size, ctx, "generate"):
            batch = bundle.prompt_collator.build(split.history[sl], split.length[sl], candidates[sl]).to(device)
            texts.append(teacher.generate(batch, gate_mode, max_new_tokens=limit))
            gates.append(teacher.gates(batch.history, batch.length, gate_mode).float().cpu())
    return [text for batch_texts in _in_sample_order(ctx, texts) for text in batch_texts], torch.cat(_in_sample_order(ctx, gates))


def evaluate_teacher(
    bundle, split: Split, candidates: np.ndarray, *, protocol: str = "score", gate_mode: str = "learned",
    batch_size: int = 16, device: str = "cpu", max_new_tokens: int | None = None, ctx: Dist = SINGLE,
    keep_generations: bool = False,
) -> dict:
    """Metrics of one protocol on one split with fixed candidates, plus gate statistics (every rank gets them).
    With ``keep_generations`` the generate protocol's result also holds ``generations``, a
    `generation_records` entry per sample.

    The generate protocol matches the teacher's `answer_texts` (its catalog titles truncated
    to ``max_title_tokens`` and decoded) and decodes up to ``max_new_tokens`` (`generate_split`).
    A split without samples is an `IloraError` (`require_samples`), checked before anything runs.
    """
    from ilora.teacher.gate import gate_statistics

    if max_new_tokens is not None and protocol != "generate":
        raise ConfigError(f"max_new_tokens applies to the generate protocol only, not to {protocol!r}")
    require_samples(split, f"{protocol} evaluation")
    cols = target_columns(candidates, split.target, bundle.teacher.title_table.num_items)
    if protocol in ("score", "generate") and ctx.is_main:
        warn_about_twin_answers(bundle.teacher, candidates, split.target, protocol)
    if protocol == "score":
        scores, gates = score_split(bundle, split, candidates, gate_mode, batch_size, device, ctx=ctx)
        same = same_answer_mask(bundle.teacher.title_table, candidates, split.target)
        metrics = score_metrics(scores, torch.as_tensor(cols), same)
    elif protocol == "generate":
        limit = max_new_tokens or default_max_new_tokens(bundle.teacher)
        texts, gates = generate_split(bundle, split, candidates, gate_mode, batch_size, device, limit, ctx=ctx)
        records = generation_records(bundle.teacher, texts, candidates, cols.tolist())  # judged once, for metrics and file
        metrics = verdict_rates([(r["valid"], r["correct"]) for r in records])
        metrics["max_new_tokens"] = limit
        if keep_generations:
            metrics["generations"] = records
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    metrics["num_samples"] = len(split)
    metrics["gate_stats"] = gate_statistics(gates)
    return metrics

"""`ilora bench eval`: candidate scoring vs generation-based evaluation of the same samples.

A random teacher: by default the tiny one (``--llm tiny``: 2-layer Llama, hidden 64, fp32),
or one of the step benchmark's shapes (``--shape tiny-quick``, and on CUDA ``1b``, ``7b``:
bf16 base, float32 adapters), built as `ilora.bench.step.build_setup` builds them and run
without autocast, as the trainer's validation runs. The LastFM titles, N samples with 10 history items and 20
candidates. Variants, each evaluating all N samples in batches of 16 and computing its
metrics:

* ``score``: the score protocol (`ilora.teacher.evaluate`, protocol ``score``): the
  prompt is encoded once and its KV cache kept; all 20 answers then run as one
  continuation under a block attention mask (nothing is copied per candidate).
* ``generate``: the generate protocol as ``ilora teacher eval --protocol generate`` runs
  it: greedy decoding up to the longest title + 8 tokens, then the iLoRA/LLaRA
  title-matching rule. A random teacher rarely emits eos, so it decodes to the limit.
* ``generate_min``: greedy decoding of only as many tokens as the longest target answer
  (title + eos) in each batch: what a perfect model would need at least. It is the
  lower bound of the generation cost.
* ``generate_llara``: the research code's generation-based evaluation: Hugging Face
  ``generate`` on the prompts' input embeddings with LLaRA's settings (greedy,
  ``max_new_tokens=64``, ``min_new_tokens=1``), decode, first line, title matching.

``ratio`` = generate_llara / score (the evaluation the score protocol replaces);
``ratio_generate`` = generate (our generate protocol) / score; ``ratio_min`` =
generate_min / score. With a tiny model the work per token is small, so what generation
costs is its sequential steps; scoring does more token work (every candidate's title)
in two passes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ilora.bench.common import interleave, load_titles, machine_info, ms, now_utc, random_samples
from ilora.bench.inputs import CANDIDATES, HISTORY_ITEMS
from ilora.errors import ConfigError, IloraError

BATCH = 16


SHAPES = ("tiny", "tiny-quick", "1b", "7b")  # tiny: the teacher of `--llm tiny`; the others: the step benchmark's


def build(device: torch.device, num_samples: int, shape: str = "tiny") -> tuple[Any, Any, np.ndarray, str]:
    """(bundle, split, candidates, titles source) for a random teacher of ``shape``."""
    from ilora.data.dataset import Catalog, Split
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.build import build_teacher
    from ilora.teacher.config import TeacherConfig

    if shape not in SHAPES:
        raise ConfigError(f"eval bench: shape {shape!r}: expected one of {', '.join(SHAPES)}")
    if shape in ("1b", "7b") and device.type != "cuda":
        raise ConfigError(f"eval bench: shape {shape} is for CUDA; on CPU use tiny")
    if shape == "tiny":
        titles, source = load_titles()
        catalog = Catalog(tuple(titles))
        torch.manual_seed(0)
        rec = SASRec(SASRecConfig(num_items=len(titles), max_len=HISTORY_ITEMS)).eval()
        bundle = build_teacher(TeacherConfig(llm="tiny", device=device.type), catalog, rec, str(device))
    else:
        from ilora.bench.step import build_setup

        setup, source = build_setup(shape, device)
        bundle = setup.bundle
    bundle.teacher.eval()
    s = random_samples(bundle.teacher.title_table.num_items, num_samples, HISTORY_ITEMS, CANDIDATES, seed=0)
    split = Split(history=s["history"].numpy(), length=s["length"].numpy(), target=s["target"].numpy())
    return bundle, split, s["candidates"].numpy(), source


@torch.no_grad()
def generate_min(bundle, split, candidates: np.ndarray, device: torch.device) -> dict[str, float]:
    """Generate-protocol metrics with decoding cut at each batch's longest target answer."""
    from ilora.teacher.evaluate import target_columns, teacher_generate_metrics

    teacher = bundle.teacher
    texts: list[str] = []
    for lo in range(0, len(split), BATCH):
        sl = slice(lo, lo + BATCH)
        batch = bundle.prompt_collator.build(split.history[sl], split.length[sl], candidates[sl]).to(device)
        longest = int(teacher.title_table.length[torch.as_tensor(split.target[sl])].max()) + 1
        texts += teacher.generate(batch, "learned", max_new_tokens=longest)
    # matched against the titles as the teacher writes them, as the generate protocol does
    return teacher_generate_metrics(teacher, texts, candidates, target_columns(candidates, split.target).tolist())


@torch.no_grad()
def generate_llara(bundle, split, candidates: np.ndarray, device: torch.device, max_new_tokens: int = 64) -> dict[str, float]:
    """LLaRA's evaluation: HF ``generate`` from input embeddings (greedy, up to 64 new tokens), first line, matching."""
    from ilora.teacher.evaluate import target_columns, teacher_generate_metrics

    teacher = bundle.teacher
    tok = teacher.tokenizer
    texts: list[str] = []
    for lo in range(0, len(split), BATCH):
        sl = slice(lo, lo + BATCH)
        batch = bundle.prompt_collator.build(split.history[sl], split.length[sl], candidates[sl]).to(device)
        gates = teacher.gates(batch.history, batch.length)
        embeds = teacher.embed(batch)
        with teacher.gate_state.use(gates):
            ids = teacher.llm.generate(
                inputs_embeds=embeds,
                attention_mask=batch.attention_mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                min_new_tokens=1,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        texts += [t.strip().split("\n")[0] for t in tok.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)]
    # matched against the titles as the teacher writes them, as the generate protocol does
    return teacher_generate_metrics(teacher, texts, candidates, target_columns(candidates, split.target).tolist())


def run_bench(
    device: torch.device, *, quick: bool = False, num_samples: int | None = None, shape: str = "tiny", warmup: int = 1, repeats: int = 3, budget_s: float | None = None
) -> dict[str, Any]:
    from ilora.teacher.evaluate import default_max_new_tokens, evaluate_teacher

    num_samples = num_samples or (16 if quick else 64)
    if quick:
        repeats = min(repeats, 2)
    budget_s = budget_s if budget_s is not None else (10.0 if quick else 60.0)
    bundle, split, candidates, source = build(device, num_samples, shape)
    metrics: dict[str, dict] = {}

    def score(parts) -> None:
        metrics["score"] = evaluate_teacher(bundle, split, candidates, protocol="score", batch_size=BATCH, device=device.type)

    def generate(parts) -> None:
        metrics["generate"] = evaluate_teacher(bundle, split, candidates, protocol="generate", batch_size=BATCH, device=device.type)

    def generate_lower(parts) -> None:
        metrics["generate_min"] = generate_min(bundle, split, candidates, device)

    def llara(parts) -> None:
        metrics["generate_llara"] = generate_llara(bundle, split, candidates, device)

    variants = {"score": score, "generate": generate, "generate_min": generate_lower, "generate_llara": llara}
    times = interleave(variants, device, warmup=warmup, repeats=repeats, budget_s=budget_s)
    for name in ("score", "generate"):
        if metrics[name]["num_samples"] != num_samples:
            raise IloraError(f"eval bench: {name} evaluated {metrics[name]['num_samples']} samples, expected {num_samples}")
    limit = default_max_new_tokens(bundle.teacher)
    return {
        "name": "eval",
        "time": now_utc(),
        "quick": quick,
        "machine": machine_info(device),
        "sizes": {
            "samples": num_samples,
            "batch": BATCH,
            "history_items": HISTORY_ITEMS,
            "candidates": CANDIDATES,
            "shape": shape,
            "llm": llm_description(bundle.teacher.llm),
            "generate_max_new_tokens": limit,
        },
        "titles": source,
        "equal_work_checked": "both protocols evaluate the same samples and candidates (metrics below)",
        "variants": {name: t.summary() for name, t in times.items()},
        "metrics": {
            "score": {k: metrics["score"][k] for k in ("hr@1", "mrr", "num_samples")},
            "generate": {k: metrics["generate"][k] for k in ("valid_ratio", "hr@1", "num_samples")},
            "generate_min": metrics["generate_min"],
            "generate_llara": metrics["generate_llara"],
        },
        "ratio": times["generate_llara"].median / times["score"].median,
        "ratio_generate": times["generate"].median / times["score"].median,
        "ratio_min": times["generate_min"].median / times["score"].median,
        "ratio_means": "LLaRA-style generation (HF generate, 64 new tokens) / score protocol, median time over the same "
        "samples; ratio_generate: our generate protocol / score; ratio_min: generation cut at the longest target answer / score",
    }


def llm_description(llm) -> str:
    cfg = llm.config
    dtype = str(next(llm.parameters()).dtype).removeprefix("torch.")
    return f"random Llama: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, {dtype} base"


def markdown_table(result: dict[str, Any]) -> list[str]:
    s = result["sizes"]
    n = s["samples"]
    lines = [
        f"Shape `{s.get('shape', 'tiny')}` ({s['llm']}), {n} samples in batches of {s['batch']}, {s['candidates']} candidates.",
        "",
        "| variant | median ms | per sample ms |",
        "|---|---:|---:|",
    ]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {ms(v['median_s'])} | {ms(v['median_s'] / n)} |")
    lines += [
        "",
        f"`ratio_generate` (our generate protocol / score) = {result['ratio_generate']:.2f}; "
        f"`ratio_min` (generation cut at the longest target answer / score) = {result['ratio_min']:.2f}.",
    ]
    return lines

"""`ilora bench inputs`: building a training batch's input embeddings, forward and backward.

Both variants turn the same samples (10 history items, 20 candidates, the target) into
token ids, attention mask, answer labels and input embeddings whose placeholders hold
the projected SASRec item embeddings, then backpropagate a fixed linear probe of the
embeddings into the projector:

* ``reference``: the LLaRA formulation (its collator and ``wrap_emb``). Per-sample
  f-string prompts (``"title [HistoryEmb]"`` items joined by ``", "``), ONE tokenizer
  call on the batch of (prompt, answer) pairs, labels from the token type ids, the
  projector run on every history and candidate item, then a per-sample loop that
  searches each placeholder id with ``nonzero`` and writes the embeddings one by one.
* ``ours``: ``PromptCollator.build`` (segment table, tensor ops) and
  ``substitute_placeholders`` (one indexed write of the projected placeholder items).

A third variant, ``projector``, times only the projector's forward and backward on the
batch's placeholder items: work both variants must do. ``ratio_bound`` (reference /
projector) is the ratio a path that spends nothing beyond the projector would reach, so
on a CPU, where the projector's matrix products dominate, no implementation can beat it;
``ratio_beyond_projector`` compares what each variant spends beyond the projector. A
fourth, ``shared``, adds the rest of what both do whatever the assembly: the token
embedding lookup of the batch and the probe loss over its ``(B, T, H)`` embeddings with
their gradient (in a training step the LLM's forward and backward take the probe's
place); ``ratio_bound_shared`` (reference / shared) is the tighter ceiling.

Before timing, each batch size is checked: both variants give the same ids, mask,
labels and embeddings at every real (non-padding) position of every sample, and the
same projector gradient. The reference pads on the right (as LLaRA), ours on the left
(as the teacher), so the comparison is per sample over the real tokens.

The reference tokenizer is a copy of ours whose placeholder tokens strip the spaces
around them, as LLaRA's slow Llama tokenizer does with its special tokens. Two choices
make the two token streams equal where LLaRA's would differ from ours (README, "Prompts, vectorised"):
its pair template has no second bos, and the answer ends with eos instead of LLaRA's
``"\n"``. It is a fast (Rust) tokenizer: LLaRA's slow one spends more Python per call
(a Python wrapper around the same model takes about 5 ms more per batch of 8 here), so
the reference's tokenising time is, if anything, too low.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ilora.bench.common import Parts, cuda_peak, interleave, load_titles, machine_info, ms, mib, now_utc, random_samples, saved_activation_bytes
from ilora.errors import IloraError
from ilora.teacher.batch import PromptBatch, PromptCollator, TitleTable, substitute_placeholders
from ilora.teacher.projector import ItemProjector
from ilora.teacher.prompts import PromptTemplate, load_template
from ilora.teacher.tiny import CANDIDATE_TOKEN, HISTORY_TOKEN, add_placeholder_tokens, build_tiny_tokenizer

HISTORY_ITEMS = 10
CANDIDATES = 20
REC_DIM = 64
HIDDEN, QUICK_HIDDEN = 4096, 1024
BATCH_SIZES = (8, 32, 128)
# On a CPU the reference's backward copies the whole (B, T, H) gradient once per
# placeholder (B * 30 times): about 160 s per run at B = 32, H = 4096 on 2 cores, and
# some 16x that at B = 128. CPU runs default to 8 and 32; --batch-sizes asks for more.
CPU_BATCH_SIZES = (8, 32)
QUICK_BATCH_SIZES = (8,)


@dataclass
class InputsSetup:
    """Everything both variants share: tokenizers, title table, embeddings, projector, probe."""

    tokenizer: Any
    ref_tokenizer: Any
    template: PromptTemplate
    titles: list[str]
    collator: PromptCollator
    item_emb: nn.Embedding  # stands in for SASRec's item embeddings (frozen)
    token_emb: nn.Embedding  # the LLM's input embeddings (frozen)
    projector: ItemProjector
    probe: torch.Tensor  # (H,) the loss is sum(embeds @ probe)
    device: torch.device


def reference_tokenizer(tokenizer):
    """A copy of ``tokenizer`` that tokenises (prompt, answer) pairs as LLaRA's slow Llama tokenizer.

    Placeholders strip the whitespace on both sides (slow-tokenizer behaviour for special
    tokens); the pair template is ``<s> A B`` with token type 1 on ``B`` (no bos between).
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    placeholders = {"[HistoryEmb]", "[CansEmb]", "[PH]"}
    for token in spec["added_tokens"]:
        if token["content"] in placeholders:
            token["lstrip"] = token["rstrip"] = True
    backend = Tokenizer.from_str(json.dumps(spec))
    bos = tokenizer.bos_token
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A:0 $B:1", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    ref = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        pad_token=tokenizer.pad_token,
    )
    ref.padding_side = "right"
    return ref


def build_setup(hidden: int, device: torch.device, seed: int = 0) -> tuple[InputsSetup, str]:
    """The shared pieces on ``device`` with LLM hidden size ``hidden``; returns (setup, titles source)."""
    titles, source = load_titles()
    template = load_template("music")
    tokenizer = build_tiny_tokenizer(titles + list(template.pieces) * 50, vocab_size=2000)
    placeholders = add_placeholder_tokens(tokenizer)
    table = TitleTable.build(tokenizer, titles, max_title_tokens=None)
    collator = PromptCollator(tokenizer, template, table, placeholders, with_answer=True, padding_side="left")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        item_emb = nn.Embedding(len(titles) + 1, REC_DIM).requires_grad_(False)
        token_emb = nn.Embedding(len(tokenizer), hidden).requires_grad_(False)
        projector = ItemProjector(REC_DIM, hidden)
        probe = torch.randn(hidden) / hidden**0.5
    setup = InputsSetup(
        tokenizer=tokenizer,
        ref_tokenizer=reference_tokenizer(tokenizer),
        template=template,
        titles=titles,
        collator=collator,
        item_emb=item_emb.to(device),
        token_emb=token_emb.to(device),
        projector=projector.to(device),
        probe=probe.to(device),
        device=device,
    )
    return setup, source


# -- the reference (LLaRA's collator + wrap_emb) ----------------------------------------------


def reference_strings(setup: InputsSetup, samples: dict[str, torch.Tensor]) -> list[list[str]]:
    """Per-sample (prompt, answer) f-strings, as LLaRA's collator writes them."""
    t = setup.template
    eos = setup.ref_tokenizer.eos_token
    pairs = []
    for b in range(len(samples["length"])):
        hist = ", ".join(f"{setup.titles[int(i)]} {HISTORY_TOKEN}" for i in samples["history"][b, : int(samples["length"][b])])
        cans = ", ".join(f"{setup.titles[int(i)]} {CANDIDATE_TOKEN}" for i in samples["candidates"][b])
        pairs.append([f"{t.before} {hist} {t.between} {cans} {t.after}", f"{setup.titles[int(samples['target'][b])]}{eos}"])
    return pairs


def reference_tokens(setup: InputsSetup, samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ONE tokenizer call on the batch of pairs; labels = answer tokens (type id 1)."""
    tokens = setup.ref_tokenizer(
        reference_strings(setup, samples),
        return_tensors="pt",
        padding="longest",
        add_special_tokens=True,
        return_attention_mask=True,
        return_token_type_ids=True,
    )
    ids = tokens["input_ids"].to(setup.device)
    mask = tokens["attention_mask"].to(setup.device)
    types = tokens["token_type_ids"].to(setup.device)
    labels = ids.masked_fill((types == 0) | (mask == 0), -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_embeds(setup: InputsSetup, tokens: dict[str, torch.Tensor], samples: dict[str, torch.Tensor]) -> torch.Tensor:
    """LLaRA's ``wrap_emb``: project every item, then a per-sample loop of single-row writes."""
    ids = tokens["input_ids"]
    embeds = setup.token_emb(ids)
    if embeds.is_leaf and embeds.requires_grad:
        # transformers' gradient checkpointing makes the embedding output a leaf that requires
        # grad (enable_input_require_grads); in-place row writes need a non-leaf copy
        embeds = embeds.clone()
    tok = setup.ref_tokenizer
    his_id = tok(HISTORY_TOKEN, return_tensors="pt", add_special_tokens=False).input_ids.item()
    cans_id = tok(CANDIDATE_TOKEN, return_tensors="pt", add_special_tokens=False).input_ids.item()
    history = samples["history"].to(setup.device)
    candidates = samples["candidates"].to(setup.device)
    his_emb = setup.projector(setup.item_emb(history))
    cans_emb = setup.projector(setup.item_emb(candidates))
    len_cans = torch.full_like(samples["length"], candidates.shape[1])
    for i in range(len(samples["length"])):
        for ph_id, values, count in ((his_id, his_emb, samples["length"]), (cans_id, cans_emb, len_cans)):
            if (ids[i] == ph_id).nonzero().shape[0] > 0:
                idx_tensor = (ids[i] == ph_id).nonzero().view(-1)
                for idx, item_emb in zip(idx_tensor, values[i, : int(count[i])]):
                    embeds[i, idx] = item_emb
    return embeds


def run_reference(setup: InputsSetup, samples: dict[str, torch.Tensor], parts: Parts) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    with parts("tokenise"):
        tokens = reference_tokens(setup, samples)
    with parts("substitute"):
        embeds = reference_embeds(setup, tokens, samples)
    with parts("backward"):
        (embeds @ setup.probe).sum().backward()
    return tokens, embeds


# -- ours ----------------------------------------------------------------------------------------


def our_embeds(setup: InputsSetup, batch: PromptBatch) -> torch.Tensor:
    embeds = setup.token_emb(batch.input_ids)
    projected = setup.projector(setup.item_emb(batch.ph_item))
    return substitute_placeholders(embeds, batch, projected)


def run_ours(setup: InputsSetup, samples: dict[str, torch.Tensor], parts: Parts) -> tuple[PromptBatch, torch.Tensor]:
    with parts("assemble"):
        batch = setup.collator.build(samples["history"], samples["length"], samples["candidates"], samples["target"])
        batch = batch.to(setup.device)
    with parts("substitute"):
        embeds = our_embeds(setup, batch)
    with parts("backward"):
        (embeds @ setup.probe).sum().backward()
    return batch, embeds


# -- equal work ------------------------------------------------------------------------------


def check_tokens_equal(setup: InputsSetup, samples: dict[str, torch.Tensor]) -> None:
    """Raise `IloraError` unless the reference's tokenizer call and our collator give the same
    ids and labels for every sample (compared over the real, non-padding tokens)."""
    ref = reference_tokens(setup, samples)
    ours = setup.collator.build(samples["history"], samples["length"], samples["candidates"], samples["target"])
    r_mask, o_mask = ref["attention_mask"].bool().cpu(), ours.attention_mask.bool()
    for b in range(len(o_mask)):
        if not torch.equal(ref["input_ids"][b].cpu()[r_mask[b]], ours.input_ids[b][o_mask[b]]):
            raise IloraError(f"inputs bench: sample {b}: reference and ours tokenise the prompt differently")
        if not torch.equal(ref["labels"][b].cpu()[r_mask[b]], ours.labels[b][o_mask[b]]):
            raise IloraError(f"inputs bench: sample {b}: reference and ours give different labels")


def check_equal(setup: InputsSetup, samples: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    """Raise `IloraError` unless both variants give the same tokens, labels, embeddings and gradient."""
    grads = []
    outs = []
    for run in (run_reference, run_ours):
        setup.projector.zero_grad(set_to_none=True)
        tokens, embeds = run(setup, samples, Parts(setup.device))
        ids = tokens["input_ids"] if isinstance(tokens, dict) else tokens.input_ids
        mask = tokens["attention_mask"] if isinstance(tokens, dict) else tokens.attention_mask
        labels = tokens["labels"] if isinstance(tokens, dict) else tokens.labels
        outs.append((ids, mask.bool(), labels, embeds.detach()))
        grads.append([p.grad.detach().clone() for p in setup.projector.parameters()])
    setup.projector.zero_grad(set_to_none=True)
    (r_ids, r_mask, r_lab, r_emb), (o_ids, o_mask, o_lab, o_emb) = outs
    for b in range(r_ids.shape[0]):
        if not torch.equal(r_ids[b][r_mask[b]], o_ids[b][o_mask[b]]):
            raise IloraError(f"inputs bench: sample {b}: reference and ours tokenise the prompt differently")
        if not torch.equal(r_lab[b][r_mask[b]], o_lab[b][o_mask[b]]):
            raise IloraError(f"inputs bench: sample {b}: reference and ours give different labels")
        if not torch.allclose(r_emb[b][r_mask[b]], o_emb[b][o_mask[b]], atol=atol, rtol=0):
            raise IloraError(f"inputs bench: sample {b}: reference and ours give different input embeddings")
    for g_ref, g_ours in zip(*grads):
        if not torch.allclose(g_ref, g_ours, rtol=1e-4, atol=1e-4 * float(g_ref.abs().max())):
            raise IloraError("inputs bench: reference and ours give different projector gradients")


def memory(setup: InputsSetup, samples: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Saved-activation bytes of each variant's forward; on CUDA also the peak of forward + backward.

    On CPU the graph is dropped without running backward (the reference's backward is
    the slow part and adds nothing to the saved-tensor count).
    """
    exclude = [*setup.projector.parameters(), setup.item_emb.weight, setup.token_emb.weight, setup.probe]

    def forward_reference() -> torch.Tensor:
        return reference_embeds(setup, reference_tokens(setup, samples), samples)

    def forward_ours() -> torch.Tensor:
        batch = setup.collator.build(samples["history"], samples["length"], samples["candidates"], samples["target"])
        return our_embeds(setup, batch.to(setup.device))

    out: dict[str, dict[str, int]] = {}
    for name, forward in (("reference", forward_reference), ("ours", forward_ours)):
        with cuda_peak(setup.device) as peak:
            saved, embeds = saved_activation_bytes(forward, exclude)
            if setup.device.type == "cuda":
                (embeds @ setup.probe).sum().backward()
            del embeds
        setup.projector.zero_grad(set_to_none=True)
        out[name] = {"saved_activation_bytes": saved, **{f"cuda_{k}": v for k, v in peak.items()}}
    return out


# -- the benchmark ---------------------------------------------------------------------------


def beyond(reference: float, ours: float, shared: float) -> float | None:
    """(reference - shared) / (ours - shared); None when timing noise puts ours at or below the shared part."""
    return (reference - shared) / (ours - shared) if ours > shared else None


def run_bench(
    device: torch.device,
    *,
    quick: bool = False,
    hidden: int | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    warmup: int | None = None,
    repeats: int = 5,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Time reference vs ours for each batch size; one JSON-ready dict.

    The equality check runs reference and ours once before timing, and the projector and
    shared variants run once beside it: that is the warm-up (``warmup`` adds more rounds). After the first measured round, no new round starts
    once ``budget_s`` seconds were spent on that batch size, so on a CPU the
    reference's slow batch sizes are measured once.
    """
    hidden = hidden or (QUICK_HIDDEN if quick else HIDDEN)
    if batch_sizes is None:
        batch_sizes = QUICK_BATCH_SIZES if quick else (BATCH_SIZES if device.type == "cuda" else CPU_BATCH_SIZES)
    if warmup is None:  # a warm-up round settles the allocator (the reference's timings vary 2x without)
        warmup = 1 if quick else 0
    budget_s = budget_s if budget_s is not None else (5.0 if quick else 60.0)
    setup, source = build_setup(hidden, device)
    rows = []
    for b in batch_sizes:
        samples = random_samples(len(setup.titles), b, HISTORY_ITEMS, CANDIDATES, seed=b)
        check_equal(setup, samples)
        built = setup.collator.build(samples["history"], samples["length"], samples["candidates"], samples["target"])  # untimed: sizes and inputs
        tokens = int(built.attention_mask.sum())

        def reference(parts: Parts, samples=samples) -> None:
            run_reference(setup, samples, parts)
            setup.projector.zero_grad(set_to_none=True)

        def ours(parts: Parts, samples=samples) -> None:
            run_ours(setup, samples, parts)
            setup.projector.zero_grad(set_to_none=True)

        items = setup.item_emb(built.ph_item.to(device))

        def projector(parts: Parts, items=items) -> None:
            (setup.projector(items) @ setup.probe).sum().backward()
            setup.projector.zero_grad(set_to_none=True)

        ids = built.input_ids.to(device)

        def shared(parts: Parts, items=items, ids=ids) -> None:
            embeds = setup.token_emb(ids).requires_grad_()  # its (B, T, H) gradient, as ours computes it
            ((embeds @ setup.probe).sum() + (setup.projector(items) @ setup.probe).sum()).backward()
            setup.projector.zero_grad(set_to_none=True)

        for warm in (projector, shared):  # the check ran reference and ours once; these two run once here
            warm(Parts(device))
        times = interleave(
            {"reference": reference, "ours": ours, "projector": projector, "shared": shared},
            device, warmup=warmup, repeats=repeats, min_repeats=1, budget_s=budget_s,
        )
        summary = {name: t.summary() for name, t in times.items()}
        projector_s = times["projector"].median
        rows.append(
            {
                "batch_size": b,
                "tokens_per_sample": tokens / b,
                "placeholders_per_sample": HISTORY_ITEMS + CANDIDATES,
                **summary,
                "ratio": times["reference"].median / times["ours"].median,
                "ratio_bound": times["reference"].median / projector_s,
                "ratio_bound_shared": times["reference"].median / times["shared"].median,
                "ratio_beyond_projector": beyond(times["reference"].median, times["ours"].median, projector_s),
                "memory": memory(setup, samples),
            }
        )
    return {
        "name": "inputs",
        "time": now_utc(),
        "quick": quick,
        "machine": machine_info(device),
        "sizes": {
            "hidden": hidden,
            "rec_dim": REC_DIM,
            "history_items": HISTORY_ITEMS,
            "candidates": CANDIDATES,
            "batch_sizes": list(batch_sizes),
            "vocab": len(setup.tokenizer),
            "dtype": "float32",
        },
        "titles": source,
        "equal_work_checked": "per sample: ids, mask, labels, embeddings at real positions; projector gradient",
        "warmup": f"the equality check's run of each variant, then {warmup} discarded round(s)",
        "rows": rows,
        "ratio": min(r["ratio"] for r in rows),
        "ratio_means": "reference / ours median end-to-end time, the smallest over the batch sizes",
        "ratio_bound_means": "reference / projector per batch size: the ratio of a path whose only cost is the projector's "
        "forward + backward, an upper bound for any implementation that does the same work",
        "ratio_bound_shared_means": "reference / shared per batch size: 'shared' adds to the projector the token embedding lookup "
        "and the probe loss over the batch's (B, T, H) embeddings with their gradient, which any implementation of this "
        "benchmark also runs: the tighter ceiling",
        "ratio_beyond_projector_means": "(reference - projector) / (ours - projector) per batch size: the time each variant "
        "spends beyond the projector's forward + backward on the batch's placeholder items, which both must do (timed alone "
        "as the 'projector' variant)",
    }


def markdown_table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| batch | tokens/sample | reference ms (tokenise / substitute / backward) | ours ms (assemble / substitute / backward) | projector alone ms | shared work ms | ratio | bound (ref / projector) | bound (ref / shared) | ratio beyond projector | saved MiB ref / ours |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        rp, op = r["reference"].get("parts_median_s", {}), r["ours"].get("parts_median_s", {})
        mem = r["memory"]
        lines.append(
            f"| {r['batch_size']} | {r['tokens_per_sample']:.0f} "
            f"| {ms(r['reference']['median_s'])} ({ms(rp.get('tokenise'))} / {ms(rp.get('substitute'))} / {ms(rp.get('backward'))}) "
            f"| {ms(r['ours']['median_s'])} ({ms(op.get('assemble'))} / {ms(op.get('substitute'))} / {ms(op.get('backward'))}) "
            f"| {ms(r['projector']['median_s'])} | {ms(r['shared']['median_s'])} | {r['ratio']:.1f} | {r['ratio_bound']:.1f} | "
            f"{r['ratio_bound_shared']:.1f} | "
            f"{'-' if r['ratio_beyond_projector'] is None else format(r['ratio_beyond_projector'], '.1f')} "
            f"| {mib(mem['reference']['saved_activation_bytes'])} / {mib(mem['ours']['saved_activation_bytes'])} |"
        )
    return lines


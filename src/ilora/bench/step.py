"""`ilora bench step`: one full teacher training step (inputs, forward, loss, backward, AdamW).

A Llama-architecture LLM with random weights, built from a config (no download):
``tiny`` on CPU, and on CUDA the shapes of a 1B model (Llama-3.2-1B) and of
Llama-2-7B in bf16. The tokenizer is trained in-process on the LastFM titles, with a
vocabulary sized so a prompt (10 history items, 20 candidates, answer) is about 220
tokens as with Llama's tokenizer; the model's embedding table has the real model's
vocabulary size, so the LM head costs what it costs there. Both variants train the same
teacher (LoRA experts E = 4 x r = 2 on q,k,v,o,gate,up,down, gate network, projector)
with AdamW, gradient clipping and (CUDA) bf16 autocast, as ``ilora teacher train`` does:

* ``reference``: the research-code step. Per-sample f-string prompts and one tokenizer
  call, LLaRA's per-sample placeholder loop (`ilora.bench.inputs`), the iLoRA einsum
  adapters (`ilora.bench.adapter.reference_adapters`), right padding, and the loss from
  HF ``labels`` (logits over the full sequence and vocabulary). With ``--compile`` it runs
  the compiled layers too, unless ``--reference-eager``; ``--reference-micro-batch-size``
  gives it micro-batches of its own (iLoRA's LastFM script trains in micro-batches of 8; at 7B
  that takes 45 GiB on an H100), so the two run the same samples each as it would train on them.
* ``ours``: ``PromptCollator.build`` + ``ILoRATeacher.loss`` (logits only where an
  answer token is predicted).
* ``ours_eager`` (with ``eager_baseline``): ``ours`` with transformers' eager attention
  (scores and probabilities materialised) instead of its default SDPA, switched on the
  same model for that variant's steps only, so the SDPA fast path is measured side by side.
* ``ours_fp32`` (with ``fp32_baseline``, CUDA): ``ours`` with the LLM's weights in float32
  and no autocast (`full_precision`), so bf16 autocast is measured side by side.
* ``ours_shared`` (with ``shared_inputs``): ``ours`` with the adapters of layers that read one
  input (q/k/v, gate/up) grouped (`ilora.teacher.shared_input`): one dropout mask and one ``A``
  product per input, the teacher's ``share_adapter_inputs`` option, measured side by side.
* ``lora`` (with ``lora_baseline``): ``ours`` with every gated layer run as plain LoRA on
  the same weights (`ilora.bench.adapter.PlainLoraView`) and the uniform gate (no SASRec
  or gate network): what the step would cost without iLoRA's gating, the floor for ours.

Every variant's optimizer is the trainer's (`ilora.teacher.optim.build_optimizer`: fused
AdamW). After the steps, the optimizer part alone is timed with ``fused=True`` and with
torch's default ``foreach`` kernels (`compare_optimizers`): the measurement behind that choice.

With ``group_by_length`` the batch is one the trainer's ``group_by_length`` sampler would
form (`grouped_batches`), so padding costs what it costs in such training; otherwise the
samples are drawn at random. With ``batches`` > 1 the steps cycle through that many batches
of different lengths (`grouped_batches`), as training meets them, so compiled layers see new
shapes (in the warm-up) and run their dynamic-shape kernels. ``lora_dropout`` overrides the
teacher's adapter dropout (0 measures what it costs) and ``compile_mode`` torch.compile's mode.

The variants run interleaved on one model; each variant's swap (reference adapters in,
eager attention on) is made before its timed step and undone after it, outside the timer.

Before timing, every variant's logits at the answer positions are checked against ours on
the same batch (dropout off, random ``lora_B``; `check_equal`); the ``lora`` variant's
against ours under the uniform gate. The check also measures how far the uniform gate moves
those logits, so it knows whether it could catch a gate that never reaches the layers.
MFU counts useful FLOPs only: ``(4 + 2 if checkpointing) * N * tokens`` with ``N`` the
decoder layers' linear weights and ``tokens`` the non-padding tokens (frozen weights:
forward 2N, input gradients 2N, no weight gradients; a recomputed forward 2N more),
plus ``4 * H * V`` per answer token for the LM head. Attention-score FLOPs and the LoRA
adapters are not counted. ``mfu_all_params`` uses the issue's count instead, the one of the
H100 anchor table it quotes: ``(4 [+ 2]) * P * tokens`` with ``P`` all of the LLM's
parameters (embeddings and LM head too), which credits about 4 % at 7B that the step never
computes (the embedding lookup, the head at non-answer tokens). Peak FLOP/s come from
`ilora.bench.common.PEAK_BF16_FLOPS`; on CPU MFU is null.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ilora.bench.adapter import plain_lora_adapters, reference_adapters
from ilora.bench.common import Parts, cuda_peak, interleave, load_titles, machine_info, mib, ms, now_utc, peak_flops, random_samples, saved_activation_bytes, sync
from ilora.bench.inputs import CANDIDATES, HISTORY_ITEMS, InputsSetup, reference_embeds, reference_tokenizer, reference_tokens
from ilora.errors import ConfigError, IloraError
from ilora.teacher.batch import IGNORE_INDEX

TOKENIZER_VOCAB = 5000  # gives LastFM prompts of about 220 tokens
# The check's random lora_B ~ N(0, CHECK_LORA_B_STD) and its bf16 tolerance. Measured on an H200 (eager,
# batch 8; lora_B std 0.02 / 0.03 / 0.05): bf16 moves ours' answer logits from the reference's by
# 0.054 / 0.057 / 0.064 at the 7B shape and 0.024 / 0.025 / 0.028 at 1B, while the gate moves them by
# 0.30 / 0.43 / 0.67 and 0.19 / 0.27 / 0.44 (bench/RESULTS.md). At 0.05 the tolerance sits above the
# noise and below half the gate's effect at both shapes.
TOL_BF16 = 0.1
CHECK_LORA_B_STD = 0.05

# Llama-architecture shapes (random weights). vocab None = the tokenizer's size.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": None, "tie_word_embeddings": False},
    "tiny-quick": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": None, "tie_word_embeddings": False},
    # Llama-3.2-1B
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0},
    # Llama-2-7B
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False},
}


@dataclass
class StepSetup:
    bundle: Any  # TeacherBundle
    inputs: InputsSetup  # what the reference's input code reads (tokenizers, titles, modules)
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    device: torch.device
    autocast: bool
    shape: str
    compiled: Any = None  # CompiledLayers with --compile: active in every variant's context (see reference_eager)
    micro_batch_size: int = 0  # a step's forward + backward in micro-batches of this many samples (0: one)
    reference_micro_batch_size: int | None = None  # the reference's own micro-batch size (None: micro_batch_size)
    reference_eager: bool = False  # with compiled layers, the reference's steps run them eager (as the research code)

    def micro_batch_size_of(self, variant: str) -> int:
        """The micro-batch size ``variant`` steps in: the reference's own where one was set."""
        if variant == "reference" and self.reference_micro_batch_size is not None:
            return self.reference_micro_batch_size
        return self.micro_batch_size


def build_llm(shape: str, tokenizer, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight LlamaForCausalLM of ``shape`` built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(SHAPES[shape])
    vocab = spec.pop("vocab_size") or len(tokenizer) + 3
    if vocab < len(tokenizer) + 3:
        raise ConfigError(f"shape {shape}: vocab {vocab} is smaller than the tokenizer ({len(tokenizer)} + 3 placeholders)")
    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec,
    )
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        # as ilora.teacher.tiny: a head of std 1/sqrt(hidden) gives logits of order 1
        nn.init.normal_(model.get_output_embeddings().weight, std=config.hidden_size**-0.5)
    return model


def build_setup(
    shape: str,
    device: torch.device,
    *,
    gradient_checkpointing: bool = False,
    compile_layers: bool = False,
    compile_mode: str | None = None,
    lora_dropout: float | None = None,
) -> tuple[StepSetup, str]:
    from ilora.data.dataset import Catalog
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.adapters import enable_gradient_checkpointing
    from ilora.teacher.build import assemble
    from ilora.teacher.compiled import CompiledLayers
    from ilora.teacher.config import TeacherConfig
    from ilora.teacher.optim import teacher_optimizer
    from ilora.teacher.prompts import load_template
    from ilora.teacher.tiny import build_tiny_tokenizer

    if shape not in SHAPES:
        raise ConfigError(f"shape {shape!r}: expected one of {', '.join(SHAPES)}")
    if compile_layers and gradient_checkpointing:
        raise ConfigError("--compile with --gradient-checkpointing is not supported (see enable_gradient_checkpointing)")
    compile_mode = None if compile_mode == "default" else compile_mode
    if compile_mode is not None and not compile_layers:
        raise ConfigError("--compile-mode needs --compile")
    titles, source = load_titles()
    template = load_template("music")
    tokenizer = build_tiny_tokenizer(titles + list(template.pieces) * 50, vocab_size=TOKENIZER_VOCAB)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llm = build_llm(shape, tokenizer, device, dtype)
    torch.manual_seed(0)
    rec = SASRec(SASRecConfig(num_items=len(titles), max_len=HISTORY_ITEMS)).eval()
    # no title truncation: the reference's f-strings carry whole titles
    cfg = TeacherConfig(llm=f"random-{shape}", max_title_tokens=1024)
    if lora_dropout is not None:
        cfg = dataclasses.replace(cfg, lora_dropout=lora_dropout)
    bundle = assemble(cfg, Catalog(tuple(titles)), rec.to(device), llm, tokenizer, str(device))
    teacher = bundle.teacher
    if gradient_checkpointing:
        enable_gradient_checkpointing(teacher.llm, teacher.gate_state)
    # as `teacher.compile` in training; the limit on recompiles is `recompile_limit`'s, for all variants
    compiled = CompiledLayers(teacher.llm, mode=compile_mode, max_recompiles=None) if compile_layers else None
    optimizer = teacher_optimizer(teacher, cfg)  # the trainer's
    inputs = InputsSetup(
        tokenizer=tokenizer,
        ref_tokenizer=reference_tokenizer(tokenizer),
        template=template,
        titles=titles,
        collator=bundle.train_collator,
        item_emb=teacher.rec.item_emb,
        token_emb=teacher.llm.get_input_embeddings(),
        projector=teacher.projector,
        probe=torch.empty(0),
        device=device,
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return StepSetup(bundle, inputs, optimizer, params, device, device.type == "cuda", shape, compiled), source


def grouped_batches(setup: StepSetup, batch_size: int, count: int = 1, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` length-grouped batches: ``GROUP_WINDOW`` batches of random samples, sorted by
    prompt length and cut into batches (`length_grouped`, the trainer's sampler; the trainer
    groups global batches and cuts them into micro-batches, so its extremes reach further
    than a window of micro-batch-sized groups). One batch: the one whose mean prompt length is the median's (a
    typical batch, not the shortest). Several: evenly spaced over the window's batches
    ordered by mean length (shortest to longest), returned in a shuffled order, as training
    meets them."""
    from ilora.teacher.train import GROUP_WINDOW, length_grouped

    if not 1 <= count <= GROUP_WINDOW:
        raise ConfigError(f"batches: must be between 1 and {GROUP_WINDOW}, got {count}")
    pool = random_samples(len(setup.inputs.titles), GROUP_WINDOW * batch_size, HISTORY_ITEMS, CANDIDATES, seed=seed)
    lengths = setup.bundle.train_collator.token_counts(pool["history"], pool["length"], pool["candidates"], pool["target"]).numpy()
    rng = np.random.default_rng(seed)
    order = length_grouped(np.arange(len(lengths)), lengths, batch_size, rng)
    batches = order.reshape(GROUP_WINDOW, batch_size)
    by_length = batches[np.argsort(lengths[batches].mean(axis=1), kind="stable")]
    if count == 1:
        picked = [by_length[GROUP_WINDOW // 2]]
    else:
        picked = [by_length[i] for i in rng.permutation(np.linspace(0, GROUP_WINDOW - 1, count).round().astype(int))]
    return [{key: value[torch.from_numpy(rows)] for key, value in pool.items()} for rows in picked]


def _autocast(setup: StepSetup):
    return torch.autocast(setup.device.type, dtype=torch.bfloat16) if setup.autocast else contextlib.nullcontext()


# -- the two losses --------------------------------------------------------------------------


def reference_output(setup: StepSetup, samples: dict[str, torch.Tensor], parts: Parts) -> tuple[Any, torch.Tensor]:
    """Strings + one tokenizer call + per-sample loop, einsum adapters, HF labels loss (full logits).
    Returns the LLM's output (``loss``, ``logits`` over every position) and the labels."""
    teacher = setup.bundle.teacher
    with parts("inputs"):
        tokens = reference_tokens(setup.inputs, samples)
    with parts("forward"), _autocast(setup):
        embeds = reference_embeds(setup.inputs, tokens, samples)
        history, length = samples["history"].to(setup.device), samples["length"].to(setup.device)
        gates = teacher.gates(history, length)
        with teacher.gate_state.use(gates):
            out = teacher.llm(inputs_embeds=embeds, attention_mask=tokens["attention_mask"], labels=tokens["labels"], use_cache=False)
    return out, tokens["labels"]


def reference_loss(setup: StepSetup, samples: dict[str, torch.Tensor], parts: Parts) -> torch.Tensor:
    return reference_output(setup, samples, parts)[0].loss


def our_batch(setup: StepSetup, samples: dict[str, torch.Tensor]):
    return setup.bundle.train_collator.build(samples["history"], samples["length"], samples["candidates"], samples["target"]).to(setup.device)


def our_loss(setup: StepSetup, samples: dict[str, torch.Tensor], parts: Parts, gate_mode: str = "learned") -> torch.Tensor:
    with parts("inputs"):
        batch = our_batch(setup, samples)
    with parts("forward"), _autocast(setup):
        loss = setup.bundle.teacher.loss(batch, gate_mode)
    return loss


VARIANTS = ("reference", "ours", "ours_eager", "ours_fp32", "ours_shared", "lora")


@contextlib.contextmanager
def attention(llm: nn.Module, implementation: str) -> Iterator[None]:
    """Within the block ``llm`` runs transformers' ``implementation`` attention; restored after."""
    previous = llm.config._attn_implementation
    llm.set_attn_implementation(implementation)
    try:
        yield
    finally:
        llm.set_attn_implementation(previous)


@contextlib.contextmanager
def full_precision(setup: StepSetup) -> Iterator[None]:
    """Within the block the LLM's bfloat16 weights and buffers are float32 and steps run without
    autocast; restored after (bfloat16 -> float32 -> bfloat16 is exact). The parameter objects
    stay the same, so the optimizer and the adapters are untouched."""
    llm = setup.bundle.teacher.llm
    trained = {id(p) for p in setup.params}
    if any(t.dtype == torch.bfloat16 for t in setup.params):
        raise ConfigError("--fp32-baseline: the trained weights are bfloat16; converting them there and back would round them")
    frozen = [t for t in (*llm.parameters(), *llm.buffers()) if t.dtype == torch.bfloat16 and id(t) not in trained]
    autocast, converted = setup.autocast, []
    try:
        for t in frozen:
            t.data = t.data.float()
            converted.append(t)
        setup.autocast = False
        yield
    finally:
        for t in converted:
            t.data = t.data.to(torch.bfloat16)
        setup.autocast = autocast


RECOMPILES_PER_VARIANT = 8  # torch.compile's default limit for one function, per timed variant


@contextlib.contextmanager
def recompile_limit(variants: int | None) -> Iterator[None]:
    """With compiled layers (``variants`` timed on them; None: not compiled, nothing changes):
    `ilora.teacher.compiled.recompile_limit` at `RECOMPILES_PER_VARIANT` per variant (the
    layers themselves are built without a limit of their own).

    Every variant's swaps change what the one compiled layer function is guarded on, and new
    batch shapes recompile it, so several variants cycling through batches can pass torch's
    default of 8 graphs; past it torch runs the layers eager for the rest of the process, and
    the benchmark would report eager steps under a compiled variant's name (session 13: a
    three-variant cycled run timed ``ours`` at 558 ms against 430 ms with two variants)."""
    from ilora.teacher.compiled import recompile_limit as limited

    if variants is None:
        yield
        return
    advice = (
        f"step bench: {RECOMPILES_PER_VARIANT} per variant, {variants} variants; the figures would time eager steps as "
        "compiled ones. Time fewer variants or batches per run"
    )
    with limited(RECOMPILES_PER_VARIANT * variants, advice):
        yield


def variant_context(setup: StepSetup, variant: str) -> contextlib.ExitStack:
    """How ``variant`` runs the shared model: einsum adapters (reference), eager attention
    (ours_eager), float32 weights without autocast (ours_fp32), grouped adapter inputs
    (ours_shared), plain LoRA (lora); with ``--compile`` the compiled decoder layers too (not for
    the reference with ``setup.reference_eager``)."""
    from ilora.teacher.shared_input import shared_adapter_inputs

    llm = setup.bundle.teacher.llm
    swaps = {
        "reference": lambda: reference_adapters(llm),
        "ours_eager": lambda: attention(llm, "eager"),
        "ours_fp32": lambda: full_precision(setup),
        "ours_shared": lambda: shared_adapter_inputs(llm),
        "lora": lambda: plain_lora_adapters(llm),
        "ours": contextlib.nullcontext,
    }
    if variant not in swaps:
        raise ConfigError(f"step bench: unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    stack = contextlib.ExitStack()
    stack.enter_context(swaps[variant]())
    if setup.compiled is not None and not (variant == "reference" and setup.reference_eager):
        stack.enter_context(setup.compiled.active())
    return stack


def gate_mode(variant: str) -> str:
    """The gate ours runs with in ``variant``: uniform for plain LoRA (and ``ours_uniform``)."""
    return "uniform" if variant in ("lora", "ours_uniform") else "learned"


def variant_loss(setup: StepSetup, samples: dict[str, torch.Tensor], parts: Parts, variant: str) -> torch.Tensor:
    if variant == "reference":
        return reference_loss(setup, samples, parts)
    return our_loss(setup, samples, parts, gate_mode(variant))


def checked_micro_batch_size(size: int, batch_size: int, name: str) -> int:
    """``size`` checked to divide ``batch_size`` (0: one micro-batch), as the trainer's must;
    0 when it is the whole batch, as `micro_batches` reads it."""
    if size < 0 or (size and batch_size % size):
        raise ConfigError(f"{name}: must divide the batch size {batch_size}, got {size}")
    return 0 if size == batch_size else size


def micro_batches(samples: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """``samples`` cut into consecutive micro-batches of ``size`` (0: one), as the trainer cuts a
    global batch (`ilora.teacher.train.rank_micro_batches`); a length-grouped batch is sorted
    longest first, so each micro-batch has its own padded width."""
    n = len(samples["target"])
    if size <= 0 or size >= n:
        return [samples]
    return [{key: value[i : i + size] for key, value in samples.items()} for i in range(0, n, size)]


def step_in_context(setup: StepSetup, samples: dict[str, torch.Tensor], parts: Parts, variant: str) -> float:
    """One optimiser step of ``variant``; the caller holds ``variant_context(setup, variant)``
    around it (backward too: a checkpointed layer is recomputed with the modules in place then).
    With a micro-batch size (`StepSetup.micro_batch_size_of`) the forward and backward run micro-batch by micro-batch, each
    loss weighted by its share of the samples (the trainer weights by answer tokens: the same
    work, another gradient scale), gradients accumulating, then one optimizer step; as in the
    trainer, the loss reaches the host once per step (one device sync)."""
    chunks = micro_batches(samples, setup.micro_batch_size_of(variant))
    total = None
    for chunk in chunks:
        loss = variant_loss(setup, chunk, parts, variant)
        if len(chunks) > 1:
            loss = loss * (len(chunk["target"]) / len(samples["target"]))
        with parts("backward"):
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    with parts("optimizer"):
        optimizer_step(setup, setup.optimizer)
        setup.optimizer.zero_grad(set_to_none=True)
    return float(total)


def train_step(setup: StepSetup, samples: dict[str, torch.Tensor], parts: Parts, variant: str) -> float:
    """One optimiser step of ``variant`` inside its `variant_context`."""
    with variant_context(setup, variant):
        return step_in_context(setup, samples, parts, variant)


def timed_runs(
    setup: StepSetup, batches: list[dict[str, torch.Tensor]], variants: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(runs, contexts)`` for `interleave`: each run is one step, each context the variant's
    `variant_context`, entered and left outside the timed call (the swap is not timed). The
    k-th call of a variant's run steps on ``batches[k % len(batches)]``."""

    def cycling(variant: str):
        calls = itertools.count()
        return lambda parts: step_in_context(setup, batches[next(calls) % len(batches)], parts, variant)

    runs = {v: cycling(v) for v in variants}
    contexts = {v: (lambda v=v: variant_context(setup, v)) for v in variants}
    return runs, contexts


def answer_logits(setup: StepSetup, samples: dict[str, torch.Tensor], variant: str) -> tuple[torch.Tensor, float]:
    """``variant``'s float32 logits at the positions that predict an answer token (row-major:
    sample by sample, in answer order, so every variant lists the same predictions in the same
    order) and its loss. ``ours_uniform`` is ours under the uniform gate (plain LoRA's weights)."""
    if variant == "reference":
        out, labels = reference_output(setup, samples, Parts(setup.device))
        return out.logits[:, :-1][labels[:, 1:] != IGNORE_INDEX].float(), float(out.loss)
    batch = our_batch(setup, samples)
    with _autocast(setup):
        logits, targets = setup.bundle.teacher.answer_logits(batch, gate_mode(variant))
    logits = logits.float()
    return logits, float(F.cross_entropy(logits, targets))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius norms). `IloraError` if the shapes differ: then the two
    variants predicted a different number of answer tokens, i.e. did not do the same work."""
    if a.shape != b.shape:
        raise IloraError(f"step bench: logits at {a.shape[0]} answer positions vs {b.shape[0]}: the variants do not predict the same answer tokens")
    return float((a - b).norm() / b.norm())


def check_equal(setup: StepSetup, samples: dict[str, torch.Tensor], variants: tuple[str, ...] = ("reference", "ours")) -> dict[str, Any]:
    """Every variant computes what ours computes: on the same batch, with dropout off, the logits
    at the answer positions of each variant are within `logit_tolerance` of ours (relative
    Frobenius distance; ``lora``: of ours under the uniform gate). Raises `IloraError` otherwise.

    The check runs with every ``lora_B`` temporarily random (the model is built with
    ``lora_B = 0``, where every adapter's output is zero and the gate would not matter), and it
    measures the gate's own effect: the distance of ours under the uniform gate from ours under
    the learned one. Where that is not above twice the tolerance the check could not catch a gate
    that never reaches the layers: in float32 that raises, under bf16 autocast it is recorded
    (``discriminates_gate``). Returns the distances, the losses, the tolerance and that verdict."""
    from ilora.teacher.adapters import gated_lora_modules

    teacher = setup.bundle.teacher
    teacher.eval()
    layers = list(gated_lora_modules(teacher.llm).values())
    saved = [layer.lora_B.weight.detach().clone() for layer in layers]
    logits, losses = {}, {}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[setup.device] if setup.device.type == "cuda" else []):
            torch.manual_seed(0)
            for layer in layers:
                layer.lora_B.weight.normal_(0.0, CHECK_LORA_B_STD)
            for variant in dict.fromkeys(("ours", *variants, "ours_uniform")):
                with variant_context(setup, "ours" if variant == "ours_uniform" else variant):
                    logits[variant], losses[variant] = answer_logits(setup, samples, variant)
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.lora_B.weight.copy_(weight)
        teacher.train()
        teacher.rec.eval()
    tol = logit_tolerance(setup)
    distance = {v: relative_difference(logits[v], logits["ours_uniform" if v == "lora" else "ours"]) for v in variants if v != "ours"}
    for variant, d in distance.items():
        if not d <= tol:  # NaN fails too
            raise IloraError(f"step bench: {variant}'s answer logits differ from ours by {d:.3g} (relative), more than the tolerance {tol:.3g}")
    effect = relative_difference(logits["ours_uniform"], logits["ours"])
    summary = {
        "compared": "logits at the answer positions (relative Frobenius distance to ours), dropout off, random lora_B",
        "distance": distance,
        "tolerance": tol,
        "gate_effect": effect,
        "discriminates_gate": effect > 2 * tol,
        "losses_dropout_off": losses,
    }
    if not setup.autocast and not summary["discriminates_gate"]:
        raise IloraError(f"step bench: the check cannot tell the learned gate from the uniform one (effect {effect:.3g}, tolerance {tol:.3g})")
    return summary


def logit_tolerance(setup: StepSetup) -> float:
    """Relative tolerance of the logit check: 1e-4 in float32, TOL_BF16 under bf16 autocast."""
    return TOL_BF16 if setup.autocast else 1e-4


# -- counting --------------------------------------------------------------------------------


def decoder_linear_params(llm: nn.Module) -> int:
    """Elements of the decoder layers' frozen linear weights (LoRA experts excluded)."""
    from ilora.teacher.adapters import gated_lora_modules

    lora = {id(m) for layer in gated_lora_modules(llm).values() for m in (layer.lora_A, layer.lora_B)}
    return sum(
        m.weight.numel() for m in llm.get_decoder().layers.modules() if isinstance(m, nn.Linear) and id(m) not in lora
    )


def useful_flops(setup: StepSetup, tokens: int, answer_tokens: int, gradient_checkpointing: bool) -> float:
    llm = setup.bundle.teacher.llm
    n = decoder_linear_params(llm)
    head = llm.get_output_embeddings().weight.numel()
    return (4 + (2 if gradient_checkpointing else 0)) * n * tokens + 4 * head * answer_tokens


def base_params(llm: nn.Module) -> int:
    """Elements of all of the LLM's own parameters (embeddings, LM head, norms; LoRA experts excluded), tied ones once."""
    from ilora.teacher.adapters import adapter_parameters

    lora = {id(p) for p in adapter_parameters(llm)}
    return sum(p.numel() for p in llm.parameters() if id(p) not in lora)


def all_params_flops(setup: StepSetup, tokens: int, gradient_checkpointing: bool) -> float:
    """The issue's MFU count: ``(4 [+ 2]) x N x tokens`` with ``N`` every LLM parameter (`base_params`)."""
    return (4 + (2 if gradient_checkpointing else 0)) * base_params(setup.bundle.teacher.llm) * tokens


def widest_micro_batch(setup: StepSetup, samples: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """The micro-batch of ``samples`` (`micro_batches`, at ``variant``'s size) with the most
    padded tokens: what ``variant``'s step holds at most at once."""
    chunks = micro_batches(samples, setup.micro_batch_size_of(variant))
    return max(chunks, key=lambda c: our_batch(setup, c).input_ids.numel()) if len(chunks) > 1 else samples


def memory(setup: StepSetup, samples: dict[str, torch.Tensor], variants: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Per variant: saved-activation bytes of the forward (both devices; of the widest micro-batch
    when the step has several) and the CUDA peak of a full step."""
    teacher = setup.bundle.teacher
    out: dict[str, dict[str, int]] = {}
    for variant in variants:
        forward = widest_micro_batch(setup, samples, variant)
        with variant_context(setup, variant):
            exclude = [*teacher.parameters(), *teacher.buffers()]  # in the variant's dtype
            saved, loss = saved_activation_bytes(lambda: variant_loss(setup, forward, Parts(setup.device), variant), exclude)
            del loss
        stats: dict[str, int] = {"saved_activation_bytes": saved}
        if setup.device.type == "cuda":
            with cuda_peak(setup.device) as peak:
                train_step(setup, samples, Parts(setup.device), variant)
            stats.update({f"cuda_{k}": v for k, v in peak.items()})
        out[variant] = stats
    return out


def optimizer_step(setup: StepSetup, optimizer: torch.optim.Optimizer) -> None:
    """The step's optimizer part (clip, step), gradients kept; `step_in_context` then drops them."""
    torch.nn.utils.clip_grad_norm_(setup.params, 1.0)
    optimizer.step()


def compare_optimizers(setup: StepSetup, samples: dict[str, torch.Tensor], repeats: int = 10) -> dict[str, Any]:
    """The optimizer part alone (gradient clipping + AdamW step), as the trainer runs it
    (``fused=True``) and with torch's default ``foreach`` kernels, on the same parameters, param groups and
    gradients (one backward of ours on the first micro-batch), interleaved, median seconds each. Parameters are restored
    afterwards and gradients dropped, so the benchmark's other measurements are unaffected.
    Raises `IloraError` unless both updates agree (relative 1e-5 after one step from the same state)."""
    params = setup.params
    saved = [p.detach().clone() for p in params]
    with variant_context(setup, "ours"):
        our_loss(setup, micro_batches(samples, setup.micro_batch_size)[0], Parts(setup.device)).backward()
    groups = lambda: [{"params": list(g["params"]), "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in setup.optimizer.param_groups]  # noqa: E731
    variants = {"foreach": torch.optim.AdamW(groups(), foreach=True), "fused": torch.optim.AdamW(groups(), fused=True)}
    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

    after = {}
    try:
        for name, optimizer in variants.items():  # one step each from the same state: the same update
            optimizer_step(setup, optimizer)
            after[name] = [p.detach().clone() for p in params]
            restore()
        for a, b in zip(after["foreach"], after["fused"]):
            if not torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7):
                raise IloraError("step bench: fused and foreach AdamW give different updates")
        times = interleave(
            {name: (lambda parts, o=optimizer: optimizer_step(setup, o)) for name, optimizer in variants.items()},
            setup.device, warmup=1, repeats=repeats, min_repeats=repeats,
        )
    finally:
        restore()
        setup.optimizer.zero_grad(set_to_none=True)
    foreach, fused = times["foreach"].median, times["fused"].median
    return {"foreach_s": foreach, "fused_s": fused, "foreach_over_fused": foreach / fused, "trainable_params": sum(p.numel() for p in params)}


def profile_step(
    setup: StepSetup, samples: dict[str, torch.Tensor], path: Path, rows: int = 40, part_times: bool = True, variant: str = "ours"
) -> dict[str, Any]:
    """One step of ``variant`` (ours by default) under torch.profiler; its top operators (by self device time on CUDA,
    self CPU time otherwise) written to ``path``. Returns the step's wall time, the time the
    device was busy running kernels (CUDA) and the number of aten operators called (nested
    calls included): a device busy for a small share of the step means the step waits on
    Python and kernel launches. The profiled step synchronises between its parts as the
    timed steps do (``part_times``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = setup.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with variant_context(setup, variant):
        step_in_context(setup, samples, Parts(setup.device, timed=part_times), variant)  # warm: the profiler sees a steady step
        sync(setup.device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            step_in_context(setup, samples, Parts(setup.device, timed=part_times), variant)
            sync(setup.device)
            wall = time.perf_counter() - start
    averages = prof.key_averages()
    # kernel events only (as the table's "Self CUDA time total"): the aten operators that
    # launched them carry the same time again, and user annotations span other events
    busy_us = (
        sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
        if cuda
        else None
    )
    operators = sum(e.count for e in averages if e.key.startswith("aten::"))
    summary = {
        "variant": variant,
        "file": str(path),
        "step_s": wall,
        "device_busy_s": busy_us / 1e6 if busy_us is not None else None,
        "device_busy_share": busy_us / 1e6 / wall if busy_us is not None else None,
        "aten_operators": operators,
    }
    table = averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"step profile of {variant}: {json.dumps(summary)}\n\n{table}\n")
    return summary


# -- the benchmark ---------------------------------------------------------------------------


def run_bench(
    device: torch.device,
    *,
    quick: bool = False,
    shape: str | None = None,
    batch_size: int = 8,
    gradient_checkpointing: bool = False,
    compile_layers: bool = False,
    eager_baseline: bool = False,
    fp32_baseline: bool = False,
    lora_baseline: bool = False,
    warmup: int | None = None,
    repeats: int = 5,
    budget_s: float | None = None,
    profile: Path | None = None,
    part_times: bool = True,
    group_by_length: bool = False,
    reference: bool = True,
    compile_mode: str | None = None,
    lora_dropout: float | None = None,
    batches: int = 1,
    shared_inputs: bool = False,
    micro_batch_size: int = 0,
    reference_micro_batch_size: int | None = None,
    reference_eager: bool = False,
) -> dict[str, Any]:
    """Time a training step of the reference and of ours (and of ours with eager attention when
    ``eager_baseline``, of plain LoRA when ``lora_baseline``, of ours with grouped adapter inputs
    when ``shared_inputs``), interleaved on one model; one
    JSON-ready dict. With ``profile``, one more step of ours (of ``ours_shared`` with
    ``shared_inputs``) runs under torch.profiler afterwards (`profile_step`). ``part_times=False`` times whole steps without the device
    syncs between their parts (inputs, forward, backward, optimizer), as training runs them.
    ``group_by_length``: the batch is `grouped_batches`' (as training with ``group_by_length``).
    ``reference=False`` leaves the reference out (for batches whose reference step does not
    fit in memory): ``ratio`` is then None and MFU is the headline. ``compile_mode`` is
    torch.compile's mode for the compiled layers (e.g. ``max-autotune-no-cudagraphs``);
    ``lora_dropout`` overrides the teacher's default adapter dropout (0.1). ``batches`` > 1
    cycles the steps through that many batches of different lengths (`grouped_batches`, or
    random batches), as training meets them: with ``compile_layers`` that includes the
    recompilation for new shapes in the warm-up (which then covers every batch) and the
    dynamic-shape kernels after it (the warm-up is at least ``batches`` rounds). Each variant's
    step time (``step_s``) is then the mean of its timed steps (every variant steps on the same
    sequence of batches), samples/s, tokens/s and MFU are over those steps together (their
    FLOPs and tokens summed, divided by their summed time), and memory is measured on the
    widest batch (padded width); with one batch the step time is the median. With
    ``compile_layers`` the measurements run under `recompile_limit`: a run that would pass it
    raises instead of timing eager layers. ``micro_batch_size`` (a divisor of ``batch_size``; 0:
    one micro-batch) runs each step's forward and backward in consecutive micro-batches, each
    padded to its own width, before one optimizer step, as the trainer runs a step of
    ``batch_size`` with that ``micro_batch_size``; the equal-work check runs on the whole batch
    (without gradients), saved memory is the widest micro-batch's. ``reference_micro_batch_size``
    gives the reference micro-batches of its own (a divisor of ``batch_size``) and
    ``reference_eager`` runs its layers eager under ``compile_layers``: the research code's step
    as it runs (no compile, the micro-batch its memory allows) against ours as the trainer runs
    it, on the same samples, so the step-time ratio is the ratio of samples/s."""
    shape = shape or ("tiny-quick" if quick else "tiny")
    if device.type == "cpu" and shape in ("1b", "7b"):
        raise ConfigError(f"shape {shape} is for CUDA; on CPU use tiny")
    if quick:
        repeats = min(repeats, 3)
    if batches < 1:
        raise ConfigError(f"batches: must be >= 1, got {batches}")
    micro_batch_size = checked_micro_batch_size(micro_batch_size, batch_size, "micro_batch_size")
    if reference_micro_batch_size is not None:
        if not reference:
            raise ConfigError("reference_micro_batch_size: the reference is not run (--no-reference)")
        reference_micro_batch_size = checked_micro_batch_size(reference_micro_batch_size, batch_size, "reference_micro_batch_size")
    if reference_eager and not (compile_layers and reference):
        raise ConfigError("reference_eager: runs the reference's layers eager while ours are compiled; it needs --compile and the reference")
    warmup = warmup if warmup is not None else (2 if compile_layers else 1) + (batches if batches > 1 else 0)
    if batches > 1:
        warmup = max(warmup, batches)  # every batch (and shape) seen before timing
    budget_s = budget_s if budget_s is not None else (10.0 if quick else 120.0)
    if fp32_baseline and (device.type != "cuda" or compile_layers):
        raise ConfigError("--fp32-baseline measures bf16 autocast against float32: CUDA only (on a CPU both run float32), without --compile")
    setup, source = build_setup(
        shape, device, gradient_checkpointing=gradient_checkpointing, compile_layers=compile_layers, compile_mode=compile_mode, lora_dropout=lora_dropout
    )
    if group_by_length:
        batch_list = grouped_batches(setup, batch_size, batches)
    else:
        batch_list = [random_samples(len(setup.inputs.titles), batch_size, HISTORY_ITEMS, CANDIDATES, seed=i) for i in range(batches)]
    setup.micro_batch_size = micro_batch_size
    setup.reference_micro_batch_size = reference_micro_batch_size
    setup.reference_eager = reference_eager
    samples = batch_list[0]
    optional = {"ours_eager": eager_baseline, "ours_fp32": fp32_baseline, "ours_shared": shared_inputs, "lora": lora_baseline}
    variants = (("reference",) if reference else ()) + ("ours",) + tuple(v for v, wanted in optional.items() if wanted)
    with recompile_limit(len(variants) if compile_layers else None):
        check = check_equal(setup, samples, variants)
        probes = [our_batch(setup, b) for b in batch_list]
        tokens_each = [int(p.attention_mask.sum()) for p in probes]
        answers_each = [p.num_targets for p in probes]
        flops_each = [useful_flops(setup, n, a, gradient_checkpointing) for n, a in zip(tokens_each, answers_each)]
        flops_all_each = [all_params_flops(setup, n, gradient_checkpointing) for n in tokens_each]
        longest = batch_list[max(range(batches), key=lambda i: (probes[i].input_ids.shape[1], tokens_each[i]))]  # the widest
        padded_width = {"ours": probes[0].input_ids.shape[1], "reference": reference_tokens(setup.inputs, samples)["input_ids"].shape[1]}

        runs, contexts = timed_runs(setup, batch_list, variants)
        cycle = {} if batches == 1 else {"repeats": -(-repeats // batches) * batches, "min_repeats": batches, "stop_every": batches}
        times = interleave(
            runs, device, warmup=warmup, **{"repeats": repeats, **cycle}, budget_s=budget_s, contexts=contexts, part_times=part_times
        )
        mem = memory(setup, longest, variants)
        optimizers = compare_optimizers(setup, samples)
        profiled = profile_step(setup, samples, profile, part_times=part_times, variant="ours_shared" if shared_inputs else "ours") if profile else None
    peak = peak_flops(device)
    step_s = {name: t.median if batches == 1 else sum(t.totals) / len(t.totals) for name, t in times.items()}
    variants = {}
    for name, t in times.items():
        # the k-th call stepped on batch k % batches; the timed calls follow the warm-up's
        used = [0] if batches == 1 else [(warmup + j) % batches for j in range(len(t.totals))]
        steps, seconds = len(used), step_s[name] * len(used)
        step_tokens = sum(tokens_each[i] for i in used)
        step_flops = sum(flops_each[i] for i in used)
        step_flops_all = sum(flops_all_each[i] for i in used)
        variants[name] = {
            **t.summary(),
            "step_s": step_s[name],
            "samples_per_s": steps * batch_size / seconds,
            "tokens_per_s": step_tokens / seconds,
            "mfu": step_flops / seconds / peak if peak else None,
            "mfu_all_params": step_flops_all / seconds / peak if peak else None,
            "memory": mem[name],
        }
    llm = setup.bundle.teacher.llm
    cfg = llm.config
    return {
        "name": "step",
        "time": now_utc(),
        "quick": quick,
        "machine": machine_info(device),
        "sizes": {
            "shape": shape,
            "hidden": cfg.hidden_size,
            "layers": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "intermediate": cfg.intermediate_size,
            "vocab": cfg.vocab_size,
            "decoder_linear_params": decoder_linear_params(llm),
            "dtype": "bfloat16 (adapters float32, bf16 autocast)" if setup.autocast else "float32",
            "batch_size": batch_size,
            "micro_batch_size": micro_batch_size or batch_size,
            **(
                {"micro_batch_padded_width": [our_batch(setup, c).input_ids.shape[1] for c in micro_batches(samples, micro_batch_size)]}
                if micro_batch_size
                else {}
            ),
            "tokens_per_sample": sum(tokens_each) / len(tokens_each) / batch_size,
            "answer_tokens_per_sample": sum(answers_each) / len(answers_each) / batch_size,
            "padded_width": padded_width,
            "batches": batches,
            "warmup": warmup,
            **(
                {
                    "tokens_per_sample_each": [n / batch_size for n in tokens_each],
                    "padded_width_each": [p.input_ids.shape[1] for p in probes],
                    "memory_measured_on": "the widest batch (padded width, then tokens)",
                }
                if batches > 1
                else {}
            ),
            "experts": setup.bundle.teacher.num_experts,
            "gradient_checkpointing": gradient_checkpointing,
            "compile": compile_layers,
            **({"reference_compiled": not reference_eager} if compile_layers and reference else {}),
            **(
                {
                    "reference_micro_batch_size": reference_micro_batch_size or batch_size,
                    "reference_micro_batch_padded_width": [
                        reference_tokens(setup.inputs, c)["input_ids"].shape[1] for c in micro_batches(samples, reference_micro_batch_size)
                    ],
                }
                if reference_micro_batch_size is not None
                else {}
            ),
            "compile_mode": compile_mode or "default",
            "lora_dropout": setup.bundle.config.lora_dropout,
            "attention": llm.config._attn_implementation,
            "part_syncs": part_times,
            "batch": "length-grouped (as group_by_length trains)" if group_by_length else "random samples",
        },
        "titles": source,
        "equal_work_checked": check,
        "flops_per_step": sum(flops_each) / batches,
        "flops_counted": "useful FLOPs: (4 + 2 if gradient checkpointing) x decoder linear weights x non-padding tokens "
        "+ 4 x H x V per answer token (LM head); attention scores and LoRA not counted",
        "flops_all_params_per_step": sum(flops_all_each) / batches,
        "flops_all_params_counted": "the issue's count, as in the H100 anchor table it quotes (4 x 6.74e9 x tokens at 7B): "
        "(4 + 2 if gradient checkpointing) x all of the LLM's parameters (embeddings and LM head included, LoRA excluded) "
        "x non-padding tokens; the basis of mfu_all_params",
        "peak_flops": peak,
        "variants": variants,
        "ratio": step_s["reference"] / step_s["ours"] if reference else None,
        "ratio_means": (
            "reference / ours time of a full training step (step_s)" + reference_settings(setup, compile_layers)
            if reference
            else "not measured (--no-reference)"
        ),
        "optimizer": optimizers,
        "optimizer_means": "the optimizer part alone (clip + AdamW step) on ours' gradients: foreach=True (torch's default "
        "on CUDA) vs fused=True (what the trainer and the variants above run), median seconds",
        **({"profile": profiled} if profiled else {}),
        **(
            {
                "sdpa_vs_eager": step_s["ours_eager"] / step_s["ours"],
                "sdpa_vs_eager_means": "ours with eager attention / ours with the default attention, step time (step_s)",
            }
            if eager_baseline
            else {}
        ),
        **(
            {
                "bf16_vs_fp32": step_s["ours_fp32"] / step_s["ours"],
                "bf16_vs_fp32_means": "ours in float32 without autocast / ours (bf16 weights, bf16 autocast), step time (step_s)",
            }
            if fp32_baseline
            else {}
        ),
        **(
            {
                "shared_vs_ours": step_s["ours"] / step_s["ours_shared"],
                "shared_vs_ours_means": "ours / ours with grouped adapter inputs (one dropout mask and one A product for q/k/v "
                "and for gate/up), step time (step_s); above 1: grouping is faster",
            }
            if shared_inputs
            else {}
        ),
        **(
            {
                "vs_lora": step_s["ours"] / step_s["lora"],
                "vs_lora_means": "ours / plain LoRA on the same weights (no gate), step time (step_s)",
            }
            if lora_baseline
            else {}
        ),
    }


def reference_settings(setup: StepSetup, compile_layers: bool) -> str:
    """How the reference ran where that differs from ours, for the ratio's meaning ('' where it did not)."""
    differs = []
    if setup.reference_micro_batch_size is not None and setup.micro_batch_size_of("reference") != setup.micro_batch_size:
        differs.append(f"in micro-batches of {setup.reference_micro_batch_size or 'the whole batch'}")
    if compile_layers and setup.reference_eager:
        differs.append("eager")
    return f" (the reference {', '.join(differs)})" if differs else ""


def markdown_table(result: dict[str, Any]) -> list[str]:
    s = result["sizes"]
    first_batch = "the first batch's micro-batches " if s.get("batches", 1) > 1 else ""  # micro_batch_padded_width is batch 0's
    ours_micro = s.get("micro_batch_size", s["batch_size"])
    lines = [
        f"Shape `{s['shape']}` ({s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}, {s['dtype']}), batch {s['batch_size']}, "
        f"{s['tokens_per_sample']:.0f} tokens/sample ({s.get('batch', 'random samples')}"
        + (f", padded to {s['padded_width']['ours']}" if s.get("batches", 1) == 1 else "")
        + (
            f"; {s['batches']} batches cycled, {min(s['tokens_per_sample_each']):.0f}-{max(s['tokens_per_sample_each']):.0f} tokens/sample "
            f"padded to {min(s['padded_width_each'])}-{max(s['padded_width_each'])}; step time the mean of the timed steps, rates and MFU "
            "over them together, memory on the widest batch"
            if s.get("batches", 1) > 1
            else ""
        )
        + ")"
        + (
            f", in micro-batches of {s['micro_batch_size']} ({first_batch}padded to {', '.join(map(str, s['micro_batch_padded_width']))}; "
            "one optimizer step, saved MiB of the widest)"
            if ours_micro < s["batch_size"]
            else ""
        )
        + (
            f"; the reference in micro-batches of {s['reference_micro_batch_size']} (padded to "
            f"{', '.join(map(str, s['reference_micro_batch_padded_width']))}; saved MiB of its widest)"
            if s.get("reference_micro_batch_size", ours_micro) != ours_micro
            else ""
        )
        + f", checkpointing {s['gradient_checkpointing']}, compile {s['compile']}"
        + (" (the reference eager)" if s.get("reference_compiled") is False else "")
        + ", "
        f"attention {s['attention']}, compile mode {s.get('compile_mode', 'default')}, LoRA dropout {s.get('lora_dropout', '-')}" + ("." if s.get("part_syncs", True) else ", no device syncs between the step's parts (no per-part times)."),
        "",
        "| variant | step ms (inputs / forward / backward / optimizer) | samples/s | tokens/s | MFU (issue's count: all parameters) | saved MiB | CUDA peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, v in result["variants"].items():
        p = v.get("parts_median_s", {})
        mfu = "-" if v["mfu"] is None else f"{100 * v['mfu']:.1f}% ({100 * v['mfu_all_params']:.1f}%)"
        lines.append(
            f"| {name} | {ms(v.get('step_s', v['median_s']))} ({ms(p.get('inputs'))} / {ms(p.get('forward'))} / {ms(p.get('backward'))} / {ms(p.get('optimizer'))}) "
            f"| {v['samples_per_s']:.2f} | {v['tokens_per_s']:.0f} | {mfu} | {mib(v['memory']['saved_activation_bytes'])} "
            f"| {mib(v['memory'].get('cuda_peak_bytes'))} |"
        )
    if "bf16_vs_fp32" in result:
        lines += ["", f"float32 / bf16 (ours, step time): {result['bf16_vs_fp32']:.2f}x."]
    if "sdpa_vs_eager" in result:
        lines += ["", f"Eager attention / {s['attention']} attention (ours, step time): {result['sdpa_vs_eager']:.2f}x."]
    check = result["equal_work_checked"]
    if "discriminates_gate" in check:
        verdict = "tells" if check["discriminates_gate"] else "does NOT tell"
        distances = ", ".join(f"{v} {d:.3g}" for v, d in check.get("distance", {}).items())
        lines += [
            "",
            f"Equal-work check (answer-position logits, random lora_B; relative distance to ours: {distances}): tolerance {check['tolerance']:.3g}, "
            f"learned vs uniform gate {check['gate_effect']:.3g}: it {verdict} the gate apart.",
        ]
    if "shared_vs_ours" in result:
        lines += ["", f"Ours / ours with grouped adapter inputs (step time): {result['shared_vs_ours']:.3f}x."]
    if "vs_lora" in result:
        lines += ["", f"Ours / plain LoRA on the same weights (step time): {result['vs_lora']:.3f}x."]
    if "optimizer" in result:
        o = result["optimizer"]
        lines += ["", f"Optimizer part alone (clip + AdamW, {o['trainable_params']:,} trainable parameters): foreach {ms(o['foreach_s'])} ms, fused {ms(o['fused_s'])} ms ({o['foreach_over_fused']:.2f}x)."]
    if "profile" in result:
        p = result["profile"]
        busy = "" if p["device_busy_s"] is None else f", device busy {ms(p['device_busy_s'])} ms ({100 * p['device_busy_share']:.0f} %)"
        lines += ["", f"Profiled step of {p.get('variant', 'ours')}: {ms(p['step_s'])} ms{busy}, {p['aten_operators']} aten operators (top operators: `{Path(p['file']).name}`; `profiles.txt` in a `gpu.sh` run)."]
    return lines

"""The iLoRA teacher: a frozen causal LM with gated LoRA experts, driven by SASRec.

One forward path. `ILoRATeacher.run` turns a `PromptBatch` into
``(inputs_embeds, attention_mask, position_ids, gates)`` and runs the LLM's decoder with
the per-sample gate in scope. Everything else calls it:

* `loss`: next-token cross-entropy on the answer tokens only; LM-head logits are
  computed only at the positions that predict an answer token (`answer_logits`).
* `score_candidates`: exact log-likelihood of each candidate title (+ eos) given the
  prompt. The prompt is encoded once by `run`; all C answers then run as one
  continuation of its KV cache under a block attention mask (nothing copied per candidate).
* `generate`: greedy decoding from the prompt, logits only at the last position.
* teacher-output export (`ilora.outputs.export`) uses `score_candidates`, and `decode`
  for the item embeddings.

Gates: ``learned`` (the gate network on SASRec's user representation), ``uniform``
(every expert 1/E: plain LoRA) or ``expert:N`` (all weight on expert N).

The frozen SASRec stays in eval mode whatever mode the teacher is put in (`ILoRATeacher.train`).
`score_candidates` and `generate` take only left-padded prompts without answers
(`check_prompt_batch`), and candidate ids must be catalog items.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ilora.errors import ConfigError, IloraError
from ilora.teacher.batch import special_ids


@dataclass
class DecoderOutput:
    hidden: torch.Tensor  # (B, T, H) last hidden states
    past_key_values: object | None
    gates: torch.Tensor  # (B, E) the gate that was applied


def _cache_argument(decoder: nn.Module) -> str:
    """The KV-cache keyword of this transformers version: ``cache`` (5.x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def parse_gate_mode(mode: str, num_experts: int | None) -> tuple[str, int | None]:
    """``learned`` | ``uniform`` | ``expert:N`` -> (kind, N). ``num_experts=None`` checks the
    syntax only (before a teacher is loaded: N any non-negative integer)."""
    if mode in ("learned", "uniform"):
        return mode, None
    if mode.startswith("expert:"):
        digits = mode.split(":", 1)[1]  # ASCII digits only, no sign, space or leading zero: one spelling per expert (file names)
        n = int(digits) if re.fullmatch(r"0|[1-9][0-9]*", digits) else -1
        if n < 0 or (num_experts is not None and n >= num_experts):
            expected = "a non-negative integer" if num_experts is None else f"in 0..{num_experts - 1}"
            raise ConfigError(f"gate {mode!r}: expert index must be {expected}")
        return "expert", n
    raise ConfigError(f"gate {mode!r}: expected learned, uniform or expert:N")


def candidate_mask(prompt_valid: torch.Tensor, segment: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, A, T + A) mask for A packed answer tokens continuing a cached prompt.

    Answer token i of row b belongs to candidate ``segment[b, i]`` (-1: padding) at offset
    ``offset[b, i]`` inside that answer. It attends to every valid prompt token and to the
    earlier tokens of its own answer; every token also attends to itself, so padding rows
    never see an empty set.
    """
    b, a = segment.shape
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0) & (offset[:, None, :] <= offset[:, :, None])
    own = same | torch.eye(a, dtype=torch.bool, device=segment.device)[None]
    allowed = torch.cat([prompt_valid[:, None, :].expand(b, a, -1), own], dim=2)
    zero = torch.zeros((), dtype=dtype, device=segment.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def check_prompt_batch(batch, what: str) -> None:
    """`IloraError` unless ``batch`` holds prompts without answers, left-padded.

    Left padding puts every prompt's last token in the last column, which is where
    `ILoRATeacher.score_candidates` and `ILoRATeacher.generate` read the next-token state;
    an answer in the batch would be read as part of the prompt. An empty batch is refused too.
    """
    if len(batch) == 0:
        raise IloraError(f"{what}: the batch holds no prompts")
    last = batch.attention_mask[:, -1] if batch.attention_mask.shape[1] else batch.attention_mask.new_zeros(len(batch))
    if not bool((last == 1).all()):
        row = int((last != 1).nonzero()[0, 0])
        raise IloraError(f"{what}: prompt {row} does not end in the last column; prompts must be left-padded (PromptCollator padding_side='left')")
    answers = (batch.labels != -100).any(1)
    if bool(answers.any()):
        row = int(answers.nonzero()[0, 0])
        raise IloraError(f"{what}: prompt {row} carries an answer; build prompts without answers (PromptCollator with_answer=False)")


def pack_answers(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C, L) right-padded answers -> (B, A) packed ids, segment (candidate, -1 = pad), offset.

    The real tokens of a row's answers are laid end to end, in candidate order, so no
    compute is spent on per-answer padding.
    """
    b, c, length = ids.shape
    flat = mask.reshape(b, c * length)
    slot = flat.long().cumsum(1) - 1
    width = max(int(flat.sum(1).max()), 1)
    rows = torch.arange(b, device=ids.device)[:, None].expand_as(flat)[flat]
    cols = slot[flat]
    cand = torch.arange(c, device=ids.device).repeat_interleave(length).expand(b, -1)[flat]
    off = torch.arange(length, device=ids.device).repeat(c).expand(b, -1)[flat]
    packed = torch.full((b, width), pad_id, dtype=ids.dtype, device=ids.device)
    segment = torch.full((b, width), -1, dtype=torch.long, device=ids.device)
    offset = torch.zeros((b, width), dtype=torch.long, device=ids.device)
    packed[rows, cols] = ids.reshape(b, -1)[flat]
    segment[rows, cols] = cand
    offset[rows, cols] = off
    return packed, segment, offset


@contextlib.contextmanager
def eval_mode(teacher: nn.Module) -> Iterator[nn.Module]:
    """``teacher`` in eval mode within the block (LoRA dropout off, so scores, texts and gates
    are exact, whatever mode the caller left it in), then in the caller's mode again."""
    if not teacher.training:  # nothing to switch (and no walk over every module)
        yield teacher
        return
    teacher.eval()
    try:
        yield teacher
    finally:
        teacher.train()


def in_eval_mode(method):
    """Run a teacher ``method`` under `eval_mode`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with eval_mode(self):
            return method(self, *args, **kwargs)

    return wrapper


def attention_window(config) -> int | None:
    """The sliding attention window of an LLM config (Mistral, Phi-3, Gemma 2/3, Qwen2 with
    ``use_sliding_window``), or None where no layer attends through one."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or getattr(config, "use_sliding_window", True) is False:
        return None  # (transformers before 5 kept Qwen2's sliding_window with use_sliding_window off)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def head_logits(llm, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM's output layer on ``hidden``, with the changes some families make
    after that layer in their own forward: Granite divides by ``logits_scaling`` (HyperCLOVA X
    multiplies by it), Cohere multiplies by ``logit_scale``, Falcon-H1 by
    ``lm_head_multiplier``, Gemma 2/3 soft-cap with ``final_logit_softcapping``
    (``cap * tanh(logits / cap)``). Without them the loss, scores and generations would use
    another distribution than the model's; `check_head_logits` catches a family not listed."""
    logits = llm.get_output_embeddings()(hidden)
    config = llm.config
    if getattr(config, "logits_scaling", None):
        scale = config.logits_scaling
        logits = logits * scale if config.model_type == "hyperclovax" else logits / scale
    for name in ("logit_scale", "lm_head_multiplier"):
        if getattr(config, name, None):
            logits = logits * getattr(config, name)
    if getattr(config, "final_logit_softcapping", None):
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_head_logits(llm, tolerance: float = 1e-3) -> None:
    """`ConfigError` unless `head_logits` on the decoder's output reproduces the model's own
    logits, on one two-token forward (run before the adapters are injected): a family whose
    forward changes the logits in a way `head_logits` does not know would otherwise train and
    score on another distribution, silently."""
    was_training = llm.training
    llm.eval()
    try:
        ids = torch.tensor([[0, 1]], device=llm.get_output_embeddings().weight.device)
        with torch.no_grad():
            own = llm(input_ids=ids).logits.float()
            ours = head_logits(llm, llm.get_decoder()(input_ids=ids).last_hidden_state).float()
    finally:
        llm.train(was_training)
    gap = float((ours - own).abs().max())
    if gap > tolerance * max(float(own.abs().max()), 1.0):
        raise ConfigError(
            f"model type {llm.config.model_type!r}: its forward changes the output layer's logits (a scale or a cap) "
            f"in a way ilora does not reproduce (largest difference {gap:.3g}); it cannot be the teacher's LLM yet"
        )


class ILoRATeacher(nn.Module):
    """Frozen LLM + gated LoRA experts + gate network + projector, reading a frozen SASRec.

    Trainable: the LoRA experts (inside ``llm``), ``gate_net`` and ``projector``.
    """

    def __init__(self, llm, tokenizer, rec, gate_net, projector, gate_state, title_table, num_experts: int) -> None:
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.rec = rec
        self.gate_net = gate_net
        self.projector = projector
        self.gate_state = gate_state
        self.title_table = title_table
        self.num_experts = num_experts
        for p in self.rec.parameters():
            p.requires_grad_(False)
        self.rec.eval()

    def train(self, mode: bool = True) -> "ILoRATeacher":
        """Set the training mode of every part except the frozen SASRec, which stays in eval
        mode (no dropout in the gate input or the placeholder embeddings)."""
        super().train(mode)
        self.rec.eval()
        return self

    # -- the one forward path ------------------------------------------------------------------
    def gates(self, history: torch.Tensor, length: torch.Tensor, mode: str = "learned") -> torch.Tensor:
        """(B, E) expert weights for each sample."""
        kind, n = parse_gate_mode(mode, self.num_experts)
        batch = history.shape[0]
        if kind == "learned":
            with torch.no_grad():
                user = self.rec.user_representation(history, length)
            return self.gate_net(user.float())
        weights = torch.zeros(batch, self.num_experts, device=history.device)
        if kind == "uniform":
            return weights + 1.0 / self.num_experts
        weights[:, n] = 1.0
        return weights

    def embed(self, batch) -> torch.Tensor:
        """Token embeddings with every placeholder replaced by its projected SASRec item embedding."""
        from ilora.teacher.batch import substitute_placeholders

        embeds = self.llm.get_input_embeddings()(batch.input_ids)
        if batch.ph_item.numel() == 0:
            return embeds
        with torch.no_grad():
            item_vectors = self.rec.item_embeddings(batch.ph_item)
        projected = self.projector(item_vectors.float()).to(embeds.dtype)
        return substitute_placeholders(embeds, batch, projected)

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        gates: torch.Tensor,
        past_key_values=None,
        use_cache: bool = False,
    ) -> DecoderOutput:
        """Run the LLM's decoder stack with ``gates`` in scope for every adapted layer."""
        decoder = self.llm.get_decoder()
        cache_kwarg = _cache_argument(decoder)
        with self.gate_state.use(gates):
            out = decoder(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **{cache_kwarg: past_key_values},
            )
        return DecoderOutput(out.last_hidden_state, out[cache_kwarg] if use_cache else None, gates)

    def run(self, batch, gate_mode: str = "learned", use_cache: bool = False) -> DecoderOutput:
        """Batch -> (inputs_embeds, attention_mask, position_ids, gates) -> decoder hidden states."""
        gates = self.gates(batch.history, batch.length, gate_mode)
        embeds = self.embed(batch)
        position_ids = (batch.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return self.decode(embeds, batch.attention_mask, position_ids, gates, use_cache=use_cache)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on ``hidden``, as the model's own forward applies it (`head_logits`)."""
        return head_logits(self.llm, hidden)

    # -- what the one path is used for ---------------------------------------------------------
    def loss(self, batch, gate_mode: str = "learned", reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy over the answer tokens (labels != -100): their mean, or
        with ``reduction="sum"`` their sum (the trainer divides by the global batch's count).

        The hidden state at position t predicts token t + 1, so logits are computed only
        at the positions just before an answer token. With ``reduction="mean"`` a batch
        without answer tokens raises `IloraError` (its mean is undefined); their sum is 0.
        """
        if reduction == "mean" and batch.num_targets == 0:
            raise IloraError("loss: the batch has no answer tokens (every label is -100); build it with answers (PromptCollator with_answer=True)")
        logits, targets = self.answer_logits(batch, gate_mode)
        return F.cross_entropy(logits.float(), targets, reduction=reduction)

    def answer_logits(self, batch, gate_mode: str = "learned") -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, targets)``: the LM-head logits ``(N, V)`` at the N positions that predict an
        answer token, and those tokens ``(N,)``, row-major (sample by sample, in answer order).
        The hidden state at position t predicts token t + 1; no other position gets logits."""
        from ilora.teacher.batch import target_positions

        out = self.run(batch, gate_mode)
        rows, cols = target_positions(batch)  # no host sync: their number was counted at build time
        return self.lm_logits(out.hidden[rows, cols]), batch.labels[rows, cols + 1]

    @torch.no_grad()
    @in_eval_mode
    def score_candidates(self, batch, candidates: torch.Tensor, gate_mode: str = "learned", chunk: int = 4096) -> torch.Tensor:
        """(B, C) exact log-likelihood of each candidate's answer tokens (title + eos) given the prompt.

        ``batch`` holds prompts without answers (left-padded). The prompts run through `run`
        (the training forward) once, keeping their KV cache; then all C answers of a row,
        packed end to end without padding (`pack_answers`), run as one continuation under
        the block mask of `candidate_mask`: each answer attends to the cached prompt and to
        its own earlier tokens only, at positions continuing from the prompt's end. Nothing
        is copied per candidate and the gate stays one per sample. LM-head logits are
        computed only at the positions that predict an answer token, ``chunk`` rows at a time.

        Runs in eval mode (`in_eval_mode`). Raises `IloraError` if the prompts are not
        left-padded or carry answers (`check_prompt_batch`), if ``candidates`` is not (B, C),
        if a candidate id is outside the catalog ``0..num_items - 1``, if the LLM runs
        FlashAttention (it cannot take the block mask), or if it attends through a sliding
        window shorter than the padded prompts plus the longest answer (`attention_window`: the
        block mask cannot apply it).
        """
        check_prompt_batch(batch, "score_candidates")
        if candidates.ndim != 2 or candidates.shape[0] != len(batch) or candidates.shape[1] == 0:
            raise IloraError(f"score_candidates: candidates have shape {tuple(candidates.shape)}, expected ({len(batch)}, C >= 1) for {len(batch)} prompts")
        bad = ((candidates < 0) | (candidates >= self.title_table.num_items)).nonzero()
        if bad.numel():
            r, k = (int(i) for i in bad[0])
            raise IloraError(
                f"score_candidates: prompt {r}, candidate {k} has id {int(candidates[r, k])}, outside the catalog 0..{self.title_table.num_items - 1}"
            )
        attn = getattr(self.llm.config, "_attn_implementation", None)
        if attn is not None and "flash" in str(attn):
            raise IloraError(f"score_candidates: the LLM uses attn_implementation {attn!r}, which cannot take the block attention mask; load it with sdpa or eager")
        b, c = candidates.shape
        ids, mask = self.title_table.answer_tokens(candidates.reshape(-1))
        ids, mask = ids.to(candidates.device).view(b, c, -1), mask.to(candidates.device).view(b, c, -1)
        packed, segment, offset = pack_answers(ids, mask, self.title_table.pad_id)
        window = attention_window(self.llm.config)
        if window is not None and batch.input_ids.shape[1] + ids.shape[-1] > window:
            # Within the window, the block mask is exact: each (prompt, answer) sequence is no
            # longer than the window, so the model's own forward would not cut it either, and
            # the cache still holds the whole prompt. Beyond it, the mask would not cut it.
            raise IloraError(
                f"score_candidates: the LLM attends through a sliding window of {window} tokens, shorter than these prompts "
                f"({batch.input_ids.shape[1]} tokens, padded) plus their longest answer ({ids.shape[-1]} tokens): the block "
                "mask cannot apply the window, so answers would be scored unlike the model reads them. Smaller batches "
                "(narrower padding) help where each prompt fits alone; evaluation can use the generate protocol instead"
            )
        prompt = self.run(batch, gate_mode, use_cache=True)
        embeds = self.llm.get_input_embeddings()(packed).to(prompt.hidden.dtype)
        positions = batch.attention_mask.long().sum(1, keepdim=True) + offset
        attention = candidate_mask(batch.attention_mask.bool(), segment, offset, embeds.dtype)
        answers = self.decode(embeds, attention, positions, prompt.gates, past_key_values=prompt.past_key_values)
        # The token at offset 0 is predicted by the prompt's last position, any other by
        # the packed token just before it (same answer, since answers are laid in order).
        real = segment >= 0
        previous = torch.cat([prompt.hidden[:, -1:], answers.hidden[:, :-1]], dim=1)
        predictors = torch.where((offset == 0)[..., None], prompt.hidden[:, -1:], previous)[real]
        targets = packed[real]
        logp = torch.empty(targets.shape, device=targets.device)
        for i in range(0, targets.numel(), chunk):
            logits = self.lm_logits(predictors[i : i + chunk]).float()
            logp[i : i + chunk] = torch.log_softmax(logits, -1).gather(-1, targets[i : i + chunk, None]).squeeze(-1)
        scores = torch.zeros(b, c, device=targets.device)
        rows = torch.arange(b, device=targets.device)[:, None].expand_as(segment)[real]
        return scores.index_put_((rows, segment[real]), logp, accumulate=True)

    @torch.no_grad()
    @in_eval_mode
    def generate(self, batch, gate_mode: str = "learned", max_new_tokens: int = 32) -> list[str]:
        """Greedy decoding from prompts without answers (left-padded, `check_prompt_batch`);
        returns the decoded texts (up to eos, special tokens skipped). The first token is never
        eos, as in LLaRA (``min_new_tokens=1``): an empty answer would always be invalid. Runs in
        eval mode (`in_eval_mode`); ``max_new_tokens`` must be >= 1."""
        check_prompt_batch(batch, "generate")
        if max_new_tokens < 1:
            raise IloraError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        eos, pad = special_ids(self.tokenizer)  # pad falls back to eos (Llama-2 has no pad token)
        out = self.run(batch, gate_mode, use_cache=True)
        cache, gates, attention = out.past_key_values, out.gates, batch.attention_mask
        position = attention.long().sum(1, keepdim=True)
        last = out.hidden[:, -1]
        done = torch.zeros(last.shape[0], dtype=torch.bool, device=last.device)
        steps = []
        for number in range(max_new_tokens):
            logits = self.lm_logits(last)
            if number == 0:
                logits[:, eos] = float("-inf")
            token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            steps.append(token)
            done |= token == eos
            if bool(done.all()) or number == max_new_tokens - 1:  # no forward for a token never used
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            embeds = self.llm.get_input_embeddings()(token[:, None])
            step = self.decode(embeds, attention, position, gates, past_key_values=cache, use_cache=True)
            cache, last, position = step.past_key_values, step.hidden[:, -1], position + 1
        tokens = torch.stack(steps, dim=1).tolist()
        texts = []
        for row in tokens:
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

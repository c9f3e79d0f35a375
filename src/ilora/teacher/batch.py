"""Prompt batches for the teacher, assembled with whole-batch array operations (no per-sample loop).

A prompt is the concatenation of independently tokenised *segments*:

    [bos] before  title h1 [HistoryEmb] ,  ...  title hL [HistoryEmb]  between
          title c1 [CansEmb] ,  ...  title cC [CansEmb]  after  | title target  eos

(``|`` marks where the answer starts; it is left out for generation/scoring).
Text-only samples of the curriculum (``hybrid`` False) put ``[PH]`` where the
hybrid prompt has ``[HistoryEmb]``/``[CansEmb]``; as in LLaRA, ``[PH]`` keeps its own
token embedding and is never replaced. ``bos`` is present when the tokenizer itself
adds it (``tokenizer("")`` contains bos): Llama yes, Qwen no.

Segment convention (`segment_prefix`): every text segment (template piece, separator,
title) is stripped and tokenised on its own, with ``add_special_tokens=False`` and
special-token splitting disabled, as it reads after one space in running text: as
``" " + text``. Tokenizers that add a dummy-prefix ``"▁"`` themselves (Llama-2
SentencePiece conversions with a ``Prepend("▁")`` normalizer) get ``text`` instead, so
there is never a doubled ``"▁"``. An empty (or all-space) text is zero tokens. So a
title has the same ids wherever it stands, and those are the ids it has after a space
inside a sentence tokenised as a whole.

`TitleTable` tokenises every catalog title once (one batch tokenizer call) into a
padded id table; `PromptCollator` puts the title rows and the constant segments in one
*segment table*, describes each sample as a row of segment ids, and expands all rows at
once (``repeat`` + ``cumsum`` + one gather + one indexed write, in numpy: for arrays this small
its cost per operation is a fraction of torch's). Prompts are
left-padded by default, so the last prompt token sits at position ``T - 1`` in every row
(what generation and candidate scoring need); ``padding_side="right"`` is available.
"""

from __future__ import annotations

import dataclasses
import logging
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ilora.errors import ConfigError, IloraError
from ilora.rec.sasrec import id_tensor
from ilora.teacher.prompts import SEPARATOR, PromptTemplate
from ilora.teacher.tiny import PlaceholderIds, require_eos

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PH_NONE, PH_HISTORY, PH_CANDIDATE = 0, 1, 2


# -- tokenising segments ---------------------------------------------------------------------


def segment_prefix(tokenizer) -> str:
    """``" "`` or ``""``: what to put before a segment so it gets the ids it has after a space.

    Probe: the ids of ``"a"`` inside ``"b a"``. Metaspace and byte-level tokenizers give
    them for ``" a"``; a tokenizer that prepends its own ``"▁"`` (Llama-2 style) gives
    them for ``"a"`` (and ``" a"`` would get a doubled ``"▁"``).
    """
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    context = encode("b a")
    for prefix in (" ", ""):
        ids = encode(prefix + "a")
        if context[len(context) - len(ids) :] == ids:
            return prefix
    raise IloraError("cannot find how this tokenizer writes a word after a space ('b a' ends neither like ' a' nor 'a')")


def encode_segments(tokenizer, texts: Sequence[str], *, max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise ``texts`` with the segment convention in ONE tokenizer call.

    Returns ``ids`` (n, width) right-padded with 0 and ``lengths`` (n,); texts longer
    than ``max_tokens`` keep their first ``max_tokens`` tokens. Special-token text inside
    ``texts`` (e.g. ``"[HistoryEmb]"``) is tokenised as plain text.
    """
    prefix = segment_prefix(tokenizer)
    stripped = [t.strip() for t in texts]
    inputs = [prefix + t if t else "" for t in stripped]
    rows = tokenizer(inputs, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=int(lengths.sum()))
    if max_tokens is not None:
        if max_tokens < 1:
            raise ConfigError(f"max title tokens must be >= 1, got {max_tokens}")
        keep = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths) < max_tokens
        flat, lengths = flat[keep], np.minimum(lengths, max_tokens)
    width = int(lengths.max()) if lengths.size else 0
    ids = np.zeros((len(rows), max(width, 1)), dtype=np.int64)
    row_of = np.repeat(np.arange(len(rows)), lengths)
    col_of = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids[row_of, col_of] = flat
    return torch.from_numpy(ids), torch.from_numpy(lengths)


def forbidden_ids(tokenizer) -> list[int]:
    """Special-token ids that must never come out of a title (all specials except unk)."""
    return sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id})


# -- titles ----------------------------------------------------------------------------------


def _comparable(text: str) -> str:
    """``text`` NFKC-normalised with whitespace runs collapsed: what a tokenizer may rightly change."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def titles_not_given_back(tokenizer, titles: Sequence[str]) -> list[tuple[int, str]]:
    """``(item, decoded text)`` for every title that the tokenizer does not give back: its tokens
    (whole, in the segment convention) decoded differ from the title beyond Unicode (NFKC)
    normalisation and whitespace. A lossless tokenizer gives back every title; one that maps
    unknown text to ``unk``, or one transformers rebuilt in another class, does not."""
    ids, length = encode_segments(tokenizer, titles)
    rows = [row[:n] for row, n in zip(ids.tolist(), length.tolist())]
    decoded = tokenizer.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return [(item, text) for item, (title, text) in enumerate(zip(titles, decoded)) if _comparable(text) != _comparable(title)]


def check_titles_given_back(tokenizer, titles: Sequence[str], source: str) -> None:
    """`IloraError` if the tokenizer (loaded from ``source``) does not give back most titles; a
    warning naming the first one if it loses some.

    The teacher reads titles in its prompts and is trained to write one as its answer: a title
    the tokenizer cannot write becomes other text for the teacher. A few such titles (a
    character without a token) are worth a warning; most of them mean the tokenizer is not
    the one that was saved (e.g. transformers rebuilding a custom ``tokenizers`` tokenizer as
    the model type's own class)."""
    lost = titles_not_given_back(tokenizer, titles)
    if not lost:
        return
    item, text = lost[0]
    what = (
        f"{source}: {len(lost)} of {len(titles)} item titles do not come back from the tokenizer "
        f"({type(tokenizer).__name__}) as they went in (item {item}: {titles[item]!r} comes back as {text.strip()!r})"
    )
    if 2 * len(lost) > len(titles):
        raise IloraError(
            f"{what}: the teacher would read and write other text than the titles. Is this the tokenizer the model was "
            "saved with? transformers may load a tokenizer directory as the class of the model's type (e.g. Qwen2's), "
            "rebuilding a custom tokenizer.json into another tokenizer"
        )
    log.warning("warning: %s; the prompts and answers of those items hold what the tokenizer gives back", what)


@dataclass
class TitleTable:
    """Every catalog title tokenised once.

    Attributes:
        ids: int64 ``(num_items + 1, width)``; row ``i`` holds the tokens of item ``i``
            left-aligned; the last row (the padding id) is empty.
        length: int64 ``(num_items + 1,)`` tokens per row.
        eos_id, pad_id: used by `answer_tokens`.
    """

    ids: torch.Tensor
    length: torch.Tensor
    eos_id: int
    pad_id: int

    @classmethod
    def build(cls, tokenizer, titles: Sequence[str], *, max_title_tokens: int | None = None) -> "TitleTable":
        """Tokenise ``titles`` (item ``i`` has ``titles[i]``); truncate each to ``max_title_tokens``.

        Truncation applies everywhere a title appears (history, candidates, answer).
        Raises `IloraError` if a title yields a special token id (placeholder, bos, eos...).
        """
        eos, pad = special_ids(tokenizer)
        ids, length = encode_segments(tokenizer, [*titles, ""], max_tokens=max_title_tokens)
        bad = torch.isin(ids, torch.tensor(forbidden_ids(tokenizer), dtype=torch.long))
        bad &= torch.arange(ids.shape[1]) < length[:, None]
        if bad.any():
            item = int(bad.any(1).nonzero()[0, 0])
            raise IloraError(f"title of item {item} ({titles[item]!r}) tokenises to a special token id")
        return cls(ids, length, eos, pad)

    def decoded(self, tokenizer) -> list[str]:
        """Every item's title tokens (as truncated here) decoded as `ILoRATeacher.generate`
        decodes its output (``skip_special_tokens=True``): the answer text the teacher is
        trained to write, one string per item (the padding row left out)."""
        rows = [row[:n] for row, n in zip(self.ids[:-1].tolist(), self.length[:-1].tolist())]
        return tokenizer.batch_decode(rows, skip_special_tokens=True)

    @property
    def num_items(self) -> int:
        return self.ids.shape[0] - 1

    @property
    def padding_id(self) -> int:
        return self.ids.shape[0] - 1

    def answer_tokens(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer continuations of ``items`` (n,): title + eos, right-padded with pad.

        Returns ``ids`` (n, max answer length) and a bool ``mask`` of real tokens.
        Raises `IloraError` naming the first position whose id is outside the catalog
        ``0..num_items - 1`` (negative ids and the padding id included).
        """
        items = items.to(self.ids.device, torch.long)
        bad = ((items < 0) | (items >= self.num_items)).nonzero()
        if bad.numel():
            k = int(bad[0, 0])
            raise IloraError(f"answer item at position {k} has id {int(items[k])}, outside the catalog 0..{self.num_items - 1}")
        n = self.length[items]
        width = int(n.max()) + 1 if items.numel() else 1
        cols = torch.arange(width, device=self.ids.device)
        titles = self.ids[items[:, None], cols.clamp(max=self.ids.shape[1] - 1)[None, :]]
        ids = torch.where(cols < n[:, None], titles, self.pad_id)
        ids = torch.where(cols == n[:, None], self.eos_id, ids)
        return ids, cols <= n[:, None]


def special_ids(tokenizer) -> tuple[int, int]:
    """(eos, pad) ids; pad falls back to eos when the tokenizer has none."""
    eos = require_eos(tokenizer)
    pad = tokenizer.pad_token_id
    return eos, eos if pad is None else pad


# -- the batch -------------------------------------------------------------------------------


@dataclass
class PromptBatch:
    """Token ids and placeholder positions of B prompts (T = longest prompt in the batch).

    Attributes:
        input_ids, attention_mask: int64 ``(B, T)``; padding has ``pad`` id and mask 0.
        labels: int64 ``(B, T)``; the answer tokens (title + eos), ``-100`` elsewhere
            (all ``-100`` for prompts built without answer).
        ph_batch, ph_pos, ph_item: int64 ``(P,)``; placeholder ``k`` is at
            ``input_ids[ph_batch[k], ph_pos[k]]`` and stands for item ``ph_item[k]``.
            Ordered by sample, then position. Only hybrid samples have placeholders.
        ph_is_candidate: bool ``(P,)``; False for ``[HistoryEmb]``, True for ``[CansEmb]``.
        prompt_length, answer_start, answer_length: int64 ``(B,)``; the prompt has
            ``prompt_length`` tokens; the answer (``answer_length`` tokens incl. eos, 0
            without answer) starts at column ``answer_start``.
        history, length, candidates, target, hybrid: the inputs (target may be None).
        num_targets: int, counted on the host when the batch is built: how many answer
            tokens have a position before them (``labels[:, 1:] != -100``), i.e. how many
            the loss predicts; `target_positions` finds them on the device without a sync.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    ph_batch: torch.Tensor
    ph_pos: torch.Tensor
    ph_item: torch.Tensor
    ph_is_candidate: torch.Tensor
    prompt_length: torch.Tensor
    answer_start: torch.Tensor
    answer_length: torch.Tensor
    history: torch.Tensor
    length: torch.Tensor
    candidates: torch.Tensor
    target: torch.Tensor | None
    hybrid: torch.Tensor
    num_targets: int = 0

    def _map(self, fn) -> "PromptBatch":
        return PromptBatch(**{f.name: _apply(fn, getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "PromptBatch":
        """The batch on ``device``. From the CPU to another device it moves one flat buffer
        per dtype (`move_packed`) instead of its 15 small tensors one by one: each would be
        a host-to-device transfer of its own, and most of a small batch's copy time."""
        device = torch.device(device)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        tensors = {name: value for name, value in fields.items() if isinstance(value, torch.Tensor)}
        if device.type == "cpu" or any(t.device.type != "cpu" for t in tensors.values()):
            return self._map(lambda t: t.to(device, non_blocking=non_blocking))
        return dataclasses.replace(self, **move_packed(tensors, device, non_blocking))

    def pin_memory(self) -> "PromptBatch":
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _apply(fn, value):
    return fn(value) if isinstance(value, torch.Tensor) else value


def move_packed(tensors: Mapping[str, torch.Tensor], device: torch.device, non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """``tensors`` on ``device`` with one copy per dtype: each dtype's tensors are
    concatenated flat, copied once (pinned first when ``non_blocking`` and they all were
    pinned, so the copy stays asynchronous) and split back into views of their shapes."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    moved = {}
    for names in by_dtype.values():
        flat = torch.cat([tensors[n].reshape(-1) for n in names])
        if non_blocking and all(tensors[n].is_pinned() for n in names):
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=non_blocking)
        for n, part in zip(names, flat.split([tensors[n].numel() for n in names])):
            moved[n] = part.view(tensors[n].shape)
    return moved


def target_positions(batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the hidden states that predict an answer token, in row-major order:
    where ``labels[:, 1:] != -100``. Their number, ``batch.num_targets``, was counted when the
    batch was built, so on a GPU this needs no host-device synchronisation (``nonzero``
    would wait for the device to learn how many there are). On the CPU the count is checked."""
    predicts = batch.labels[:, 1:] != IGNORE_INDEX
    if predicts.device.type == "cpu" and (found := int(predicts.sum())) != batch.num_targets:
        raise IloraError(
            f"the batch's labels have {found} answer tokens to predict but num_targets says {batch.num_targets}: "
            "labels were changed after the batch was built"
        )
    rows, cols = torch.nonzero_static(predicts, size=batch.num_targets).unbind(1)
    return rows, cols


def substitute_placeholders(inputs_embeds: torch.Tensor, batch: PromptBatch, values: torch.Tensor) -> torch.Tensor:
    """``inputs_embeds`` with placeholder ``k`` replaced by ``values[k]``; use the returned tensor.

    ``values`` is ``(P, H)``, aligned with ``batch.ph_item`` (e.g. the projected SASRec
    embeddings of ``batch.ph_item``). Gradients reach ``values`` and, when it requires
    grad, ``inputs_embeds`` at the other positions.

    An ``inputs_embeds`` that does not require grad (the output of the frozen embedding
    table: the teacher's case) is written in place, which saves a copy of the whole
    ``(B, T, H)`` tensor; one that requires grad (a leaf under transformers' input-grad
    hook, say), or that is a view or an inference tensor outside inference mode, is left as
    it is and a new tensor returned.
    """
    if values.shape != (batch.ph_item.numel(), inputs_embeds.shape[-1]):
        raise IloraError(
            f"placeholder values have shape {tuple(values.shape)}, expected ({batch.ph_item.numel()}, {inputs_embeds.shape[-1]})"
        )
    index, values = (batch.ph_batch, batch.ph_pos), values.to(inputs_embeds.dtype)
    owned = inputs_embeds._base is None and (torch.is_inference_mode_enabled() or not inputs_embeds.is_inference())
    if inputs_embeds.requires_grad or not owned:  # a view (of a weight?) or an inference tensor: copy
        return inputs_embeds.index_put(index, values)
    return inputs_embeds.index_put_(index, values)


# -- the collator ----------------------------------------------------------------------------


class PromptCollator:
    """Builds `PromptBatch` es from item ids; usable as a DataLoader ``collate_fn``.

    Holds one segment table: the title rows (row = item id, the padding row is empty)
    followed by the constant rows (bos, eos, separator, the three placeholders, the
    three template pieces).
    """

    def __init__(
        self,
        tokenizer,
        template: PromptTemplate,
        titles: TitleTable,
        placeholders: PlaceholderIds,
        *,
        with_answer: bool = True,
        padding_side: str = "left",
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding side {padding_side!r}: expected left or right")
        self.titles = titles
        self.template = template
        self.with_answer = with_answer
        self.padding_side = padding_side
        self.eos_id, self.pad_id = special_ids(tokenizer)
        bos = tokenizer.bos_token_id
        self.bos_id = bos if bos is not None and bos in tokenizer("")["input_ids"] else None
        text_ids, text_len = encode_segments(tokenizer, [SEPARATOR, *template.pieces])
        single = [self.bos_id or 0, self.eos_id, placeholders.history, placeholders.candidate, placeholders.text]
        single_len = [int(self.bos_id is not None), 1, 1, 1, 1]
        width = max(titles.ids.shape[1], text_ids.shape[1])
        # numpy: a batch is a few dozen small array operations, and numpy's cost per call is a
        # fraction of torch's (assembling a batch of 8 LastFM prompts took 3x longer in torch)
        self.table = torch.cat(
            [_pad_cols(titles.ids, width), _pad_cols(torch.tensor(single)[:, None], width), _pad_cols(text_ids, width)]
        ).numpy()
        self.table_len = torch.cat([titles.length, torch.tensor(single_len), text_len]).numpy()
        n = titles.ids.shape[0]
        self.EMPTY = titles.padding_id
        self.BOS, self.EOS, self.PH_HISTORY, self.PH_CANDIDATE, self.PH_TEXT = range(n, n + 5)
        self.SEP, self.BEFORE, self.BETWEEN, self.AFTER = range(n + 5, n + 9)

    def __call__(self, samples: Sequence[Mapping]) -> PromptBatch:
        """Collate dataset samples with keys ``history``, ``length``, ``candidates``,
        ``target`` (needed with answer) and optional ``hybrid`` (default True)."""
        from torch.utils.data import default_collate

        batch = default_collate(list(samples))
        return self.build(
            batch["history"],
            batch["length"],
            batch["candidates"],
            batch.get("target"),
            hybrid=batch.get("hybrid"),
            candidate_length=batch.get("candidate_length"),
        )

    def build(
        self,
        history: torch.Tensor,
        length: torch.Tensor,
        candidates: torch.Tensor,
        target: torch.Tensor | None = None,
        *,
        hybrid: torch.Tensor | None = None,
        candidate_length: torch.Tensor | None = None,
        with_answer: bool | None = None,
    ) -> PromptBatch:
        """Assemble the prompts of a batch.

        Args:
            history: ``(B, L)`` item ids, the first ``length[b]`` valid, then anything
                (normally the padding id).
            length: ``(B,)`` history lengths, ``0 <= length <= L``.
            candidates: ``(B, C)`` item ids; the first ``candidate_length[b]`` (default
                all ``C``) are written into the prompt.
            target: ``(B,)`` the answer item; required when building with the answer.
            hybrid: ``(B,)`` bool; False gives the text-only ``[PH]`` prompt (default True).
            with_answer: append ``title + eos`` of the target (default: the collator's).
        """
        with_answer = self.with_answer if with_answer is None else with_answer
        history, length, candidates = (id_tensor(x, f"prompt {n}") for x, n in ((history, "history"), (length, "length"), (candidates, "candidates")))
        b, num_c = candidates.shape[0], candidates.shape[1] if candidates.ndim == 2 else -1
        hybrid = torch.ones(b, dtype=torch.bool) if hybrid is None else torch.as_tensor(hybrid, dtype=torch.bool)
        cand_length = torch.full((b,), num_c) if candidate_length is None else id_tensor(candidate_length, "prompt candidate_length")
        target = None if target is None else id_tensor(target, "prompt target")
        self._validate(history, length, candidates, cand_length, target, hybrid, with_answer)
        slots, kinds, items, answer_slot = self._segments(history, length, candidates, cand_length, target, hybrid, with_answer)
        return self._expand(slots, kinds, items, answer_slot, history, length, candidates, target, hybrid)

    def token_counts(self, history, length, candidates, target=None) -> torch.Tensor:
        """(B,) how many tokens each sample's prompt has (with the answer when the collator
        adds one), from the segment lengths alone: what `build` would make, without making it.
        Hybrid and text-only prompts have the same length (one placeholder token each)."""
        history, length, candidates = (id_tensor(x, f"prompt {n}") for x, n in ((history, "history"), (length, "length"), (candidates, "candidates")))
        b = candidates.shape[0]
        target = None if target is None else id_tensor(target, "prompt target")
        hybrid, cand_length = torch.ones(b, dtype=torch.bool), torch.full((b,), candidates.shape[1])
        self._validate(history, length, candidates, cand_length, target, hybrid, self.with_answer)
        slots = self._segments(history, length, candidates, cand_length, target, hybrid, self.with_answer)[0]
        return torch.from_numpy(self.table_len[slots].sum(1))

    def _segments(self, history, length, candidates, cand_length, target, hybrid, with_answer):
        """Each sample as a row of segment ids, with placeholder kinds and items, and the answer's
        slots (the inputs' tensors read as numpy arrays; numpy arrays out)."""
        history, length, candidates, cand_length, hybrid = (t.numpy() for t in (history, length, candidates, cand_length, hybrid))
        target = None if target is None else target.numpy()
        b = candidates.shape[0]
        h_slots, h_kind, h_item = self._item_slots(history, length, hybrid, self.PH_HISTORY, PH_HISTORY)
        c_slots, c_kind, c_item = self._item_slots(candidates, cand_length, hybrid, self.PH_CANDIDATE, PH_CANDIDATE)
        col = lambda v: np.full((b, 1), v, dtype=np.int64)  # noqa: E731
        zero = lambda k: np.zeros((b, k), dtype=np.int64)  # noqa: E731
        slots = [col(self.BOS), col(self.BEFORE), h_slots, col(self.BETWEEN), c_slots, col(self.AFTER)]
        kinds = [zero(2), h_kind, zero(1), c_kind, zero(1)]
        items = [zero(2), h_item, zero(1), c_item, zero(1)]
        if with_answer:
            slots += [target[:, None], col(self.EOS)]
            kinds.append(zero(2))
            items.append(zero(2))
        slots, kinds, items = np.concatenate(slots, 1), np.concatenate(kinds, 1), np.concatenate(items, 1)
        answer_slot = np.zeros(slots.shape[1], dtype=bool)
        answer_slot[slots.shape[1] - (2 if with_answer else 0) :] = True
        return slots, kinds, items, np.broadcast_to(answer_slot, slots.shape)

    def _item_slots(self, ids, count, hybrid, ph_row, ph_kind):
        """Slots ``title, placeholder, separator`` per item: (B, 3K) segment ids, kinds, items."""
        k = ids.shape[1]
        pos = np.arange(k)
        valid = pos < count[:, None]
        title = np.where(valid, ids, self.EMPTY)
        ph = np.where(valid, np.where(hybrid, ph_row, self.PH_TEXT)[:, None], self.EMPTY)
        sep = np.where(pos < count[:, None] - 1, self.SEP, self.EMPTY)
        kind = np.where(valid & hybrid[:, None], ph_kind, PH_NONE)
        zeros = np.zeros_like(ids)
        item = np.where(kind > 0, ids, 0)
        flat = lambda a, m, c: np.stack([a, m, c], 2).reshape(len(ids), 3 * k)  # noqa: E731
        return flat(title, ph, sep), flat(zeros, kind, zeros), flat(zeros, item, zeros)

    def _expand(self, slots, kinds, items, answer_slot, history, length, candidates, target, hybrid) -> PromptBatch:
        """Segment rows -> padded token rows, labels and placeholder positions."""
        b = slots.shape[0]
        seg_len = self.table_len[slots]  # (B, W)
        total = seg_len.sum(1)
        answer_length = (seg_len * answer_slot).sum(1)
        width = int(total.max()) if b else 0
        flat_len = seg_len.reshape(-1)
        n_tok = int(flat_len.sum())
        seg_start = np.cumsum(flat_len) - flat_len
        tok_seg = np.repeat(slots.reshape(-1), flat_len)
        tok_off = np.arange(n_tok) - np.repeat(seg_start, flat_len)
        tok_id = self.table[tok_seg, tok_off]
        tok_sample = np.repeat(np.arange(b), total)
        tok_local = np.arange(n_tok) - (np.cumsum(total) - total)[tok_sample]
        shift = width - total if self.padding_side == "left" else np.zeros_like(total)
        tok_pos = tok_local + shift[tok_sample]

        input_ids = np.full((b, width), self.pad_id, dtype=np.int64)
        input_ids[tok_sample, tok_pos] = tok_id
        attention_mask = np.zeros((b, width), dtype=np.int64)
        attention_mask[tok_sample, tok_pos] = 1
        labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
        is_answer = np.repeat(answer_slot.reshape(-1), flat_len)
        labels[tok_sample[is_answer], tok_pos[is_answer]] = tok_id[is_answer]

        tok_kind = np.repeat(kinds.reshape(-1), flat_len)
        is_ph = tok_kind > 0
        tok_item = np.repeat(items.reshape(-1), flat_len)
        prompt_length = total - answer_length
        t = torch.from_numpy
        return PromptBatch(
            num_targets=int((labels[:, 1:] != IGNORE_INDEX).sum()),
            input_ids=t(input_ids),
            attention_mask=t(attention_mask),
            labels=t(labels),
            ph_batch=t(tok_sample[is_ph]),
            ph_pos=t(tok_pos[is_ph]),
            ph_item=t(tok_item[is_ph]),
            ph_is_candidate=t(tok_kind[is_ph] == PH_CANDIDATE),
            prompt_length=t(prompt_length),
            answer_start=t(shift + prompt_length),
            answer_length=t(answer_length),
            history=history,
            length=length,
            candidates=candidates,
            target=target,
            hybrid=hybrid,
        )

    def _validate(self, history, length, candidates, cand_length, target, hybrid, with_answer) -> None:
        """Shapes and ids; raises `IloraError` naming the sample (row of the batch)."""
        n = self.titles.num_items
        if history.ndim != 2 or candidates.ndim != 2:
            raise IloraError(f"history and candidates must be 2-d, got {tuple(history.shape)} and {tuple(candidates.shape)}")
        b = history.shape[0]
        expected_shapes = {
            "length": (length, (b,)),
            "candidates": (candidates, (b, candidates.shape[1])),
            "candidate_length": (cand_length, (b,)),
            "hybrid": (hybrid, (b,)),
        }
        for name, (t, shape) in expected_shapes.items():
            if tuple(t.shape) != shape:
                raise IloraError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        _check_ids("history", history, length, n)
        _check_ids("candidates", candidates, cand_length, n)
        if with_answer:
            if target is None:
                raise IloraError("a prompt with answer needs the target items")
            if tuple(target.shape) != (b,):
                raise IloraError(f"target has shape {tuple(target.shape)}, expected ({b},)")
            bad = ((target < 0) | (target >= n)).nonzero()
            if bad.numel():
                r = int(bad[0, 0])
                raise IloraError(f"sample {r}: target id {int(target[r])} is outside the catalog 0..{n - 1}")


def _check_ids(name: str, ids: torch.Tensor, count: torch.Tensor, n: int) -> None:
    bad = ((count < 0) | (count > ids.shape[1])).nonzero()
    if bad.numel():
        r = int(bad[0, 0])
        raise IloraError(f"sample {r}: {name} length {int(count[r])} is outside 0..{ids.shape[1]}")
    valid = torch.arange(ids.shape[1]) < count[:, None]
    bad = (valid & ((ids < 0) | (ids >= n))).nonzero()
    if bad.numel():
        r, c = map(int, bad[0])
        raise IloraError(f"sample {r}: {name} position {c} holds id {int(ids[r, c])}, outside the catalog 0..{n - 1}")


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


# -- curriculum ------------------------------------------------------------------------------


def hybrid_probability(step: int, total_steps: int) -> float:
    """LLaRA's curriculum: the chance of a hybrid prompt rises linearly, ``step / total_steps``, clipped to [0, 1]."""
    if total_steps <= 0:
        raise ConfigError(f"curriculum total steps must be positive, got {total_steps}")
    return min(max(step / total_steps, 0.0), 1.0)


def draw_hybrid_flags(batch_size: int, step: int, total_steps: int, *, seed: int, per_batch: bool = False) -> torch.Tensor:
    """(batch_size,) bool hybrid flags for training step ``step``.

    Deterministic in ``(seed, step)`` alone (a fresh generator per step), so it does not
    depend on DataLoader workers or call order. ``per_batch`` draws one flag for the
    whole batch, as LLaRA did; the default draws one per sample.
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    u = torch.rand(1 if per_batch else batch_size, generator=generator)
    return (u < hybrid_probability(step, total_steps)).expand(batch_size).clone()

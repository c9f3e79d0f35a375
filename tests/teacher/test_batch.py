"""Vectorised prompt batches against a per-sample, string-based reference."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ilora.errors import IloraError
from ilora.teacher.batch import (
    PromptBatch,
    PromptCollator,
    TitleTable,
    draw_hybrid_flags,
    hybrid_probability,
    move_packed,
    segment_prefix,
    substitute_placeholders,
    target_positions,
)
from ilora.teacher.prompts import PromptTemplate, load_template
from ilora.teacher.tiny import add_placeholder_tokens, build_tiny_tokenizer

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
TEMPLATE = PromptTemplate.parse("This user listened to [HistoryHere] in this order. Choose from [CansHere] and answer. It is")
CORPUS = [*TEMPLATE.pieces, "Morcheeba", "Enigma", "Café Del Mar", "Fleetwood Mac", "AC/DC", "Earth, Wind & Fire"] * 3
SPECIAL_TITLES = ["[HistoryEmb]", "[CansEmb]", "[PH]", "x[PH]y [CansEmb]", "</s>", "<s>", "<|endoftext|>", "<pad>"]
TITLES = st.one_of(
    st.text(max_size=10),
    st.sampled_from(
        ["", "   ", "Enigma", " Café Del Mar ", "Sigur Rós", "日本語のバンド", "AC/DC", "Earth, Wind & Fire", "a" * 80, *SPECIAL_TITLES]
    ),
)


@functools.cache
def tokenizer(style: str):
    tok = build_tiny_tokenizer(CORPUS, vocab_size=300, style=style)
    return tok, add_placeholder_tokens(tok)


def llama2_style_tokenizer():
    """A tokenizer that prepends its own "▁" in a normalizer (Llama-2 conversions), no pre-tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok, _ = tokenizer("llama")
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


# -- the reference: one sample at a time, from strings -------------------------------------------


def ref_segment(tok, text: str, max_tokens: int | None = None) -> list[int]:
    text = text.strip()
    if not text:
        return []
    return tok(" " + text, add_special_tokens=False, split_special_tokens=True)["input_ids"][:max_tokens]


def reference(tok, ph, template, titles, history, length, cands, cand_len, target, hybrid, with_answer, side, max_tokens):
    """Per-sample lists of (kind, text) segments -> ids; placeholders found by scanning."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    pad = tok.pad_token_id
    rows, answers, ph_found = [], [], []
    for b in range(len(history)):
        h_mark, c_mark = ("[HistoryEmb]", "[CansEmb]") if hybrid[b] else ("[PH]", "[PH]")
        hist = [titles[i] for i in history[b][: length[b]]]
        can = [titles[i] for i in cands[b][: cand_len[b]]]
        segments = [("text", template.before)]
        for group, mark in ((hist, h_mark), (can, c_mark)):
            for j, title in enumerate(group):
                segments += [("title", title), ("mark", mark)] + ([("text", ",")] if j < len(group) - 1 else [])
            segments.append(("text", template.between if group is hist else template.after))
        # the same prompt as an f-string (readable text) agrees with the segments
        h_text = " , ".join(f"{t.strip()} {h_mark}".strip() for t in hist)
        c_text = " , ".join(f"{t.strip()} {c_mark}".strip() for t in can)
        fstring = f"{template.before} {h_text} {template.between} {c_text} {template.after}"
        assert " ".join(fstring.split()) == " ".join(" ".join(s.strip() for _, s in segments if s.strip()).split())
        ids = list(bos)
        for kind, text in segments:
            if kind == "mark":
                ids.append(tok.convert_tokens_to_ids(text))
            else:
                ids += ref_segment(tok, text, max_tokens if kind == "title" else None)
        answer = ref_segment(tok, titles[target[b]], max_tokens) + [tok.eos_token_id] if with_answer else []
        rows.append(ids)
        answers.append(answer)
        # scanning: every placeholder id in the prompt, in order, with its item
        found_h = [p for p, t in enumerate(ids) if t == ph.history]
        found_c = [p for p, t in enumerate(ids) if t == ph.candidate]
        if hybrid[b]:
            assert len(found_h) == length[b] and len(found_c) == cand_len[b]
            ph_found += [(b, p, int(i), False) for p, i in zip(found_h, history[b][: length[b]])]
            ph_found += [(b, p, int(i), True) for p, i in zip(found_c, cands[b][: cand_len[b]])]
        else:
            assert not found_h and not found_c
            assert sum(t == ph.text for t in ids) == length[b] + cand_len[b]
    width = max(len(r) + len(a) for r, a in zip(rows, answers))
    out = {k: [] for k in ("input_ids", "attention_mask", "labels", "answer_start")}
    shifts = []
    for r, a in zip(rows, answers):
        n_pad = width - len(r) - len(a)
        shift = n_pad if side == "left" else 0
        shifts.append(shift)
        fill = [pad] * n_pad
        out["input_ids"].append(fill + r + a if side == "left" else r + a + fill)
        mask = [0] * n_pad
        out["attention_mask"].append(mask + [1] * (len(r) + len(a)) if side == "left" else [1] * (len(r) + len(a)) + mask)
        labels = [-100] * len(r) + a
        out["labels"].append([-100] * n_pad + labels if side == "left" else labels + [-100] * n_pad)
        out["answer_start"].append(shift + len(r))
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
    out["prompt_length"] = torch.tensor([len(r) for r in rows])
    out["answer_length"] = torch.tensor([len(a) for a in answers])
    ph_found.sort(key=lambda x: x[:2])
    ph_found = [(b, p + shifts[b], i, c) for b, p, i, c in ph_found]
    out["ph_batch"] = torch.tensor([x[0] for x in ph_found], dtype=torch.long)
    out["ph_pos"] = torch.tensor([x[1] for x in ph_found], dtype=torch.long)
    out["ph_item"] = torch.tensor([x[2] for x in ph_found], dtype=torch.long)
    out["ph_is_candidate"] = torch.tensor([x[3] for x in ph_found], dtype=torch.bool)
    return out


@st.composite
def batches(draw):
    titles = draw(st.lists(TITLES, min_size=1, max_size=10))
    n = len(titles)
    b, width, c = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 5))
    item = st.integers(0, n - 1)
    length = draw(st.lists(st.integers(0, width), min_size=b, max_size=b))
    history = [draw(st.lists(item, min_size=w, max_size=w)) + [n] * (width - w) for w in length]
    cands = draw(st.lists(st.lists(item, min_size=c, max_size=c), min_size=b, max_size=b))
    cand_len = draw(st.one_of(st.none(), st.lists(st.integers(0, c), min_size=b, max_size=b)))
    target = draw(st.lists(item, min_size=b, max_size=b))
    hybrid = draw(st.lists(st.booleans(), min_size=b, max_size=b))
    return dict(
        titles=titles, history=history, length=length, cands=cands, cand_len=cand_len, target=target, hybrid=hybrid,
        with_answer=draw(st.booleans()), side=draw(st.sampled_from(["left", "right"])),
        max_tokens=draw(st.one_of(st.none(), st.integers(1, 4))),
    )  # fmt: skip


def check_against_reference(style: str, case: dict) -> PromptBatch:
    tok, ph = tokenizer(style)
    table = TitleTable.build(tok, case["titles"], max_title_tokens=case["max_tokens"])
    collator = PromptCollator(tok, TEMPLATE, table, ph, with_answer=case["with_answer"], padding_side=case["side"])
    c = len(case["cands"][0])
    cand_len = case["cand_len"] or [c] * len(case["cands"])
    batch = collator.build(
        torch.tensor(case["history"]),
        torch.tensor(case["length"]),
        torch.tensor(case["cands"]),
        torch.tensor(case["target"]),
        hybrid=torch.tensor(case["hybrid"]),
        candidate_length=None if case["cand_len"] is None else torch.tensor(case["cand_len"]),
    )
    ref = reference(
        tok, ph, TEMPLATE, case["titles"], case["history"], case["length"], case["cands"], cand_len,
        case["target"], case["hybrid"], case["with_answer"], case["side"], case["max_tokens"],
    )  # fmt: skip
    for key, expected in ref.items():
        got = getattr(batch, key)
        assert got.dtype == expected.dtype and torch.equal(got, expected), key
    return batch


@pytest.mark.parametrize("style", ["llama", "qwen2"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=batches())
def test_batch_matches_per_sample_reference(style, case):
    check_against_reference(style, case)


FIXED_CASE = dict(
    titles=["Enigma", "[HistoryEmb]", "", "Café Del Mar", "Sigur Rós"], history=[[0, 1, 2], [3, 5, 5]], length=[3, 1],
    cands=[[4, 1], [0, 2]], cand_len=None, target=[4, 2], hybrid=[True, False], with_answer=True, side="left", max_tokens=None,
)  # fmt: skip


def test_fixed_case_left_padding_and_answer():
    batch = check_against_reference("llama", FIXED_CASE)
    tok, ph = tokenizer("llama")
    # left padding: every row ends with the answer's eos; without answer, with the last template token
    assert (batch.input_ids[:, -1] == tok.eos_token_id).all()
    assert torch.equal(batch.answer_start + batch.answer_length, torch.full((2,), batch.input_ids.shape[1]))
    assert batch.ph_item.tolist() == [0, 1, 2, 4, 1]  # only the hybrid sample has placeholders
    # the title "[HistoryEmb]" is text, not a placeholder: exactly 3 history placeholders in row 0
    assert int((batch.input_ids[0] == ph.history).sum()) == 3


def test_target_positions_are_the_answer_predicting_states_counted_at_build_time():
    """The loss's positions without a device sync: the same as a scan of the labels, counted when
    the batch was built; a batch whose labels changed afterwards is refused (on the CPU)."""
    import dataclasses

    batch = check_against_reference("llama", FIXED_CASE)
    expected = [(b, t) for b in range(batch.labels.shape[0]) for t in range(batch.labels.shape[1] - 1) if batch.labels[b, t + 1] != -100]
    rows, cols = target_positions(batch)
    assert list(zip(rows.tolist(), cols.tolist())) == expected and batch.num_targets == len(expected) > 0
    assert batch.to("meta").num_targets == batch.num_targets  # travels with the batch
    stale = dataclasses.replace(batch, labels=batch.labels.masked_fill(batch.labels == batch.labels.max(), -100))
    with pytest.raises(IloraError, match="labels were changed"):
        target_positions(stale)


def test_batch_moves_as_one_copy_per_dtype():
    batch = check_against_reference("llama", FIXED_CASE)
    tensors = {f: getattr(batch, f) for f in batch.__dataclass_fields__ if isinstance(getattr(batch, f), torch.Tensor)}
    # the packing itself, run to the CPU so the values can be compared: same dtypes, shapes, values
    moved = move_packed({**tensors, "strided": batch.input_ids.t()}, torch.device("cpu"))
    for name, t in {**tensors, "strided": batch.input_ids.t()}.items():
        assert moved[name].dtype == t.dtype and torch.equal(moved[name], t), name
    # to another device: every field there, with its shape and dtype, from one buffer per dtype
    copies = []
    original = torch.Tensor.to
    torch.Tensor.to = lambda self, *a, **k: copies.append(self.dtype) or original(self, *a, **k)
    try:
        on_meta = batch.to("meta")
    finally:
        torch.Tensor.to = original
    assert sorted(map(str, copies)) == ["torch.bool", "torch.int64"]
    for name, t in tensors.items():
        other = getattr(on_meta, name)
        assert other.device.type == "meta" and other.shape == t.shape and other.dtype == t.dtype, name
    assert torch.equal(batch.to("cpu").input_ids, batch.input_ids)


def test_title_same_wherever_it_stands():
    """A title's row equals its ids inside whole sentences (after a space)."""
    titles = ["Enigma", "Café Del Mar", "AC/DC", "Sigur Rós", "Earth, Wind & Fire", "50 Cent", "Guns N' Roses", "日本語"]
    for tok in (tokenizer("llama")[0], tokenizer("qwen2")[0], llama2_style_tokenizer()):
        table = TitleTable.build(tok, titles)
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        for i, title in enumerate(titles):
            row = table.ids[i, : table.length[i]].tolist()
            assert row and tok.decode(row).strip() == title
            head = encode("This user listened to")
            assert encode(f"This user listened to {title} in this order")[len(head) : len(head) + len(row)] == row
            assert encode(f"It is {title}")[-len(row) :] == row
            if segment_prefix(tok) == " ":  # Metaspace / byte-level: also right after a special token
                assert encode(f"[HistoryEmb] {title} [CansEmb]")[1 : 1 + len(row)] == row
            else:  # a "▁"-prepending normalizer runs per chunk between special tokens: at the very start
                assert encode(title) == row


def test_segment_prefix_per_tokenizer_kind():
    assert segment_prefix(tokenizer("llama")[0]) == " "
    assert segment_prefix(tokenizer("qwen2")[0]) == " "
    assert segment_prefix(llama2_style_tokenizer()) == ""


@pytest.mark.parametrize("style", ["llama", "qwen2"])
def test_special_token_text_never_makes_a_placeholder(style):
    tok, ph = tokenizer(style)
    table = TitleTable.build(tok, SPECIAL_TITLES)
    special = torch.tensor(tok.all_special_ids)
    valid = torch.arange(table.ids.shape[1]) < table.length[:, None]
    assert not (torch.isin(table.ids, special) & valid).any()
    collator = PromptCollator(tok, TEMPLATE, table, ph)
    n = len(SPECIAL_TITLES)
    ids = torch.arange(n)
    batch = collator.build(ids[None].repeat(2, 1), torch.tensor([n, n]), ids[None].repeat(2, 1), torch.tensor([0, 2]),
                           hybrid=torch.tensor([True, False]))  # fmt: skip
    row = batch.input_ids
    assert int((row[0] == ph.history).sum()) == n and int((row[0] == ph.candidate).sum()) == n
    assert int((row[1] == ph.text).sum()) == 2 * n and int((row[1] == ph.history).sum()) == 0
    assert int((row == tok.eos_token_id).sum()) == 2  # only the answers' eos


def test_substitution_matches_loop_reference():
    torch.manual_seed(0)
    tok, ph = tokenizer("llama")
    titles = ["Enigma", "Moby", "Café Del Mar", "AC/DC", "Sigur Rós", "Bj"]
    collator = PromptCollator(tok, TEMPLATE, TitleTable.build(tok, titles), ph)
    history = torch.tensor([[0, 1, 2, 6], [3, 6, 6, 6], [4, 5, 0, 1]])
    batch = collator.build(history, torch.tensor([3, 1, 4]), torch.tensor([[1, 2], [0, 5], [3, 4]]), torch.tensor([1, 0, 4]),
                           hybrid=torch.tensor([True, True, False]))  # fmt: skip
    hidden = 8
    embeds = torch.randn(*batch.input_ids.shape, hidden, requires_grad=True)
    item_table = torch.randn(len(titles), hidden, requires_grad=True)
    upstream = torch.randn(*batch.input_ids.shape, hidden)

    out = substitute_placeholders(embeds, batch, item_table[batch.ph_item] * 2.0)
    (out * upstream).sum().backward()
    got_grads = embeds.grad.clone(), item_table.grad.clone()
    embeds.grad, item_table.grad = None, None

    # reference: per sample, scan the ids and write the history/candidate embeddings in order
    ref = embeds.clone()
    for b in range(3):
        if not batch.hybrid[b]:
            continue
        h_pos = (batch.input_ids[b] == ph.history).nonzero().flatten().tolist()
        c_pos = (batch.input_ids[b] == ph.candidate).nonzero().flatten().tolist()
        for p, item in zip(h_pos, history[b][: batch.length[b]], strict=True):
            ref[b, p] = item_table[item] * 2.0
        for p, item in zip(c_pos, batch.candidates[b], strict=True):
            ref[b, p] = item_table[item] * 2.0
    (ref * upstream).sum().backward()

    assert torch.equal(out, ref)
    assert torch.allclose(got_grads[0], embeds.grad) and torch.allclose(got_grads[1], item_table.grad)
    assert got_grads[1].abs().sum() > 0
    with pytest.raises(IloraError, match="placeholder values"):
        substitute_placeholders(embeds, batch, item_table[:2])

    # a frozen table's output (no grad) is written in place: same values, same gradient to the items
    frozen = embeds.detach().clone()
    item_table.grad = None
    written = substitute_placeholders(frozen, batch, item_table[batch.ph_item] * 2.0)
    assert written.data_ptr() == frozen.data_ptr() and torch.equal(written, ref)
    (written * upstream).sum().backward()
    torch.testing.assert_close(item_table.grad, got_grads[1])
    # a view (of a weight, say) is never written: a new tensor comes back
    table = embeds.detach().clone()
    view = table[:, :]
    kept = view.clone()
    out = substitute_placeholders(view, batch, item_table[batch.ph_item].detach() * 2.0)
    assert torch.equal(view, kept) and torch.equal(out, ref)


def test_answer_tokens_and_truncation():
    tok, _ = tokenizer("qwen2")
    titles = ["Enigma", "", "Earth, Wind & Fire", "a" * 40]
    table = TitleTable.build(tok, titles, max_title_tokens=3)
    ids, mask = table.answer_tokens(torch.tensor([2, 1, 3, 0]))
    pad = tok.pad_token_id
    expected = [ref_segment(tok, titles[i], 3) + [tok.eos_token_id] for i in (2, 1, 3, 0)]
    width = max(map(len, expected))
    assert ids.tolist() == [e + [pad] * (width - len(e)) for e in expected]
    assert mask.tolist() == [[True] * len(e) + [False] * (width - len(e)) for e in expected]
    assert table.num_items == 4 and table.length[-1] == 0
    with pytest.raises(IloraError):
        TitleTable.build(tok, titles, max_title_tokens=0)
    for bad in (-1, 4, 5):  # negative, the padding id, past the catalog
        with pytest.raises(IloraError, match=f"position 1 has id {bad}"):
            table.answer_tokens(torch.tensor([0, bad]))


@pytest.mark.parametrize("style", ["llama", "qwen2"])
def test_decoded_titles_are_the_truncated_answers_decoded(style):
    tok, _ = tokenizer(style)
    titles = ["Enigma", "Earth, Wind & Fire", "Café Del Mar", "a" * 40]
    table = TitleTable.build(tok, titles, max_title_tokens=3)
    expected = [tok.decode(ref_segment(tok, t, 3), skip_special_tokens=True) for t in titles]
    assert table.decoded(tok) == expected
    assert "Fire" not in table.decoded(tok)[1]
    assert [t.strip() for t in TitleTable.build(tok, titles).decoded(tok)] == titles  # untruncated: the titles


def test_dataloader_collate_and_generation_prompt():
    tok, ph = tokenizer("llama")
    titles = ["Enigma", "Moby", "Café Del Mar", "AC/DC"]
    collator = PromptCollator(tok, TEMPLATE, TitleTable.build(tok, titles), ph, with_answer=False)
    rng = random.Random(0)
    samples = [
        {"history": torch.tensor([rng.randrange(4), rng.randrange(4), 4]), "length": torch.tensor(2),
         "candidates": torch.tensor([rng.randrange(4) for _ in range(3)]), "target": torch.tensor(rng.randrange(4))}
        for _ in range(5)
    ]  # fmt: skip
    loader = torch.utils.data.DataLoader(samples, batch_size=3, collate_fn=collator)
    batches = list(loader)
    assert [type(b) for b in batches] == [PromptBatch, PromptBatch] and len(batches[0]) == 3
    direct = collator.build(
        torch.stack([s["history"] for s in samples[:3]]), torch.tensor([2, 2, 2]),
        torch.stack([s["candidates"] for s in samples[:3]]), hybrid=torch.ones(3, dtype=torch.bool),
    )  # fmt: skip
    assert torch.equal(batches[0].input_ids, direct.input_ids) and torch.equal(batches[0].ph_pos, direct.ph_pos)
    last_piece = tok(" " + TEMPLATE.after, add_special_tokens=False)["input_ids"][-1]
    assert (direct.input_ids[:, -1] == last_piece).all()  # left padding: prompts end together
    assert (direct.labels == -100).all() and (direct.answer_length == 0).all()
    moved = direct.to("cpu", non_blocking=True)
    assert isinstance(moved, PromptBatch) and torch.equal(moved.input_ids, direct.input_ids) and moved.target is None
    if torch.cuda.is_available():
        assert direct.pin_memory().input_ids.is_pinned()


def test_bad_inputs_fail_loudly():
    tok, ph = tokenizer("llama")
    collator = PromptCollator(tok, TEMPLATE, TitleTable.build(tok, ["A", "B"]), ph)
    good = dict(history=torch.tensor([[0, 2]]), length=torch.tensor([1]), candidates=torch.tensor([[0, 1]]), target=torch.tensor([1]))
    collator.build(**good)
    with pytest.raises(IloraError, match="sample 0: history position 1 holds id 2"):
        collator.build(**{**good, "length": torch.tensor([2])})
    with pytest.raises(IloraError, match="length 3"):
        collator.build(**{**good, "length": torch.tensor([3])})
    with pytest.raises(IloraError, match="candidates position 1 holds id 7"):
        collator.build(**{**good, "candidates": torch.tensor([[0, 7]])})
    with pytest.raises(IloraError, match="target"):
        collator.build(**{**good, "target": None})
    with pytest.raises(IloraError, match="target id 2"):
        collator.build(**{**good, "target": torch.tensor([2])})
    for name, bad in (("length", torch.tensor([1.5])), ("candidates", np.array([[0.0, 1.0]])), ("target", torch.tensor([True]))):
        with pytest.raises(IloraError, match=rf"prompt {name} must be integers, got torch\.(float|bool)"):  # int64 would truncate 1.5 to 1
            collator.build(**{**good, name: bad})
    with pytest.raises(IloraError, match=r"prompt candidate_length must be integers"):
        collator.build(**good, candidate_length=torch.tensor([2.0]))
    collator.build(**{**good, "history": np.array([[0, 2]], dtype=np.int32), "length": [1]})  # any integer type
    empty = collator.build(history=np.zeros((0, 2)), length=[], candidates=np.zeros((0, 2)), target=[])  # empty: nothing to truncate
    assert len(empty) == 0


def test_curriculum():
    assert [hybrid_probability(s, 100) for s in (0, 25, 100, 250)] == [0.0, 0.25, 1.0, 1.0]
    assert not draw_hybrid_flags(64, 0, 100, seed=1).any()
    assert draw_hybrid_flags(64, 100, 100, seed=1).all()
    a = draw_hybrid_flags(5000, 30, 100, seed=7)
    assert torch.equal(a, draw_hybrid_flags(5000, 30, 100, seed=7))
    assert not torch.equal(a, draw_hybrid_flags(5000, 31, 100, seed=7))
    assert abs(a.float().mean().item() - 0.3) < 0.03
    whole = torch.stack([draw_hybrid_flags(8, s, 100, seed=3, per_batch=True) for s in range(100)])
    assert (whole == whole[:, :1]).all() and 0.3 < whole[:, 0].float().mean() < 0.7


@pytest.mark.skipif(not (SHARED / "datasets" / "lastfm" / "id2name.txt").exists(), reason="shared LastFM data absent")
def test_lastfm_title_table():
    lines = (SHARED / "datasets" / "lastfm" / "id2name.txt").read_text(encoding="utf-8").splitlines()
    titles = [line.split("::", 1)[1].strip() for line in lines]
    assert len(titles) == 4606
    template = load_template("music")
    tok = build_tiny_tokenizer([*titles, *template.pieces], vocab_size=2000)
    ph = add_placeholder_tokens(tok)
    table = TitleTable.build(tok, titles)
    assert table.ids.shape[0] == 4607 and table.length[-1] == 0 and (table.length[:-1] > 0).all()
    for i in random.Random(0).sample(range(4606), 200):
        assert table.ids[i, : table.length[i]].tolist() == ref_segment(tok, titles[i])
    collator = PromptCollator(tok, template, table, ph)
    history = torch.tensor([[0, 1, 2, 4606], [3, 4, 5, 6]])
    batch = collator.build(history, torch.tensor([3, 4]), torch.tensor([[7, 8, 9], [10, 11, 12]]), torch.tensor([8, 11]))
    text = tok.decode(batch.input_ids[1][batch.attention_mask[1].bool()], skip_special_tokens=True)
    assert " ".join(text.split()) == " ".join(template.render(titles[3:7], titles[10:13], answer=titles[11]).replace("[HistoryEmb]", "").replace("[CansEmb]", "").split())


def word_tokenizer(words: list[str], normalizer=None):
    """A WordLevel tokenizer knowing only ``words`` (everything else is unk), split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if normalizer is not None:
        tok.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_titles_the_tokenizer_cannot_give_back_are_named_and_most_of_them_refused(caplog):
    from tokenizers import normalizers

    from ilora.teacher.batch import check_titles_given_back, titles_not_given_back

    tok = word_tokenizer(["red", "fox", "blue", "owl", "fish"], normalizers.NFKC())
    # "green" is unknown: item 2 comes back as "<unk> owl"; the ligature and the double space
    # are normalisation, which a tokenizer may rightly apply: items 3 and 4 come back as they are
    titles = ["red fox", "blue fox", "green owl", "\ufb01sh", "red  owl"]
    assert [(item, " ".join(text.split())) for item, text in titles_not_given_back(tok, titles)] == [(2, "<unk> owl")]
    with caplog.at_level("WARNING", logger="ilora.teacher.batch"):
        check_titles_given_back(tok, titles, "tok")
    assert "tok: 1 of 5 item titles do not come back from the tokenizer" in caplog.text and "'green owl' comes back as '<unk> owl'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ilora.teacher.batch"):
        check_titles_given_back(tok, titles[:2] + titles[3:], "tok")  # all come back: silent
    assert caplog.text == ""
    with pytest.raises(IloraError, match=r"tok: 3 of 4 item titles do not come back .* Is this the tokenizer the model was saved with"):
        check_titles_given_back(tok, ["green owl", "grey owl", "pink fox", "red fox"], "tok")


def test_a_teacher_is_not_built_around_a_tokenizer_that_loses_most_titles(tmp_path, monkeypatch):
    """Refused before the base LLM's weights load, naming the model."""
    import transformers

    from ilora.data.dataset import Catalog
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.build import build_teacher
    from ilora.teacher.config import TeacherConfig
    from ilora.teacher.tiny import build_tiny_llm

    tok = word_tokenizer(["red", "fox"])
    build_tiny_llm(tok, hidden=16).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    catalog = Catalog(("red fox", "green owl", "grey owl"))
    rec = SASRec(SASRecConfig(num_items=3, max_len=4, hidden=8, dropout=0.0))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(IloraError, match=f"the tokenizer of {tmp_path / 'm'}: 2 of 3 item titles do not come back"):
        build_teacher(TeacherConfig(llm=str(tmp_path / "m")), catalog, rec)

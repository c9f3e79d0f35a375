"""The teacher's one forward path against independent references (tiny models, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ilora.cli.main import main
from ilora.data import candidate_sets, make_synthetic, write_native
from ilora.rec.sasrec import SASRec, SASRecConfig
from ilora.teacher.adapters import enable_gradient_checkpointing, gated_lora_modules
from ilora.teacher.build import build_teacher, load_teacher, save_teacher
from ilora.teacher.config import TeacherConfig
from ilora.teacher.evaluate import evaluate_teacher, matched_candidates

SMALL = dict(tiny_hidden=32, tiny_layers=2, tiny_heads=4, tiny_vocab=300, lora_dropout=0.0, max_title_tokens=8)


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic(users=60, items=40, seed=3)


@pytest.fixture(scope="module")
def rec(dataset):
    torch.manual_seed(0)
    return SASRec(SASRecConfig(num_items=dataset.num_items, max_len=dataset.max_len, hidden=16, dropout=0.0)).eval()


def make_bundle(dataset, rec, **overrides):
    bundle = build_teacher(TeacherConfig(**{**SMALL, **overrides}), dataset.catalog, rec)
    torch.manual_seed(1)
    for layer in gated_lora_modules(bundle.teacher.llm).values():
        layer.reset_lora_parameters("random")  # B != 0, so experts differ and gate gradients are non-zero
    return bundle


def sample_arrays(dataset, n=3, count=5):
    split = dataset.split("val").subset(slice(0, n))
    cands = candidate_sets(split, dataset.num_items, count=count, seed=0, split_name="val")
    return split, cands


def full_logits(teacher, batch, gate_mode="learned"):
    """Reference: HF's own causal-LM forward (full sequence x vocabulary) with the gate in scope."""
    gates = teacher.gates(batch.history, batch.length, gate_mode)
    embeds = teacher.embed(batch)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    with teacher.gate_state.use(gates):
        return teacher.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=position_ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loss_equals_full_sequence_cross_entropy(dataset, rec, arch):
    bundle = make_bundle(dataset, rec, tiny_arch=arch)
    split, cands = sample_arrays(dataset)
    batch = bundle.train_collator.build(split.history, split.length, cands, split.target)
    logits = full_logits(bundle.teacher, batch)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(bundle.teacher.loss(batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate_mode,arch", [("learned", "llama"), ("uniform", "llama"), ("expert:2", "llama"), ("learned", "qwen2")])
def test_candidate_scores_equal_per_candidate_full_sequences(dataset, rec, gate_mode, arch):
    """KV-cache scoring == scoring each (prompt, candidate answer) as its own full sequence."""
    bundle = make_bundle(dataset, rec, tiny_arch=arch)
    teacher = bundle.teacher
    split, cands = sample_arrays(dataset)
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    fast = teacher.score_candidates(prompts, prompts.candidates, gate_mode)
    for b in range(len(split)):
        for c in range(cands.shape[1]):
            one = bundle.train_collator.build(split.history[b : b + 1], split.length[b : b + 1], cands[b : b + 1], cands[b : b + 1, c])
            with torch.no_grad():
                logp = torch.log_softmax(full_logits(teacher, one, gate_mode)[0].double(), -1)
            answer = (one.labels[0] != -100).nonzero().flatten()
            expected = sum(float(logp[t - 1, one.labels[0, t]]) for t in answer)
            assert float(fast[b, c]) == pytest.approx(expected, abs=1e-4)


def test_different_experts_give_different_scores(dataset, rec):
    bundle = make_bundle(dataset, rec)
    split, cands = sample_arrays(dataset)
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    scores = [bundle.teacher.score_candidates(prompts, prompts.candidates, f"expert:{e}") for e in range(4)]
    for e in range(1, 4):
        assert not torch.allclose(scores[0], scores[e], atol=1e-4)
    learned = bundle.teacher.score_candidates(prompts, prompts.candidates, "learned")
    assert all(not torch.allclose(learned, s, atol=1e-5) for s in scores)


def _grads(bundle, batch):
    bundle.teacher.zero_grad(set_to_none=True)
    bundle.teacher.train()
    bundle.teacher.loss(batch).backward()
    return {n: p.grad.clone() for n, p in bundle.teacher.named_parameters() if p.requires_grad and p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(dataset, rec):
    split, cands = sample_arrays(dataset, n=4)
    plain = make_bundle(dataset, rec)
    batch = plain.train_collator.build(split.history, split.length, cands, split.target)
    expected = _grads(plain, batch)
    ckpt = make_bundle(dataset, rec)
    enable_gradient_checkpointing(ckpt.teacher.llm, ckpt.teacher.gate_state)
    got = _grads(ckpt, batch)
    assert set(got) == set(expected)
    assert any(n.startswith("gate_net") for n in got) and any("lora_A" in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_saved_teacher_reloads_identically(dataset, rec, tmp_path):
    bundle = make_bundle(dataset, rec)
    save_teacher(bundle, tmp_path / "t", dataset.catalog)
    loaded = load_teacher(tmp_path / "t", dataset.catalog)
    split, cands = sample_arrays(dataset)
    for b in (bundle, loaded):
        b.teacher.eval()
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    again = loaded.prompt_collator.build(split.history, split.length, cands)
    assert torch.equal(prompts.input_ids, again.input_ids)
    for mode in ("learned", "expert:1"):
        assert torch.equal(
            bundle.teacher.score_candidates(prompts, prompts.candidates, mode),
            loaded.teacher.score_candidates(again, again.candidates, mode),
        )


def test_generate_and_score_agree_when_answers_are_forced(dataset, rec):
    """Overfit a teacher on a few samples until greedy generation names a candidate;
    then that candidate must be the top-scored one."""
    bundle = make_bundle(dataset, rec, curriculum=False)
    teacher = bundle.teacher
    split, cands = sample_arrays(dataset, n=4, count=4)
    batch = bundle.train_collator.build(split.history, split.length, cands, split.target)
    opt = torch.optim.Adam([p for p in teacher.parameters() if p.requires_grad], lr=3e-3)
    teacher.train()
    for _ in range(120):
        opt.zero_grad()
        loss = teacher.loss(batch)
        loss.backward()
        opt.step()
    teacher.eval()
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    texts = teacher.generate(prompts, max_new_tokens=12)
    scores = teacher.score_candidates(prompts, prompts.candidates)
    titles = dataset.catalog.titles
    checked = 0
    for b, text in enumerate(texts):
        hits = matched_candidates(text, [titles[i] for i in cands[b]])
        if len(hits) == 1:
            checked += 1
            assert hits[0] == int(scores[b].argmax()), (text, scores[b])
    assert checked >= 3, (loss.item(), texts)


def test_evaluate_reports_gate_statistics(dataset, rec):
    bundle = make_bundle(dataset, rec)
    split, cands = sample_arrays(dataset, n=6)
    m = evaluate_teacher(bundle, split, cands, dataset.catalog.titles, protocol="score")
    assert m["valid_ratio"] == 1.0 and 0.0 <= m["hr@1"] <= 1.0 and m["num_samples"] == 6
    assert sum(m["gate_stats"]["mean_weight"]) == pytest.approx(1.0)
    g = evaluate_teacher(bundle, split, cands, dataset.catalog.titles, protocol="generate")
    assert set(g) >= {"valid_ratio", "hr@1", "hr@1_all"}


def test_cli_train_then_eval(tmp_path, capsys):
    data = tmp_path / "data"
    write_native(make_synthetic(users=40, items=30, seed=5), data)
    assert main(["rec", "train", str(data), "--out", str(tmp_path / "rec"), "--epochs", "1", "--max-steps", "3"]) == 0
    capsys.readouterr()
    args = ["teacher", "train", str(data), "--rec", str(tmp_path / "rec"), "--out", str(tmp_path / "t"), "--max-steps", "2",
            "--batch-size", "4", "--val-samples", "6", "--tiny-hidden", "32", "--tiny-vocab", "300", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and "mrr" in summary["best_val"]
    for gate in ("learned", "uniform", "expert:0"):
        assert main(["teacher", "eval", str(data), "--teacher", str(tmp_path / "t"), "--limit", "5", "--gate", gate, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["gate"] == gate and result["num_samples"] == 5 and "mean_target_logprob" in result
    assert main(["teacher", "eval", str(data), "--teacher", str(tmp_path / "t"), "--gate", "expert:9"]) == 2
    assert "expert index" in capsys.readouterr().err

"""The teacher's one forward path against independent references (tiny models, CPU)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ilora.cli.main import main
from ilora.data import candidate_sets, make_synthetic, read_native, write_native
from ilora.data.dataset import Catalog, SeqDataset
from ilora.errors import ConfigError, IloraError
from ilora.rec.sasrec import SASRec, SASRecConfig
from ilora.teacher.adapters import enable_gradient_checkpointing, gated_lora_modules
from ilora.teacher.batch import PromptCollator
from ilora.teacher.build import build_teacher, load_teacher, part_fingerprints, save_teacher
from ilora.teacher.config import TeacherConfig
from ilora.teacher.evaluate import evaluate_teacher, matched_candidates
from ilora.teacher.tiny import add_placeholder_tokens

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


def test_answer_logits_are_the_full_logits_at_the_positions_before_each_answer_token(dataset, rec):
    bundle = make_bundle(dataset, rec)
    split, cands = sample_arrays(dataset)
    batch = bundle.train_collator.build(split.history, split.length, cands, split.target)
    logits, targets = bundle.teacher.answer_logits(batch, "expert:1")
    full = full_logits(bundle.teacher, batch, "expert:1")
    expected, expected_targets = [], []
    for b in range(len(batch)):  # sample by sample, each answer token in order
        for t in range(1, batch.labels.shape[1]):
            if batch.labels[b, t] != -100:
                expected.append(full[b, t - 1])
                expected_targets.append(int(batch.labels[b, t]))
    torch.testing.assert_close(logits, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert targets.tolist() == expected_targets and len(expected_targets) == batch.num_targets


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


@pytest.mark.parametrize("gate_mode", ["learned", "expert:1"])
def test_generate_equals_per_sample_unpadded_greedy_decoding(dataset, rec, gate_mode):
    """Batched, left-padded, KV-cached generation == greedy decoding of each prompt alone,
    recomputing the whole unpadded sequence with HF's own forward (default positions) per token,
    never eos first (LLaRA's min_new_tokens=1)."""
    bundle = make_bundle(dataset, rec)
    teacher, tok = bundle.teacher.eval(), bundle.teacher.tokenizer
    split, cands = sample_arrays(dataset, n=4)
    assert len(set(split.length.tolist())) > 1  # prompts of different lengths: the batch is padded
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    fast = teacher.generate(prompts, gate_mode, max_new_tokens=6)
    for r in range(len(split)):
        one = bundle.prompt_collator.build(split.history[r : r + 1], split.length[r : r + 1], cands[r : r + 1])
        prompt = teacher.embed(one)[0]
        gate = teacher.gates(one.history, one.length, gate_mode)
        generated: list[int] = []
        with torch.no_grad(), teacher.gate_state.use(gate):
            for step in range(6):
                new = teacher.llm.get_input_embeddings()(torch.tensor(generated, dtype=torch.long)).to(prompt.dtype)
                logits = teacher.llm(inputs_embeds=torch.cat([prompt, new])[None]).logits[0, -1]
                if step == 0:
                    logits[tok.eos_token_id] = float("-inf")
                token = int(logits.argmax())
                if token == tok.eos_token_id:
                    break
                generated.append(token)
        assert fast[r] == tok.decode(generated, skip_special_tokens=True)


def test_generation_writes_at_least_one_token_like_hf_generate_with_llaras_settings(dataset, rec):
    """A teacher that prefers eos everywhere still writes one token first, as HF's generate
    with LLaRA's min_new_tokens=1 does; an empty answer would be invalid whatever the model knew."""
    bundle = make_bundle(dataset, rec)
    teacher, tok = bundle.teacher.eval(), bundle.teacher.tokenizer
    old = teacher.llm.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 50.0
    teacher.llm.set_output_embeddings(head)
    split, cands = sample_arrays(dataset, n=4)
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    ours = teacher.generate(prompts, max_new_tokens=8)
    gates = teacher.gates(prompts.history, prompts.length)
    with torch.no_grad(), teacher.gate_state.use(gates):
        ids = teacher.llm.generate(
            inputs_embeds=teacher.embed(prompts), attention_mask=prompts.attention_mask, do_sample=False, num_beams=1,
            max_new_tokens=8, min_new_tokens=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
    hf = tok.batch_decode(ids, skip_special_tokens=True)
    assert ours == hf and all(text for text in ours)


def test_scoring_and_generation_run_without_dropout_and_restore_the_mode(dataset, rec):
    bundle = make_bundle(dataset, rec, lora_dropout=0.5)
    split, cands = sample_arrays(dataset)
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    exact = bundle.teacher.eval().score_candidates(prompts, prompts.candidates)
    texts = bundle.teacher.generate(prompts, max_new_tokens=4)
    bundle.teacher.train()
    assert torch.equal(bundle.teacher.score_candidates(prompts, prompts.candidates), exact)
    assert bundle.teacher.generate(prompts, max_new_tokens=4) == texts
    assert bundle.teacher.training and not bundle.teacher.rec.training
    with pytest.raises(IloraError, match="max_new_tokens must be >= 1, got 0"):
        bundle.teacher.generate(prompts, max_new_tokens=0)


FAMILY_LOGIT_CHANGES = {
    "granite": dict(logits_scaling=8.0),  # divides
    "hyperclovax": dict(logits_scaling=0.25),  # multiplies: the same field, the other way
    "cohere": dict(logit_scale=0.0625),
    "falcon_h1": dict(lm_head_multiplier=0.3),
    "gemma2": dict(final_logit_softcapping=0.5),
    "llama": dict(),
}


def tiny_family_model(family: str, **extra):
    import transformers

    config = transformers.AutoConfig.for_model(
        family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=0, **{**FAMILY_LOGIT_CHANGES[family], **extra},
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", sorted(FAMILY_LOGIT_CHANGES))
def test_head_logits_are_the_models_own_logits(family):
    """These families scale or soft-cap the output layer's logits in their own forward."""
    from ilora.teacher.model import check_head_logits, head_logits

    model = tiny_family_model(family)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        assert torch.allclose(head_logits(model, hidden), model(input_ids=ids).logits, atol=1e-6)
        if family != "llama":  # the plain output layer would be another distribution
            assert not torch.allclose(model.get_output_embeddings()(hidden), model(input_ids=ids).logits, atol=1e-3)
    check_head_logits(model)


def test_a_family_whose_logits_ilora_does_not_reproduce_is_refused():
    import transformers

    from ilora.teacher.model import check_head_logits

    class Rescaled(transformers.LlamaForCausalLM):  # a family that changes its logits in a way head_logits does not know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model = tiny_family_model("llama")
    rescaled = Rescaled(model.config).eval()
    rescaled.load_state_dict(model.state_dict())
    with pytest.raises(ConfigError, match="model type 'llama': its forward changes the output layer's logits"):
        check_head_logits(rescaled)


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


def test_shared_adapter_inputs_option_groups_the_layers_and_keeps_the_gradients(dataset, rec, tmp_path):
    """``share_adapter_inputs`` groups q/k/v and gate/up of every decoder layer; without dropout the
    teacher's gradients equal the ungrouped teacher's, and a saved teacher reloads grouped."""
    split, cands = sample_arrays(dataset, n=4)
    plain = make_bundle(dataset, rec)
    batch = plain.train_collator.build(split.history, split.length, cands, split.target)
    expected = _grads(plain, batch)
    shared = make_bundle(dataset, rec, share_adapter_inputs=True)
    grouped = [path.rsplit(".", 1)[-1] for path, m in gated_lora_modules(shared.teacher.llm).items() if m.shared_input]
    assert grouped == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"] * 2
    got = _grads(shared, batch)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    save_teacher(shared, tmp_path / "t", dataset.catalog)
    loaded = load_teacher(tmp_path / "t", dataset.catalog)
    assert loaded.config.share_adapter_inputs
    assert sum(m.shared_input is not None for m in gated_lora_modules(loaded.teacher.llm).values()) == 10


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



@pytest.mark.usefixtures("library_bars_on")
def test_saving_and_loading_a_tiny_teacher_draws_transformers_bars_as_plain_lines(dataset, rec, tmp_path, monkeypatch):
    """A tiny teacher's base LLM is written and read by transformers, whose bars ("Writing model
    shards", "Loading weights") a batch job's log gets as whole lines, no carriage returns."""
    import io
    import sys

    bundle = make_bundle(dataset, rec)
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)

    save_teacher(bundle, tmp_path / "t", dataset.catalog)
    load_teacher(tmp_path / "t", dataset.catalog)

    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert any(line.startswith("Writing model shards: 100%") for line in lines), text
    assert any(line.startswith("Loading weights: 100%") for line in lines), text

def test_a_damaged_weights_file_of_a_saved_teacher_is_an_error_naming_it(dataset, rec, tmp_path):
    """With part fingerprints (format 3) a damaged file is found before it is read; a format-2
    teacher has none, and then each reader names the file and what it should hold."""
    bundle = make_bundle(dataset, rec)
    save_teacher(bundle, tmp_path / "t", dataset.catalog)
    files = sorted(p for p in (tmp_path / "t").rglob("*.safetensors") if p.parent.name != "llm")
    assert [p.relative_to(tmp_path / "t").as_posix() for p in files] == [
        "adapter_model.safetensors", "added_embeddings.safetensors", "gate.safetensors", "projector.safetensors", "rec/model.safetensors",
    ]
    unchecked = tmp_path / "format2"
    shutil.copytree(tmp_path / "t", unchecked)
    _edit_json(unchecked / "teacher_config.json", lambda c: (c.update(format_version=2), c.pop("parts")))
    for teacher_dir, fingerprinted in ((tmp_path / "t", True), (unchecked, False)):
        for path in (teacher_dir / p.relative_to(tmp_path / "t") for p in files):
            intact = path.read_bytes()
            path.write_bytes(intact[: len(intact) // 2])
            read_first = fingerprinted and path.parent.name != "rec"  # rec/ is read, then fingerprinted
            expected = "not the one saved" if read_first else r"not a readable safetensors file \((the|SASRec's) "
            with pytest.raises(IloraError, match=rf"{path.name}: {expected}"):
                load_teacher(teacher_dir, dataset.catalog)
            path.write_bytes(intact)
        load_teacher(teacher_dir, dataset.catalog)


def test_gate_options_reach_the_gate_and_survive_save_and_load(dataset, rec, tmp_path):
    """gate_blocks, gate_pool and gate_temperature build the ResNet router they describe, and a
    saved teacher reloads with the same router (checked against a softmax written here)."""
    from ilora.teacher.gate import ResNetGate

    options = dict(gate="resnet", gate_hidden=6, gate_blocks=1, gate_pool=3, gate_temperature=0.5)
    bundle = make_bundle(dataset, rec, **options)
    save_teacher(bundle, tmp_path / "t", dataset.catalog)
    loaded = load_teacher(tmp_path / "t", dataset.catalog)
    user = torch.randn(5, rec.config.hidden, generator=torch.Generator().manual_seed(0))
    for gate in (bundle.teacher.gate_net, loaded.teacher.gate_net):
        assert isinstance(gate, ResNetGate)
        assert len(gate.blocks) == 1 and gate.pool.output_size == 3 and gate.head.in_features == 6 * 3
        expected = torch.exp(gate.logits(user) / 0.5)
        torch.testing.assert_close(gate(user), expected / expected.sum(-1, keepdim=True))
    assert torch.equal(bundle.teacher.gate_net(user), loaded.teacher.gate_net(user))
    assert {k: getattr(loaded.config, k) for k in options} == options


def test_a_teacher_saved_before_the_gate_options_existed_loads_with_their_defaults(dataset, rec, tmp_path):
    from ilora.teacher.config import ADDED_OPTIONS

    bundle = make_bundle(dataset, rec, gate="resnet", gate_hidden=6)
    save_teacher(bundle, tmp_path / "t", dataset.catalog)
    meta_path = tmp_path / "t" / "teacher_config.json"
    meta = json.loads(meta_path.read_text())
    assert set(ADDED_OPTIONS) <= set(meta["config"])
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in ADDED_OPTIONS}
    meta_path.write_text(json.dumps(meta))
    loaded = load_teacher(tmp_path / "t", dataset.catalog)
    assert (loaded.config.gate_blocks, loaded.config.gate_pool, loaded.config.gate_temperature) == (2, 8, 1.0)
    user = torch.randn(3, rec.config.hidden, generator=torch.Generator().manual_seed(1))
    assert torch.equal(bundle.teacher.gate_net(user), loaded.teacher.gate_net(user))


def _base_weight(teacher):
    return teacher.llm.get_decoder().layers[0].self_attn.q_proj.base_layer.weight


def test_saving_into_a_used_directory_replaces_the_sasrec_and_base_llm(dataset, rec, tmp_path):
    """Run 2 saved where run 1 had saved: the directory holds run 2's teacher, rec and base alike."""
    first = make_bundle(dataset, rec, seed=0)
    save_teacher(first, tmp_path / "t", dataset.catalog)
    torch.manual_seed(5)
    other_rec = SASRec(SASRecConfig(num_items=dataset.num_items, max_len=dataset.max_len, hidden=16, dropout=0.0)).eval()
    second = make_bundle(dataset, other_rec, seed=7)
    assert not torch.equal(_base_weight(first.teacher), _base_weight(second.teacher))
    save_teacher(second, tmp_path / "t", dataset.catalog)
    loaded = load_teacher(tmp_path / "t", dataset.catalog)
    assert torch.equal(loaded.teacher.rec.item_emb.weight, other_rec.item_emb.weight)
    assert torch.equal(_base_weight(loaded.teacher), _base_weight(second.teacher))
    split, cands = sample_arrays(dataset)
    prompts = second.prompt_collator.build(split.history, split.length, cands)
    second.teacher.eval()
    assert torch.equal(loaded.teacher.eval().score_candidates(prompts, prompts.candidates), second.teacher.score_candidates(prompts, prompts.candidates))
    assert sorted(p.name for p in (tmp_path / "t").iterdir() if p.name.startswith(".")) == []  # no temporary directory left


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


BAD_FILES = {
    "format_version": ("teacher_config.json", lambda d: _edit_json(d / "teacher_config.json", lambda c: c.update(format_version=99))),
    "no_config": ("teacher_config.json", lambda d: _edit_json(d / "teacher_config.json", lambda c: c.pop("config"))),
    "bad_config": ("teacher_config.json", lambda d: _edit_json(d / "teacher_config.json", lambda c: c["config"].update(num_experts=0))),
    "lora_alpha_null": ("adapter_config.json", lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(lora_alpha=None))),
    "gate_kind": ("gate.safetensors", lambda d: _edit_json(d / "teacher_config.json", lambda c: c["config"].update(gate="resnet"))),
    "gate_missing": ("gate.safetensors", lambda d: (d / "gate.safetensors").unlink()),
    "projector_missing": ("projector.safetensors", lambda d: (d / "projector.safetensors").unlink()),
    "rows_missing": ("added_embeddings.safetensors", lambda d: (d / "added_embeddings.safetensors").unlink()),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_loading_a_damaged_checkpoint_names_the_file(dataset, rec, tmp_path, case):
    bundle = make_bundle(dataset, rec)
    save_teacher(bundle, tmp_path / "t", dataset.catalog)
    name, damage = BAD_FILES[case]
    damage(tmp_path / "t")
    with pytest.raises(IloraError, match=name.replace(".", r"\.")):
        load_teacher(tmp_path / "t", dataset.catalog)
    # the same damage recorded as if saved that way: the part's own reader names the file too
    if (tmp_path / "t" / name).is_file() and name != "teacher_config.json":
        _edit_json(tmp_path / "t" / "teacher_config.json", lambda c: c.update(parts=part_fingerprints(tmp_path / "t")))
        with pytest.raises(IloraError, match=name.replace(".", r"\.")):
            load_teacher(tmp_path / "t", dataset.catalog)


@pytest.mark.parametrize("part", ["gate.safetensors", "adapter_model.safetensors", "tokenizer"])
def test_a_save_interrupted_part_way_is_refused(dataset, rec, tmp_path, part):
    """Training saves its best teacher into the same directory again and again: killed part-way,
    new parts stand beside old ones, with the old teacher_config.json. Loading refuses that mix."""
    save_teacher(make_bundle(dataset, rec, seed=0), tmp_path / "a", dataset.catalog)
    later = make_bundle(dataset, rec, seed=7)
    with torch.no_grad():  # the same teacher a few steps on: other adapters and gate
        next(iter(gated_lora_modules(later.teacher.llm).values())).lora_B.weight.add_(1.0)
    save_teacher(later, tmp_path / "b", dataset.catalog)
    if part == "tokenizer":  # a tokenizer file rewritten (same content would be fine: change it)
        _edit_json(tmp_path / "a" / "tokenizer" / "tokenizer_config.json", lambda c: c.update(model_max_length=77))
    else:
        shutil.copy(tmp_path / "b" / part, tmp_path / "a" / part)
    with pytest.raises(IloraError, match=f"{part}.*not the one saved with this teacher_config.json"):
        load_teacher(tmp_path / "a", dataset.catalog)


def test_a_format_2_checkpoint_loads_without_part_checks_and_says_so(dataset, rec, tmp_path, caplog):
    bundle = make_bundle(dataset, rec)
    save_teacher(bundle, tmp_path / "t", dataset.catalog)
    _edit_json(tmp_path / "t" / "teacher_config.json", lambda c: (c.update(format_version=2), c.pop("parts")))
    with caplog.at_level("WARNING"):
        loaded = load_teacher(tmp_path / "t", dataset.catalog)
    assert "format 2" in caplog.text
    assert torch.equal(loaded.teacher.gate_net.net[0].weight, bundle.teacher.gate_net.net[0].weight)


def test_loading_detects_a_sasrec_or_base_llm_from_another_save(dataset, rec, tmp_path):
    save_teacher(make_bundle(dataset, rec, seed=0), tmp_path / "a", dataset.catalog)
    torch.manual_seed(5)
    other_rec = SASRec(SASRecConfig(num_items=dataset.num_items, max_len=dataset.max_len, hidden=16, dropout=0.0)).eval()
    save_teacher(make_bundle(dataset, other_rec, seed=7), tmp_path / "b", dataset.catalog)
    for part in ("rec", "llm"):
        mixed = tmp_path / f"mixed_{part}"
        shutil.copytree(tmp_path / "a", mixed)
        shutil.rmtree(mixed / part)
        shutil.copytree(tmp_path / "b" / part, mixed / part)
        with pytest.raises(IloraError, match=f"{part}: .*not the"):
            load_teacher(mixed, dataset.catalog)


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


def test_generate_runs_with_a_tokenizer_without_pad_token(dataset, rec):
    """Llama-2's tokenizer has no pad token: rows that finished early are filled with eos,
    and the texts are those generated with a pad token: each row's greedy tokens up to its
    eos, decoded (checked against the tokens the forced logits chose at each step)."""
    bundle = make_bundle(dataset, rec)
    teacher = bundle.teacher.eval()
    split, cands = sample_arrays(dataset, n=4)
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    eos = teacher.tokenizer.eos_token_id
    forced = {1: 2, 3: 1}  # sample -> step at which it emits eos: rows finish at different steps (never at 0)
    lm_logits = teacher.lm_logits
    chosen = []  # per step, the token each row's logits pick

    def logits_with_early_eos(hidden):
        logits = lm_logits(hidden).clone()
        logits[:, eos] = -1e9
        for row, at in forced.items():
            if len(chosen) == at:
                logits[row, eos] = 1e9
        chosen.append(logits.argmax(-1).tolist())
        return logits

    teacher.lm_logits = logits_with_early_eos
    try:
        with_pad = teacher.generate(prompts, max_new_tokens=4)
        chosen_with_pad = list(chosen)
        chosen.clear()
        teacher.tokenizer.pad_token = None
        assert teacher.tokenizer.pad_token_id is None
        without_pad = teacher.generate(prompts, max_new_tokens=4)
    finally:
        del teacher.lm_logits
    assert len(chosen_with_pad) == len(chosen) == 4  # rows 0 and 2 never finish: all 4 steps

    def live(picks):  # each row's picks up to and including its eos (after it, pad or eos is fed: the picks differ)
        return [[step[row] for step in picks][: forced.get(row, 3) + 1] for row in range(4)]

    assert live(chosen) == live(chosen_with_pad)
    expected = []
    for row in range(4):
        tokens = [picked[row] for picked in chosen_with_pad][: forced.get(row, 4)]
        assert eos not in tokens
        expected.append(teacher.tokenizer.decode(tokens, skip_special_tokens=True))
    assert with_pad == expected
    assert without_pad == with_pad
    assert all(text != "" for text in with_pad[:3])


def overfit(bundle, split, cands, answers, steps=40):
    """Train ``bundle``'s teacher on ``split`` until it writes ``answers`` (item ids), as
    `test_generate_and_score_agree_when_answers_are_forced` does; returns it in eval mode."""
    teacher = bundle.teacher
    batch = bundle.train_collator.build(split.history, split.length, cands, answers)
    opt = torch.optim.Adam([p for p in teacher.parameters() if p.requires_grad], lr=3e-3)
    teacher.train()
    for _ in range(steps):
        opt.zero_grad()
        teacher.loss(batch).backward()
        opt.step()
    return teacher.eval()


def test_evaluate_reports_the_metrics_of_its_scores_generations_and_gates(dataset, rec):
    """evaluate_teacher == the metrics recomputed here from the teacher's own scores,
    generations and gates, one sample at a time (a batch size that splits the samples).
    The teacher is overfitted to write the target for 4 samples and another candidate for 2,
    so that its generations are valid, some right and some wrong (a random teacher writes no
    title: the generate metrics would be 0 whatever evaluate_teacher did)."""
    bundle = make_bundle(dataset, rec, curriculum=False)
    split, cands = sample_arrays(dataset, n=6)
    answers = split.target.copy()
    for i in (1, 4):  # the first candidate that is not the target
        answers[i] = next(int(c) for c in cands[i] if c != split.target[i])
    teacher = overfit(bundle, split, cands, answers)
    titles = dataset.catalog.titles
    m = evaluate_teacher(bundle, split, cands, protocol="score", batch_size=4)
    scores, gates, texts = [], [], []
    for i in range(len(split)):
        one = bundle.prompt_collator.build(split.history[i : i + 1], split.length[i : i + 1], cands[i : i + 1])
        scores.append(teacher.score_candidates(one, one.candidates)[0].tolist())
        gates.append(teacher.gates(one.history, one.length)[0].tolist())
        texts.append(teacher.generate(one, max_new_tokens=int(teacher.title_table.length.max()) + 8)[0])
    ranks = []
    for row, cand, target in zip(scores, cands.tolist(), split.target.tolist(), strict=True):
        col = cand.index(target)
        ranks.append(sum(1 for j, s in enumerate(row) if j != col and s >= row[col]))
    assert m["num_samples"] == 6 and m["valid_ratio"] == 1.0
    assert m["mrr"] == pytest.approx(sum(1 / (r + 1) for r in ranks) / 6, abs=1e-9)
    assert m["hr@5"] == pytest.approx(sum(r < 5 for r in ranks) / 6, abs=1e-9)
    mean_gate = [sum(g[e] for g in gates) / 6 for e in range(4)]
    assert m["gate_stats"]["mean_weight"] == pytest.approx(mean_gate, abs=1e-6)
    assert max(mean_gate) - min(mean_gate) > 1e-4  # a learned gate, not a constant uniform one

    g = evaluate_teacher(bundle, split, cands, protocol="generate", batch_size=4)
    answers = [teacher.tokenizer.decode(teacher.title_table.ids[i, : teacher.title_table.length[i]].tolist(), skip_special_tokens=True) for i in range(len(titles))]
    valid = correct = 0
    for text, cand, target in zip(texts, cands.tolist(), split.target.tolist(), strict=True):
        line = text.strip().partition("\n")[0].strip().lower()
        found = [i for i in cand if answers[i].strip().lower() in line]
        valid += len(found) == 1
        correct += found == [target]
    assert valid >= 4 and 0 < correct < valid, texts  # the reference counts are not trivial
    assert (g["valid_ratio"], g["hr@1_all"]) == (pytest.approx(valid / 6), pytest.approx(correct / 6))
    assert g["hr@1"] == pytest.approx(correct / valid)
    assert g["gate_stats"]["mean_weight"] == pytest.approx(mean_gate, abs=1e-6)

    # max_new_tokens reaches the decoder and the metrics record it; the score protocol refuses it
    assert g["max_new_tokens"] == int(teacher.title_table.length.max()) + 8
    with pytest.raises(ConfigError, match="generate protocol only"):
        evaluate_teacher(bundle, split, cands, protocol="score", max_new_tokens=5)
    calls = []
    generate = teacher.generate
    teacher.generate = lambda batch, gate, max_new_tokens: calls.append(max_new_tokens) or generate(batch, gate, max_new_tokens=max_new_tokens)
    try:
        assert evaluate_teacher(bundle, split, cands, protocol="generate", batch_size=4, max_new_tokens=2)["max_new_tokens"] == 2
        evaluate_teacher(bundle, split, cands, protocol="generate", batch_size=4)
    finally:
        del teacher.generate
    assert calls == [2, 2] + [int(teacher.title_table.length.max()) + 8] * 2



def test_evaluation_warns_about_candidates_whose_answers_are_the_same(dataset, rec, caplog):
    """A catalog that repeats a title: the target and its twin score the same (up to rounding;
    the twin ranks above the target whatever the rounding) and an output naming one matches
    both; both protocols say so in a warning that counts the rows, and say nothing on distinct
    titles."""
    from dataclasses import replace

    split, cands = sample_arrays(dataset, n=4, count=6)
    target = int(split.target[2])
    twin = next(int(c) for c in cands[2] if c != target)
    titles = list(dataset.catalog.titles)
    titles[twin] = titles[target]
    bundle = build_teacher(TeacherConfig(**SMALL), replace(dataset.catalog, titles=tuple(titles)), rec)
    rows = [r for r in range(4) if target in cands[r] and twin in cands[r]]
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    scores = bundle.teacher.eval().score_candidates(prompts, prompts.candidates)
    assert scores[2, list(cands[2]).index(target)] == scores[2, list(cands[2]).index(twin)]
    with caplog.at_level("WARNING", logger="ilora.teacher.evaluate"):
        evaluate_teacher(bundle, split, cands, protocol="score", batch_size=4)
        evaluate_teacher(bundle, split, cands, protocol="generate", batch_size=4, max_new_tokens=2)
    score, generate = (r.getMessage() for r in caplog.records)
    assert score.startswith(f"score protocol: 1 of 4 candidate rows hold two items with the same answer (row 2: items {target} and {twin}, ")
    assert "the twin ranks above the target" in score
    assert generate.startswith(f"generate protocol: {len(rows)} of 4 candidate rows hold two items with the same answer (row {rows[0]}: items ")
    assert "counts as invalid" in generate
    # rounding that put the target a hair above its twin (as scoring one answer at two places of
    # a packed sequence can) still ranks the twin above it
    import ilora.teacher.evaluate as evaluate_module

    score_split = evaluate_module.score_split

    seen = {}

    def nudged(*args, **kwargs):
        got, gates = score_split(*args, **kwargs)
        twin_col, target_col = list(cands[2]).index(twin), list(cands[2]).index(target)
        got[2, twin_col] = got[2].max() + 1.0
        got[2, target_col] = got[2, twin_col] + 1e-5  # the target a hair above its twin, both above the rest
        seen["scores"] = got.clone()
        return got, gates

    evaluate_module.score_split = nudged
    try:
        nudged_mrr = evaluate_teacher(bundle, split, cands, protocol="score", batch_size=4)["mrr"]
    finally:
        evaluate_module.score_split = score_split
    ranks = []  # brute force: every other candidate scoring at least as high or with the target's title
    for r in range(4):
        t = list(cands[r]).index(int(split.target[r]))
        ranks.append(sum(
            1 for c in range(cands.shape[1])
            if c != t and (seen["scores"][r, c] >= seen["scores"][r, t] or titles[int(cands[r, c])] == titles[int(split.target[r])])
        ))
    assert ranks[2] == 1
    assert nudged_mrr == pytest.approx(sum(1 / (k + 1) for k in ranks) / 4)
    caplog.clear()
    with caplog.at_level("WARNING", logger="ilora.teacher.evaluate"):
        evaluate_teacher(make_bundle(dataset, rec), split, cands, protocol="score", batch_size=4)
    assert not caplog.records
    outside = cands.copy()
    outside[1, 0 if outside[1, 0] != split.target[1] else 1] = dataset.num_items  # the padding id: no item
    with pytest.raises(IloraError, match=rf"candidate row 1, position [01]: id {dataset.num_items} is outside the catalog"):
        evaluate_teacher(bundle, split, outside, protocol="score", batch_size=4)

def test_scoring_and_generating_a_split_leave_the_teacher_in_the_callers_mode(dataset, rec):
    """Both run in eval mode (the same scores from a teacher left in training mode) and hand the
    teacher back as they found it: a caller mid-training keeps training with dropout on."""
    from ilora.teacher.evaluate import generate_split, score_split

    bundle = build_teacher(TeacherConfig(**{**SMALL, "lora_dropout": 0.3}), dataset.catalog, rec)
    split, cands = sample_arrays(dataset, n=3)
    bundle.teacher.eval()
    expected, _ = score_split(bundle, split, cands.copy())
    assert not bundle.teacher.training
    bundle.teacher.train()
    got, gates = score_split(bundle, split, cands.copy())
    assert torch.equal(got, expected)
    assert bundle.teacher.training and not bundle.teacher.rec.training
    assert not got.requires_grad and not gates.requires_grad  # no autograd graph kept alive per batch
    generate_split(bundle, split, cands, max_new_tokens=2)
    assert bundle.teacher.training and not bundle.teacher.rec.training


def test_evaluating_a_split_without_samples_is_an_error_not_a_torch_error(dataset, rec):
    from ilora.teacher.evaluate import generate_split, score_split

    bundle = make_bundle(dataset, rec)
    split, cands = sample_arrays(dataset, n=3)
    empty, none = split.subset(slice(0, 0)), cands[:0]
    for protocol in ("score", "generate"):
        with pytest.raises(IloraError, match=f"{protocol} evaluation: the split has no samples"):
            evaluate_teacher(bundle, empty, none, protocol=protocol)
    with pytest.raises(IloraError, match="scoring: the split has no samples"):
        score_split(bundle, empty, none)
    with pytest.raises(IloraError, match="generation: the split has no samples"):
        generate_split(bundle, empty, none)


def test_generate_protocol_matches_the_truncated_titles_the_teacher_learnt(dataset):
    """A teacher that writes exactly its training answers (titles cut to max_title_tokens)
    scores hr@1 = 1 under the generate protocol, even when every title is longer."""
    titles = [f"Band{i:02d} and the very long tail of a title that goes on" for i in range(dataset.num_items)]
    long = SeqDataset(Catalog(tuple(titles)), dict(dataset.splits), source="long titles")
    torch.manual_seed(0)
    rec = SASRec(SASRecConfig(num_items=long.num_items, max_len=long.max_len, hidden=16, dropout=0.0)).eval()
    bundle = make_bundle(long, rec, max_title_tokens=4)
    teacher = bundle.teacher
    split, cands = sample_arrays(long, n=5)
    assert bool((teacher.title_table.length[:-1] == 4).all())  # every title is truncated
    # the training answers, read from the labels of prompts with answers (eos dropped)
    train = bundle.train_collator.build(split.history, split.length, cands, split.target)
    perfect = [teacher.tokenizer.decode([t for t in row if t != -100][:-1], skip_special_tokens=True) for row in train.labels.tolist()]
    assert all(text.strip() and text.strip() not in titles for text in perfect)
    outputs = iter(perfect)
    teacher.generate = lambda batch, *args, **kwargs: [next(outputs) for _ in range(len(batch))]
    g = evaluate_teacher(bundle, split, cands, protocol="generate", batch_size=2)
    assert g["valid_ratio"] == 1.0 and g["hr@1"] == 1.0 and g["hr@1_all"] == 1.0


# -- input checks ---------------------------------------------------------------------------------


def test_scoring_and_generation_reject_right_padded_prompts_and_prompts_with_answers(dataset, rec):
    bundle = make_bundle(dataset, rec)
    teacher = bundle.teacher.eval()
    split, cands = sample_arrays(dataset, n=3)
    pc = bundle.prompt_collator
    right = PromptCollator(teacher.tokenizer, pc.template, pc.titles, add_placeholder_tokens(teacher.tokenizer), with_answer=False, padding_side="right")
    prompts = right.build(split.history, split.length, cands)
    assert not bool(prompts.attention_mask[:, -1].all())  # the prompts have different lengths
    with pytest.raises(IloraError, match="left-padded"):
        teacher.score_candidates(prompts, prompts.candidates)
    with pytest.raises(IloraError, match="left-padded"):
        teacher.generate(prompts, max_new_tokens=3)
    answered = bundle.train_collator.build(split.history, split.length, cands, split.target)
    with pytest.raises(IloraError, match="answer"):
        teacher.score_candidates(answered, answered.candidates)
    with pytest.raises(IloraError, match="answer"):
        teacher.generate(answered, max_new_tokens=3)


@pytest.mark.parametrize("bad", ["minus_one", "padding_id", "too_many_rows", "one_dimensional"])
def test_scoring_rejects_candidates_outside_the_catalog_or_of_the_wrong_shape(dataset, rec, bad):
    bundle = make_bundle(dataset, rec)
    split, cands = sample_arrays(dataset, n=2)
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    c = prompts.candidates.clone()
    if bad == "minus_one":
        c[1, 2] = -1
    elif bad == "padding_id":
        c[0, 1] = dataset.num_items
    elif bad == "too_many_rows":
        c = torch.cat([c, c[:1]])
    else:
        c = c[0]
    with pytest.raises(IloraError, match="prompt 1, candidate 2|prompt 0, candidate 1|shape"):
        bundle.teacher.score_candidates(prompts, c)


def test_scoring_refuses_flash_attention(dataset, rec):
    bundle = make_bundle(dataset, rec)
    split, cands = sample_arrays(dataset, n=2)
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    bundle.teacher.llm.config._attn_implementation_internal = "flash_attention_2"
    assert bundle.teacher.llm.config._attn_implementation == "flash_attention_2"
    with pytest.raises(IloraError, match="flash_attention_2"):
        bundle.teacher.score_candidates(prompts, prompts.candidates)


def test_scoring_and_generating_refuse_an_empty_batch_or_no_candidates(dataset, rec):
    bundle = make_bundle(dataset, rec)
    split, cands = sample_arrays(dataset, n=2)
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    empty = bundle.prompt_collator.build(split.history[:0], split.length[:0], cands[:0])
    with pytest.raises(IloraError, match="score_candidates: the batch holds no prompts"):
        bundle.teacher.score_candidates(empty, torch.as_tensor(cands[:0]))
    with pytest.raises(IloraError, match="generate: the batch holds no prompts"):
        bundle.teacher.generate(empty)
    with pytest.raises(IloraError, match=r"candidates have shape \(2, 0\), expected \(2, C >= 1\)"):
        bundle.teacher.score_candidates(prompts, torch.as_tensor(cands[:, :0]))


def test_the_learned_gate_names_a_sample_without_history(dataset, rec):
    """The collator writes a prompt with an empty history; SASRec's user representation (the
    learned gate's input) needs one item, and says which sample has none."""
    bundle = make_bundle(dataset, rec)
    split, cands = sample_arrays(dataset, n=3)
    length = torch.as_tensor(split.length).clone()
    length[1] = 0
    with pytest.raises(IloraError, match="sample 1 of the batch has length 0"):
        bundle.teacher.gates(torch.as_tensor(split.history), length)
    assert bundle.teacher.gates(torch.as_tensor(split.history), length, "uniform").shape == (3, bundle.teacher.num_experts)


def test_mean_loss_of_a_batch_without_answers_is_an_error(dataset, rec):
    bundle = make_bundle(dataset, rec)
    split, cands = sample_arrays(dataset, n=2)
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    with pytest.raises(IloraError, match="no answer tokens"):
        bundle.teacher.loss(prompts)
    assert bundle.teacher.loss(prompts, reduction="sum").item() == 0.0


def test_train_mode_leaves_the_frozen_sasrec_in_eval_mode(dataset, rec):
    bundle = make_bundle(dataset, rec)
    teacher = bundle.teacher
    torch.manual_seed(0)
    teacher.rec = SASRec(SASRecConfig(num_items=dataset.num_items, max_len=dataset.max_len, hidden=16, dropout=0.3)).requires_grad_(False)
    split, _ = sample_arrays(dataset, n=4)
    history, length = torch.as_tensor(split.history), torch.as_tensor(split.length)
    assert teacher.train() is teacher
    assert teacher.training and teacher.gate_net.training and not teacher.rec.training
    with torch.no_grad():
        expected = teacher.gate_net(teacher.rec.eval().user_representation(history, length))
        torch.testing.assert_close(teacher.gates(history, length), expected, rtol=0, atol=0)  # no dropout in the gate input
    teacher.eval()
    assert not teacher.gate_net.training and not teacher.rec.training


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

    out = tmp_path / "eval"
    evaluate = ["teacher", "eval", str(data), "--teacher", str(tmp_path / "t"), "--limit", "5", "--out", str(out), "--json"]
    for gate in ("learned", "uniform"):  # a second eval on the same candidates adds its result beside the first
        assert main([*evaluate, "--gate", gate]) == 0
        assert json.loads(capsys.readouterr().out) == json.loads((out / f"eval_test_score_{gate}.json").read_text())
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(written) == ["candidates_test.npy", "eval_test_score_learned.json", "eval_test_score_uniform.json"]
    for name in ("eval_test_score_learned.json", "eval_test_score_uniform.json"):
        result = json.loads(written[name])
        assert result["candidates_file"] == "candidates_test.npy"
        assert result["candidates_sha256"] == hashlib.sha256(written["candidates_test.npy"]).hexdigest()
    for other in (["--seed", "1"], ["--limit", "4"]):  # other candidates would orphan the results there: refused, nothing written
        assert main([*evaluate, *other]) == 2
        err = capsys.readouterr().err
        assert "candidates_test.npy holds other candidate sets (5 samples x 20)" in err and "another --out" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == written

    # the generate protocol also writes what each sample generated and how it was judged
    assert main([*evaluate, "--protocol", "generate"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "generations" not in result and result["generations_file"] == "generations_test_learned.jsonl"
    records = [json.loads(line) for line in (out / result["generations_file"]).read_text().splitlines()]
    candidates, test = np.load(out / "candidates_test.npy"), read_native(data).split("test")
    assert [r["sample"] for r in records] == list(range(5))
    for r, row, target in zip(records, candidates, test.target[:5]):
        assert r["target"] == int(target) and set(r["named"]) <= set(row.tolist()) and isinstance(r["text"], str)
        assert r["valid"] == (len(r["named"]) == 1) and r["correct"] == (r["valid"] and r["named"] == [r["target"]])
    valid = sum(r["valid"] for r in records)
    assert result["valid_ratio"] == valid / 5
    assert result["hr@1"] == (sum(r["correct"] for r in records) / valid if valid else None)


def test_a_format_1_checkpoint_loads_without_fingerprint_checks_and_says_so(dataset, rec, tmp_path, caplog):
    """Teachers saved before the fingerprints existed still load (same weights), with a warning."""
    bundle = make_bundle(dataset, rec)
    save_teacher(bundle, tmp_path / "t", dataset.catalog)
    _edit_json(tmp_path / "t" / "teacher_config.json", lambda c: (c.update(format_version=1), c.pop("rec"), c.pop("llm")))
    with caplog.at_level("WARNING"):
        loaded = load_teacher(tmp_path / "t", dataset.catalog)
    assert "format 1" in caplog.text
    assert torch.equal(loaded.teacher.rec.item_emb.weight, bundle.teacher.rec.item_emb.weight)


def _save_base_llm(dataset, path, seed):
    """A tiny Llama and its tokenizer saved as a model directory, as a downloaded model is."""
    from ilora.teacher.tiny import build_tiny_llm, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(dataset.catalog.titles, vocab_size=300)
    build_tiny_llm(tokenizer, hidden=32, layers=2, heads=4, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_a_teacher_refuses_another_model_at_its_base_llm_path(dataset, rec, tmp_path, caplog):
    """A teacher names its base LLM by path; a checkpoint of the same architecture found there
    later (another fine-tune) must not load silently under the teacher's adapters."""
    from ilora.teacher.build import base_weights_sample
    from ilora.teacher.tiny import load_llm

    base = tmp_path / "base"
    _save_base_llm(dataset, base, seed=0)
    bundle = build_teacher(TeacherConfig(**{**SMALL, "llm": str(base)}), dataset.catalog, rec)
    save_teacher(bundle, tmp_path / "teacher", dataset.catalog)
    split, cands = sample_arrays(dataset)
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    loaded = load_teacher(tmp_path / "teacher", dataset.catalog)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.teacher.eval().score_candidates(prompts, prompts.candidates),
            bundle.teacher.eval().score_candidates(prompts, prompts.candidates),
        )
    # the sample ignores what the teacher adds (adapters, placeholder rows) and the loading dtype
    plain, _ = load_llm(base, device="cpu")
    assert base_weights_sample(plain) == base_weights_sample(bundle.teacher.llm) == base_weights_sample(plain.to(torch.bfloat16))

    _save_base_llm(dataset, base, seed=1)  # same architecture and shapes, other weights
    with pytest.raises(IloraError, match=f"{base}: not the base LLM the teacher in .*teacher was trained on"):
        load_teacher(tmp_path / "teacher", dataset.catalog)

    config = tmp_path / "teacher" / "teacher_config.json"  # a checkpoint saved before the sample was recorded
    meta = json.loads(config.read_text())
    del meta["llm_sample"]
    config.write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        load_teacher(tmp_path / "teacher", dataset.catalog)
    assert "without a sample of its base LLM's weights" in caplog.text


def test_attention_window_reads_each_familys_sliding_window() -> None:
    import transformers

    from ilora.teacher.model import attention_window

    def config(family, **extra):
        return transformers.AutoConfig.for_model(family, num_hidden_layers=2, **extra)

    assert attention_window(config("llama")) is None
    assert attention_window(config("mistral", sliding_window=64)) == 64
    assert attention_window(config("mistral", sliding_window=None)) is None
    assert attention_window(config("qwen2", sliding_window=64)) is None  # use_sliding_window is off by default
    assert attention_window(config("qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=1)) == 64
    assert attention_window(config("qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=2)) is None  # no layer uses it
    assert attention_window(config("gemma3_text", sliding_window=64, layer_types=["sliding_attention", "full_attention"])) == 64


def test_scoring_under_a_sliding_window_is_exact_within_it_and_refused_beyond(dataset, rec, monkeypatch, sliding_window_llm) -> None:
    """The block mask cannot apply a sliding window. With the window exactly the padded prompts
    plus the longest answer (far less than the prompts plus all packed answers) every
    (prompt, answer) sequence fits it and the scores equal each candidate's own full forward
    (which applies the window); one token less is refused by name."""
    from ilora.teacher.model import pack_answers

    bundle = build_teacher(TeacherConfig(**{**SMALL, "llm": sliding_window_llm(dataset.catalog.titles, 4096)}), dataset.catalog, rec)
    teacher = bundle.teacher.eval()
    split, cands = sample_arrays(dataset)
    prompts = bundle.prompt_collator.build(split.history, split.length, cands)
    ids, mask = teacher.title_table.answer_tokens(prompts.candidates.reshape(-1))
    packed = pack_answers(ids.view(len(split), cands.shape[1], -1), mask.view(len(split), cands.shape[1], -1), teacher.title_table.pad_id)[0]
    fits = prompts.input_ids.shape[1] + ids.shape[-1]
    assert fits < prompts.input_ids.shape[1] + packed.shape[1]  # the window leaves the packed answers' tail outside
    teacher.llm.config.sliding_window = fits - 1
    with pytest.raises(IloraError, match=rf"sliding window of {fits - 1} tokens, shorter than these prompts \(\d+ tokens, padded\) plus their longest answer"):
        teacher.score_candidates(prompts, prompts.candidates)
    teacher.llm.config.sliding_window = fits
    fast = teacher.score_candidates(prompts, prompts.candidates)
    for b in range(len(split)):  # each (prompt, candidate answer) as its own full sequence, as in the test above
        for c in range(cands.shape[1]):
            one = bundle.train_collator.build(split.history[b : b + 1], split.length[b : b + 1], cands[b : b + 1], cands[b : b + 1, c])
            with torch.no_grad():
                logp = torch.log_softmax(full_logits(teacher, one)[0].double(), -1)
            answer = (one.labels[0] != -100).nonzero().flatten()
            assert float(fast[b, c]) == pytest.approx(sum(float(logp[t - 1, one.labels[0, t]]) for t in answer), abs=1e-4)
    # the same refusal, from token counts alone and before any model call, for each batching
    from ilora.teacher.evaluate import check_scoring_window

    split, cands = sample_arrays(dataset, n=8)
    # every candidate title of the shortest length but one, for the sample with the shortest
    # prompt: a batch holding it and a longer prompt is wider than either sample alone
    by_title = np.argsort(teacher.title_table.length[:-1].numpy(), kind="stable")
    cands[:] = by_title[: cands.shape[1]]
    cands[int(np.argmin(bundle.prompt_collator.token_counts(split.history, split.length, cands).numpy())), 0] = by_title[-1]

    def widths(size):  # what score_candidates compares with the window, per batch it would score
        out = []
        for start in range(0, len(split), size):
            batch = bundle.prompt_collator.build(split.history[start : start + size], split.length[start : start + size], cands[start : start + size])
            out.append(batch.input_ids.shape[1] + teacher.title_table.answer_tokens(batch.candidates.reshape(-1))[0].shape[-1])
        return out

    alone = max(widths(1))
    messages = set()
    for size in (1, 2, 4, len(split)):
        needed = max(widths(size))
        teacher.llm.config.sliding_window = needed
        check_scoring_window(bundle, split, cands, size)
        teacher.llm.config.sliding_window = needed - 1
        message = "do not fit in it" if alone > needed - 1 else r"Use a smaller --batch-size \(ilora run: eval.batch_size\) \(now \d+; every sample fits alone\)"
        messages.add(message)
        with pytest.raises(IloraError, match=rf"sliding window of {needed - 1} tokens.*{message}"):
            check_scoring_window(bundle, split, cands, size)
    assert len(messages) == 2  # both refusals were met
    # scoring a split (teacher eval, ilora run's eval) refuses it before its first batch is scored
    from ilora.teacher.evaluate import score_split

    teacher.llm.config.sliding_window = max(widths(len(split))) - 1
    monkeypatch.setattr(type(teacher), "score_candidates", lambda *a, **k: pytest.fail("a batch was scored"))
    with pytest.raises(IloraError, match=r"Use a smaller --batch-size \(ilora run: eval.batch_size\)"):
        score_split(bundle, split, cands, batch_size=len(split))


def test_a_teacher_keeps_its_prompt_template_whatever_becomes_of_the_file(dataset, rec, tmp_path, monkeypatch):
    """A template file named by a relative path: the saved teacher records the template itself, so
    it loads from another directory and keeps its prompts when the file is edited; a teacher saved
    before templates were recorded needs the file, and says so."""
    from ilora.teacher.prompts import load_template

    monkeypatch.chdir(tmp_path)
    Path("mine.txt").write_text("Listened: [HistoryHere] Pick one of [CansHere] Answer:\n", encoding="utf-8")
    bundle = make_bundle(dataset, rec, domain="mine.txt")
    save_teacher(bundle, tmp_path / "t", dataset.catalog)
    split, cands = sample_arrays(dataset)
    expected = bundle.prompt_collator.build(split.history, split.length, cands).input_ids
    Path("mine.txt").write_text("Other words: [HistoryHere] then [CansHere] end\n", encoding="utf-8")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_teacher(tmp_path / "t", dataset.catalog)
    assert loaded.config.domain == "mine.txt"  # the option as given, and the template it stood for:
    assert loaded.prompt_collator.template.pieces == ("Listened:", "Pick one of", "Answer:")
    assert torch.equal(loaded.prompt_collator.build(split.history, split.length, cands).input_ids, expected)
    meta_path = tmp_path / "t" / "teacher_config.json"
    meta = json.loads(meta_path.read_text())
    del meta["template"]  # as an older ilora saved it
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IloraError, match=r"saved by an older ilora without its prompt template, and prompt template 'mine.txt': not a domain"):
        load_teacher(tmp_path / "t", dataset.catalog)
    monkeypatch.chdir(tmp_path)
    assert load_teacher(tmp_path / "t", dataset.catalog).prompt_collator.template == load_template("mine.txt")  # the file as it is now
    meta["template"] = {"before": "x"}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IloraError, match=r"teacher_config.json: the prompt template is \{'before': 'x'\}"):
        load_teacher(tmp_path / "t", dataset.catalog)

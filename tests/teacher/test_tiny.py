"""Tiny offline tokenizers/LLMs, placeholder tokens, and loading saved models."""

from __future__ import annotations

import pytest
import torch

from ilora.errors import IloraError
from ilora.teacher.tiny import (
    PLACEHOLDER_TOKENS,
    add_placeholder_tokens,
    build_tiny_llm,
    build_tiny_tokenizer,
    load_llm,
)

TEXTS = ["This user listened to", "in this order", "Morcheeba", "Enigma", "Café Del Mar", "Fleetwood Mac", "AC/DC"] * 5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_llm_with_placeholders(arch):
    tok = build_tiny_tokenizer(TEXTS, vocab_size=200, style=arch)
    model = build_tiny_llm(tok, arch=arch, hidden=32, layers=1, heads=4)
    assert model.config.model_type == arch
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    before = len(tok)

    ids = add_placeholder_tokens(tok, model)

    assert len(tok) == before + 3
    assert [ids.history, ids.candidate, ids.text] == [tok.convert_tokens_to_ids(t) for t in PLACEHOLDER_TOKENS]
    assert len({ids.history, ids.candidate, ids.text}) == 3 and min(ids.history, ids.candidate, ids.text) >= before
    assert model.get_input_embeddings().weight.shape == (len(tok), 32)
    assert model.get_output_embeddings().weight.shape == (len(tok), 32)
    # the placeholder text is one special token, and is skipped when decoding
    assert tok("Enigma [CansEmb]", add_special_tokens=False)["input_ids"][-1] == ids.candidate
    assert tok.decode([ids.history, ids.text], skip_special_tokens=True) == ""
    out = model(input_ids=torch.tensor([[ids.history, ids.candidate, ids.text, tok.eos_token_id]]))
    assert out.logits.shape == (1, 4, len(tok))
    # idempotent: same ids, no further growth
    assert add_placeholder_tokens(tok, model) == ids
    assert len(tok) == before + 3 and model.get_input_embeddings().weight.shape[0] == len(tok)


def test_a_model_whose_vocabulary_the_tokenizer_outgrows_is_refused():
    """Placeholders are the only rows the teacher adds (and saves): a base model with fewer
    rows than its tokenizer's tokens trained on rows drawn at random, and each load drew others
    (a teacher whose every evaluation gave other metrics)."""
    tok = build_tiny_tokenizer(TEXTS, vocab_size=200)
    small = build_tiny_llm(build_tiny_tokenizer(TEXTS[:3], vocab_size=40), hidden=32, layers=1, heads=4)
    rows = small.get_input_embeddings().weight.shape[0]
    assert rows < len(tok)
    with pytest.raises(IloraError, match=rf"has {rows} rows in its input embeddings, but its tokenizer has token ids up to {len(tok) - 1}"):
        add_placeholder_tokens(tok, small)
    assert "[HistoryEmb]" not in tok.get_vocab()  # refused before the tokenizer or the model changed


def test_tokenizer_styles():
    llama = build_tiny_tokenizer(TEXTS, vocab_size=200, style="llama")
    qwen = build_tiny_tokenizer(TEXTS, vocab_size=200, style="qwen2")
    assert llama("Enigma")["input_ids"][0] == llama.bos_token_id  # Llama adds bos
    assert qwen.bos_token_id is None and qwen("Enigma")["input_ids"] == qwen("Enigma", add_special_tokens=False)["input_ids"]
    for tok in (llama, qwen):
        for text in ["Enigma", "Sigur Rós ☃ 日本語", "Mötley Crüe!"]:  # unseen characters: byte fallback / byte level
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
    assert "▁Enigma" in llama.convert_ids_to_tokens(llama("Enigma", add_special_tokens=False)["input_ids"])


def test_tiny_llm_is_seeded():
    tok = build_tiny_tokenizer(TEXTS, vocab_size=200)
    state = torch.get_rng_state()
    a, b = build_tiny_llm(tok, seed=3), build_tiny_llm(tok, seed=3)
    c = build_tiny_llm(tok, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_load_llm_round_trip(tmp_path):
    tok = build_tiny_tokenizer(TEXTS, vocab_size=200, style="qwen2")
    model = build_tiny_llm(tok, arch="qwen2", hidden=32, layers=1)
    ids = add_placeholder_tokens(tok, model)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    loaded, loaded_tok = load_llm(tmp_path, device="cpu")

    assert next(loaded.parameters()).dtype == torch.float32
    assert loaded_tok.convert_tokens_to_ids("[CansEmb]") == ids.candidate
    x = torch.tensor([[ids.history, 5, 6, ids.candidate]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, model(input_ids=x).logits)
    bf16, _ = load_llm(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_load_llm_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(IloraError, match="cannot load LLM"):
        load_llm("no-such-org/no-such-model-ilora", device="cpu")
    monkeypatch.chdir(tmp_path)  # a plain name may be a hub id (gpt2): tried as one, and the error says where it was looked for
    with pytest.raises(IloraError, match=rf"cannot load LLM 'my_llama': not a model directory \(nothing named 'my_llama' in the working directory {tmp_path}\), and not a hub id"):
        load_llm("my_llama", device="cpu")
    for absent in (tmp_path / "absent", "./absent-ilora", "models/llama/absent"):  # a path, not a hub id: said plainly
        with pytest.raises(IloraError, match=r"absent(-ilora)?: no such directory \(an LLM is a model directory with config.json, or a hub id"):
            load_llm(absent, device="cpu")
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(IloraError, match="directory"):
        load_llm(tmp_path / "weights.bin", device="cpu")
    # a model directory without its tokenizer, and one without config.json
    tok = build_tiny_tokenizer(TEXTS, vocab_size=200)
    build_tiny_llm(tok, hidden=32, layers=1).save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(IloraError, match=f"{tmp_path / 'no_tokenizer'}: cannot load its tokenizer .*tokenizer.json or tokenizer.model"):
        load_llm(tmp_path / "no_tokenizer", device="cpu")
    tok.save_pretrained(tmp_path / "no_config")
    with pytest.raises(IloraError, match=f"{tmp_path / 'no_config'}: not a model directory: no config.json"):
        load_llm(tmp_path / "no_config", device="cpu")


@pytest.mark.usefixtures("library_bars_on")
def test_load_llm_draws_transformers_bar_as_plain_lines_in_a_redirected_log(tmp_path, monkeypatch):
    """load_llm routes transformers' "Loading weights" bar through ilora.progress: in a batch
    job's log (stderr not a terminal) it is whole lines, no carriage returns."""
    import io
    import sys

    tok = build_tiny_tokenizer(TEXTS, vocab_size=200)
    build_tiny_llm(tok, hidden=32, layers=1).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)

    load_llm(tmp_path, device="cpu")

    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert any(line.startswith("Loading weights: 100%") for line in log.getvalue().splitlines()), log.getvalue()


def test_a_tokenizer_without_eos_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    import transformers

    tok = build_tiny_tokenizer(TEXTS, vocab_size=200)
    build_tiny_llm(tok, hidden=32, layers=1).save_pretrained(tmp_path / "m")
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(IloraError, match=f"{tmp_path / 'm'}: the tokenizer has no eos token; the answer needs one to end"):
        load_llm(tmp_path / "m", device="cpu")

"""Fixtures shared by several test directories."""

from __future__ import annotations

import pytest


@pytest.fixture
def library_bars_on(recwarn):
    """transformers' progress bars switched on for the test, their previous state restored after.

    Skips where transformers has no ``set_tqdm_hook`` (its bars then stay its own). A test
    redirects ``sys.stderr`` in its own body: pytest's capture replaces it again between a
    fixture's setup and the test. recwarn: huggingface_hub's warning that
    HF_HUB_DISABLE_PROGRESS_BARS=1 keeps its own bars off is recorded, not printed."""
    from transformers.utils import logging as hf_logging

    if not hasattr(hf_logging, "set_tqdm_hook"):
        pytest.skip("this transformers has no set_tqdm_hook: its bars stay its own")
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # HF_HUB_DISABLE_PROGRESS_BARS=1 would start transformers' bars off
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


@pytest.fixture
def sliding_window_llm(tmp_path):
    """``make(titles, window, seed=0)``: the path of a saved 2-layer Mistral (random weights) whose
    attention slides over ``window`` tokens, with a tiny tokenizer built on ``titles``."""
    import torch
    import transformers

    from ilora.teacher.tiny import build_tiny_tokenizer

    def make(titles, window: int, seed: int = 0) -> str:
        tokenizer = build_tiny_tokenizer(titles, vocab_size=300)
        config = transformers.AutoConfig.for_model(
            "mistral", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, head_dim=8, sliding_window=window,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        directory = tmp_path / "mistral"
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return str(directory)

    return make

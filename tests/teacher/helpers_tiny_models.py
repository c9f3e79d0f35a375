"""Tiny Llama / Qwen2 causal LMs built from configs (random weights, no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

TINY = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32 and vocab 100, float32, eval mode."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False))
    return model.eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 (biased q/k/v projections, tied embeddings) of the same size."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))
    return model.eval()


def padded_batch(batch: int = 3, length: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded token ids and their attention mask; sample i has i pad positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        pad = min(i, length - 1)
        ids[i, :pad] = 0
        mask[i, :pad] = 0
    return ids, mask

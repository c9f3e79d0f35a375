"""Projector: SASRec item embeddings -> the LLM's input-embedding space.

A 2-layer MLP with GELU, as in LLaRA/iLoRA. Its outputs replace the input embeddings
of the ``[HistoryEmb]`` / ``[CansEmb]`` placeholder tokens.
"""

from __future__ import annotations

import torch
from torch import nn


class ItemProjector(nn.Module):
    def __init__(self, rec_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(rec_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, item_embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(item_embeddings)

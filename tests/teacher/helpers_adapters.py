"""Gated LoRA on tiny models, and a probe of the shared-input groups, for the tests."""

from __future__ import annotations

import torch

from helpers_tiny_models import tiny_llama
from ilora.teacher.adapters import GateState, MoELoraConfig, inject_gated_lora
from ilora.teacher.shared_input import SharedInput


def injected(make_model=tiny_llama, seed=0, **cfg_kwargs):
    """A tiny model with gated LoRA experts (random B, no dropout unless given) and its GateState."""
    model = make_model()
    cfg = MoELoraConfig(**{"init": "random", "dropout": 0.0, **cfg_kwargs})
    state = GateState(cfg.num_experts)
    torch.manual_seed(seed)
    inject_gated_lora(model, cfg, state)
    return model, state


def record_group_products(monkeypatch) -> list[bool]:
    """From now on, one entry per grouped layer's call: True where its group computed the product,
    False where the layer took columns the group already held."""
    calls: list[bool] = []
    original = SharedInput.lora_hidden

    def recorded(group, position, x):
        calls.append(not group._holds(x, position))
        return original(group, position, x)

    monkeypatch.setattr(SharedInput, "lora_hidden", recorded)
    return calls

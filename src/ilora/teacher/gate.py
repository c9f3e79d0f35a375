"""Gate networks: a user representation ``(B, D)`` -> softmax weights ``(B, E)`` over LoRA experts.

* `MLPGate`: Linear -> GELU -> Linear.
* `ResNetGate`: a small 1-D conv ResNet router in the spirit of iLoRA's, not a copy of it.
  The D-dim vector is read as a 1-channel signal of length D: a Conv1d stem, residual
  Conv1d blocks at one width (32 channels, 2 blocks, GELU), adaptive average pooling to a
  few positions (8), flatten, Linear to E. iLoRA's router is deeper (three stages of 16,
  32 and 64 channels, the second and third with stride 2, three blocks each, ReLU, batch norm, global average
  pooling, Linear(64, E)); ours has no batch norm, so a sample's gate never depends on the
  rest of its batch.

Both give ``softmax(logits / temperature)``; ``.logits(x)`` gives the logits.
Fixed gates for evaluation: `uniform_gate` (all experts equal, i.e. plain LoRA) and
`expert_gate` (one expert only). `gate_statistics` summarises a batch of gates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from ilora.config import option
from ilora.errors import ConfigError


@dataclass
class GateConfig:
    """The gate network that turns SASRec's user representation into expert weights."""

    kind: Literal["mlp", "resnet"] = option("mlp", "mlp: Linear-GELU-Linear; resnet: a small 1-D conv ResNet router like iLoRA's")
    hidden: int = option(32, "mlp: hidden width; resnet: conv channels")
    blocks: int = option(2, "resnet: number of residual conv blocks")
    pool: int = option(8, "resnet: positions kept by the adaptive average pool before the last Linear")
    temperature: float = option(1.0, "softmax temperature (below 1: sharper expert choice)")

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "resnet"):
            raise ConfigError(f"gate kind: {self.kind!r} is not one of mlp, resnet")
        for name in ("hidden", "pool"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gate {name}: must be >= 1, got {getattr(self, name)}")
        if self.blocks < 0:
            raise ConfigError(f"gate blocks: must be >= 0, got {self.blocks}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"gate temperature: must be positive, got {self.temperature}")


class _Gate(nn.Module):
    """Common part: input check, temperature softmax."""

    def __init__(self, in_dim: int, num_experts: int, temperature: float) -> None:
        super().__init__()
        if in_dim < 1 or num_experts < 1:
            raise ConfigError(f"gate needs in_dim >= 1 and num_experts >= 1, got {in_dim}, {num_experts}")
        self.in_dim = in_dim
        self.num_experts = num_experts
        self.temperature = temperature

    def _check(self, user: torch.Tensor) -> None:
        if user.dim() != 2 or user.shape[1] != self.in_dim:
            raise ValueError(f"gate expects a (batch, {self.in_dim}) user representation, got {tuple(user.shape)}")

    def logits(self, user: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, user: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim) -> (B, E)`` expert weights, rows summing to 1."""
        return torch.softmax(self.logits(user) / self.temperature, dim=-1)


class MLPGate(_Gate):
    """Linear(in_dim, hidden) -> GELU -> Linear(hidden, E) -> softmax."""

    def __init__(self, in_dim: int, num_experts: int, hidden: int = 32, temperature: float = 1.0) -> None:
        super().__init__(in_dim, num_experts, temperature)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_experts))

    def logits(self, user: torch.Tensor) -> torch.Tensor:
        self._check(user)
        return self.net(user)


class _ResidualBlock(nn.Module):
    """x + conv(gelu(conv(x))), then GELU; kernel 3, same length."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.conv2(F.gelu(self.conv1(x))))


class ResNetGate(_Gate):
    """The user vector as a 1-channel 1-D signal: stem conv, residual blocks, pool, Linear to E.

    No batch norm, so a sample's gate does not depend on the rest of its batch.
    """

    def __init__(
        self, in_dim: int, num_experts: int, channels: int = 32, blocks: int = 2, pool: int = 8, temperature: float = 1.0
    ) -> None:
        super().__init__(in_dim, num_experts, temperature)
        self.stem = nn.Conv1d(1, channels, kernel_size=3, padding=1)
        self.blocks = nn.Sequential(*[_ResidualBlock(channels) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool1d(min(pool, in_dim))
        self.head = nn.Linear(channels * min(pool, in_dim), num_experts)

    def logits(self, user: torch.Tensor) -> torch.Tensor:
        self._check(user)
        h = F.gelu(self.stem(user.unsqueeze(1)))  # (B, C, D)
        h = self.pool(self.blocks(h))  # (B, C, pool)
        return self.head(h.flatten(1))


def build_gate(cfg: GateConfig, in_dim: int, num_experts: int) -> _Gate:
    """The gate network ``cfg`` describes, reading ``in_dim`` features, for ``num_experts`` experts."""
    if cfg.kind == "mlp":
        return MLPGate(in_dim, num_experts, hidden=cfg.hidden, temperature=cfg.temperature)
    if cfg.kind == "resnet":
        return ResNetGate(in_dim, num_experts, channels=cfg.hidden, blocks=cfg.blocks, pool=cfg.pool, temperature=cfg.temperature)
    raise ConfigError(f"gate kind: {cfg.kind!r} is not one of mlp, resnet")


# -- fixed gates ---------------------------------------------------------------------------------


def uniform_gate(batch: int, num_experts: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, E)`` all ``1/E``: the experts act as one plain LoRA of rank ``E*r`` (scaled by 1/E)."""
    return torch.full((batch, num_experts), 1.0 / num_experts, device=device, dtype=dtype)


def expert_gate(
    batch: int, num_experts: int, n: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(B, E)`` one-hot on expert ``n``: only that expert is active."""
    if not 0 <= n < num_experts:
        raise ConfigError(f"expert index {n} is not in 0..{num_experts - 1}")
    gate = torch.zeros(batch, num_experts, device=device, dtype=dtype)
    gate[:, n] = 1.0
    return gate


# -- statistics ----------------------------------------------------------------------------------


def gate_statistics(gates: torch.Tensor) -> dict[str, float | list[float] | int]:
    """Summary of a ``(B, E)`` batch of gates (rows are probability vectors).

    * ``mean_weight``: per expert, the mean weight over samples.
    * ``weight_std``: per expert, the standard deviation of its weight across samples
      (population std); all zeros means the gate ignores the user.
    * ``mean_entropy`` (nats) and ``max_entropy`` = ln E: near the max = near uniform.
    * ``mean_pairwise_distance``: mean Euclidean distance between the gates of two
      different samples (0 for a single sample).
    * ``argmax_share``: per expert, the share of samples whose largest weight is that expert;
      a sample whose largest weight several experts share counts 1/k for each of its k
      (the uniform gate gives 1/E each, not everything to expert 0).
    """
    if gates.dim() != 2 or gates.shape[0] < 1:
        raise ValueError(f"gate_statistics expects a non-empty (batch, experts) tensor, got {tuple(gates.shape)}")
    g = gates.detach().double().cpu()
    batch, experts = g.shape
    entropy = -(g * torch.log(g.clamp_min(1e-300))).sum(dim=1)
    if batch > 1:
        pairwise = torch.pdist(g, p=2).mean().item()
    else:
        pairwise = 0.0
    is_max = (g == g.max(dim=1, keepdim=True).values).double()
    share = (is_max / is_max.sum(dim=1, keepdim=True)).sum(dim=0) / batch
    return {
        "num_samples": batch,
        "mean_weight": g.mean(dim=0).tolist(),
        "weight_std": g.std(dim=0, unbiased=False).tolist(),
        "mean_entropy": entropy.mean().item(),
        "max_entropy": math.log(experts),
        "mean_pairwise_distance": pairwise,
        "argmax_share": share.tolist(),
    }

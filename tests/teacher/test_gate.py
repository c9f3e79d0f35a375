"""Gate networks, fixed gates and gate statistics."""

from __future__ import annotations

import math

import pytest
import torch

from ilora.config import from_dict
from ilora.errors import ConfigError
from ilora.teacher.gate import GateConfig, MLPGate, ResNetGate, build_gate, expert_gate, gate_statistics, uniform_gate


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_gate_shape_rows_and_gradients(kind):
    torch.manual_seed(0)
    gate = build_gate(GateConfig(kind=kind, hidden=8), in_dim=64, num_experts=4)
    assert isinstance(gate, MLPGate if kind == "mlp" else ResNetGate)
    user = torch.randn(5, 64, requires_grad=True)
    weights = gate(user)
    assert weights.shape == (5, 4)
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(5))
    (weights * torch.randn(5, 4)).sum().backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert user.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_temperature_and_per_sample_independence(kind):
    torch.manual_seed(0)
    gate = build_gate(GateConfig(kind=kind, hidden=8, temperature=0.5), in_dim=16, num_experts=3)
    user = torch.randn(4, 16)
    with torch.no_grad():
        logits = gate.logits(user)
        weights = gate(user)
        alone = gate(user[2:3])
    exp = torch.exp(logits / 0.5)
    torch.testing.assert_close(weights, exp / exp.sum(dim=1, keepdim=True))
    torch.testing.assert_close(alone[0], weights[2])  # no batch statistics inside


def test_gate_input_and_config_checks():
    gate = MLPGate(64, 4)
    with pytest.raises(ValueError, match=r"\(batch, 64\)"):
        gate(torch.randn(3, 32))
    for bad in ({"kind": "tree"}, {"hidden": 0}, {"temperature": 0}, {"blocks": -1}):
        with pytest.raises(ConfigError):
            from_dict(GateConfig, bad)


def test_fixed_gates():
    torch.testing.assert_close(uniform_gate(2, 4), torch.full((2, 4), 0.25))
    torch.testing.assert_close(expert_gate(2, 3, 1), torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    with pytest.raises(ConfigError):
        expert_gate(2, 3, 3)


def test_gate_statistics_by_hand():
    gates = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]])
    stats = gate_statistics(gates)
    assert stats["num_samples"] == 3
    assert stats["mean_weight"] == pytest.approx([1.75 / 3, 1.25 / 3])
    m0 = 1.75 / 3
    std0 = math.sqrt(((1 - m0) ** 2 + (0.5 - m0) ** 2 + (0.25 - m0) ** 2) / 3)
    assert stats["weight_std"] == pytest.approx([std0, std0])
    h = [0.0, math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert stats["mean_entropy"] == pytest.approx(sum(h) / 3)
    assert stats["max_entropy"] == pytest.approx(math.log(2))
    d01 = math.sqrt(0.5**2 + 0.5**2)
    d02 = math.sqrt(0.75**2 + 0.75**2)
    d12 = math.sqrt(0.25**2 + 0.25**2)
    assert stats["mean_pairwise_distance"] == pytest.approx((d01 + d02 + d12) / 3)
    # argmax: sample 0 -> expert 0, sample 1 ties -> half to each, sample 2 -> expert 1
    assert stats["argmax_share"] == pytest.approx([1.5 / 3, 1.5 / 3])
    single = gate_statistics(uniform_gate(1, 4))
    assert single["mean_pairwise_distance"] == 0.0 and single["mean_entropy"] == pytest.approx(math.log(4))
    assert single["argmax_share"] == pytest.approx([0.25] * 4)  # the uniform gate favours no expert

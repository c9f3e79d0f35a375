"""Gated LoRA experts: the layer against a slow per-sample/per-expert reference, the gate's
plumbing (scope, checks, gradient checkpointing), injection into tiny HF models, and peft's
file format."""

from __future__ import annotations

import contextlib

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_tiny_models import padded_batch, tiny_llama, tiny_qwen2  # noqa: E402
from helpers_adapters import injected  # noqa: E402

from ilora.config import from_dict  # noqa: E402
from ilora.errors import ConfigError, IloraError  # noqa: E402
from ilora.teacher.adapters import (  # noqa: E402
    GatedLoraLinear,
    GateNotSetError,
    GateState,
    LoraDropout,
    MoELoraConfig,
    adapter_parameters,
    adapter_state_dict,
    enable_gradient_checkpointing,
    find_target_modules,
    gated_lora_modules,
    inject_gated_lora,
    load_adapters,
    save_adapters,
)
from ilora.teacher.gate import uniform_gate  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_layer(in_f=6, out_f=5, experts=3, rank=2, convention="per_expert", seed=0, bias=True):
    torch.manual_seed(seed)
    cfg = MoELoraConfig(num_experts=experts, rank_per_expert=rank, alpha=8.0, scaling_convention=convention, dropout=0.0, init="random")
    state = GateState(experts)
    layer = GatedLoraLinear(nn.Linear(in_f, out_f, bias=bias), cfg, state)
    return layer, state, cfg


def reference_forward(x, weight, bias, A, B, gate, experts, rank, scaling):
    """W x + b + s * sum_e g[b, e] * B_e A_e x, one sample, one token, one expert at a time.

    ``gate`` is (B, E) or per-token (B, T, E); x is (B, T, in) or (B, in).
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x[:, None, :]
    rows = []
    for b in range(x.shape[0]):
        tokens = []
        for t in range(x.shape[1]):
            xt = x[b, t]
            y = weight @ xt + (bias if bias is not None else 0.0)
            for e in range(experts):
                g = gate[b, t, e] if gate.dim() == 3 else gate[b, e]
                A_e = A[e * rank : (e + 1) * rank, :]
                B_e = B[:, e * rank : (e + 1) * rank]
                y = y + scaling * g * (B_e @ (A_e @ xt))
            tokens.append(y)
        rows.append(torch.stack(tokens))
    out = torch.stack(rows)
    return out[:, 0] if squeeze else out


def padded_input(batch=3, tokens=4, in_f=6, seed=3):
    """Inputs whose trailing positions are padding (a fixed pad vector) and the mask of real ones."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, in_f, generator=gen)
    mask = torch.ones(batch, tokens)
    for b in range(batch):
        x[b, tokens - b :] = 0.5
        mask[b, tokens - b :] = 0.0
    return x, mask


# -- config ---------------------------------------------------------------------------------------


def test_config_defaults_are_ilora_and_scaling_conventions():
    cfg = MoELoraConfig()
    assert (cfg.num_experts, cfg.rank_per_expert, cfg.total_rank) == (4, 2, 8)
    assert cfg.scaling == 32.0 / 2
    assert MoELoraConfig(scaling_convention="total").scaling == 32.0 / 8


@pytest.mark.parametrize("bad", [{"num_experts": 0}, {"rank_per_expert": 0}, {"dropout": 1.0}, {"alpha": -1}, {"scaling_convention": "x"}])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        from_dict(MoELoraConfig, bad)


# -- the layer against the slow reference -----------------------------------------------------------


@pytest.mark.parametrize("convention", ["per_expert", "total"])
@pytest.mark.parametrize("per_token", [False, True])
def test_layer_matches_reference_outputs_and_gradients(convention, per_token):
    layer, state, cfg = make_layer(convention=convention)
    assert layer.lora_B.weight.abs().min() > 0  # B non-zero, else the gate gradient is trivially 0
    x, mask = padded_input()
    gen = torch.Generator().manual_seed(7)
    shape = (3, 4, 3) if per_token else (3, 3)
    logits = torch.randn(*shape, generator=gen, requires_grad=True)
    weights_out = torch.randn(3, 4, 5, generator=gen)

    with state.use(torch.softmax(logits, dim=-1)):
        out = layer(x)
    loss = (out * weights_out * mask[..., None]).sum()
    loss.backward()

    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    ref_logits = logits.detach().clone().requires_grad_(True)
    expected_scaling = 8.0 / 2 if convention == "per_expert" else 8.0 / 6
    ref = reference_forward(
        x, layer.base_layer.weight.detach(), layer.base_layer.bias.detach(), A, B,
        torch.softmax(ref_logits, dim=-1), 3, 2, expected_scaling,
    )
    (ref * weights_out * mask[..., None]).sum().backward()

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.weight.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.weight.grad, B.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-5)
    assert ref_logits.grad.abs().max() > 1e-3
    assert layer.base_layer.weight.grad is None


def test_layer_two_dimensional_input_matches_reference():
    layer, state, _ = make_layer(bias=False)
    x = torch.randn(4, 6)
    gate = torch.softmax(torch.randn(4, 3), dim=-1)
    with state.use(gate), torch.no_grad():
        out = layer(x)
    ref = reference_forward(x, layer.base_layer.weight, None, layer.lora_A.weight, layer.lora_B.weight, gate, 3, 2, 4.0)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)


def test_uniform_gate_with_identical_experts_is_plain_lora():
    layer, state, cfg = make_layer(experts=4, rank=2)
    A0, B0 = torch.randn(2, 6), torch.randn(5, 2)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A0.repeat(4, 1))
        layer.lora_B.weight.copy_(B0.repeat(1, 4))
    x, _ = padded_input()
    with state.use(uniform_gate(3, 4)), torch.no_grad():
        out = layer(x)
    plain = x @ layer.base_layer.weight.T + layer.base_layer.bias + cfg.scaling * (x @ A0.T) @ B0.T
    torch.testing.assert_close(out, plain.detach(), rtol=1e-5, atol=1e-5)


def test_bf16_base_with_fp32_gate_and_adapters():
    layer, state, _ = make_layer()
    x = torch.randn(2, 3, 6)
    gate = torch.softmax(torch.randn(2, 3), dim=-1)
    with state.use(gate), torch.no_grad():
        ref = layer(x)
    layer.base_layer.to(torch.bfloat16)  # adapters stay float32
    with state.use(gate), torch.no_grad():
        out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    layer.to(torch.bfloat16)  # everything bf16, the gate still float32
    with state.use(gate), torch.no_grad():
        out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op name, output shape, output dtype) of every aten op run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.ops.append((func.overloadpacket.__name__, tuple(t.shape), t.dtype))
        return out


def test_autocast_adapter_makes_no_float32_copy_of_the_input():
    """Under autocast the products run in bf16 anyway: casting the (B, T, in) input to the
    float32 adapters first would only be cast back. Same result as the float32 layer."""
    layer, state, _ = make_layer(in_f=32, out_f=16, experts=4, rank=2)
    x = torch.randn(2, 5, 32)
    gate = torch.softmax(torch.randn(2, 4), dim=-1)
    with state.use(gate), torch.no_grad():
        ref = layer(x)
    layer.base_layer.to(torch.bfloat16)  # adapters stay float32
    x16 = x.to(torch.bfloat16)
    with RecordOps() as rec, torch.autocast("cpu", dtype=torch.bfloat16), state.use(gate), torch.no_grad():
        out = layer(x16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    assert not [op for op in rec.ops if op[1] == (2, 5, 32) and op[2] == torch.float32], rec.ops
    # outside autocast the float32 adapters still get a float32 input
    with RecordOps() as rec, state.use(gate), torch.no_grad():
        layer(x16)
    assert [op for op in rec.ops if op[1] == (2, 5, 32) and op[2] == torch.float32]


@pytest.mark.parametrize("regime", ["float32", "autocast", "bf16 base, float32 adapters"])
def test_outputs_and_gradients_match_the_reference_in_every_dtype_regime(regime):
    """float32 throughout, bf16 autocast over a bf16 base (training on CUDA), and float32 adapters
    on a bf16 base without autocast (the product in the adapters' dtype, as peft): outputs and
    adapter gradients match the float32 reference formulation to the regime's precision."""
    layer, state, _ = make_layer(in_f=32, out_f=16, experts=4, rank=2)
    x = torch.randn(2, 5, 32)
    gate = torch.softmax(torch.randn(2, 4), dim=-1)
    weights_out = torch.randn(2, 5, 16)
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    ref = reference_forward(x, layer.base_layer.weight.detach(), layer.base_layer.bias.detach(), A, B, gate, 4, 2, layer.scaling)
    (ref * weights_out).sum().backward()

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if regime == "autocast" else contextlib.nullcontext()
    if regime != "float32":
        layer.base_layer.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    with autocast, state.use(gate):
        with RecordOps() as forward:
            out = layer(x)
        (out.float() * weights_out).sum().backward()
    assert out.dtype == (torch.float32 if regime == "float32" else torch.bfloat16)
    if regime == "bf16 base, float32 adapters":  # the B product in float32, cast to bf16 for the sum
        assert ("mm", (10, 16), torch.float32) in forward.ops or ("bmm", (2, 5, 16), torch.float32) in forward.ops, forward.ops
    tol = 1e-5 if regime == "float32" else 4e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(layer.lora_A.weight.grad, A.grad, rtol=tol, atol=tol * A.grad.abs().max().item())
    torch.testing.assert_close(layer.lora_B.weight.grad, B.grad, rtol=tol, atol=tol * B.grad.abs().max().item())


def test_the_gate_is_expanded_once_per_forward_for_all_layers_of_one_config():
    torch.manual_seed(0)
    state = GateState(3)
    same = MoELoraConfig(num_experts=3, rank_per_expert=2, alpha=8.0, dropout=0.0, init="random")
    other = MoELoraConfig(num_experts=3, rank_per_expert=3, alpha=6.0, dropout=0.0, init="random")
    layers = [GatedLoraLinear(nn.Linear(6, 6), cfg, state) for cfg in (same, same, same, other)]
    x = torch.randn(2, 4, 6)
    gate = torch.softmax(torch.randn(2, 3), dim=-1)
    with RecordOps() as rec, state.use(gate), torch.no_grad():
        outs = []
        h = x
        for layer in layers:
            h = layer(h)
            outs.append(h)
    # repeat_interleave by an int runs as unsqueeze, expand, clone: one expand per expansion
    expansions = [op for op in rec.ops if op[0] == "expand"]
    assert sorted(op[1] for op in expansions) == [(2, 3, 2), (2, 3, 3)], rec.ops  # one per (rank, scaling), not per layer
    h = x
    for layer, out in zip(layers, outs):
        expected = reference_forward(
            h, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight, layer.lora_B.weight,
            gate, 3, layer.rank_per_expert, layer.scaling,
        )
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        h = out


def test_no_batch_tokens_experts_out_tensor_is_saved():
    layer, state, _ = make_layer(in_f=8, out_f=16, experts=4, rank=2)
    batch, tokens = 2, 3
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    x = torch.randn(batch, tokens, 8)
    logits = torch.randn(batch, 4, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), state.use(torch.softmax(logits, -1)):
        out = layer(x)
    out.sum().backward()
    assert shapes, "no tensor was saved: the hook did not see the forward"
    big = batch * tokens * 4 * 16
    assert all(len(s) <= 3 for s in shapes), shapes
    assert all(torch.Size(s).numel() < big for s in shapes), shapes


# -- dropout -------------------------------------------------------------------------------------


def test_lora_dropout_is_inverted_dropout_with_a_bool_mask():
    """Kept elements are x / (1 - p), the rest 0, at rate p; the gradient follows the same mask;
    backward keeps one bool mask (not torch's float noise on the CPU); off in eval mode."""
    p = 0.25
    drop = LoraDropout(p)
    x = (torch.rand(64, 512) + 0.5).requires_grad_()  # no zeros: a zero output means dropped
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = drop(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p))
    assert abs(1 - kept.float().mean().item() - p) < 0.01  # 32,768 draws: the rate is p to ~4 sd
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g / (1 - p), 0.0))
    assert saved == [(torch.bool, (64, 512))]
    drop.eval()
    assert drop(x) is x


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_recomputes_the_forward_dropout_mask(dropout):
    """With dropout on, the recomputed layer draws the forward's mask (the RNG state is restored)."""
    ref_logit_grad, ref_grads, _ = llama_grads(checkpointing=False, dropout=dropout)
    logit_grad, grads, recomputed = llama_grads(checkpointing=True, dropout=dropout)
    assert recomputed == 1
    torch.testing.assert_close(logit_grad, ref_logit_grad, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    if dropout:  # the mask matters: without dropout the gradient is another
        no_dropout_grad, _, _ = llama_grads(checkpointing=False, dropout=0.0)
        assert not torch.allclose(logit_grad, no_dropout_grad, rtol=1e-3, atol=1e-5)


# -- the gate's scope ----------------------------------------------------------------------------


def test_missing_gate_wrong_batch_and_nesting_raise():
    layer, state, _ = make_layer()
    x = torch.randn(2, 4, 6)
    with pytest.raises(GateNotSetError, match="no gate set"):
        layer(x)
    with state.use(uniform_gate(3, 3)), pytest.raises(RuntimeError, match="batch size 3 does not match"):
        layer(x)
    with state.use(uniform_gate(2, 3)), pytest.raises(RuntimeError, match="nested"):
        with state.use(uniform_gate(2, 3)):
            pass
    with pytest.raises(ValueError, match="batch, 3"):
        with state.use(uniform_gate(2, 4)):
            pass
    with pytest.raises(RuntimeError, match="per-token gate"):
        with state.use(torch.full((2, 5, 3), 1 / 3)):
            layer(x)
    with pytest.raises(KeyError):
        with state.use(uniform_gate(2, 3)):
            raise KeyError("boom")
    assert not state.is_set  # cleared even after an exception
    with pytest.raises(GateNotSetError):
        layer(x)


def test_a_failed_gate_scope_leaves_no_gate_behind(monkeypatch):
    """If computing the gate's expansion fails (out of memory, Ctrl-C), the state stays unset and
    the next scope works: it is not locked as if a scope were still open."""
    from ilora.teacher import adapters

    layer, state, _ = make_layer()
    gate = torch.softmax(torch.randn(2, 3), dim=-1)
    real = adapters.scale_and_expand
    monkeypatch.setattr(adapters, "scale_and_expand", lambda *a: (_ for _ in ()).throw(MemoryError("out of memory")))
    with pytest.raises(MemoryError):
        with state.use(gate):
            pass
    assert not state.is_set
    monkeypatch.setattr(adapters, "scale_and_expand", real)
    with state.use(gate), torch.no_grad():
        layer(torch.randn(2, 4, 6))


def test_changing_one_samples_gate_changes_only_that_sample():
    model, state = injected(tiny_llama)
    ids, mask = padded_batch()
    gate = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    other = gate.clone()
    other[1] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    with torch.no_grad():
        with state.use(gate):
            a = model(input_ids=ids, attention_mask=mask).logits
        with state.use(other):
            b = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]], rtol=1e-6, atol=1e-6)
    assert (a[1] - b[1]).abs().max() > 1e-3


# -- injection ------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2])
def test_injection_is_architecture_independent(make_model):
    model = make_model()
    assert find_target_modules(model) == TARGETS
    state = GateState(4)
    paths = inject_gated_lora(model, MoELoraConfig(), state)
    expected = [f"model.layers.{i}.{part}.{name}" for i in range(2) for part, names in
                (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:])) for name in names]
    assert sorted(paths) == sorted(expected)
    assert sorted(gated_lora_modules(model)) == sorted(expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.lora_{ab}.weight" for p in expected for ab in "AB"}
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    ids, mask = padded_batch()
    with torch.no_grad():
        base = make_model()(input_ids=ids, attention_mask=mask).logits
        with state.use(uniform_gate(3, 4)):
            adapted = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(adapted, base)  # B = 0 at init: the base model


def test_target_module_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ConfigError, match="cannot auto-detect"):
        find_target_modules(gpt2)
    model = tiny_llama()
    with pytest.raises(ConfigError, match="matches no layer.*q_proj"):
        inject_gated_lora(model, MoELoraConfig(target_modules=["qkv"]), GateState(4))
    for name in ("lm_head", "embed_tokens"):
        with pytest.raises(ConfigError, match="cannot be adapted"):
            inject_gated_lora(model, MoELoraConfig(target_modules=[name]), GateState(4))
    assert not gated_lora_modules(model)  # failed injections changed nothing
    paths = inject_gated_lora(model, MoELoraConfig(target_modules=["layers.1.self_attn.q_proj", "down_proj"]), GateState(4))
    assert paths == ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ConfigError, match="already"):
        inject_gated_lora(model, MoELoraConfig(), GateState(4))
    with pytest.raises(ConfigError, match="experts"):
        inject_gated_lora(tiny_llama(), MoELoraConfig(num_experts=3), GateState(4))


# -- gradient checkpointing -----------------------------------------------------------------------


def llama_grads(checkpointing: bool, dropout: float = 0.0):
    """Gradients of a loss on batch 1, backward run after batch 2 (same size, other gate) ran."""
    model, state = injected(tiny_llama, dropout=dropout)
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model, state)
    layer = gated_lora_modules(model)["model.layers.0.self_attn.q_proj"]
    calls = []
    layer.register_forward_pre_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 4, generator=gen, requires_grad=True)
    ids, mask = padded_batch()
    with state.use(torch.softmax(logits, dim=-1)):
        out = model(input_ids=ids, attention_mask=mask).logits
    loss = (out * torch.randn(out.shape, generator=gen) * mask[..., None]).sum()
    other_ids, other_mask = padded_batch(seed=5)
    with state.use(torch.softmax(torch.randn(3, 4, generator=gen), dim=-1)):
        model(input_ids=other_ids, attention_mask=other_mask)
    forward_calls = len(calls)
    loss.backward()
    recomputed = len(calls) - forward_calls
    return logits.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, recomputed


def test_gradient_checkpointing_restores_the_forward_gate():
    ref_logit_grad, ref_grads, ref_recomputed = llama_grads(checkpointing=False)
    logit_grad, grads, recomputed = llama_grads(checkpointing=True)
    assert ref_recomputed == 0 and recomputed == 1  # checkpointing really recomputed the layer in backward
    assert ref_logit_grad.abs().max() > 1e-4
    torch.testing.assert_close(logit_grad, ref_logit_grad, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_leaves_the_embedding_output_without_grad():
    """Non-reentrant checkpointing needs no input that requires grad: transformers' hook that makes
    the embedding output require grad is removed (no (B, T, H) gradient for it, and the placeholder
    rows can be written in place); the gradients are those of the plain model (test above)."""
    model, state = injected(tiny_llama)
    enable_gradient_checkpointing(model, state)
    ids, _ = padded_batch()
    assert model.is_gradient_checkpointing if hasattr(model, "is_gradient_checkpointing") else True
    assert not model.get_input_embeddings()(ids).requires_grad


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_without_our_context_fn_fails_loudly(use_reentrant):
    model, state = injected(tiny_llama)
    model.train()
    with pytest.raises(ConfigError, match="reentrant"):
        enable_gradient_checkpointing(model, state, use_reentrant=True)
    with pytest.raises(ConfigError, match="another GateState"):
        enable_gradient_checkpointing(model, GateState(4))
    model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})  # plain HF: no gate restore
    ids, mask = padded_batch()
    logits = torch.randn(3, 4, requires_grad=True)
    with state.use(torch.softmax(logits, dim=-1)):
        out = model(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(RuntimeError, match="recomputed during backward without its gate"):
        out.sum().backward()


# -- files ----------------------------------------------------------------------------------------


def test_saved_files_use_peft_keys_and_config(tmp_path):
    model, _ = injected(tiny_llama)
    cfg = MoELoraConfig(init="random", dropout=0.0)
    save_adapters(model, cfg, tmp_path, base_model_name_or_path="tiny-llama")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    expected = {f"base_model.model.model.layers.{i}.{part}.{name}.lora_{ab}.weight"
                for i in range(2) for part, names in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:]))
                for name in names for ab in "AB"}
    assert set(tensors) == expected
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 32)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (32, 8)
    peft_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 8 and peft_cfg["task_type"] == "CAUSAL_LM"
    assert peft_cfg["lora_alpha"] == pytest.approx(16.0 * 8 / 4)
    assert sorted(peft_cfg["target_modules"]) == sorted(TARGETS)
    assert peft_cfg["base_model_name_or_path"] == "tiny-llama" and peft_cfg["bias"] == "none"
    ours = json.loads((tmp_path / "ilora_adapter.json").read_text())
    assert (ours["num_experts"], ours["rank_per_expert"], ours["alpha"], ours["scaling_convention"]) == (4, 2, 32.0, "per_expert")


@pytest.mark.parametrize("targets", [[], ["layers.1.self_attn.q_proj", "down_proj"]])
def test_peft_reads_our_files_as_the_uniform_gate_model(tmp_path, targets):
    from peft import PeftModel

    model, state = injected(tiny_llama, target_modules=targets)
    save_adapters(model, MoELoraConfig(init="random", dropout=0.0, target_modules=targets), tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    peft_adapted = {n[len("base_model.model."):-len(".lora_A")] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert peft_adapted == set(gated_lora_modules(model))  # peft adapts exactly our layers
    ids, mask = padded_batch()
    with torch.no_grad():
        with state.use(uniform_gate(3, 4)):
            ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        base = tiny_llama()(input_ids=ids, attention_mask=mask).logits
    assert (ours - base).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2])
def test_save_load_round_trip_is_bit_identical(tmp_path, make_model):
    model, state = injected(make_model, seed=4)
    cfg = MoELoraConfig(init="random", dropout=0.0)
    save_adapters(model, cfg, tmp_path)
    fresh, fresh_state = make_model(), GateState(4)
    loaded_cfg = load_adapters(fresh, tmp_path, fresh_state)
    assert loaded_cfg == cfg
    saved, loaded = adapter_state_dict(model), adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert [p.requires_grad for p in adapter_parameters(fresh)] == [True] * 28
    ids, mask = padded_batch()
    gate = torch.softmax(torch.randn(3, 4), dim=-1)
    with torch.no_grad():
        with state.use(gate):
            a = model(input_ids=ids, attention_mask=mask).logits
        with fresh_state.use(gate):
            b = fresh(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


def test_load_rejects_bad_keys_and_shapes(tmp_path):
    model, _ = injected(tiny_llama)
    save_adapters(model, MoELoraConfig(init="random", dropout=0.0), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    good = load_file(str(weights))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"

    renamed = dict(good)
    renamed[key.replace("up_proj", "upp_proj")] = renamed.pop(key)
    save_file(renamed, str(weights))
    with pytest.raises(IloraError, match="missing key .*up_proj.lora_B"):
        load_adapters(tiny_llama(), tmp_path, GateState(4))

    reshaped = dict(good)
    reshaped[key] = torch.zeros(48, 6)
    save_file(reshaped, str(weights))
    with pytest.raises(IloraError, match=r"up_proj.lora_B.weight has shape \(48, 6\), the model expects \(48, 8\)"):
        load_adapters(tiny_llama(), tmp_path, GateState(4))

    extra = dict(good)
    extra["base_model.model.model.layers.1.mlp.extra.lora_A.weight"] = torch.zeros(8, 32)
    save_file(extra, str(weights))
    with pytest.raises(IloraError, match="unexpected key .*mlp.extra"):
        load_adapters(tiny_llama(), tmp_path, GateState(4))

    save_file(good, str(weights))
    with pytest.raises(ConfigError, match=r"ilora_adapter.json: the saved adapter has 4 experts, the gate 3"):
        load_adapters(tiny_llama(), tmp_path, GateState(3))
    # the same layer names exist in a deeper model, whose third layer the adapter never saw
    from transformers import LlamaConfig, LlamaForCausalLM
    from helpers_tiny_models import TINY

    deeper = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 3}, tie_word_embeddings=False))
    with pytest.raises(IloraError, match=r"ilora_adapter.json: this model has 7 layer\(s\) .* \(first: model.layers.2.self_attn.q_proj\): "
                       "it was saved on another base model"):
        load_adapters(deeper, tmp_path, GateState(4))
    assert not gated_lora_modules(deeper)  # refused before injecting anything
    (tmp_path / "ilora_adapter.json").unlink()
    with pytest.raises(IloraError, match="ilora_adapter.json: file not found"):
        load_adapters(tiny_llama(), tmp_path, GateState(4))


# -- torch.compile ----------------------------------------------------------------------------------


def _decoder_layer_inputs(model, gen):
    hidden = torch.randn(3, 5, model.config.hidden_size, generator=gen, requires_grad=True)
    position_ids = torch.arange(5)[None].expand(3, 5)
    return hidden, model.model.rotary_emb(hidden, position_ids)


def test_an_adapted_decoder_layer_compiles_without_graph_breaks():
    """Dynamo traces a whole adapted Llama decoder layer as one graph (the backward-recompute
    check must not break it at every adapted linear), and the compiled layer (dropout off) reads
    the gate in scope at each call: its outputs and gradients equal the eager layer's for two gates."""
    import torch._dynamo

    model, state = injected(tiny_llama)
    model.train()
    layer = model.model.layers[0]
    assert len(gated_lora_modules(layer)) == 7
    gen = torch.Generator().manual_seed(4)
    hidden, pos = _decoder_layer_inputs(model, gen)
    gates = [torch.softmax(torch.randn(3, 4, generator=gen), -1) for _ in range(2)]
    torch._dynamo.reset()
    try:
        # the explain runs with the default adapter dropout (0.05): training mode as in a training step
        dropout_model, dropout_state = injected(tiny_llama, dropout=0.05)
        dropout_model.train()
        with dropout_state.use(gates[0]):
            explained = torch._dynamo.explain(dropout_model.model.layers[0])(hidden, attention_mask=None, position_embeddings=pos)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        compiled_outputs = []
        for gate in gates:
            results = []
            for module in (layer, compiled):
                x = hidden.detach().clone().requires_grad_(True)
                g = gate.clone().requires_grad_(True)
                with state.use(g):
                    out = module(x, attention_mask=None, position_embeddings=pos)
                out = out[0] if isinstance(out, tuple) else out
                out.pow(2).sum().backward()
                results.append((out.detach(), x.grad, g.grad))
                layer.zero_grad(set_to_none=True)
            for eager, comp in zip(*results):
                torch.testing.assert_close(comp, eager)
            compiled_outputs.append(results[1][0])
        assert (compiled_outputs[0] - compiled_outputs[1]).abs().max() > 1e-4  # the second gate was really read
    finally:
        torch._dynamo.reset()

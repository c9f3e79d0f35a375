"""Layers that share an input (q/k/v, gate/up): one A product and one dropout mask for the group.

Checked against the ungrouped layers (each tested against a slow per-sample reference in
test_adapters.py) without dropout, and against a hand-computed dropout with recovered masks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_tiny_models import padded_batch, tiny_llama, tiny_qwen2  # noqa: E402
from helpers_adapters import injected, record_group_products  # noqa: E402

from ilora.errors import ConfigError  # noqa: E402
from ilora.teacher.adapters import GatedLoraLinear, GateState, MoELoraConfig, enable_gradient_checkpointing, gated_lora_modules  # noqa: E402
from ilora.teacher.shared_input import SharedInput, share_adapter_inputs, shared_adapter_inputs, unshare_adapter_inputs  # noqa: E402


def model_grads(model, state, seed=11):
    """Logits, and gradients of a fixed loss w.r.t. the gate logits and every trainable weight."""
    gen = torch.Generator().manual_seed(seed)
    dtype = model.lm_head.weight.dtype
    logits = torch.randn(3, 4, generator=gen, dtype=dtype).requires_grad_(True)
    ids, mask = padded_batch()
    with state.use(torch.softmax(logits, dim=-1)):
        out = model(input_ids=ids, attention_mask=mask).logits
    (out * torch.randn(out.shape, generator=gen, dtype=dtype) * mask[..., None]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), logits.grad, grads


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2])
def test_grouping_finds_qkv_and_gate_up_of_every_layer(make_model):
    model, _ = injected(make_model)
    groups = share_adapter_inputs(model)
    layers = gated_lora_modules(model)
    names = sorted(tuple(path.rsplit(".", 1)[-1] for path, m in layers.items() if m.shared_input and m.shared_input[0] is g) for g in groups)
    assert names == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    assert layers["model.layers.0.self_attn.o_proj"].shared_input is None
    assert layers["model.layers.0.mlp.down_proj"].shared_input is None
    unshare_adapter_inputs(model)
    assert all(m.shared_input is None for m in layers.values())


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2])
def test_without_dropout_outputs_and_gradients_equal_the_ungrouped_layers(make_model, monkeypatch):
    model, state = injected(make_model)
    model.train().double()  # float64: the two summation orders agree to far below the tolerance
    reference = model_grads(model, state)
    computed = record_group_products(monkeypatch)
    with shared_adapter_inputs(model) as groups:
        shared = model_grads(model, state)
        assert all(g._input is None for g in groups)  # every member took its columns: nothing held
    assert len(computed) == 10 and sum(computed) == 4  # 2 layers x (q, k, v, gate, up); one product per group
    out, logit_grad, grads = shared
    ref_out, ref_logit_grad, ref_grads = reference
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    assert ref_logit_grad.abs().max() > 1e-4
    torch.testing.assert_close(logit_grad, ref_logit_grad, rtol=1e-10, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name in grads:
        assert ref_grads[name].abs().max() > 1e-6, name
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def identity_group(dropout: float, size: int = 6):
    """Three layers on one input whose adapters pass ``dropout(x)`` through unchanged:
    zero base weight, A = B = identity (E * r = size), uniform gate, so out = scaling / E * dropout(x)."""
    cfg = MoELoraConfig(num_experts=3, rank_per_expert=size // 3, alpha=float(size // 3), dropout=dropout)
    state = GateState(3)
    layers = []
    for _ in range(3):
        layer = GatedLoraLinear(nn.Linear(size, size, bias=False), cfg, state)
        with torch.no_grad():
            layer.base_layer.weight.zero_()
            layer.lora_A.weight.copy_(torch.eye(size))
            layer.lora_B.weight.copy_(torch.eye(size))
        layers.append(layer.train())
    return layers, state, cfg.scaling / 3  # scaling = alpha / r = 1: out = dropout(x) / 3


def dropped(layers, state, factor, x):
    with state.use(torch.full((x.shape[0], 3), 1 / 3)):
        return [layer(x) / factor for layer in layers]


def test_with_dropout_the_members_share_one_mask_and_each_call_draws_a_new_one():
    torch.manual_seed(0)
    layers, state, factor = identity_group(dropout=0.5)
    x = torch.rand(4, 5, 6) + 1.0  # no zeros: a zero output means a dropped element
    SharedInput(layers)
    first = dropped(layers, state, factor, x)
    masks = [out != 0 for out in first]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    assert 0.3 < masks[0].float().mean() < 0.7
    for out, mask in zip(first, masks):  # kept elements scaled by 1 / (1 - p), as nn.Dropout
        torch.testing.assert_close(out[mask], x[mask] / 0.5)
    second = dropped(layers, state, factor, x)
    assert not torch.equal(second[0] != 0, masks[0])  # a fresh mask for the next input
    for layer in layers:  # ungrouped: each layer its own mask
        layer.shared_input = None
    own = [out != 0 for out in dropped(layers, state, factor, x)]
    assert not (torch.equal(own[0], own[1]) and torch.equal(own[0], own[2]))


def test_another_input_or_an_in_place_change_gets_its_own_product():
    torch.manual_seed(0)
    layers, state, factor = identity_group(dropout=0.0)
    group = SharedInput(layers)
    q, k, v = layers
    x1, x2 = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    with state.use(torch.full((2, 3), 1 / 3)):
        torch.testing.assert_close(q(x1) / factor, x1)
        torch.testing.assert_close(k(x2) / factor, x2)  # not x1's product
        torch.testing.assert_close(v(x1) / factor, x1)
        torch.testing.assert_close(q(x1) / factor, x1)
        x1.mul_(2.0)  # in place after q computed the group's product
        torch.testing.assert_close(k(x1) / factor, x1)
        torch.testing.assert_close(v(x1) / factor, x1)
        assert group._input is x1  # q's columns of the changed x1 are still held ...
        torch.testing.assert_close(q(x1) / factor, x1)
    assert group._input is None  # ... until q takes them


def test_under_inference_mode_each_member_computes_its_own_product(monkeypatch):
    """Inference tensors have no version counter, so the group cannot tell an in-place change:
    each member runs its own product (the results equal the ungrouped model's)."""
    model, state = injected()
    ids, mask = padded_batch()
    gate = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(2)), -1)
    with torch.no_grad(), state.use(gate):
        ungrouped = model(input_ids=ids, attention_mask=mask).logits
    share_adapter_inputs(model)
    own = []
    product = GatedLoraLinear.lora_hidden
    monkeypatch.setattr(GatedLoraLinear, "lora_hidden", lambda layer, x: own.append(1) or product(layer, x))
    with torch.no_grad(), state.use(gate):
        grouped = model(input_ids=ids, attention_mask=mask).logits
    assert len(own) == 4  # o_proj and down_proj of 2 layers: the others through their groups
    with torch.inference_mode(), state.use(gate):
        out = model(input_ids=ids, attention_mask=mask).logits
    assert len(own) == 4 + 14  # every layer its own
    torch.testing.assert_close(out, ungrouped)
    torch.testing.assert_close(grouped, ungrouped)


def test_gradient_checkpointing_recomputes_the_shared_mask():
    """With dropout, a checkpointed model's recomputation draws the forward's masks again
    (torch restores the RNG state), so its gradients equal the plain model's."""

    def grads(checkpointing):
        model, state = injected(dropout=0.3)
        model.train()
        share_adapter_inputs(model)
        if checkpointing:
            enable_gradient_checkpointing(model, state)
        calls = []
        model.model.layers[0].self_attn.k_proj.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(5)
        return *model_grads(model, state), len(calls)

    out, logit_grad, g, calls = grads(False)
    c_out, c_logit_grad, c_g, c_calls = grads(True)
    assert (calls, c_calls) == (1, 2)  # checkpointing really recomputed the layer
    torch.testing.assert_close(c_out, out)
    torch.testing.assert_close(c_logit_grad, logit_grad)
    for name in g:
        torch.testing.assert_close(c_g[name], g[name], msg=name)


def test_a_grouped_decoder_layer_compiles_without_graph_breaks():
    import torch._dynamo

    model, state = injected()
    model.train()
    layer = model.model.layers[0]
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 5, model.config.hidden_size, generator=gen)
    pos = model.model.rotary_emb(hidden, torch.arange(5)[None].expand(3, 5))
    gate = torch.softmax(torch.randn(3, 4, generator=gen), -1)
    torch._dynamo.reset()
    try:
        dropout_model, dropout_state = injected(dropout=0.05)
        dropout_model.train()
        share_adapter_inputs(dropout_model)
        with dropout_state.use(gate):
            explained = torch._dynamo.explain(dropout_model.model.layers[0])(hidden, attention_mask=None, position_embeddings=pos)
        assert explained.graph_break_count == 0, explained.break_reasons
        results = []
        eager_results = []
        with shared_adapter_inputs(model) as groups:
            compiled = torch.compile(layer, backend="eager", fullgraph=True)
            for module, sink in ((layer, eager_results), (compiled, results)):
                x = hidden.clone().requires_grad_(True)
                with state.use(gate):
                    out = module(x, attention_mask=None, position_embeddings=pos)
                out = out[0] if isinstance(out, tuple) else out
                out.pow(2).sum().backward()
                sink += [out.detach(), x.grad, layer.self_attn.k_proj.lora_A.weight.grad.clone()]
                layer.zero_grad(set_to_none=True)
                assert all(g._input is None for g in groups)
        for eager, comp in zip(eager_results, results):
            torch.testing.assert_close(comp, eager)
    finally:
        torch._dynamo.reset()


def test_compiled_layers_of_a_grouped_model_equal_the_eager_grouped_model():
    """As training compiles (`CompiledLayers`: one compiled function for every decoder layer),
    each layer's groups use that layer's own A weights: outputs and gradients equal eager's."""
    import torch._dynamo

    from ilora.teacher.compiled import CompiledLayers

    model, state = injected()
    model.train()
    share_adapter_inputs(model)
    torch._dynamo.reset()
    try:
        compiled = CompiledLayers(model, backend="aot_eager")
        eager = model_grads(model, state)
        with compiled.active():
            comp = model_grads(model, state)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(comp[0], eager[0])
    torch.testing.assert_close(comp[1], eager[1])
    for name in eager[2]:
        torch.testing.assert_close(comp[2][name], eager[2][name], msg=name)


def test_a_product_that_raises_leaves_nothing_claimed_for_its_input(monkeypatch):
    """If computing the group's product fails, the group still holds only the previous input's
    columns, so a retry with the new input computes its own product instead of a stale one."""
    from ilora.teacher import shared_input

    torch.manual_seed(0)
    layers, state, factor = identity_group(dropout=0.0)
    group = SharedInput(layers)
    q, k, v = layers
    x1, x2 = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    linear = shared_input.F.linear
    with state.use(torch.full((2, 3), 1 / 3)):
        q(x1)
        k(x1)  # v's columns of x1 still held
        monkeypatch.setattr(shared_input.F, "linear", lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
        with pytest.raises(RuntimeError, match="out of memory"):
            k(x2)
        monkeypatch.setattr(shared_input.F, "linear", linear)
        torch.testing.assert_close(v(x2) / factor, x2)
        torch.testing.assert_close(k(x2) / factor, x2)
        torch.testing.assert_close(q(x2) / factor, x2)
    assert group._input is None


def test_grouping_errors():
    model, _ = injected(target_modules=["o_proj", "down_proj"])
    with pytest.raises(ConfigError, match="no two sibling gated LoRA layers"):
        share_adapter_inputs(model)
    model, _ = injected()
    SharedInput([model.model.layers[1].mlp.gate_proj, model.model.layers[1].mlp.up_proj])
    with pytest.raises(ConfigError, match="already belongs"):
        share_adapter_inputs(model)  # all or nothing: layer 0, grouped first, is let go again
    assert [path for path, m in gated_lora_modules(model).items() if m.shared_input] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    layers, _, _ = identity_group(dropout=0.0)
    with pytest.raises(ConfigError, match="at least 2"):
        SharedInput(layers[:1])
    layers[1].lora_dropout = nn.Dropout(0.2)
    with pytest.raises(ConfigError, match="one dropout"):
        SharedInput(layers)
    from ilora.teacher.config import TeacherConfig

    with pytest.raises(ConfigError, match="adapt no two layers that read one input"):
        TeacherConfig(share_adapter_inputs=True, target_modules=["q_proj", "o_proj", "up_proj"])
    assert TeacherConfig(share_adapter_inputs=True, target_modules=["model.layers.0.self_attn.k_proj", "v_proj"]).share_adapter_inputs


@pytest.mark.parametrize(
    ("targets", "groups_expected"),
    [
        (["q_proj", "k_proj"], True),
        (["q_proj", "o_proj", "up_proj"], False),
        (["model.layers.0.self_attn.k_proj", "v_proj"], True),
        (["layers.1.self_attn.q_proj", "self_attn.k_proj"], True),
        (["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"], False),  # one of each in two layers
        (["layers.0.self_attn.q_proj", "layers.0.mlp.up_proj"], False),  # one layer, two inputs
        (["0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"], True),
        (["layers.0.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.gate_proj"], True),
        (["q_proj", "layers.0.self_attn.q_proj"], False),  # one name twice
    ],
)
def test_the_config_check_agrees_with_the_grouping_of_a_built_model(targets, groups_expected):
    """`TeacherConfig` refuses, before any model is loaded, exactly the target lists whose
    built model has no group to make (the reference: grouping the injected layers)."""
    from ilora.teacher.config import TeacherConfig

    model, _ = injected(target_modules=targets)
    try:
        share_adapter_inputs(model)
        groups_form = True
    except ConfigError:
        groups_form = False
    assert groups_form == groups_expected
    if groups_form:
        assert TeacherConfig(share_adapter_inputs=True, target_modules=targets).share_adapter_inputs
    else:
        with pytest.raises(ConfigError, match="adapt no two layers that read one input"):
            TeacherConfig(share_adapter_inputs=True, target_modules=targets)


def test_a_dropped_grouped_model_is_freed_without_the_cycle_collector():
    """Members point to their group; a group pointing back would form a reference cycle that
    keeps a dropped teacher's grouped layers (frozen 7B weights included) alive until a full
    garbage collection, e.g. the eval stage's teacher while the export stage loads its own."""
    import gc
    import weakref

    model, _ = injected(dropout=0.1)
    share_adapter_inputs(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.shared_input is not None
    refs = [weakref.ref(q_proj), weakref.ref(q_proj.base_layer.weight), weakref.ref(q_proj.shared_input[0])]
    del q_proj
    gc.disable()
    try:
        del model
        assert [r() is None for r in refs] == [True, True, True]
    finally:
        gc.enable()


def test_the_benchmark_block_undoes_only_its_own_groups():
    model, _ = injected()
    o_projs = [layer.self_attn.o_proj for layer in model.model.layers]
    SharedInput(o_projs)  # a group made before the block, of layers the block does not group
    with shared_adapter_inputs(model):
        assert model.model.layers[0].self_attn.q_proj.shared_input is not None
    assert model.model.layers[0].self_attn.q_proj.shared_input is None
    assert all(layer.shared_input is not None for layer in o_projs)

"""Compiled decoder layers: the same outputs and gradients as eager, only inside `active`, and
a teacher trained with ``compile`` equals one trained without (CPU, inductor)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_tiny_models import padded_batch, tiny_llama  # noqa: E402

from ilora.errors import ConfigError  # noqa: E402
from ilora.teacher.adapters import GateState, MoELoraConfig, inject_gated_lora  # noqa: E402
from ilora.teacher.compiled import CompiledLayers  # noqa: E402
from ilora.teacher.config import TeacherConfig  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def gated_llama():
    torch.manual_seed(0)
    model, state = tiny_llama(), GateState(4)
    inject_gated_lora(model, MoELoraConfig(dropout=0.0, init="random"), state)
    return model.train(), state


def outputs_and_grads(model, state, gate, ids, mask):
    gate = gate.clone().requires_grad_(True)
    with state.use(gate):
        logits = model(input_ids=ids, attention_mask=mask).logits
    (logits * mask[..., None]).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), gate.grad, grads


def test_compiled_layers_equal_eager_and_only_inside_the_block():
    model, state = gated_llama()
    layer = model.model.layers[0]
    hook = layer.forward  # an instance forward set by someone else (accelerate's hooks do this)
    model.model.layers[1].forward = hook.__func__.__get__(model.model.layers[1])
    before = {i: l.__dict__.get("forward") for i, l in enumerate(model.model.layers)}
    compiled = CompiledLayers(model, backend="aot_eager")
    ids, mask = padded_batch()
    gates = [torch.softmax(torch.randn(3, 4), -1) for _ in range(2)]
    for gate in gates:  # the compiled layers read the gate in scope at every call
        eager = outputs_and_grads(model, state, gate, ids, mask)
        with compiled.active():
            assert all(l.forward is c for l, c in zip(compiled.layers, compiled.compiled))
            comp = outputs_and_grads(model, state, gate, ids, mask)
        torch.testing.assert_close(comp[0], eager[0])
        torch.testing.assert_close(comp[1], eager[1])
        assert comp[2].keys() == eager[2].keys()
        for name in eager[2]:
            torch.testing.assert_close(comp[2][name], eager[2][name], msg=name)
        # after the block: the layers' own forwards, an instance one included, are back
        assert {i: l.__dict__.get("forward") for i, l in enumerate(model.model.layers)} == before
    assert "forward" not in layer.__dict__


def test_compiled_layers_fail_loudly_past_their_recompile_limit():
    """Past torch's recompile limit a layer would run eager for good, silently slower: within
    `active` that is an IloraError naming the limit, and torch's settings are back after."""
    import torch._dynamo

    from ilora.errors import IloraError

    before = (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit)
    model, state = gated_llama()
    ids, mask = padded_batch()
    gate = torch.softmax(torch.randn(len(ids), 4), -1)
    roomy = CompiledLayers(model, backend="eager")
    with roomy.active(), state.use(gate):  # new widths recompile a few times, well within the training limit
        for width in (6, 5, 4, 3):
            model(input_ids=ids[:, -width:], attention_mask=mask[:, -width:])
    torch._dynamo.reset()
    tight = CompiledLayers(model, backend="eager", max_recompiles=1)
    with pytest.raises(IloraError, match="compiled a decoder layer more than 1 times.*Train with compile=false"):
        with tight.active(), state.use(gate):
            for width in (6, 5):
                model(input_ids=ids[:, -width:], attention_mask=mask[:, -width:])
    assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit) == before
    assert "forward" not in model.model.layers[0].__dict__  # the eager forwards are back


def test_config_refuses_compile_with_gradient_checkpointing():
    with pytest.raises(ConfigError, match="compile and gradient_checkpointing"):
        TeacherConfig(compile=True, gradient_checkpointing=True)


def test_training_with_compile_on_a_cpu_without_a_compiler_is_refused_before_any_work(tmp_path, monkeypatch):
    from ilora.data import make_synthetic
    from ilora.teacher import compiled
    from ilora.teacher.train import train_teacher

    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        train_teacher(make_synthetic(users=10, items=20, seed=0), TeacherConfig(compile=True), tmp_path / "rec", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    compiled.check_can_compile("cuda")  # Triton, not a C++ compiler, on CUDA


def test_a_teacher_trains_the_same_with_compile(tmp_path):
    """Two optimiser steps with compiled layers (inductor) give the weights of two eager steps;
    validation and the saved teacher run eagerly (no compiled forward left on the layers)."""
    from ilora.data import make_synthetic
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.build import load_teacher
    from ilora.teacher.train import train_teacher

    ds = make_synthetic(users=30, items=25, seed=2)
    torch.manual_seed(0)
    SASRec(SASRecConfig(num_items=ds.num_items, max_len=ds.max_len, hidden=16)).save(tmp_path / "rec")
    small = dict(tiny_hidden=32, tiny_layers=2, tiny_heads=4, tiny_vocab=300, lora_dropout=0.0, max_title_tokens=8, num_candidates=6)
    weights = {}
    for flag in (False, True):
        cfg = TeacherConfig(**small, max_steps=2, batch_size=4, val_samples=4, epochs=1, compile=flag)
        train_teacher(ds, cfg, tmp_path / "rec", tmp_path / f"out{flag}")
        teacher = load_teacher(tmp_path / f"out{flag}", ds.catalog).teacher
        weights[flag] = {n: p.detach().clone() for n, p in teacher.named_parameters() if p.requires_grad}
    assert weights[False].keys() == weights[True].keys()
    assert any("lora_B" in n and w.abs().max() > 0 for n, w in weights[True].items())  # training moved the zero-initialised B
    for name in weights[False]:
        torch.testing.assert_close(weights[True][name], weights[False][name], rtol=1e-4, atol=1e-5, msg=name)

"""The benchmarks' reference variants compute what ours compute, and every benchmark runs.

No timing is asserted anywhere: the CPU is shared and the numbers are noise here.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ilora.bench import adapter as adapter_bench
from ilora.bench import common
from ilora.bench import inputs as inputs_bench
from ilora.bench import step as step_bench
from ilora.cli.main import main
from ilora.errors import ConfigError, IloraError
from ilora.teacher.adapters import GatedLoraLinear, GateState, MoELoraConfig, gated_lora_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "teacher"))
from helpers_adapters import record_group_products  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
LASTFM_TITLES = SHARED / "datasets" / "lastfm" / "id2name.txt"
CPU = torch.device("cpu")


@pytest.fixture
def synthetic_titles(monkeypatch):
    """Make the benchmarks use 300 synthetic titles (fast, no shared data needed)."""
    titles = common.synthetic_titles(300, seed=3)
    for module in (inputs_bench, step_bench):
        monkeypatch.setattr(module, "load_titles", lambda: (titles, "synthetic (test)"))
    return titles


# -- common -----------------------------------------------------------------------------------


def test_interleave_rotates_order_and_discards_warmup():
    calls = []
    variants = {name: (lambda parts, name=name: calls.append(name)) for name in "abc"}
    times = common.interleave(variants, CPU, warmup=1, repeats=3)
    assert calls == list("abc" + "bca" + "cab" + "abc")
    assert all(len(t.totals) == 3 for t in times.values())


def test_interleave_stops_on_the_budget_only_after_whole_cycles():
    calls = []
    times = common.interleave({"a": lambda parts: calls.append("a")}, torch.device("cpu"), warmup=0, repeats=9, min_repeats=1, budget_s=0.0, stop_every=3)
    assert len(times["a"].totals) == 3  # the budget was spent after the first round; the run stopped after a whole cycle of 3
    times = common.interleave({"a": lambda parts: None}, torch.device("cpu"), warmup=0, repeats=9, min_repeats=1, budget_s=0.0)
    assert len(times["a"].totals) == 1


def test_interleave_enters_each_variants_context_outside_its_timed_call(monkeypatch):
    """A fake clock: entering/leaving a context costs 100 ticks, a call 1 (a, CPU) or 2 (b):
    the times are the calls' alone, and each call runs inside its own variant's context."""
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    events = []

    @contextlib.contextmanager
    def context(name):
        clock[0] += 100
        events.append(f"enter {name}")
        yield
        events.append(f"exit {name}")
        clock[0] += 100

    def call(name, cost):
        def run(parts):
            events.append(f"run {name}")
            clock[0] += cost
        return run

    times = common.interleave(
        {"a": call("a", 1), "b": call("b", 2)}, CPU, warmup=1, repeats=2,
        contexts={"a": lambda: context("a"), "b": lambda: context("b")},
    )
    assert times["a"].totals == [1, 1] and times["b"].totals == [2, 2]
    assert events == [f"{e} {n}" for n in "ab" "ba" "ab" for e in ("enter", "run", "exit")]
    with pytest.raises(ConfigError, match="unknown variants: c"):
        common.interleave({"a": call("a", 1)}, CPU, contexts={"c": lambda: context("c")})


def test_saved_activation_bytes_counts_saved_tensors_not_weights():
    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    saved, out = common.saved_activation_bytes(lambda: torch.tanh(lin(x)), exclude=list(lin.parameters()))
    # linear saves x (4x16) and its weight (excluded); tanh saves its output (4x8)
    assert saved == (4 * 16 + 4 * 8) * 4
    out.sum().backward()


def test_saved_activation_bytes_leaves_no_graph_behind():
    """Dropping the output frees the graph: the counting hook must not keep it alive (it once
    did, through a tensor -> grad_fn -> tensor cycle, and CUDA peaks counted the leftovers)."""
    import weakref

    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    kept = []

    def forward():
        hidden = torch.tanh(lin(x))  # tanh saves its own output
        kept.append(weakref.ref(hidden))
        return hidden.sum()

    _, out = common.saved_activation_bytes(forward, exclude=list(lin.parameters()))
    del out
    assert kept[0]() is None
    # and backward through a counted forward still gives the plain forward's gradient
    _, out = common.saved_activation_bytes(lambda: torch.tanh(lin(x)).pow(2).sum())
    out.backward()
    counted = x.grad.clone()
    x.grad = None
    torch.tanh(lin(x)).pow(2).sum().backward()
    torch.testing.assert_close(counted, x.grad)


def test_synthetic_titles_are_distinct():
    titles = common.synthetic_titles(500, seed=1)
    assert len(set(titles)) == 500 and all(t.strip() == t and t for t in titles)


# -- inputs: LLaRA's strings + loop vs ours -------------------------------------------------


def _inputs_setup_and_samples(batch: int):
    setup, _ = inputs_bench.build_setup(64, CPU)
    samples = common.random_samples(len(setup.titles), batch, 10, 20, seed=batch)
    return setup, samples


def test_inputs_reference_equals_ours_on_synthetic_titles(synthetic_titles):
    setup, samples = _inputs_setup_and_samples(5)
    inputs_bench.check_equal(setup, samples)  # raises on any difference


@pytest.mark.skipif(not LASTFM_TITLES.is_file(), reason="shared LastFM data not present")
def test_inputs_reference_equals_ours_on_lastfm_titles(monkeypatch):
    titles = common.load_titles()[0]
    assert len(titles) == 4606
    # every title in some sample (4606 titles over 154 samples of 30 items): same ids and labels;
    # embeddings and gradients on a few samples
    monkeypatch.setattr(inputs_bench, "load_titles", lambda: (titles, "LastFM"))
    setup, _ = inputs_bench.build_setup(32, CPU)
    perm = torch.randperm(len(titles), generator=torch.Generator().manual_seed(0))
    perm = torch.cat([perm, perm[: (-len(perm)) % 30]]).view(-1, 30)
    samples = {"history": perm[:, :10], "length": torch.full((len(perm),), 10), "candidates": perm[:, 10:], "target": perm[:, 10]}
    inputs_bench.check_tokens_equal(setup, samples)
    inputs_bench.check_equal(setup, {k: v[:4] for k, v in samples.items()})


def test_inputs_reference_matches_an_independent_placeholder_write(synthetic_titles):
    """The reference's loop writes projected item k of sample b at the k-th placeholder of b."""
    setup, samples = _inputs_setup_and_samples(3)
    tokens = inputs_bench.reference_tokens(setup, samples)
    with torch.no_grad():
        embeds = inputs_bench.reference_embeds(setup, tokens, samples)
        plain = setup.token_emb(tokens["input_ids"])
        hist = setup.projector(setup.item_emb(samples["history"]))
        cans = setup.projector(setup.item_emb(samples["candidates"]))
    ids = tokens["input_ids"].tolist()
    his_id, cans_id = setup.tokenizer.convert_tokens_to_ids(["[HistoryEmb]", "[CansEmb]"])
    for b in range(3):
        expected = plain[b].clone()
        h_pos = [p for p, t in enumerate(ids[b]) if t == his_id]
        c_pos = [p for p, t in enumerate(ids[b]) if t == cans_id]
        assert len(h_pos) == 10 and len(c_pos) == 20
        for k, p in enumerate(h_pos):
            expected[p] = hist[b, k]
        for k, p in enumerate(c_pos):
            expected[p] = cans[b, k]
        torch.testing.assert_close(embeds[b], expected)


def test_inputs_check_detects_a_difference(synthetic_titles, monkeypatch):
    setup, samples = _inputs_setup_and_samples(2)
    original = inputs_bench.our_embeds
    monkeypatch.setattr(inputs_bench, "our_embeds", lambda s, batch: original(s, batch) * 1.001)
    with pytest.raises(IloraError, match="embeddings"):
        inputs_bench.check_equal(setup, samples)


# -- adapter: iLoRA's einsum, ours, plain LoRA ---------------------------------------------------


def _naive(layer: GatedLoraLinear, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Per sample, per expert: base(x_b) + scaling * sum_e g_be B_e A_e x_b."""
    r = layer.rank_per_expert
    out = []
    for b in range(x.shape[0]):
        y = layer.base_layer(x[b])
        for e in range(layer.num_experts):
            a = layer.lora_A.weight[e * r : (e + 1) * r]
            bb = layer.lora_B.weight[:, e * r : (e + 1) * r]
            y = y + layer.scaling * gate[b, e] * (x[b] @ a.T @ bb.T)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("rank", [1, 2, 8])
def test_reference_adapter_equals_naive_and_ours(rank):
    base, ours, reference, _, state = adapter_bench.build_layers(24, rank, CPU, torch.float32, torch.float32)
    reference.eval()  # its own dropout module (iLoRA's) and ours, which it holds
    x = torch.randn(3, 5, 24)
    gate = torch.softmax(torch.randn(3, adapter_bench.NUM_EXPERTS), -1)
    with torch.no_grad():
        naive = _naive(ours, x, gate)
        with reference.gate_state.use(gate):
            torch.testing.assert_close(reference(x), naive, rtol=1e-5, atol=1e-5)
        with state.use(gate):
            torch.testing.assert_close(ours(x), naive, rtol=1e-5, atol=1e-5)
    inputs = {"x": x, "gate": gate, "grad_out": torch.randn(3, 5, 24)}
    adapter_bench.check_equal(ours, reference, inputs)


def test_reference_runs_iloras_dropout_and_follows_the_layers_mode():
    """The reference runs torch's dropout module (iLoRA's), ours and the plain-LoRA floor ours;
    a reference made for a layer in eval mode (swapped into a model under check) is in eval
    mode too, and the equality check leaves every module in the mode it found."""
    from ilora.teacher.adapters import LoraDropout

    base, ours, reference, plain, _ = adapter_bench.build_layers(16, 2, CPU, torch.float32, torch.float32)
    assert type(reference.lora_dropout) is nn.Dropout and reference.lora_dropout.p == adapter_bench.DROPOUT
    assert isinstance(ours.lora_dropout, LoraDropout) and isinstance(plain.lora_dropout, LoraDropout)
    ours.eval()
    assert not adapter_bench.ReferenceGatedLinear(ours).lora_dropout.training
    reference.train()
    inputs = {k: v[:, :4] if k != "gate" else v for k, v in adapter_bench.make_inputs(16, CPU, torch.float32).items()}
    adapter_bench.check_equal(ours, reference, inputs)
    assert ours.training and reference.training and reference.lora_dropout.training


def test_adapter_check_detects_a_difference():
    base, ours, reference, _, state = adapter_bench.build_layers(16, 2, CPU, torch.float32, torch.float32)
    inputs = adapter_bench.make_inputs(16, CPU, torch.float32)
    inputs = {k: v[:, :4] if k != "gate" else v for k, v in inputs.items()}
    reference.layer = GatedLoraLinear(base, MoELoraConfig(num_experts=4, rank_per_expert=2, init="random"), state)
    with pytest.raises(IloraError, match="differ"):
        adapter_bench.check_equal(ours, reference, inputs)


def test_plain_lora_equals_ours_under_the_uniform_gate():
    base, ours, _, plain, state = adapter_bench.build_layers(20, 2, CPU, torch.float32, torch.float32)
    ours.eval()
    plain.eval()
    plain.lora_A.weight.data.copy_(ours.lora_A.weight)
    plain.lora_B.weight.data.copy_(ours.lora_B.weight)
    plain.scaling = ours.scaling / ours.num_experts
    x = torch.randn(2, 3, 20)
    with torch.no_grad(), state.use(torch.full((2, ours.num_experts), 1 / ours.num_experts)):
        torch.testing.assert_close(plain(x), ours(x))


def test_reference_adapters_swap_and_restore():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))
    state = GateState(2)
    cfg = MoELoraConfig(num_experts=2, rank_per_expert=2, dropout=0.0, init="random")
    model[0] = GatedLoraLinear(model[0], cfg, state)
    model[1][0] = GatedLoraLinear(model[1][0], cfg, state)
    before = dict(gated_lora_modules(model))
    x, gate = torch.randn(3, 8), torch.softmax(torch.randn(3, 2), -1)
    with state.use(gate):
        expected = model(x)
    with adapter_bench.reference_adapters(model) as n:
        assert n == 2
        assert isinstance(model[0], adapter_bench.ReferenceGatedLinear)
        with state.use(gate):
            torch.testing.assert_close(model(x), expected)
    assert gated_lora_modules(model) == before


# -- step -------------------------------------------------------------------------------------


def test_step_reference_and_ours_losses_agree_and_flops_are_counted(synthetic_titles):
    setup, _ = step_bench.build_setup("tiny-quick", CPU)
    samples = common.random_samples(len(synthetic_titles), 3, 10, 20, seed=0)
    check = step_bench.check_equal(setup, samples)
    losses = check["losses_dropout_off"]
    assert abs(losses["reference"] - losses["ours"]) < 1e-4 and check["distance"]["reference"] < 1e-4
    assert gated_lora_modules(setup.bundle.teacher.llm)  # the swap was undone
    spec = step_bench.SHAPES["tiny-quick"]
    h, i, layers = spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"]
    assert step_bench.decoder_linear_params(setup.bundle.teacher.llm) == layers * (4 * h * h + 3 * h * i)
    vocab = setup.bundle.teacher.llm.config.vocab_size
    n = layers * (4 * h * h + 3 * h * i)
    assert step_bench.useful_flops(setup, 100, 7, False) == 4 * n * 100 + 4 * h * vocab * 7
    assert step_bench.useful_flops(setup, 100, 7, True) == 6 * n * 100 + 4 * h * vocab * 7
    # a training step of each variant runs and changes the adapters
    before = [p.detach().clone() for p in setup.params]
    for variant in ("reference", "ours"):
        loss = step_bench.train_step(setup, samples, common.Parts(CPU), variant)
        assert loss == loss  # finite-ish: not NaN
    assert any(not torch.equal(b, p) for b, p in zip(before, setup.params))


def test_step_with_gradient_checkpointing_runs_both_variants_with_the_same_loss(synthetic_titles):
    """Checkpointing makes the embedding output a leaf that requires grad: the reference's
    in-place row writes must still work, and both variants still agree."""
    setup, _ = step_bench.build_setup("tiny-quick", CPU, gradient_checkpointing=True)
    samples = common.random_samples(len(synthetic_titles), 3, 10, 20, seed=0)
    losses = step_bench.check_equal(setup, samples)["losses_dropout_off"]
    assert abs(losses["reference"] - losses["ours"]) < 1e-4
    for variant in ("reference", "ours"):  # a full step (backward through the recomputed layers) runs
        assert math.isfinite(step_bench.train_step(setup, samples, common.Parts(CPU), variant))


def test_step_eager_baseline_runs_eager_attention_with_the_same_loss(synthetic_titles):
    setup, _ = step_bench.build_setup("tiny-quick", CPU)
    llm = setup.bundle.teacher.llm
    assert llm.config._attn_implementation == "sdpa"
    samples = common.random_samples(len(synthetic_titles), 3, 10, 20, seed=0)
    losses = step_bench.check_equal(setup, samples, step_bench.VARIANTS)["losses_dropout_off"]
    assert abs(losses["ours_eager"] - losses["ours"]) < 1e-4
    with step_bench.variant_context(setup, "ours_eager"):
        assert llm.config._attn_implementation == "eager"
    assert llm.config._attn_implementation == "sdpa"  # restored
    # eager attention saves its (B, heads, T, T) float32 probabilities in every layer for backward;
    # SDPA saves less (on CPU with a padding mask, some (B, T, T)-sized state: hence only half required)
    mem = step_bench.memory(setup, samples, ("ours", "ours_eager"))
    heads, layers = step_bench.SHAPES["tiny-quick"]["num_attention_heads"], step_bench.SHAPES["tiny-quick"]["num_hidden_layers"]
    width = setup.bundle.train_collator.build(samples["history"], samples["length"], samples["candidates"], samples["target"]).input_ids.shape[1]
    extra = mem["ours_eager"]["saved_activation_bytes"] - mem["ours"]["saved_activation_bytes"]
    assert extra >= 0.5 * layers * 3 * heads * width * width * 4
    assert math.isfinite(step_bench.train_step(setup, samples, common.Parts(CPU), "ours_eager"))
    assert llm.config._attn_implementation == "sdpa"


def test_step_check_has_random_adapters_and_plain_lora_is_ours_under_the_uniform_gate(synthetic_titles):
    """The loss check runs with lora_B random (at lora_B = 0 every adapter is zero and the check
    could not tell the gate or the adapters apart), then restores lora_B; the plain-LoRA variant
    equals ours under the uniform gate, and differs from ours under the learned gate."""
    setup, _ = step_bench.build_setup("tiny-quick", CPU)
    layers = list(gated_lora_modules(setup.bundle.teacher.llm).values())
    assert all(not layer.lora_B.weight.any() for layer in layers)
    samples = common.random_samples(len(synthetic_titles), 3, 10, 20, seed=0)
    losses = step_bench.check_equal(setup, samples, ("reference", "ours", "lora"))["losses_dropout_off"]
    assert all(not layer.lora_B.weight.any() for layer in layers)  # restored
    assert abs(losses["reference"] - losses["ours"]) < 1e-4
    assert abs(losses["lora"] - losses["ours_uniform"]) < 1e-4
    assert abs(losses["ours"] - losses["ours_uniform"]) > 1e-3  # the gate matters with nonzero adapters
    check = step_bench.check_equal(setup, samples, ("ours", "lora"))
    assert check["distance"]["lora"] < 1e-6 and check["gate_effect"] > 1e-2
    llm = setup.bundle.teacher.llm
    with step_bench.variant_context(setup, "lora"):
        assert isinstance(llm.model.layers[0].mlp.down_proj, adapter_bench.PlainLoraView)
        assert math.isfinite(step_bench.step_in_context(setup, samples, common.Parts(CPU), "lora"))
    assert isinstance(llm.model.layers[0].mlp.down_proj, GatedLoraLinear)


def test_step_check_fails_when_the_gate_does_not_reach_the_layers(synthetic_titles, monkeypatch):
    """A model whose layers ignore the gate (the fault of earlier implementations) fails the check."""
    from ilora.teacher.adapters import GateState, scale_and_expand

    setup, _ = step_bench.build_setup("tiny-quick", CPU)
    samples = common.random_samples(len(synthetic_titles), 3, 10, 20, seed=0)
    uniform = lambda self, x, r, s: scale_and_expand(torch.full_like(self.gate_for(x), 1 / self.num_experts), r, s)  # noqa: E731
    monkeypatch.setattr(GateState, "scaled_gate_for", uniform)
    with pytest.raises(IloraError, match="cannot tell the learned gate"):
        step_bench.check_equal(setup, samples, ("ours",))
    # with the reference in the check, ours now differs from it by the gate's effect
    with pytest.raises(IloraError, match="reference's answer logits differ from ours"):
        step_bench.check_equal(setup, samples)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_step_check_under_bf16_autocast_still_sees_the_gate(synthetic_titles, monkeypatch, weights):
    """Under bf16 autocast, with float32 or (as on a GPU) bf16 base weights, the logit check's
    tolerance is far below the gate's effect on the answer logits, so a model whose layers ignore
    the gate fails against the reference. (The loss alone could not show it: the gate moves it
    by less than bf16's own noise at the 7B shape.) Four layers: in two the gate moves the logits by
    less than twice the tolerance; the GPU shapes have 16 and 32, where it moves them by 0.44-0.67."""
    from ilora.teacher.adapters import GateState, scale_and_expand

    monkeypatch.setitem(step_bench.SHAPES, "tiny-quick", dict(step_bench.SHAPES["tiny-quick"], num_hidden_layers=4))
    build_llm = step_bench.build_llm
    monkeypatch.setattr(step_bench, "build_llm", lambda shape, tok, device, dtype, seed=0: build_llm(shape, tok, device, weights, seed))
    setup, _ = step_bench.build_setup("tiny-quick", CPU)
    assert setup.bundle.teacher.llm.get_input_embeddings().weight.dtype == weights
    setup.autocast = True
    samples = common.random_samples(len(synthetic_titles), 3, 10, 20, seed=0)
    check = step_bench.check_equal(setup, samples, ("reference", "ours", "lora"))
    assert check["tolerance"] == step_bench.TOL_BF16
    assert 0 < check["distance"]["reference"] < check["tolerance"] / 3  # bf16 noise, well inside
    assert check["distance"]["lora"] < 1e-6  # plain LoRA is ours under the uniform gate, the same products
    assert check["discriminates_gate"] and check["gate_effect"] > 2 * check["tolerance"]
    uniform = lambda self, x, r, s: scale_and_expand(torch.full_like(self.gate_for(x), 1 / self.num_experts), r, s)  # noqa: E731
    monkeypatch.setattr(GateState, "scaled_gate_for", uniform)
    with pytest.raises(IloraError, match="reference's answer logits differ from ours"):
        step_bench.check_equal(setup, samples)


def test_step_grouped_batch_is_the_median_batch_of_the_length_sorted_pool(synthetic_titles):
    """`--group-by-length`: the pool is one window of 64 batches, so the sampler sorts it by prompt
    length and cuts it into batches; the bench takes the batch of median mean length. Written out
    here from the token counts alone."""
    setup, _ = step_bench.build_setup("tiny-quick", CPU)
    collator = setup.bundle.train_collator
    count = lambda s: collator.token_counts(s["history"], s["length"], s["candidates"], s["target"]).numpy()  # noqa: E731
    batch = step_bench.grouped_batches(setup, 8)[0]
    assert set(batch) == {"history", "length", "candidates", "target", "target_col"}
    assert torch.equal(batch["candidates"][torch.arange(8), batch["target_col"]], batch["target"])

    pool = common.random_samples(len(synthetic_titles), 64 * 8, 10, 20, seed=0)
    runs = sorted(sorted(count(pool).tolist())[i : i + 8] for i in range(0, 64 * 8, 8))  # contiguous runs of 8
    runs.sort(key=lambda r: sum(r) / 8)
    assert sorted(count(batch).tolist()) == runs[32]
    random_batch = common.random_samples(len(synthetic_titles), 8, 10, 20, seed=0)
    padding = lambda lengths: int(lengths.max() * len(lengths) - lengths.sum())  # noqa: E731
    assert padding(count(batch)) < padding(count(random_batch))


def test_optimizer_comparison_gives_the_same_update_and_leaves_the_model_as_it_was(synthetic_titles):
    """foreach and fused AdamW take the same step from the same state (checked inside, against each
    other: it raises otherwise); afterwards parameters are back and no gradient is left."""
    setup, _ = step_bench.build_setup("tiny-quick", CPU)
    samples = common.random_samples(len(synthetic_titles), 2, 10, 20, seed=0)
    before = [p.detach().clone() for p in setup.params]
    o = step_bench.compare_optimizers(setup, samples, repeats=2)
    assert o["trainable_params"] == sum(p.numel() for p in before) and o["foreach_s"] > 0 and o["fused_s"] > 0
    assert all(torch.equal(b, p) for b, p in zip(before, setup.params)) and all(p.grad is None for p in setup.params)


def test_optimizer_comparison_fails_when_the_two_updates_differ(synthetic_titles, monkeypatch):
    setup, _ = step_bench.build_setup("tiny-quick", CPU)
    samples = common.random_samples(len(synthetic_titles), 2, 10, 20, seed=0)
    before = [p.detach().clone() for p in setup.params]
    adamw = torch.optim.AdamW

    def wrong_fused(groups, **kwargs):  # a "fused" optimizer that steps twice as far
        if kwargs.get("fused"):
            groups = [{**g, "lr": 2 * g["lr"]} for g in groups]
        return adamw(groups, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", wrong_fused)
    with pytest.raises(IloraError, match="fused and foreach AdamW give different updates"):
        step_bench.compare_optimizers(setup, samples, repeats=2)
    assert all(torch.equal(b, p) for b, p in zip(before, setup.params))  # restored on failure too


def test_step_compile_runs_every_variant_with_the_trainers_compiled_layers(synthetic_titles):
    """--compile uses `CompiledLayers`, as `teacher.compile` does in training, in every variant's context."""
    setup, _ = step_bench.build_setup("tiny-quick", CPU, compile_layers=True)
    layers = setup.compiled.layers
    assert layers == list(setup.bundle.teacher.llm.get_decoder().layers)
    for variant in step_bench.VARIANTS:
        with step_bench.variant_context(setup, variant):
            assert all(layer.forward is fn for layer, fn in zip(layers, setup.compiled.compiled)), variant
        assert all("forward" not in layer.__dict__ for layer in layers)


def test_step_timed_runs_swap_outside_the_step_and_restore(synthetic_titles):
    """Each timed step runs with its variant's modules in place, though the step itself swaps nothing."""
    setup, _ = step_bench.build_setup("tiny-quick", CPU)
    llm = setup.bundle.teacher.llm
    samples = common.random_samples(len(synthetic_titles), 2, 10, 20, seed=0)
    runs, contexts = step_bench.timed_runs(setup, [samples], step_bench.VARIANTS)
    before = dict(gated_lora_modules(llm))
    assert len(before) == 7 * step_bench.SHAPES["tiny-quick"]["num_hidden_layers"]
    seen = {}

    def observe(name):
        def run(parts):
            q_proj = llm.model.layers[0].self_attn.q_proj
            seen[name] = (type(q_proj).__name__, llm.config._attn_implementation, getattr(q_proj, "shared_input", None) is not None)
            assert math.isfinite(runs[name](parts))
        return run

    common.interleave({v: observe(v) for v in runs}, CPU, warmup=0, repeats=1, contexts=contexts)
    assert seen == {
        "reference": ("ReferenceGatedLinear", "sdpa", False),
        "ours": ("GatedLoraLinear", "sdpa", False),
        "ours_eager": ("GatedLoraLinear", "eager", False),
        "ours_fp32": ("GatedLoraLinear", "sdpa", False),
        "ours_shared": ("GatedLoraLinear", "sdpa", True),
        "lora": ("PlainLoraView", "sdpa", False),
    }
    assert gated_lora_modules(llm) == before  # the swap was undone
    assert all(layer.shared_input is None for layer in before.values())
    assert llm.config._attn_implementation == "sdpa"


def test_step_fp32_variant_runs_float32_without_autocast_and_restores_bf16_exactly(synthetic_titles, monkeypatch):
    """`--fp32-baseline` (CUDA): ours with the bf16 weights as float32 and no autocast. Emulated here
    with bf16 weights and autocast on the CPU."""
    build_llm = step_bench.build_llm
    monkeypatch.setattr(step_bench, "build_llm", lambda shape, tok, device, dtype, seed=0: build_llm(shape, tok, device, torch.bfloat16, seed))
    setup, _ = step_bench.build_setup("tiny-quick", CPU)
    setup.autocast = True
    llm = setup.bundle.teacher.llm
    params = dict(llm.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    adapters = {id(p) for p in setup.params}
    samples = common.random_samples(len(synthetic_titles), 2, 10, 20, seed=0)
    with step_bench.variant_context(setup, "ours_fp32"):
        assert not setup.autocast
        assert all(p.dtype == torch.float32 for p in llm.parameters())
        assert dict(llm.named_parameters()) == params  # the same Parameter objects: the optimizer still holds them
        assert math.isfinite(step_bench.train_step(setup, samples, common.Parts(CPU), "ours_fp32"))
    assert setup.autocast
    for name, p in llm.named_parameters():
        if id(p) not in adapters:  # frozen: back to the same bf16 values, bit for bit
            assert p.dtype == torch.bfloat16 and torch.equal(p, before[name]), name
        else:  # trained in the step, still float32
            assert p.dtype == torch.float32
    check = step_bench.check_equal(setup, samples, ("reference", "ours", "ours_fp32"))
    assert check["distance"]["ours_fp32"] < check["tolerance"]


@pytest.mark.parametrize("device,compile_layers", [(CPU, False), (torch.device("cuda"), True)])
def test_step_fp32_baseline_is_refused_on_cpu_and_with_compile_before_any_model_is_built(device, compile_layers, monkeypatch):
    monkeypatch.setattr(step_bench, "build_setup", lambda *a, **k: pytest.fail("built a model before refusing"))
    with pytest.raises(ConfigError, match="CUDA only"):
        step_bench.run_bench(device, quick=True, fp32_baseline=True, compile_layers=compile_layers)


def test_step_cli_passes_group_by_length_and_the_fp32_refusal(synthetic_titles, capsys):
    assert main(["bench", "step", "--quick", "--group-by-length", "--no-part-syncs", "--repeats", "1", "--no-record", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    sizes = result["sizes"]
    assert sizes["batch"].startswith("length-grouped") and not sizes["part_syncs"]
    assert sizes["padded_width"]["ours"] == sizes["tokens_per_sample"]  # a grouped batch of equal lengths here: no padding
    assert main(["bench", "step", "--quick", "--fp32-baseline", "--no-record"]) == 2
    assert "CUDA only" in capsys.readouterr().err


def test_step_without_reference_never_runs_it_and_has_no_ratio(synthetic_titles, capsys, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(step_bench, "reference_output", refuse)
    monkeypatch.setattr(step_bench, "reference_adapters", refuse)
    results = tmp_path / "RESULTS.md"
    argv = ["bench", "step", "--quick", "--no-reference", "--lora-baseline", "--repeats", "1", "--results", str(results)]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["variants"]) == {"ours", "lora"} and result["ratio"] is None
    assert "reference" not in result["equal_work_checked"]["distance"]  # the gate check still ran
    assert result["equal_work_checked"]["discriminates_gate"]
    assert "No headline `ratio`: not measured (--no-reference)." in results.read_text()
    assert main(argv) == 0  # the printed table, no JSON
    assert "ratio: - (not measured (--no-reference))" in capsys.readouterr().out
    assert main(["bench", "inputs", "--no-reference", "--no-record"]) == 2


def test_step_all_params_count_is_every_llm_parameter_and_lora_dropout_reaches_the_layers(synthetic_titles):
    """The issue's MFU count uses every LLM parameter once (embeddings, head, norms; tied
    weights once; LoRA experts not), against the closed-form count of a Llama's parameters."""
    setup, _ = step_bench.build_setup("tiny-quick", CPU, lora_dropout=0.0)
    llm = setup.bundle.teacher.llm
    spec = step_bench.SHAPES["tiny-quick"]
    h, i, layers, vocab = spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"], llm.config.vocab_size
    untied_head = not llm.config.tie_word_embeddings
    expected = vocab * h * (2 if untied_head else 1) + layers * (4 * h * h + 3 * h * i + 2 * h) + h  # + norms
    assert step_bench.base_params(llm) == expected
    assert step_bench.all_params_flops(setup, 100, False) == 4 * expected * 100
    assert step_bench.all_params_flops(setup, 100, True) == 6 * expected * 100
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True))
    assert step_bench.base_params(tied) == 50 * 8 + (4 * 8 * 8 + 3 * 8 * 16 + 2 * 8) + 8  # the shared table once
    layers_ = gated_lora_modules(llm).values()
    assert all(isinstance(layer.lora_dropout, nn.Identity) for layer in layers_)
    setup, _ = step_bench.build_setup("tiny-quick", CPU)  # the teacher's default dropout
    assert {layer.lora_dropout.p for layer in gated_lora_modules(setup.bundle.teacher.llm).values()} == {0.1}


def test_step_cli_passes_lora_dropout_and_refuses_a_compile_mode_without_compile(synthetic_titles, capsys):
    argv = ["bench", "step", "--quick", "--no-reference", "--lora-dropout", "0", "--repeats", "1", "--no-record", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sizes"]["lora_dropout"] == 0.0 and result["sizes"]["compile_mode"] == "default"
    assert result["variants"]["ours"]["mfu_all_params"] is None  # no peak FLOP/s on a CPU
    assert main(["bench", "step", "--quick", "--compile-mode", "max-autotune-no-cudagraphs", "--no-record"]) == 2
    assert "--compile-mode needs --compile" in capsys.readouterr().err
    assert main(["bench", "inputs", "--lora-dropout", "0", "--no-record"]) == 2


def test_step_shared_inputs_times_ours_with_grouped_adapters_beside_ours(synthetic_titles, capsys, monkeypatch, tmp_path):
    """--shared-inputs adds ours_shared: the same teacher with q/k/v and gate/up grouped (checked
    equal to ours with dropout off), whose steps really compute one A product per group; --profile
    then profiles ours_shared, the variant the run is about."""
    products = record_group_products(monkeypatch)
    profile = tmp_path / "profile.txt"
    argv = ["bench", "step", "--quick", "--no-reference", "--shared-inputs", "--repeats", "1", "--warmup", "0", "--no-record", "--json"]
    assert main(argv + ["--profile", str(profile)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["profile"]["variant"] == "ours_shared" and profile.read_text().startswith("step profile of ours_shared: ")
    assert "Profiled step of ours_shared" in "\n".join(step_bench.markdown_table(result))
    assert set(result["variants"]) == {"ours", "ours_shared"}
    assert result["equal_work_checked"]["distance"]["ours_shared"] < 1e-5
    assert result["shared_vs_ours"] == result["variants"]["ours"]["step_s"] / result["variants"]["ours_shared"]["step_s"]
    layers = step_bench.SHAPES["tiny-quick"]["num_hidden_layers"]
    assert products and sum(products) * 5 == len(products) * 2  # per decoder layer: 5 grouped layers, 2 products
    assert len(products) % (5 * layers) == 0
    assert main(["bench", "inputs", "--shared-inputs", "--no-record"]) == 2


def test_micro_batches_are_consecutive_slices_covering_the_batch():
    samples = {"target": torch.arange(8), "history": torch.arange(16).view(8, 2)}
    chunks = step_bench.micro_batches(samples, 3)
    assert [c["target"].tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert torch.equal(torch.cat([c["history"] for c in chunks]), samples["history"])
    assert step_bench.micro_batches(samples, 0) == [samples] and step_bench.micro_batches(samples, 8) == [samples]


def test_step_with_micro_batches_runs_each_forward_backward_then_one_optimizer_step(synthetic_titles, capsys, monkeypatch):
    """--micro-batch-size M: every timed step runs B / M forwards of M samples (each padded to its
    own width), their backwards accumulating, and one optimizer step, as the trainer does; the
    accumulated gradient is the samples-weighted mean of the micro-batches' (checked against
    one backward per micro-batch by hand)."""
    events = []
    real_step = step_bench.step_in_context
    real_loss, real_optimizer = step_bench.variant_loss, step_bench.optimizer_step
    monkeypatch.setattr(step_bench, "step_in_context", lambda *a: events.append("step") or real_step(*a))
    monkeypatch.setattr(step_bench, "variant_loss", lambda setup, chunk, parts, variant: events.append(len(chunk["target"])) or real_loss(setup, chunk, parts, variant))
    monkeypatch.setattr(step_bench, "optimizer_step", lambda setup, optimizer: events.append("optimizer" if optimizer is setup.optimizer else "other") or real_optimizer(setup, optimizer))
    r = _run_cli(capsys, "step", "--quick", "--batch-size", "6", "--micro-batch-size", "2", "--no-reference", "--repeats", "2", "--warmup", "1", "--no-record")
    assert r["sizes"]["micro_batch_size"] == 2 and len(r["sizes"]["micro_batch_padded_width"]) == 3
    steps = [i for i, e in enumerate(events) if e == "step"]
    assert len(steps) == 3  # warm-up + 2 timed rounds
    for i in steps:
        assert events[i + 1 : i + 5] == [2, 2, 2, "optimizer"]
    assert "in micro-batches of 2" in "\n".join(step_bench.markdown_table(r))
    assert main(["bench", "step", "--quick", "--batch-size", "6", "--micro-batch-size", "4", "--no-record"]) == 2
    assert "micro_batch_size: must divide the batch size 6" in capsys.readouterr().err


def test_step_reference_steps_in_its_own_micro_batches_and_the_refusals(synthetic_titles, capsys, monkeypatch):
    """--reference-micro-batch-size M: the reference's steps run B / M micro-batches of M samples
    (ours one of B), both on the same samples, so the step-time ratio is the ratio of samples/s."""
    events = []
    real_step, real_loss = step_bench.step_in_context, step_bench.variant_loss
    monkeypatch.setattr(step_bench, "step_in_context", lambda setup, samples, parts, variant: events.append(variant) or real_step(setup, samples, parts, variant))
    monkeypatch.setattr(
        step_bench, "variant_loss",
        lambda setup, chunk, parts, variant: events.append((variant, len(chunk["target"]))) or real_loss(setup, chunk, parts, variant),
    )
    r = _run_cli(capsys, "step", "--quick", "--batch-size", "4", "--reference-micro-batch-size", "2", "--repeats", "1", "--warmup", "1", "--no-record")
    assert r["sizes"]["reference_micro_batch_size"] == 2 and r["sizes"]["micro_batch_size"] == 4
    steps = [i for i, e in enumerate(events) if isinstance(e, str)]
    assert {events[i] for i in steps} == {"reference", "ours"} and len(steps) >= 4  # warm-up + timed round (+ memory's)
    for i in steps:
        expected = [("reference", 2)] * 2 if events[i] == "reference" else [("ours", 4)]
        assert events[i + 1 : i + 1 + len(expected)] == expected
    assert {e for e in events if not isinstance(e, str)} == {("reference", 2), ("ours", 4)}  # memory's forwards too
    assert r["variants"]["reference"]["samples_per_s"] == pytest.approx(4 / r["variants"]["reference"]["step_s"])
    widths = r["sizes"]["reference_micro_batch_padded_width"]
    assert len(widths) == 2 and max(widths) <= r["sizes"]["padded_width"]["reference"]
    assert f"the reference in micro-batches of 2 (padded to {widths[0]}, {widths[1]}; saved MiB of its widest)" in "\n".join(step_bench.markdown_table(r))
    assert r["ratio_means"].endswith("(the reference in micro-batches of 2)")
    for argv, message in (
        (["--reference-micro-batch-size", "3"], "reference_micro_batch_size: must divide the batch size 4"),
        (["--reference-micro-batch-size", "2", "--no-reference"], "the reference is not run"),
        (["--reference-eager"], "it needs --compile and the reference"),
    ):
        assert main(["bench", "step", "--quick", "--batch-size", "4", *argv, "--no-record"]) == 2
        assert message in capsys.readouterr().err
    assert main(["bench", "adapter", "--quick", "--reference-eager", "--no-record"]) == 2
    assert "--reference-eager does not apply (only to step)" in capsys.readouterr().err


def test_step_run_with_reference_eager_steps_the_reference_outside_the_compiled_layers(synthetic_titles, capsys, monkeypatch):
    """--compile --reference-eager through the CLI: every step of the reference (check, timed rounds,
    memory) runs with the compiled layers inactive, every step of ours inside them. The compiled
    layers are a stand-in that records when they are active (compiling is not what is tested)."""
    import contextlib

    import ilora.teacher.compiled as compiled_module

    state = {"active": False}
    seen = set()

    class RecordingLayers:
        def __init__(self, llm, **kwargs):
            pass

        @contextlib.contextmanager
        def active(self):
            state["active"] = True
            try:
                yield
            finally:
                state["active"] = False

    real_loss = step_bench.variant_loss
    monkeypatch.setattr(compiled_module, "CompiledLayers", RecordingLayers)
    monkeypatch.setattr(step_bench, "variant_loss", lambda setup, chunk, parts, variant: seen.add((variant, state["active"])) or real_loss(setup, chunk, parts, variant))
    r = _run_cli(capsys, "step", "--quick", "--batch-size", "2", "--compile", "--reference-eager", "--repeats", "1", "--warmup", "1", "--no-record")
    assert seen == {("reference", False), ("ours", True)}
    assert r["sizes"]["reference_compiled"] is False and r["ratio_means"].endswith("(the reference eager)")


def test_step_reference_eager_leaves_only_the_reference_uncompiled(synthetic_titles):
    setup, _ = step_bench.build_setup("tiny-quick", CPU, compile_layers=True)
    setup.reference_eager = True
    layers = setup.compiled.layers
    for variant in step_bench.VARIANTS:
        with step_bench.variant_context(setup, variant):
            compiled = [layer.forward is fn for layer, fn in zip(layers, setup.compiled.compiled)]
            assert all(compiled) if variant != "reference" else not any(compiled), variant


def test_a_micro_batched_step_accumulates_the_sample_weighted_gradient(synthetic_titles, monkeypatch):
    setup, _ = step_bench.build_setup("tiny-quick", torch.device("cpu"), lora_dropout=0.0)
    samples = step_bench.random_samples(len(setup.inputs.titles), 6, step_bench.HISTORY_ITEMS, step_bench.CANDIDATES, seed=1)
    for layer in gated_lora_modules(setup.bundle.teacher.llm).values():
        layer.reset_lora_parameters("random")
    params = [p for p in setup.params if p.requires_grad]
    expected = [torch.zeros_like(p) for p in params]
    for lo in range(0, 6, 2):  # the reference: one backward per micro-batch by hand, weighted by hand
        chunk = {k: v[lo : lo + 2] for k, v in samples.items()}
        grads = torch.autograd.grad(step_bench.our_loss(setup, chunk, common.Parts(setup.device)), params, allow_unused=True)
        expected = [e + (g if g is not None else 0) * (2 / 6) for e, g in zip(expected, grads)]
    got = {}
    setup.micro_batch_size = 2
    keep = lambda setup, optimizer: got.update(grads=[p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])  # noqa: E731
    monkeypatch.setattr(step_bench, "optimizer_step", keep)
    step_bench.train_step(setup, samples, common.Parts(setup.device), "ours")
    for g, e in zip(got["grads"], expected):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-6)


def test_step_grouped_batches_span_the_window_and_runs_cycle_through_them(synthetic_titles, monkeypatch):
    from ilora.teacher.train import GROUP_WINDOW

    setup, _ = step_bench.build_setup("tiny-quick", CPU)
    collator = setup.bundle.train_collator

    def key(batch):  # a sample as (history, length, candidates, target) rows
        return sorted(tuple(map(tuple, torch.cat([batch["history"], batch["length"][:, None], batch["candidates"], batch["target"][:, None]], 1).tolist())))

    every = step_bench.grouped_batches(setup, 2, GROUP_WINDOW)  # the whole window: each of its batches once
    pool = common.random_samples(len(synthetic_titles), GROUP_WINDOW * 2, 10, 20, seed=0)
    assert sorted(row for b in every for row in key(b)) == key(pool)
    means = [float(collator.token_counts(b["history"], b["length"], b["candidates"], b["target"]).float().mean()) for b in every]
    assert means != sorted(means)  # shuffled, as training meets them
    three = step_bench.grouped_batches(setup, 2, 3)
    three_means = sorted(float(collator.token_counts(b["history"], b["length"], b["candidates"], b["target"]).float().mean()) for b in three)
    assert three_means[0] == min(means) and three_means[-1] == max(means)  # shortest and longest of the window
    one = step_bench.grouped_batches(setup, 2, 1)[0]  # the batch of median mean length
    one_mean = float(collator.token_counts(one["history"], one["length"], one["candidates"], one["target"]).float().mean())
    assert one_mean == sorted(means)[GROUP_WINDOW // 2]
    with pytest.raises(ConfigError, match="batches"):
        step_bench.grouped_batches(setup, 2, GROUP_WINDOW + 1)

    stepped = []
    monkeypatch.setattr(step_bench, "step_in_context", lambda setup, samples, parts, variant: stepped.append((variant, id(samples))))
    runs, _ = step_bench.timed_runs(setup, three, ("ours", "lora"))
    for _ in range(4):
        runs["ours"](None)
    runs["lora"](None)
    assert stepped == [("ours", id(three[i])) for i in (0, 1, 2, 0)] + [("lora", id(three[0]))]


def test_step_with_several_batches_reports_rates_over_the_timed_steps(synthetic_titles, capsys):
    argv = ["bench", "step", "--quick", "--no-reference", "--group-by-length", "--batches", "3", "--batch-size", "2"]
    assert main([*argv, "--repeats", "2", "--warmup", "1", "--no-record", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    sizes, ours = result["sizes"], result["variants"]["ours"]
    each = sizes["tokens_per_sample_each"]
    assert sizes["batches"] == 3 and len(each) == 3 and sizes["tokens_per_sample"] == pytest.approx(sum(each) / 3)
    assert sizes["warmup"] == 3  # --warmup 1 is raised so that every batch (and shape) is seen before timing
    # --repeats 2 is raised to a whole cycle of 3: timed calls 3, 4 and 5 (after three warm-up calls)
    # stepped on batches 0, 1 and 2, each once
    assert ours["repeats"] == 3
    seconds = ours["step_s"] * 3  # step_s: the mean of the timed steps
    assert ours["tokens_per_s"] == pytest.approx(2 * sum(each) / seconds)
    assert ours["samples_per_s"] == pytest.approx(6 / seconds)
    assert len(sizes["padded_width_each"]) == 3 and sizes["memory_measured_on"].startswith("the widest batch")
    assert main(["bench", "inputs", "--batches", "2", "--no-record"]) == 2


def test_untimed_parts_neither_sync_nor_record(monkeypatch):
    synced = []
    monkeypatch.setattr(common, "sync", lambda device: synced.append(device))

    def run(parts):
        with parts("a"):
            pass

    timed = common.interleave({"x": run}, CPU, warmup=0, repeats=2)
    assert set(timed["x"].parts) == {"a"} and len(synced) == 2 * 4  # two around the run, two around the part
    synced.clear()
    untimed = common.interleave({"x": run}, CPU, warmup=0, repeats=2, part_times=False)
    assert untimed["x"].parts == {} and len(untimed["x"].totals) == 2 and len(synced) == 2 * 2
    assert "parts_median_s" not in untimed["x"].summary()


def test_bench_rejects_an_option_of_another_benchmark(capsys):
    assert main(["bench", "inputs", "--quick", "--compile", "--no-record"]) == 2
    assert "--compile does not apply (only to step)" in capsys.readouterr().err
    assert main(["bench", "adapter", "--quick", "--batch-sizes", "8", "--no-record"]) == 2
    assert "--batch-sizes does not apply" in capsys.readouterr().err
    assert main(["bench", "adapter", "--quick", "--profile", "p.txt", "--no-record"]) == 2
    assert "--profile does not apply (only to step)" in capsys.readouterr().err
    assert main(["bench", "inputs", "--quick", "--lora-baseline", "--no-record"]) == 2
    assert "--lora-baseline does not apply (only to step)" in capsys.readouterr().err
    assert main(["bench", "adapter", "--quick", "--no-part-syncs", "--no-record"]) == 2
    assert "--no-part-syncs does not apply (only to step)" in capsys.readouterr().err


# -- every benchmark runs and prints one JSON object ---------------------------------------------


def _run_cli(capsys, *argv: str) -> dict:
    assert main(["bench", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    return json.loads(out)


def _check_common(result: dict, name: str) -> None:
    assert result["name"] == name
    assert result["machine"]["cpu"] and result["machine"]["torch"] == torch.__version__
    assert result["machine"]["device"] == "cpu"
    assert result["ratio"] > 0 and result["sizes"]


@pytest.mark.slow
def test_bench_inputs_quick_json(capsys, tmp_path):
    results = tmp_path / "RESULTS.md"
    r = _run_cli(capsys, "inputs", "--quick", "--hidden", "128", "--repeats", "1", "--results", str(results), "--note", "test")
    _check_common(r, "inputs")
    row = r["rows"][0]
    assert set(row["reference"]["parts_median_s"]) == {"tokenise", "substitute", "backward"}
    assert set(row["ours"]["parts_median_s"]) == {"assemble", "substitute", "backward"}
    assert row["memory"]["ours"]["saved_activation_bytes"] > 0
    # the bound is the reference over the projector alone, which ours also runs
    assert row["ratio_bound"] == pytest.approx(row["reference"]["median_s"] / row["projector"]["median_s"])
    # and over all the work both do (lookup, projector, the probe's (B, T, H) gradient)
    assert row["ratio_bound_shared"] == pytest.approx(row["reference"]["median_s"] / row["shared"]["median_s"])
    text = results.read_text()
    assert "### `inputs` (--quick), cpu" in text and "test" in text and '"name": "inputs"' in text


@pytest.mark.slow
def test_bench_adapter_quick_json(capsys):
    r = _run_cli(capsys, "adapter", "--quick", "--hidden", "128", "--repeats", "1", "--no-record")
    _check_common(r, "adapter")
    assert {row["rank_per_expert"] for row in r["rows"]} == set(adapter_bench.RANKS)
    assert r["ratio"] == r["vs_reference"] and r["vs_lora"] > 0
    mem = r["rows"][0]["memory"]
    # the reference saves the (batch, tokens, E, out) stack that ours never makes
    assert mem["reference"]["extra_saved_bytes"] > mem["ours"]["extra_saved_bytes"]
    # each goal's verdict is the headline figure against the threshold
    met = r["goals_met"]
    assert met["vs_lora <= 1.05"] == (r["vs_lora"] <= 1.05) and met["vs_reference >= 1.5"] == (r["vs_reference"] >= 1.5)
    assert met["gate_saved_ours_over_reference <= 1/4"] == (r["gate_saved_ours_over_reference"] <= 0.25)
    assert met["extra_saved_ours_over_reference <= 1/4, every row"] == all(row["extra_saved_ours_over_reference"] <= 0.25 for row in r["rows"])


@pytest.mark.slow
def test_bench_step_quick_json(capsys, synthetic_titles, tmp_path):
    profile = tmp_path / "profile.txt"
    r = _run_cli(
        capsys, "step", "--quick", "--batch-size", "2", "--repeats", "1", "--eager-baseline", "--lora-baseline", "--no-record", "--profile", str(profile)
    )
    _check_common(r, "step")
    assert set(r["variants"]) == {"reference", "ours", "ours_eager", "lora"} and r["sizes"]["attention"] == "sdpa"
    assert r["vs_lora"] == pytest.approx(r["variants"]["ours"]["median_s"] / r["variants"]["lora"]["median_s"])
    check = r["equal_work_checked"]
    assert check["discriminates_gate"] and check["gate_effect"] > 2 * check["tolerance"]
    assert r["sdpa_vs_eager"] == pytest.approx(r["variants"]["ours_eager"]["median_s"] / r["variants"]["ours"]["median_s"])
    o = r["optimizer"]
    assert o["foreach_over_fused"] == pytest.approx(o["foreach_s"] / o["fused_s"]) and o["trainable_params"] > 0
    assert all(v["mfu"] is None and v["samples_per_s"] > 0 for v in r["variants"].values())
    # the profiled step: its summary in the JSON, its operator table in the file
    p = r["profile"]
    assert p["variant"] == "ours" and p["file"] == str(profile) and p["step_s"] > 0 and p["aten_operators"] > 0 and p["device_busy_s"] is None
    text = profile.read_text()
    assert "aten::mm" in text and "Self CPU" in text
    assert "Profiled step of ours" in "\n".join(step_bench.markdown_table(r))


@pytest.mark.slow
def test_bench_eval_quick_json(capsys, monkeypatch, synthetic_titles):
    from ilora.bench import evaluation

    monkeypatch.setattr(evaluation, "load_titles", lambda: (synthetic_titles, "synthetic (test)"))
    r = _run_cli(capsys, "eval", "--quick", "--samples", "4", "--repeats", "1", "--no-record")
    _check_common(r, "eval")
    assert r["metrics"]["score"]["num_samples"] == 4 and r["ratio_min"] > 0
    assert r["sizes"]["shape"] == "tiny" and r["sizes"]["llm"].startswith("random Llama: 2 layers, hidden 64")


def test_bench_eval_runs_the_step_benchmarks_models(capsys, synthetic_titles):
    """--shape takes the step benchmark's models (on CUDA: 1b, 7b), the same on CPU at tiny-quick."""
    from ilora.bench import evaluation

    r = _run_cli(capsys, "eval", "--shape", "tiny-quick", "--samples", "2", "--repeats", "1", "--warmup", "0", "--no-record")
    spec = step_bench.SHAPES["tiny-quick"]
    assert r["sizes"]["shape"] == "tiny-quick" and f"hidden {spec['hidden_size']}" in r["sizes"]["llm"]
    assert r["metrics"]["score"]["num_samples"] == 2 and r["ratio"] > 0
    with pytest.raises(ConfigError, match="shape 7b is for CUDA"):
        evaluation.build(CPU, 2, "7b")
    with pytest.raises(ConfigError, match="expected one of"):
        evaluation.build(CPU, 2, "13b")
    assert main(["bench", "export", "--shape", "7b", "--no-record"]) == 2
    assert "--shape does not apply" in capsys.readouterr().err


def test_bench_cuda_without_gpu_is_a_one_line_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "adapter", "--device", "cuda", "--quick", "--no-record"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_peak_flops_are_per_card_not_per_family():
    """An H100 PCIe or NVL has less compute than the SXM part; an unknown card gets no MFU."""
    from ilora.bench.common import peak_flops_of

    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops_of("NVIDIA H200") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12 and peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert peak_flops_of("NVIDIA H200 NVL") == 835e12 and peak_flops_of("NVIDIA GH200 480GB") == 989e12
    assert peak_flops_of("NVIDIA H100") is None and peak_flops_of("NVIDIA A100-SXM4-80GB") is None
    assert peak_flops_of("NVIDIA H100 80GB HBM3 MIG 3g.40gb") is None  # a slice: the card's peak would understate MFU


def test_a_compiled_step_past_the_recompile_limit_fails_instead_of_timing_eager_layers():
    """Past torch.compile's recompile limit torch would run the function eager for good; under
    the step bench's `recompile_limit` (8 graphs per variant) that is an error naming the cause,
    and torch's own settings are back afterwards."""
    import torch._dynamo

    from ilora.errors import IloraError

    before = (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit)
    torch._dynamo.reset()
    try:
        double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)  # a graph per input size
        with step_bench.recompile_limit(2):
            for n in range(1, 17):
                double(torch.ones(n))  # 16 graphs: within 8 per variant for 2 variants
        torch._dynamo.reset()
        with pytest.raises(IloraError, match="compiled a decoder layer more than 8 times"):
            with step_bench.recompile_limit(1):
                for n in range(1, 10):
                    double(torch.ones(n))
        with step_bench.recompile_limit(None):  # not compiled: torch's settings untouched
            assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit) == before
    finally:
        torch._dynamo.reset()
    assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit) == before


def test_a_compiled_step_bench_measures_under_the_recompile_limit(synthetic_titles, monkeypatch):
    """run_bench with compiled layers runs its measurements (from the equality check on) under
    `recompile_limit` for its variants; without compiling, torch's settings stay as they are."""
    import shutil

    import torch._dynamo

    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("compiling on the CPU needs a C++ compiler")
    seen = []

    class Stop(Exception):
        pass

    def record(setup, *args, **kwargs):
        seen.append((torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit))
        if setup.compiled is not None:  # inside a variant the layers keep the bench's limit (set no limit of their own)
            with step_bench.variant_context(setup, "ours"):
                seen.append((torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit))
        raise Stop

    monkeypatch.setattr(step_bench, "check_equal", record)
    defaults = (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit)
    for compile_layers in (True, False):
        with pytest.raises(Stop):
            step_bench.run_bench(CPU, quick=True, compile_layers=compile_layers, shared_inputs=True, reference=False)
    limit = (2 * step_bench.RECOMPILES_PER_VARIANT, True)  # ours and ours_shared
    assert seen == [limit, limit, defaults]
    assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit) == defaults

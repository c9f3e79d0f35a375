"""The distilled student: combined item embeddings, RNG isolation, folding into a plain SASRec."""

from __future__ import annotations

import pytest
import torch

from ilora.distill.student import DistilledSASRec, student_factory
from ilora.errors import IloraError
from ilora.rec.sasrec import SASRec, SASRecConfig, load_sasrec

CFG = SASRecConfig(num_items=15, max_len=5, hidden=8, dropout=0.2)


def teacher_table(width: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randn(CFG.num_items, width, generator=torch.Generator().manual_seed(seed))


def histories() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    history = torch.randint(0, CFG.num_items, (6, CFG.max_len), generator=g)
    length = torch.tensor([1, 2, 5, 3, 4, 5])
    return history, length


def test_item_embeddings_are_own_plus_projected_teacher() -> None:
    table = teacher_table(width=11)
    model = DistilledSASRec(CFG, table, w_ed=0.3, seed=2)
    assert model.item_emb.proj.in_features == 11  # the teacher width comes from the table
    ids = torch.tensor([[0, 4, 14], [7, 7, 2]])
    got = model.item_embeddings(ids)
    own = model.item_emb.weight.detach()
    w, b = model.item_emb.proj.weight.detach(), model.item_emb.proj.bias.detach()
    for r in range(ids.shape[0]):
        for c in range(ids.shape[1]):
            i = int(ids[r, c])
            expected = [own[i, h].item() + 0.3 * (sum(w[h, j].item() * table[i, j].item() for j in range(11)) + b[h].item()) for h in range(CFG.hidden)]
            assert got[r, c].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_encoder_reads_combined_embeddings_and_scores_use_output_layer() -> None:
    model = DistilledSASRec(CFG, teacher_table(), w_ed=0.5, seed=0).eval()
    history, length = histories()
    plain = SASRec(CFG).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("item_emb.proj.")})
    with torch.no_grad():
        plain.item_emb.weight.copy_(model.item_emb.table())
        assert torch.allclose(model.scores(history, length), plain.scores(history, length), atol=1e-6)
        assert torch.allclose(model.scores(history, length), model.output(model.user_representation(history, length)))
        # the teacher term changes the scores (it reaches the encoder)
        model.item_emb.w_ed = 0.0
        assert not torch.allclose(model.scores(history, length), plain.scores(history, length), atol=1e-4)


def test_building_the_student_draws_like_plain_sasrec() -> None:
    torch.manual_seed(5)
    plain = SASRec(CFG)
    after_plain = torch.rand(4)
    torch.manual_seed(5)
    student = DistilledSASRec(CFG, teacher_table(), w_ed=0.2, seed=9)
    after_student = torch.rand(4)
    assert torch.equal(after_plain, after_student)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, student.state_dict()[name]), name


def test_fold_save_load_gives_the_same_scores(tmp_path) -> None:
    model = DistilledSASRec(CFG, teacher_table(), w_ed=0.4, seed=1).eval()
    history, length = histories()
    model.save(tmp_path / "m")
    loaded = load_sasrec(tmp_path / "m")
    assert type(loaded) is SASRec
    with torch.no_grad():
        assert torch.equal(loaded.item_emb.weight, model.item_emb.table())
        assert torch.allclose(loaded.scores(history, length), model.scores(history, length), atol=1e-6)
    assert "item_emb.teacher" not in model.state_dict()  # the teacher table is not saved


def test_wrong_teacher_table_is_an_error() -> None:
    with pytest.raises(IloraError, match=r"shape \(14, 11\), expected \(15, H\)"):
        DistilledSASRec(CFG, torch.zeros(14, 11), w_ed=0.2, seed=0)
    assert student_factory(None, w_ed=0.2, seed=0) is SASRec


def test_training_reaches_the_projection_and_not_the_teacher_table() -> None:
    """The loss's gradient reaches W and b of the teacher projection, scaled by w_ed (the
    chain rule through ``E + w_ed (W t + b)``), and the teacher's table stays a constant."""
    table = teacher_table()
    history, length = histories()
    target = torch.tensor([1, 2, 3, 4, 5, 6])
    grads = {}
    for w_ed in (0.2, 0.4):
        model = DistilledSASRec(CFG, table, w_ed=w_ed, seed=0).eval()
        torch.nn.functional.cross_entropy(model.scores(history, length), target).backward()
        proj = model.item_emb.proj
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0 and proj.bias.grad.abs().sum() > 0
        assert not model.item_emb.teacher.requires_grad
        assert any(p is proj.weight for p in model.parameters())  # the optimizer sees it
        grads[w_ed] = (proj.weight.grad.clone(), model.item_emb.weight.grad.clone())
    # d loss / d W = w_ed * (d loss / d E-rows) t^T: with the same E-row gradient it doubles with w_ed
    own = {w: g[1] for w, g in grads.items()}
    expected_w = {w: w * own[w].T[:, :-1] @ table for w in grads}  # the padding row's teacher row is zero
    for w in grads:
        assert torch.allclose(grads[w][0], expected_w[w], atol=1e-6)


def whole_table_forward(self, ids: torch.Tensor) -> torch.Tensor:
    """The reference: project the whole teacher table, then look the ids up in the combined table."""
    return torch.nn.functional.embedding(ids, self.weight + self.w_ed * self.proj(self.teacher))


def test_looking_up_projects_only_the_distinct_ids_looked_up() -> None:
    model = DistilledSASRec(CFG, teacher_table(), w_ed=0.3, seed=0)
    seen = []
    model.item_emb.proj.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    ids = torch.tensor([[3, 3, 9, CFG.num_items], [9, 0, 3, CFG.num_items]])  # with repeats and the padding id
    model.item_embeddings(ids)
    assert len(seen) == 1 and torch.equal(seen[0], model.item_emb.teacher[torch.tensor([0, 3, 9, CFG.num_items])])


def test_scores_and_gradients_equal_the_whole_table_projection(monkeypatch) -> None:
    """Training mode (dropout drawn from the same seed), repeated and padded ids: the loss and
    every parameter's gradient equal those of projecting the whole teacher table."""
    import copy

    model = DistilledSASRec(CFG, teacher_table(), w_ed=0.7, seed=3).train()
    reference = copy.deepcopy(model)
    history, length = histories()
    history = history.clone()
    history[0, 1] = history[0, 0]  # a repeated id inside a row
    target = torch.tensor([1, 2, 3, 4, 5, 6])
    ids = torch.tensor([[2, 2, CFG.num_items, 14]])
    results = []
    for net in (model, reference):
        if net is reference:
            monkeypatch.setattr(type(net.item_emb), "forward", whole_table_forward)
        torch.manual_seed(11)
        loss = torch.nn.functional.cross_entropy(net.scores(history, length), target) + net.item_embeddings(ids).square().sum()
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == ref_grads.keys() and "item_emb.proj.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)  # summation order differs

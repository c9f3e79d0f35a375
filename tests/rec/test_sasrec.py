"""SASRec model: shapes, padding invariance, causality, save/load, input errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from ilora.errors import IloraError
from ilora.rec.sasrec import SASRec, SASRecConfig, load_sasrec

N_ITEMS, MAX_LEN = 50, 8


def make_model(seed: int = 0, **kw) -> SASRec:
    torch.manual_seed(seed)
    cfg = SASRecConfig(num_items=N_ITEMS, max_len=MAX_LEN, hidden=kw.pop("hidden", 16), **kw)
    model = SASRec(cfg)
    # Move every weight away from its init so that no parameter is trivially zero/one.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def batch(seed: int = 1, b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    length = torch.randint(1, MAX_LEN + 1, (b,), generator=g)
    length[0], length[1] = 1, MAX_LEN
    hist = torch.randint(0, N_ITEMS, (b, MAX_LEN), generator=g)
    pad = torch.arange(MAX_LEN)[None, :] >= length[:, None]
    return hist.masked_fill(pad, N_ITEMS), length


def test_shapes() -> None:
    model = make_model(heads=2, blocks=2)
    hist, length = batch()
    assert model.item_embeddings(torch.tensor([[0, 1, N_ITEMS]])).shape == (1, 3, 16)
    assert model.user_representation(hist, length).shape == (6, 16)
    assert model.scores(hist, length).shape == (6, N_ITEMS)
    assert model(hist, length).shape == (6, N_ITEMS)
    assert model.hidden_states(hist, length).shape == (6, MAX_LEN, 16)
    # Narrower histories than max_len are accepted.
    assert model.scores(hist[:, :5].clamp(max=N_ITEMS - 1), length.clamp(max=5)).shape == (6, N_ITEMS)


def test_item_embeddings_are_the_table_rows() -> None:
    model = make_model()
    ids = torch.tensor([3, N_ITEMS, 0])
    assert torch.equal(model.item_embeddings(ids), model.item_emb.weight[ids])
    with pytest.raises(IloraError):
        model.item_embeddings(torch.tensor([N_ITEMS + 1]))


@pytest.mark.parametrize("blocks,heads", [(1, 1), (2, 4)])
def test_padding_content_does_not_matter(blocks: int, heads: int) -> None:
    model = make_model(blocks=blocks, heads=heads)
    hist, length = batch()
    base_user = model.user_representation(hist, length)
    base_scores = model.scores(hist, length)
    pad = torch.arange(MAX_LEN)[None, :] >= length[:, None]
    for garbage in (torch.randint(0, N_ITEMS, hist.shape), torch.full(hist.shape, -7), torch.full(hist.shape, 10**6)):
        changed = torch.where(pad, garbage, hist)
        assert not torch.equal(changed, hist) or not pad.any()
        torch.testing.assert_close(model.user_representation(changed, length), base_user, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.scores(changed, length), base_scores, rtol=0, atol=1e-5)
    # The padding row of the embedding table plays no role either.
    with torch.no_grad():
        model.item_emb.weight[N_ITEMS] = 1e3
    torch.testing.assert_close(model.user_representation(hist, length), base_user, rtol=0, atol=1e-6)


def test_user_representation_is_the_state_at_length_minus_one() -> None:
    model = make_model(blocks=2, heads=2)
    hist, length = batch()
    states = model.hidden_states(hist, length)
    user = model.user_representation(hist, length)
    for i in range(len(length)):
        torch.testing.assert_close(user[i], states[i, int(length[i]) - 1])
    torch.testing.assert_close(model.scores(hist, length), user @ model.output.weight.T + model.output.bias)


@pytest.mark.parametrize("blocks,heads", [(1, 1), (3, 2)])
def test_causality(blocks: int, heads: int) -> None:
    """Changing the item at position t changes hidden states at positions >= t only."""
    model = make_model(blocks=blocks, heads=heads)
    g = torch.Generator().manual_seed(5)
    hist = torch.randint(0, N_ITEMS, (1, MAX_LEN), generator=g)
    length = torch.tensor([MAX_LEN])
    base = model.hidden_states(hist, length)
    for t in range(MAX_LEN):
        changed = hist.clone()
        changed[0, t] = (hist[0, t] + 1) % N_ITEMS
        out = model.hidden_states(changed, length)
        torch.testing.assert_close(out[0, :t], base[0, :t], rtol=0, atol=0)
        assert not torch.allclose(out[0, t:], base[0, t:])
        # A shorter prefix sees exactly the same computation as the full sequence.
        prefix_user = model.user_representation(hist, torch.tensor([t + 1]))
        torch.testing.assert_close(prefix_user[0], base[0, t], rtol=0, atol=1e-6)


def test_dropout_only_in_train_mode() -> None:
    model = make_model(dropout=0.5)
    hist, length = batch()
    a, b = model.scores(hist, length), model.scores(hist, length)
    assert torch.equal(a, b)
    model.train()
    assert not torch.equal(model.scores(hist, length), model.scores(hist, length))


def test_save_load_round_trip(tmp_path) -> None:
    model = make_model(heads=2, blocks=2, dropout=0.2)
    model.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "config.json"}
    loaded = load_sasrec(tmp_path / "m")
    assert loaded.config == model.config
    assert not loaded.training
    hist, length = batch()
    assert torch.equal(loaded.scores(hist, length), model.scores(hist, length))
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(IloraError, match="not found"):
        load_sasrec(tmp_path / "nothing")
    make_model().save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["hidden"] = 32
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(IloraError, match="shape"):
        load_sasrec(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(IloraError, match="JSON"):
        load_sasrec(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"num_items": 3, "max_len": 2}))
    with pytest.raises(IloraError, match="format"):
        load_sasrec(tmp_path / "m")
    # a float size used to pass the config and fail in torch with a TypeError traceback
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "max_len": 10.0}))
    with pytest.raises(IloraError, match="sizes must be integers"):
        load_sasrec(tmp_path / "m")
    # sizes beyond the weights: checked before anything is allocated (2**40 positions was a 256 TiB allocation
    # error; such a config is now refused by its own bounds, test_a_config_json_cannot_ask_for_an_unbounded_model)
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "hidden": 16, "max_len": 4096}))
    with pytest.raises(IloraError, match=r"model.safetensors: pos_emb.weight has shape \(8, 16\); the SASRec config expects \(4096, 16\)"):
        load_sasrec(tmp_path / "m")
    # a layer_norm_eps that makes every score NaN
    for eps in (0.0, -1.0, float("nan"), float("inf")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "hidden": 16, "layer_norm_eps": eps}))
        with pytest.raises(IloraError, match="layer_norm_eps=.* is not a positive finite number"):
            load_sasrec(tmp_path / "m")


def test_bad_inputs() -> None:
    model = make_model()
    hist, length = batch()
    with pytest.raises(IloraError, match="max_len"):
        model.scores(torch.zeros(2, MAX_LEN + 1, dtype=torch.long), torch.tensor([1, 1]))
    with pytest.raises(IloraError, match=r"history lengths must be in 1\.\.\d+ .*; sample 0 of the batch has length 0"):
        model.scores(hist, length.clamp(max=0))
    with pytest.raises(IloraError, match=r"history lengths must be integers, got torch\.float32"):  # not truncated to 1
        model.scores(hist, length.float() + 0.5)
    with pytest.raises(IloraError, match=r"item ids must be integers, got torch\.float64"):
        model.item_embeddings(np.array([1.0, 2.5]))
    read_only = hist.numpy().copy()
    read_only.flags.writeable = False  # a memory-mapped split: read without torch's warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(model.scores(read_only, length), model.scores(hist, length))
    bad = hist.clone()
    bad[1, 0] = N_ITEMS  # the padding id inside the valid part
    with pytest.raises(IloraError, match="row 1, position 0"):
        model.scores(bad, length)
    with pytest.raises(IloraError, match="divisible"):
        SASRecConfig(num_items=5, max_len=3, hidden=10, heads=3)


def test_a_config_json_cannot_ask_for_an_unbounded_model(tmp_path):
    """A SASRec config.json is checked before anything is built from it: ten million blocks would
    hang even the meta-device build that checks the weights' names."""
    import json

    from ilora.errors import IloraError
    from ilora.rec.sasrec import FORMAT, SASRecConfig

    for change in ({"blocks": 10_000_000}, {"max_len": 10**9}, {"hidden": 2**30, "heads": 1}):
        text = json.dumps({"format": FORMAT, "num_items": 5, "max_len": 5, "hidden": 8, "heads": 1, **change})
        with pytest.raises(IloraError, match=r"config\.json: SASRec config: .*at most 64 blocks, a history of 4096"):
            SASRecConfig.from_json(text, tmp_path / "config.json")

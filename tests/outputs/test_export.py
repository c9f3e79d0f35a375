"""Teacher-output export against slow references (tiny teacher, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ilora.cli.main import main
from ilora.data import SeqDataset, candidate_sets, make_synthetic, write_native
from ilora.errors import ConfigError, DataError, IloraError
from ilora.outputs import read_teacher_outputs
from ilora.outputs.export import ExportOptions, build_pools, export_teacher_outputs, sasrec_top_unseen, score_pool, select_top_k
from ilora.outputs.format import read_manifest
from ilora.rec.sasrec import SASRec, SASRecConfig
from ilora.teacher.adapters import gated_lora_modules
from ilora.teacher.build import build_teacher, save_teacher
from ilora.teacher.config import TeacherConfig

SMALL = dict(tiny_hidden=32, tiny_layers=2, tiny_heads=4, tiny_vocab=300, lora_dropout=0.0, max_title_tokens=8, num_candidates=6)


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic(users=40, items=30, seed=3)


def make_teacher(dataset, directory, seed=1):
    torch.manual_seed(0)
    rec = SASRec(SASRecConfig(num_items=dataset.num_items, max_len=dataset.max_len, hidden=16, dropout=0.0)).eval()
    bundle = build_teacher(TeacherConfig(**SMALL), dataset.catalog, rec)
    torch.manual_seed(seed)
    for layer in gated_lora_modules(bundle.teacher.llm).values():
        layer.reset_lora_parameters("random")  # experts differ, so the gate matters
    save_teacher(bundle, directory, dataset.catalog)
    bundle.teacher.eval()
    return bundle


@pytest.fixture(scope="module")
def teacher(dataset, tmp_path_factory):
    directory = tmp_path_factory.mktemp("teacher")
    return make_teacher(dataset, directory), directory


def export(bundle_dir, dataset, out, **kw):
    bundle, directory = bundle_dir
    on_shard = kw.pop("on_shard", None)
    overwrite = kw.pop("overwrite", False)
    return export_teacher_outputs(bundle, dataset, out, ExportOptions(**kw), teacher_dir=directory, overwrite=overwrite, on_shard=on_shard)


# -- slow references ------------------------------------------------------------------------


def answer_logprob(bundle, history, length, shown, item) -> float:
    """log p(title + eos of ``item`` | prompt): one full-sequence HF forward, float64 log-softmax."""
    teacher = bundle.teacher
    one = bundle.train_collator.build(history[None], length[None], shown[None], np.array([item]))
    gates = teacher.gates(one.history, one.length, "learned")
    position_ids = (one.attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad(), teacher.gate_state.use(gates):
        logits = teacher.llm(inputs_embeds=teacher.embed(one), attention_mask=one.attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[0].double(), -1)
    answer = (one.labels[0] != -100).nonzero().flatten()
    return sum(float(logp[t - 1, one.labels[0, t]]) for t in answer)


def reference_rows(bundle, split, name, num_items, top_k, n_sasrec, n_cands):
    """Per sample: the pool built item by item, every item scored alone, softmax, sorted."""
    shown_count = n_cands or SMALL["num_candidates"]
    shown = candidate_sets(split, num_items, count=shown_count, seed=0, split_name=name)
    rows = []
    for b in range(len(split)):
        hist = split.history[b, : split.length[b]].tolist()
        with torch.no_grad():
            rec_scores = bundle.teacher.rec.scores(torch.as_tensor(split.history[b : b + 1]), torch.as_tensor(split.length[b : b + 1]))[0]
        ranked = sorted(range(num_items), key=lambda i: -float(rec_scores[i]))
        unseen = [i for i in ranked if i not in hist][:n_sasrec]
        pool = list(dict.fromkeys((shown[b].tolist() if n_cands else []) + unseen))
        scores = np.array([answer_logprob(bundle, split.history[b], split.length[b], shown[b], i) for i in pool])
        conf = np.exp(scores - scores.max())
        conf /= conf.sum()
        order = np.argsort(-scores, kind="stable")[:top_k]
        rows.append((np.array(pool)[order], scores[order], conf[order]))
    return rows


@pytest.mark.parametrize("n_sasrec,n_cands", [(6, 5), (8, 0), (0, 6)])
def test_top_k_and_confidence_equal_the_slow_reference(teacher, dataset, tmp_path, n_sasrec, n_cands):
    bundle = teacher[0]
    out = export(teacher, dataset, tmp_path / "o", splits=("val",), top_k=4, pool_sasrec=n_sasrec, pool_candidates=n_cands, limit=5, batch_size=3)
    got = read_teacher_outputs(out.out, ("val",)).split("val")
    split = dataset.split("val").subset(slice(0, 5))
    expected = reference_rows(bundle, split, "val", dataset.num_items, 4, n_sasrec, n_cands)
    for b, (items, scores, conf) in enumerate(expected):
        np.testing.assert_array_equal(got.topk_items[b], items)
        np.testing.assert_allclose(got.topk_scores[b], scores, atol=1e-4)
        np.testing.assert_allclose(got.topk_confidence[b], conf, atol=1e-5)
    h, n = torch.as_tensor(split.history), torch.as_tensor(split.length)
    with torch.no_grad():
        np.testing.assert_allclose(got.gate, bundle.teacher.gates(h, n, "learned").numpy(), atol=1e-6)
        np.testing.assert_allclose(got.user_embedding, bundle.teacher.rec.user_representation(h, n).numpy(), atol=1e-6)


def test_item_embeddings_are_mean_title_hidden_states_with_the_uniform_gate(teacher, dataset, tmp_path):
    bundle = teacher[0]
    out = export(teacher, dataset, tmp_path / "o", splits=("val",), top_k=2, pool_sasrec=3, pool_candidates=0, limit=1)
    emb = read_teacher_outputs(out.out, ("val",)).item_embeddings
    t = bundle.teacher
    assert emb.shape == (dataset.num_items, t.llm.config.hidden_size) and emb.dtype == np.float32
    uniform = torch.full((1, t.num_experts), 1.0 / t.num_experts)
    for item in (0, 7, dataset.num_items - 1):
        ids = t.title_table.ids[item, : t.title_table.length[item]][None]
        with torch.no_grad(), t.gate_state.use(uniform):
            hidden = t.llm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        np.testing.assert_allclose(emb[item], hidden.mean(0).numpy(), atol=1e-5)
    # a replaced item-embedding file is refused (its sha256 is in the manifest), unless verify=False
    from safetensors.numpy import save_file

    save_file({"item_embeddings": np.zeros_like(emb)}, str(tmp_path / "o" / "item_embeddings.safetensors"))
    with pytest.raises(IloraError, match="item_embeddings.safetensors: checksum does not match"):
        read_teacher_outputs(out.out, ("val",))
    assert not read_teacher_outputs(out.out, ("val",), verify=False).item_embeddings.any()


# -- pools ----------------------------------------------------------------------------------


def test_pools_deduplicate_compact_and_pad_with_a_masked_repeat():
    cands = torch.tensor([[3, 1, 4], [5, 9, 2]])
    sasrec = torch.tensor([[1, 5, 9, 2], [7, 5, 8, 6]])
    s_valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    pool, mask = build_pools([(cands, torch.ones_like(cands, dtype=torch.bool)), (sasrec, s_valid)])
    expected = [[3, 1, 4, 5, 9, 2], [5, 9, 2, 7]]
    assert pool.shape == (2, 6)
    for b, row in enumerate(expected):
        assert pool[b, mask[b]].tolist() == row
        assert (pool[b, ~mask[b]] == row[0]).all()


def test_sasrec_top_unseen_leaves_out_every_history_item_next_to_padding():
    """Against a per-row Python reference; item 0 in padded histories included (the padding
    slots must not clear it)."""
    gen = torch.Generator().manual_seed(0)
    n_items, width, n = 12, 5, 4
    history = torch.randint(0, n_items, (64, width), generator=gen)
    history[::3, 0] = 0
    length = torch.randint(0, width + 1, (64,), generator=gen)
    history[torch.arange(width)[None, :] >= length[:, None]] = n_items  # padding id
    scores = torch.randn(64, n_items, generator=gen)
    ids, valid = sasrec_top_unseen(scores, history, length, n)
    for b in range(64):
        seen = set(history[b, : int(length[b])].tolist())
        order = sorted(range(n_items), key=lambda i: -float(scores[b, i]))
        expected = [i for i in order if i not in seen][:n]
        assert ids[b, valid[b]].tolist() == expected, b
        assert int(valid[b].sum()) == len(expected)
    assert any(0 in history[b, : int(length[b])].tolist() and int(length[b]) < width for b in range(64))


def test_padding_is_never_selected_and_gets_no_confidence():
    pool = torch.tensor([[3, 1, 4, 5], [5, 9, 5, 5]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    scores = torch.tensor([[-3.0, -1.0, -2.0, -4.0], [-2.0, -1.0, 50.0, 50.0]])  # padding scores highest
    top = select_top_k(scores, pool, mask, 2)
    assert top.items.tolist() == [[1, 4], [9, 5]]
    expected = torch.softmax(torch.tensor([-2.0, -1.0]), 0)
    torch.testing.assert_close(top.confidence[1], expected.flip(0))
    with pytest.raises(IloraError, match="sample 1: its candidate pool has 2 items, fewer than top-k 3"):
        select_top_k(scores, pool, mask, 3)


def test_a_nan_score_of_a_real_pool_item_is_an_error_naming_the_sample():
    pool = torch.tensor([[3, 1, 4, 5], [5, 9, 6, 5]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    nan_in_padding = torch.tensor([[-3.0, -1.0, -2.0, -4.0], [-2.0, float("-inf"), -1.0, float("nan")]])
    top = select_top_k(nan_in_padding, pool, mask, 2)  # padding is never ranked; -inf is a valid score
    assert top.items.tolist() == [[1, 4], [6, 5]] and not torch.isnan(top.confidence).any()
    scores = nan_in_padding.clone()
    scores[1, 2] = float("nan")
    with pytest.raises(IloraError, match="val sample 41: the teacher's score of pool item 6 is nan"):
        select_top_k(scores, pool, mask, 2, "val sample", first_row=40)
    scores[1, 2] = float("inf")
    with pytest.raises(IloraError, match="val sample 41: the teacher's score of pool item 6 is inf"):
        select_top_k(scores, pool, mask, 2, "val sample", first_row=40)
    # a row whose every real score is -inf would get NaN confidences, which the reader refuses
    scores[1, :3] = float("-inf")
    with pytest.raises(IloraError, match="val sample 41: the teacher scores every item of its pool -inf"):
        select_top_k(scores, pool, mask, 2, "val sample", first_row=40)


def test_top_k_beyond_the_pool_is_refused_before_any_work(teacher, dataset, tmp_path):
    with pytest.raises(ConfigError, match="top-k 12 exceeds"):
        export(teacher, dataset, tmp_path / "o", splits=("val",), top_k=12, pool_sasrec=6, pool_candidates=5)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="both 0"):
        ExportOptions(pool_sasrec=0, pool_candidates=0)
    # candidate sets a row cannot fill (30 items; a history of up to 10): refused before the first shard,
    # not after the manifest, the item embeddings and the shards before that row were written
    with pytest.raises(DataError, match="train split.*cannot draw 27 negatives"):
        export(teacher, dataset, tmp_path / "o", splits=("train",), top_k=2, pool_sasrec=2, pool_candidates=28, shard_rows=5)
    assert not (tmp_path / "o").exists()


def test_training_loss_and_export_share_the_model_call_and_agree_on_the_prompt(teacher, dataset):
    """Both paths go through `teacher.run`: the training forward on prompt + answer and the
    export's forward on the prompt alone give the same hidden states at every prompt token
    (causal attention: a prompt token never sees the answer)."""
    bundle = teacher[0]
    t = bundle.teacher
    split = dataset.split("train").subset(slice(0, 4))
    cands = candidate_sets(split, dataset.num_items, count=5, seed=0, split_name="train")
    train_batch = bundle.train_collator.build(split.history, split.length, cands, split.target)
    prompt_batch = bundle.prompt_collator.build(split.history, split.length, cands)
    seen = []
    original = t.run

    def recording_run(b, gate_mode="learned", use_cache=False):
        out = original(b, gate_mode, use_cache)
        seen.append((b, out.hidden.detach().clone()))
        return out

    t.run = recording_run
    try:
        with torch.no_grad():
            t.loss(train_batch)
            pool, mask = build_pools([(prompt_batch.candidates, torch.ones_like(prompt_batch.candidates, dtype=torch.bool))])
            score_pool(t, prompt_batch, pool, mask, 3, "learned")
    finally:
        del t.run
    assert len(seen) == 2 and seen[0][0] is train_batch and seen[1][0] is prompt_batch
    (_, trained), (_, exported) = seen
    for b in range(4):
        in_prompt = train_batch.attention_mask[b].bool() & (torch.arange(train_batch.input_ids.shape[1]) < train_batch.answer_start[b])
        real = prompt_batch.attention_mask[b].bool()
        assert torch.equal(train_batch.input_ids[b][in_prompt], prompt_batch.input_ids[b][real])
        torch.testing.assert_close(trained[b][in_prompt], exported[b][real], rtol=1e-5, atol=1e-5)


# -- streaming, resume, identity ------------------------------------------------------------

OPTS = dict(splits=("train",), top_k=3, pool_sasrec=4, pool_candidates=3, limit=22, shard_rows=5, batch_size=2)


class Interrupt(Exception):
    pass


def export_stopped_after(teacher, dataset, out, shard: int) -> None:
    """An export (`OPTS`) killed right after committing shard ``shard``: its manifest lists it."""

    def stop(split, number):
        if number == shard:
            raise Interrupt

    with pytest.raises(Interrupt):
        export(teacher, dataset, out, on_shard=stop, **OPTS)


def test_interrupted_export_resumes_to_the_same_files(teacher, dataset, tmp_path, caplog):
    whole = export(teacher, dataset, tmp_path / "whole", **OPTS)
    assert whole.rows == 22 and whole.written == 22

    export_stopped_after(teacher, dataset, tmp_path / "cut", shard=1)
    partial = read_manifest(tmp_path / "cut")["splits"]["train"]
    assert [s["rows"] for s in partial["shards"]] == [5, 5] and not partial["complete"]
    with pytest.raises(IloraError, match=r"the train export is incomplete \(10 of 22 samples written; run the same `ilora teacher export`"):
        read_teacher_outputs(tmp_path / "cut")
    (tmp_path / "cut/train/part-00002.parquet").write_bytes(b"half a shard")  # killed while writing
    (tmp_path / "cut/train/.part-00003.parquet.tmp").write_bytes(b"junk")
    leftovers = []

    def look_for_leftovers(split, number):
        leftovers.append(sorted(p.name for p in (tmp_path / "cut/train").iterdir() if p.name.startswith(".")))

    with caplog.at_level("INFO", logger="ilora.outputs.export"):
        resumed = export(teacher, dataset, tmp_path / "cut", on_shard=look_for_leftovers, **OPTS)
    assert resumed.written == 12 and resumed.rows == 22
    assert "the train split resumed after 10 of its 22 samples" in caplog.text
    assert leftovers[0] == []  # unlisted files were discarded before the first new shard

    a, b = read_manifest(tmp_path / "whole"), read_manifest(tmp_path / "cut")
    assert [(s["file"], s["rows"], s["sha256"]) for s in a["splits"]["train"]["shards"]] == [
        (s["file"], s["rows"], s["sha256"]) for s in b["splits"]["train"]["shards"]
    ]
    assert sorted(p.name for p in (tmp_path / "cut/train").iterdir()) == [f"part-0000{i}.parquet" for i in range(5)]
    assert a["dllm2rec"] == b["dllm2rec"] and a["item_embeddings"] == b["item_embeddings"]
    x, y = read_teacher_outputs(tmp_path / "whole").split("train"), read_teacher_outputs(tmp_path / "cut").split("train")
    for col in ("topk_items", "topk_scores", "topk_confidence", "gate", "user_embedding"):
        assert np.array_equal(getattr(x, col), getattr(y, col)), col
    assert len(x) == 22
    with caplog.at_level("INFO", logger="ilora.outputs.export"):
        again = export(teacher, dataset, tmp_path / "cut", **OPTS)  # a complete export: nothing left to do
    assert again.written == 0 and "the train split already exported whole (22 samples)" in caplog.text
    (tmp_path / "cut/train/part-00001.parquet").write_bytes(b"changed")
    with pytest.raises(IloraError, match="missing or changed"):
        export(teacher, dataset, tmp_path / "cut", **OPTS)


def test_an_export_stopped_after_its_last_shard_is_listed_resumes_without_scoring_again(teacher, dataset, tmp_path):
    """Killed between listing the last (partial: 22 rows in shards of 5) shard and marking the
    split complete: the resume scores nothing, marks it complete, and the files read back as
    an uninterrupted export's."""
    whole = export(teacher, dataset, tmp_path / "whole", **OPTS)

    export_stopped_after(teacher, dataset, tmp_path / "cut", shard=4)  # the last
    cut = read_manifest(tmp_path / "cut")["splits"]["train"]
    assert [s["rows"] for s in cut["shards"]] == [5, 5, 5, 5, 2] and not cut["complete"]
    resumed = export(teacher, dataset, tmp_path / "cut", **OPTS)
    assert resumed.written == 0 and resumed.rows == whole.rows == 22
    a, b = read_manifest(tmp_path / "whole")["splits"]["train"], read_manifest(tmp_path / "cut")["splits"]["train"]
    assert b["complete"] and b["rows"] == 22 and [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    x, y = read_teacher_outputs(tmp_path / "whole").split("train"), read_teacher_outputs(tmp_path / "cut").split("train")
    assert np.array_equal(x.topk_items, y.topk_items) and np.array_equal(x.topk_confidence, y.topk_confidence)


def test_a_manifest_whose_shard_list_is_not_the_exports_own_is_refused_on_resume(teacher, dataset, tmp_path):
    out = tmp_path / "o"

    export_stopped_after(teacher, dataset, out, shard=1)
    manifest = read_manifest(out)
    shards = manifest["splits"]["train"]["shards"]
    shards.append(dict(shards[-1]))  # the same shard listed twice
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IloraError, match=r"shard 2 is 'train/part-00001.parquet' with 5 rows from row 5, expected train/part-00002.parquet"):
        export(teacher, dataset, out, **OPTS)
    from ilora.outputs.export import _verified_shards

    info = {"shards": [{"file": "train/part-00000.parquet", "first_index": 0, "rows": 5, "sha256": "x"}]}
    with pytest.raises(IloraError, match=r"lists 1 train shards, more than 0 samples in shards of 5 need"):
        _verified_shards(out, "train", info, 5, 0)


def test_another_teacher_or_options_are_refused_unless_overwrite(teacher, dataset, tmp_path):
    out = tmp_path / "o"
    export(teacher, dataset, out, **{**OPTS, "limit": 4})
    with pytest.raises(IloraError, match=r"holds an export that differs in top_k \(3 -> 2\)"):
        export(teacher, dataset, out, **{**OPTS, "limit": 4, "top_k": 2})
    with pytest.raises(IloraError, match=r"holds an export that differs in options \(limit: 4 -> 5\); use another"):
        export(teacher, dataset, out, **{**OPTS, "limit": 5})
    shifted = SeqDataset(dataset.catalog, {"train": dataset.split("train").subset(slice(1, None))}, source="shifted")
    with pytest.raises(IloraError, match="other train samples"):
        export(teacher, shifted, out, **{**OPTS, "limit": 4})
    other = make_teacher(dataset, tmp_path / "t2", seed=7)
    # another teacher: its teacher_config.json (which fingerprints its weights) and its weights differ
    with pytest.raises(IloraError, match="(config|weights)_sha256"):
        export((other, tmp_path / "t2"), dataset, out, **{**OPTS, "limit": 4})
    result = export((other, tmp_path / "t2"), dataset, out, overwrite=True, **{**OPTS, "limit": 4})
    assert result.written == 4
    assert read_manifest(out)["teacher"]["path"] == str((tmp_path / "t2").resolve())
    # --overwrite replaces an export whose manifest this ilora cannot read (another version) ...
    (out / "manifest.json").write_text('{"format": "ilora-teacher-outputs", "version": 0}')
    with pytest.raises(IloraError, match="manifest.json: format version 0"):
        export(teacher, dataset, out, **{**OPTS, "limit": 4})
    assert export(teacher, dataset, out, overwrite=True, **{**OPTS, "limit": 4}).written == 4
    # ... but not a file it cannot tell is one of its own: another program's, one without a format, not JSON
    for text, match in [
        ('{"format": "something-else"}', "format 'something-else', not an ilora teacher-outputs manifest"),
        ('{"name": "my web app"}', "format None, not an ilora teacher-outputs manifest"),
        ("[1, 2]", "a JSON list, not an ilora teacher-outputs manifest"),
        ('{"format": "ilora-tea', "not readable JSON"),
    ]:
        (out / "manifest.json").write_text(text)
        with pytest.raises(IloraError, match=match):
            export(teacher, dataset, out, overwrite=True, **{**OPTS, "limit": 4})
        assert (out / "manifest.json").read_text() == text
    foreign = tmp_path / "foreign"
    (foreign / "train").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    (foreign / "train/part-00000-4f1c.snappy.parquet").write_text("a Spark part file")
    with pytest.raises(IloraError, match="not empty"):
        export(teacher, dataset, foreign, **OPTS)
    # --overwrite of a directory without a manifest deletes only files named as an export names its own
    assert export(teacher, dataset, foreign, overwrite=True, **{**OPTS, "limit": 4}).written == 4
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "train/part-00000-4f1c.snappy.parquet").is_file()
    assert read_teacher_outputs(foreign).split("train").topk_items.shape[0] == 4


def test_cli_export_json(teacher, dataset, tmp_path, capsys):
    data = tmp_path / "data"
    write_native(dataset, data)
    base = ["teacher", "export", str(data), "--teacher", str(teacher[1]), "--out", str(tmp_path / "o")]
    args = base + ["--splits", "train,val", "--limit", "4", "--top-k", "3", "--pool-sasrec", "4", "--pool-candidates", "3", "--shard-rows", "3", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 8 and result["splits"] == {"train": 4, "val": 4} and result["out"] == str(tmp_path / "o")
    assert result["seconds"] > 0 and result["samples_per_s"] > 0 and result["dllm2rec"]
    outputs = read_teacher_outputs(tmp_path / "o", ("train", "val"))
    assert outputs.split("val").topk_items.shape == (4, 3)
    val_only = [a if a != "train,val" else "val" for a in args]
    assert main(val_only) == 0 and json.loads(capsys.readouterr().out)["dllm2rec"]  # the train export's files are still there
    assert main([*val_only[:-1], "--out", str(tmp_path / "v"), "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["dllm2rec"]  # val alone writes none
    assert main(base + ["--top-k", "40", "--pool-sasrec", "4", "--pool-candidates", "3"]) == 2
    assert "top-k 40 exceeds" in capsys.readouterr().err


def test_cli_export_refuses_what_the_shards_would_before_loading_the_teacher(teacher, dataset, tmp_path, capsys, monkeypatch):
    """Candidate sets a row cannot fill, and a pool of the target alone, are refused before the
    teacher loads (minutes at 7B), not after."""
    import ilora.teacher.build as build

    def load_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(build, "load_teacher", load_teacher)
    data = tmp_path / "data"
    write_native(dataset, data)
    base = ["teacher", "export", str(data), "--teacher", str(teacher[1]), "--out", str(tmp_path / "o"), "--top-k", "2", "--pool-sasrec", "2"]
    assert main(base + ["--pool-candidates", "28"]) == 2
    assert "cannot draw 27 negatives" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it
        main(base + ["--pool-candidates", "1"])
    assert exit_info.value.code == 2 and "must be 0 (none) or >= 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="pool-candidates: must be 0 \\(none\\) or >= 2"):
        ExportOptions(pool_candidates=1)


def test_a_train_export_dllm2rec_cannot_read_as_it_is_warns_and_says_why_in_the_manifest(teacher, dataset, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="ilora.outputs.export"):
        export(teacher, dataset, tmp_path / "one", **{**OPTS, "top_k": 1, "limit": 2})
    assert "DLLM2Rec's files: top_k 1: DLLM2Rec reads myrank_train.txt with np.loadtxt" in caplog.text
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["dllm2rec"]["problems"] == ["top_k 1: DLLM2Rec reads myrank_train.txt with np.loadtxt, which loads a single "
                                               "column as a 1-D array that its [:, :K] slicing fails on (export with --top-k >= 2)"]
    caplog.clear()
    import dataclasses

    without_val = dataclasses.replace(dataset, splits={**dataset.splits, "val": None})
    with caplog.at_level("WARNING", logger="ilora.outputs.export"):
        export(teacher, without_val, tmp_path / "noval", **{**OPTS, "top_k": 2, "limit": 2})
    problem = "the val split is absent, so data/val_data.csv is not written; DLLM2Rec evaluates it every epoch"
    assert f"DLLM2Rec's files: {problem}" in caplog.text
    assert json.loads((tmp_path / "noval" / "manifest.json").read_text())["dllm2rec"]["problems"] == [problem]
    data = tmp_path / "noval" / "dllm2rec" / "data"
    assert not (data / "val_data.csv").exists() and (data / "test_data.csv").is_file()
    caplog.clear()
    with caplog.at_level("WARNING", logger="ilora.outputs.export"):
        export(teacher, dataset, tmp_path / "two", **{**OPTS, "top_k": 2, "limit": 2})
        export(teacher, dataset, tmp_path / "val", **{**OPTS, "splits": ("val",), "top_k": 1, "limit": 2})
    assert "DLLM2Rec" not in caplog.text


def test_a_sliding_window_the_export_would_exceed_is_refused_before_anything_is_written(dataset, tmp_path, monkeypatch, sliding_window_llm):
    """An LLM whose sliding window is shorter than a batch's padded prompts plus its longest
    pool answer is refused from token counts and pools before the manifest or a shard is
    written, at exactly the width the export's own batches reach (shard-local batches: 11
    rows in shards of 5 and batches of 3; pools of fixed candidates and SASRec's top items)."""
    rec = SASRec(SASRecConfig(num_items=dataset.num_items, max_len=dataset.max_len, hidden=16, dropout=0.0)).eval()
    bundle = build_teacher(TeacherConfig(**{**SMALL, "llm": sliding_window_llm(dataset.catalog.titles, 4096)}), dataset.catalog, rec)
    save_teacher(bundle, tmp_path / "teacher", dataset.catalog)
    teacher = bundle.teacher.eval()
    widths: list[int] = []
    score = teacher.score_candidates

    def recording(prompts, pool, gate="learned"):  # the width score_candidates compares with the window
        widths.append(prompts.input_ids.shape[1] + teacher.title_table.answer_tokens(pool.reshape(-1))[0].shape[-1])
        return score(prompts, pool, gate)

    monkeypatch.setattr(teacher, "score_candidates", recording)
    opts = dict(splits=("val",), top_k=3, pool_sasrec=4, pool_candidates=4, shard_rows=5, batch_size=3, limit=11)
    export((bundle, tmp_path / "teacher"), dataset, tmp_path / "wide", **opts)
    needed = max(widths)
    assert len(widths) == 2 + 2 + 1  # shards of 5, 5 and 1 rows, each in batches of 3
    teacher.llm.config.sliding_window = needed
    widths.clear()
    export((bundle, tmp_path / "teacher"), dataset, tmp_path / "fits", **opts)
    assert max(widths) == needed
    teacher.llm.config.sliding_window = needed - 1
    widths.clear()
    with pytest.raises(IloraError, match=rf"sliding window of {needed - 1} tokens.*of the val split"):
        export((bundle, tmp_path / "teacher"), dataset, tmp_path / "refused", **opts)
    assert widths == [] and not (tmp_path / "refused" / "manifest.json").exists()


def test_the_export_bar_moves_with_every_batch_scored(teacher, dataset, tmp_path, monkeypatch):
    """It moved once per shard: a redirected log showed nothing for minutes (8,192 rows a shard)."""
    import ilora.outputs.export as export_module

    moves: list[int] = []

    class Bar:
        def __init__(self, **kwargs):
            assert kwargs["total"] == 11 and kwargs["initial"] == 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            moves.append(n)

    monkeypatch.setattr(export_module, "progress", Bar)
    export(teacher, dataset, tmp_path / "o", splits=("val",), top_k=2, pool_sasrec=3, pool_candidates=0, shard_rows=5, batch_size=3, limit=11)
    assert [n for n in moves if n] == [3, 2, 3, 2, 1]  # shards of 5, 5 and 1 rows in batches of 3

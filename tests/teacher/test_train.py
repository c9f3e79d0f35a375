"""Teacher training: its data plan (length-grouped batches, prompt lengths), one step's loss and
gradient over micro-batches, runs in a used out directory, and the inputs it refuses."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ilora.teacher.batch import PromptCollator, TitleTable
from ilora.teacher.config import TeacherConfig
from ilora.teacher.prompts import load_template
from ilora.teacher.tiny import add_placeholder_tokens, build_tiny_tokenizer
from ilora.teacher.train import GROUP_WINDOW, epoch_plan, length_grouped

TITLES = ["Enigma", "Moby", "Café Del Mar", "AC/DC", "Sigur Rós", "Bj", "The Very Long Name Of A Band"]


def test_token_counts_are_the_lengths_of_the_built_prompts() -> None:
    tok = build_tiny_tokenizer(TITLES + list(load_template("music").pieces) * 5, vocab_size=300)
    ph = add_placeholder_tokens(tok)
    titles = TITLES
    table = TitleTable.build(tok, titles)
    rng = np.random.default_rng(0)
    history = rng.integers(0, len(titles), (9, 5))
    length = rng.integers(0, 6, 9)
    history[np.arange(5)[None, :] >= length[:, None]] = len(titles)  # padding id
    candidates, target = rng.integers(0, len(titles), (9, 3)), rng.integers(0, len(titles), 9)
    for with_answer in (True, False):
        collator = PromptCollator(tok, load_template("music"), table, ph, with_answer=with_answer)
        built = collator.build(history, length, candidates, target if with_answer else None)
        counts = collator.token_counts(history, length, candidates, target if with_answer else None)
        assert torch.equal(counts, built.attention_mask.sum(1))


def _padded_tokens(order: np.ndarray, lengths: np.ndarray, b: int) -> int:
    return sum(int(lengths[order[i : i + b]].max()) * len(order[i : i + b]) for i in range(0, len(order), b))


@pytest.mark.parametrize("n", [1, 7, 64 * 4, 64 * 4 * 2 + 13])
def test_length_grouped_batches_are_length_sorted_windows_shuffled(n: int) -> None:
    b = 4
    rng = np.random.default_rng(n)
    lengths = rng.integers(50, 300, n)
    order = rng.permutation(n)
    grouped = length_grouped(order, lengths, b, np.random.default_rng(1))
    assert sorted(grouped.tolist()) == list(range(n))  # same samples, each once
    # reference: each window of the permutation, sorted longest first and cut into batches
    window = GROUP_WINDOW * b
    expected = []
    for w in range(0, n, window):
        part = order[w : w + window]
        part = part[np.argsort(-lengths[part], kind="stable")]
        expected += [tuple(part[i : i + b]) for i in range(0, len(part), b)]
    got = [tuple(grouped[i : i + b]) for i in range(0, n, b)]
    assert sorted(got) == sorted(expected)
    if n % b:
        assert got[-1] == expected[-1]  # the partial batch stays last
    assert _padded_tokens(grouped, lengths, b) <= _padded_tokens(order, lengths, b)


def test_the_plan_groups_only_when_asked() -> None:
    cfg = TeacherConfig(batch_size=8, seed=2)
    lengths = np.random.default_rng(0).integers(10, 100, 300)
    plain = epoch_plan(300, cfg, 0, 0, 100)
    grouped = epoch_plan(300, cfg, 0, 0, 100, lengths)
    flat = lambda plan: np.concatenate([idx for idx, _ in plan])  # noqa: E731
    assert sorted(flat(plain).tolist()) == sorted(flat(grouped).tolist()) == list(range(300))
    assert not np.array_equal(flat(plain), flat(grouped))
    spread = lambda plan: np.mean([np.ptp(lengths[idx]) for idx, _ in plan])  # noqa: E731
    assert spread(grouped) < spread(plain) / 4
    # the curriculum flags are drawn per step, not per sample: the same in both plans
    assert all(np.array_equal(f1, f2) for (_, f1), (_, f2) in zip(plain, grouped, strict=True))


SMALL = dict(tiny_hidden=32, tiny_layers=2, tiny_heads=4, tiny_vocab=300, lora_dropout=0.0, max_title_tokens=8)
WITHOUT_TINY = {k: v for k, v in SMALL.items() if not k.startswith("tiny_")}  # for a base LLM given by path


def test_a_new_run_in_a_used_out_keeps_its_own_sasrec_and_resume_refuses_another(tmp_path) -> None:
    import dataclasses

    from ilora.data import make_synthetic
    from ilora.errors import IloraError
    from ilora.rec.sasrec import SASRec, SASRecConfig, load_sasrec
    from ilora.teacher.build import load_teacher
    from ilora.teacher.train import train_teacher

    ds = make_synthetic(users=40, items=30, seed=5)
    for s in (0, 1):
        torch.manual_seed(s)
        SASRec(SASRecConfig(num_items=ds.num_items, max_len=ds.max_len, hidden=16)).save(tmp_path / f"rec{s}")
    out = tmp_path / "out"
    first = TeacherConfig(**SMALL, max_steps=2, batch_size=4, val_samples=4, checkpoint_every=1)
    second = dataclasses.replace(first, seed=1)
    train_teacher(ds, first, tmp_path / "rec0", out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(IloraError, match=r"holds a finished run \(train_summary.json\); pass --resume to continue or return it, --overwrite to start over"):
        train_teacher(ds, second, tmp_path / "rec1", out)  # a re-typed command must not delete the trained teacher
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    killed = tmp_path / "killed"  # killed after saving its best teacher, without checkpoints (checkpoint_every=0)
    killed.mkdir()
    (killed / "teacher_config.json").write_text("{}")
    with pytest.raises(IloraError, match="holds an earlier run's teacher_config.json; pass --overwrite to replace it"):
        train_teacher(ds, second, tmp_path / "rec1", killed)
    with pytest.raises(IloraError, match="teacher_config.json but no checkpoint or finished run to resume; pass --overwrite"):
        train_teacher(ds, second, tmp_path / "rec1", killed, resume=True)
    train_teacher(ds, second, tmp_path / "rec1", out, overwrite=True)  # a fresh run into the same out
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # the first run's events are gone: one curve per tag
    assert [row.split(",")[0] for row in (out / "train_steps.csv").read_text().splitlines()[1:]] == ["1", "2"]
    loaded = load_teacher(out, ds.catalog)
    assert torch.equal(loaded.teacher.rec.item_emb.weight, load_sasrec(tmp_path / "rec1").item_emb.weight)
    with pytest.raises(IloraError, match="another SASRec"):  # the finished run read rec1
        train_teacher(ds, second, tmp_path / "rec0", out, resume=True)
    (out / "train_summary.json").unlink()  # now an interrupted run with a checkpoint at step 1
    with pytest.raises(IloraError, match="another SASRec"):
        train_teacher(ds, second, tmp_path / "rec0", out, resume=True)
    # another dataset with the same catalog (other samples): refused as well
    other_ds = make_synthetic(users=41, items=30, seed=5)
    assert other_ds.catalog.titles == ds.catalog.titles and other_ds.sha256() != ds.sha256()
    with pytest.raises(IloraError, match="dataset"):
        train_teacher(other_ds, second, tmp_path / "rec1", out, resume=True)
    assert train_teacher(ds, second, tmp_path / "rec1", out, resume=True)["resumed_from"] == 1
    # a fresh run that stops before its first save leaves no teacher that loads (not the old one)
    from ilora.distributed import SINGLE
    from ilora.teacher.train import _open_run

    assert load_teacher(out, ds.catalog) is not None
    assert list(out.glob("trainer_state.*"))
    _open_run(out, second, {}, False, SINGLE, overwrite=True)
    with pytest.raises(IloraError, match="teacher_config.json"):
        load_teacher(out, ds.catalog)
    assert not list(out.glob("trainer_state.*"))  # nor the earlier run's final optimiser state



def test_a_run_resumes_with_smaller_micro_batches_and_gradient_checkpointing(tmp_path) -> None:
    """What a run that ran out of memory needs: resumed with micro_batch_size 2 (was 4) and
    gradient checkpointing on, it ends with the uninterrupted run's weights (up to rounding:
    the step's loss and gradient do not depend on either)."""
    import shutil

    from ilora.data import make_synthetic
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.build import load_teacher
    from ilora.teacher.train import train_teacher

    ds = make_synthetic(users=40, items=30, seed=5)
    torch.manual_seed(0)
    SASRec(SASRecConfig(num_items=ds.num_items, max_len=ds.max_len, hidden=16)).save(tmp_path / "rec")
    cfg = TeacherConfig(**SMALL, max_steps=3, batch_size=4, val_samples=4, checkpoint_every=1, curriculum=False)
    train_teacher(ds, cfg, tmp_path / "rec", tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "killed")
    (tmp_path / "killed" / "train_summary.json").unlink()  # as if killed after its checkpoint of step 2
    smaller = dataclasses.replace(cfg, micro_batch_size=2, gradient_checkpointing=True)
    assert train_teacher(ds, smaller, tmp_path / "rec", tmp_path / "killed", resume=True)["resumed_from"] == 2
    weights = {}
    for run in ("full", "killed"):
        teacher = load_teacher(tmp_path / run, ds.catalog).teacher
        weights[run] = {n: p.detach() for n, p in teacher.named_parameters() if p.requires_grad}
    assert weights["full"].keys() == weights["killed"].keys()
    for name, full in weights["full"].items():
        torch.testing.assert_close(weights["killed"][name], full, rtol=1e-4, atol=1e-6, msg=name)
    from ilora.errors import IloraError

    (tmp_path / "killed" / "train_summary.json").unlink()
    with pytest.raises(IloraError, match=r"lr: 0\.0007 -> 0\.001"):  # what the computation depends on is still refused
        train_teacher(ds, dataclasses.replace(cfg, lr=1e-3), tmp_path / "rec", tmp_path / "killed", resume=True)

    # a finished run without its train_config.json is refused, not retrained
    shutil.copytree(tmp_path / "full", tmp_path / "no-config")
    (tmp_path / "no-config" / "train_config.json").unlink()
    with pytest.raises(IloraError, match="holds a finished run's train_summary.json but not its train_config.json"):
        train_teacher(ds, cfg, tmp_path / "rec", tmp_path / "no-config", resume=True)

    # a checkpoint that verifies but lacks what a run restores: named, with the missing key
    from ilora.checkpointing import CheckpointManager

    manager = CheckpointManager(tmp_path / "killed", 1)
    newest = manager.latest()
    state = newest.load()
    del state["scheduler"]
    manager.clear()
    manager.save(newest.step, state)
    with pytest.raises(IloraError, match=rf"step-{newest.step:09d}: its state does not fit this run \(KeyError: 'scheduler'\)"):
        train_teacher(ds, cfg, tmp_path / "rec", tmp_path / "killed", resume=True)

def test_the_logged_lr_is_the_lr_each_step_used(tmp_path) -> None:
    """train_steps.csv's lr column is the lr of the optimiser step on that row (read before the
    schedule moves on): with 4 warm-up steps, step 1 ran at lr / 4."""
    import csv

    from ilora.data import make_synthetic
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.train import train_teacher

    ds = make_synthetic(users=40, items=30, seed=5)
    torch.manual_seed(0)
    SASRec(SASRecConfig(num_items=ds.num_items, max_len=ds.max_len, hidden=16)).save(tmp_path / "rec")
    cfg = TeacherConfig(**SMALL, max_steps=6, batch_size=4, val_samples=4, lr=1e-3, warmup_ratio=4 / 6, min_lr_ratio=0.0)
    train_teacher(ds, cfg, tmp_path / "rec", tmp_path / "out")
    with open(tmp_path / "out" / "train_steps.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [float(r["lr"]) for r in rows]
    expected = [1e-3 * (s + 1) / 4 for s in range(4)] + [1e-3 * (1 + math.cos(math.pi * k / 2)) / 2 for k in range(2)]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert logged == pytest.approx(expected, rel=1e-9)


def test_a_local_base_llm_is_recorded_by_absolute_path_and_resume_refuses_another_model_there(tmp_path, monkeypatch) -> None:
    import json

    from ilora.data import make_synthetic
    from ilora.errors import IloraError
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.build import load_teacher, resolve_llm_path
    from ilora.teacher.tiny import build_tiny_llm
    from ilora.teacher.train import train_teacher

    ds = make_synthetic(users=40, items=30, seed=5)
    SASRec(SASRecConfig(num_items=ds.num_items, max_len=ds.max_len, hidden=16)).save(tmp_path / "rec")

    def save_base(seed: int) -> None:
        tokenizer = build_tiny_tokenizer(ds.catalog.titles, vocab_size=300)
        build_tiny_llm(tokenizer, hidden=32, layers=2, heads=4, seed=seed).save_pretrained(tmp_path / "models" / "base")
        tokenizer.save_pretrained(tmp_path / "models" / "base")

    save_base(0)
    monkeypatch.chdir(tmp_path / "models")
    out = tmp_path / "out"
    cfg = TeacherConfig(**{**WITHOUT_TINY, "llm": "base"}, max_steps=2, batch_size=4, val_samples=4, checkpoint_every=1)
    train_teacher(ds, cfg, tmp_path / "rec", out)
    recorded = json.loads((out / "teacher_config.json").read_text())["config"]["llm"]
    assert recorded == str(tmp_path / "models" / "base")  # absolute: loadable from anywhere
    monkeypatch.chdir(tmp_path)
    load_teacher(out, ds.catalog)

    (out / "train_summary.json").unlink()  # an interrupted run with a checkpoint at step 1
    monkeypatch.chdir(tmp_path / "models")
    # a run recorded before paths were made absolute (llm: "base") resumes with the same relative path
    from ilora.checkpointing import CheckpointManager
    from ilora.teacher.train import check_same_options

    recorded = CheckpointManager(out, 1).latest().load()["config"]
    check_same_options({**recorded, "llm": "base"}, resolve_llm_path(cfg), out)
    with pytest.raises(IloraError, match="llm: 'other' -> "):
        check_same_options({**recorded, "llm": "other"}, resolve_llm_path(cfg), out)
    # a run recorded before the gate's blocks, pool and temperature were options ran with their defaults
    older = {k: v for k, v in recorded.items() if k not in ("gate_blocks", "gate_pool", "gate_temperature")}
    check_same_options({**older, "llm": "base"}, resolve_llm_path(cfg), out)
    with pytest.raises(IloraError, match=r"gate_temperature: 1\.0 -> 0\.5"):
        check_same_options({**older, "llm": "base"}, resolve_llm_path(dataclasses.replace(cfg, gate_temperature=0.5)), out)
    save_base(1)  # another model of the same shapes at the same path
    with pytest.raises(IloraError, match=r"base LLM \(--llm\).*llm: '[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
        train_teacher(ds, cfg, tmp_path / "rec", out, resume=True)
    with pytest.raises(IloraError, match="not the base LLM the teacher"):
        load_teacher(out, ds.catalog)
    # a run recorded before the weight sample existed (no 'llm' entry) is compared without it
    from ilora.teacher.train import check_same_inputs

    inputs = {"rec": "r", "dataset": "d", "llm": "new"}
    check_same_inputs({"rec": "r", "dataset": "d"}, inputs, out)
    with pytest.raises(IloraError, match="llm: 'old' -> 'new'"):
        check_same_inputs({**inputs, "llm": "old"}, inputs, out)
    with pytest.raises(IloraError, match="rec: 'other' -> 'r'"):
        check_same_inputs({"rec": "other", "dataset": "d"}, inputs, out)
    # ... and one recorded before the prompt template's fingerprint (no 'template' entry) likewise
    check_same_inputs(inputs, {**inputs, "template": "t"}, out)
    with pytest.raises(IloraError, match=r"another SASRec \(--rec\), dataset, base LLM \(--llm\) or prompt template \(--domain\).*template: 'old' -> 't'"):
        check_same_inputs({**inputs, "template": "old"}, {**inputs, "template": "t"}, out)


def test_prompts_longer_than_the_models_context_are_reported(caplog) -> None:
    from types import SimpleNamespace

    from ilora.teacher.train import warn_long_prompts

    with caplog.at_level("WARNING", logger="ilora.teacher.train"):
        warn_long_prompts(np.array([10, 64, 65, 300]), SimpleNamespace(max_position_embeddings=64))
    assert "2 of 4 training prompts are longer than the base LLM's max_position_embeddings 64 (longest: 300 tokens)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ilora.teacher.train"):
        warn_long_prompts(np.array([10, 64]), SimpleNamespace(max_position_embeddings=64))
        warn_long_prompts(np.array([10, 640]), SimpleNamespace())  # a config without the field: nothing to compare
    assert caplog.text == ""


def test_records_from_before_the_gate_options_read_as_their_old_values_not_todays_defaults(tmp_path, monkeypatch) -> None:
    """A record without gate_pool ran with the old fixed 8; if the default ever changes (here
    to 4), a run with the new default is other work: refused on resume, rerun by `ilora run`."""
    from ilora.config import to_dict
    from ilora.errors import IloraError
    from ilora.pipeline.stages import _matches, stage_key
    from ilora.teacher.config import ADDED_OPTIONS, without_added_defaults
    from ilora.teacher.train import check_same_options

    monkeypatch.setattr(TeacherConfig.__dataclass_fields__["gate_pool"], "default", 4)
    current = TeacherConfig(gate="resnet", gate_pool=4)
    old = {k: v for k, v in to_dict(TeacherConfig(gate="resnet")).items() if k not in ADDED_OPTIONS}
    with pytest.raises(IloraError, match="gate_pool: 8 -> 4"):
        check_same_options(old, current, tmp_path)
    assert not _matches(stage_key(to_dict(current), []), stage_key(old, []), old, to_dict(current), [], without_added_defaults)
    same = TeacherConfig(gate="resnet", gate_pool=8)
    check_same_options(old, same, tmp_path)
    assert _matches(stage_key(to_dict(same), []), stage_key(old, []), old, to_dict(same), [], without_added_defaults)


def test_a_template_file_is_compared_by_its_text_not_the_path_it_was_given_by(tmp_path) -> None:
    """``./mine.txt`` after ``mine.txt`` (or a copy elsewhere) was refused on resume and retrained
    by ``ilora run``; where the record holds the template's fingerprint, the text decides. A
    record without it (older runs) is still compared by the path, the only trace of its template."""
    from ilora.config import to_dict
    from ilora.errors import IloraError
    from ilora.teacher.config import same_teacher_form
    from ilora.teacher.train import check_same_options

    recorded = to_dict(TeacherConfig(domain="mine.txt"))
    respelled = TeacherConfig(domain="./mine.txt")
    check_same_options(recorded, respelled, tmp_path, {"template": "abc"})
    with pytest.raises(IloraError, match=r"domain: 'mine.txt' -> './mine.txt'"):
        check_same_options(recorded, respelled, tmp_path, {})
    with pytest.raises(IloraError, match=r"domain: '<a template file>' -> 'music'"):  # a packaged domain is no file
        check_same_options(recorded, TeacherConfig(domain="music"), tmp_path, {"template": "abc"})
    run = lambda domain, sha: {**to_dict(TeacherConfig(domain=domain)), "domain_template_sha256": sha}  # noqa: E731
    assert same_teacher_form(run("mine.txt", "abc")) == same_teacher_form(run("/elsewhere/copy.txt", "abc"))
    assert same_teacher_form(run("mine.txt", "abc")) != same_teacher_form(run("mine.txt", "def"))
    assert same_teacher_form(to_dict(TeacherConfig(domain="mine.txt"))) != same_teacher_form(to_dict(TeacherConfig(domain="./mine.txt")))


def test_a_sasrec_of_another_dataset_is_named_and_refused_before_the_llm_loads(tmp_path, monkeypatch) -> None:
    from ilora.data import make_synthetic
    from ilora.errors import IloraError
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher import train

    ds = make_synthetic(users=40, items=30, seed=5)
    SASRec(SASRecConfig(num_items=ds.num_items + 7, max_len=ds.max_len, hidden=16)).save(tmp_path / "other-rec")
    monkeypatch.setattr(train, "build_teacher", lambda *a, **k: pytest.fail("the teacher was built"))
    with pytest.raises(IloraError, match=rf"other-rec: this SASRec was trained on {ds.num_items + 7} items but the dataset has {ds.num_items}"):
        train.train_teacher(ds, TeacherConfig(**SMALL, max_steps=1), tmp_path / "other-rec", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    SASRec(SASRecConfig(num_items=ds.num_items, max_len=5, hidden=16)).save(tmp_path / "short-rec")  # --max-len 5
    with pytest.raises(IloraError, match=rf"short-rec: this SASRec reads histories of at most 5 items, but the dataset's are {ds.max_len} wide"):
        train.train_teacher(ds, TeacherConfig(**SMALL, max_steps=1), tmp_path / "short-rec", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_micro_batches_give_the_loss_and_gradient_of_the_whole_batch() -> None:
    """A partial last global batch (6 of batch_size 8) of mixed hybrid / text-only samples cut
    into micro-batches of 4 + 2 (left-padded) gives the loss and gradient of a slow reference: each sample alone and
    unpadded, full-vocabulary cross-entropy summed over its answer tokens, divided by the
    answer tokens of all 6."""
    import contextlib

    import torch.nn.functional as F

    from ilora.data import candidate_sets, make_synthetic
    from ilora.distributed import SINGLE
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.build import build_teacher
    from ilora.teacher.train import rank_micro_batches, step_forward_backward, wrap_for_training

    ds = make_synthetic(users=40, items=30, seed=5)
    torch.manual_seed(0)
    rec = SASRec(SASRecConfig(num_items=ds.num_items, max_len=ds.max_len, hidden=16, dropout=0.0))
    bundle = build_teacher(TeacherConfig(**SMALL, batch_size=8, micro_batch_size=4), ds.catalog, rec)
    teacher = bundle.teacher
    params = {name: q for name, q in teacher.named_parameters() if q.requires_grad}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every trainable tensor random (LoRA B is zero at init): every gradient non-zero
        for q in params.values():
            q.copy_(torch.randn(q.shape, generator=g, dtype=q.dtype) * 0.1)
    train = ds.split("train")
    cands = candidate_sets(train, ds.num_items, count=5, seed=0, split_name="train")
    idx = np.array([0, 7, 3, 11, 5, 19])
    flags = np.array([True, False, True, True, False, True])  # hybrid and text-only prompts in both micro-batches

    def build(rows: np.ndarray, hybrid: np.ndarray):
        return bundle.train_collator.build(train.history[rows], train.length[rows], cands[rows], train.target[rows], hybrid=hybrid)

    teacher.train()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i, flag in zip(idx, flags, strict=True):
        one = build(np.array([i]), np.array([flag]))
        assert bool(one.attention_mask.all())  # one sample alone: no padding
        with teacher.gate_state.use(teacher.gates(one.history, one.length)):
            logits = teacher.llm(inputs_embeds=teacher.embed(one), attention_mask=one.attention_mask).logits[0]
        labels = one.labels[0, 1:]
        answer = labels != -100
        total = total + F.cross_entropy(logits[:-1][answer].double(), labels[answer], reduction="sum")
        count += int(answer.sum())
    expected_loss = total / count
    expected_loss.backward()
    expected = {name: q.grad.clone() for name, q in params.items()}
    for q in params.values():
        q.grad = None

    plan = rank_micro_batches(idx, flags, 4, SINGLE)
    micro = [(build(rows, hybrid), counts) for rows, hybrid, counts in plan]
    assert [len(b) for b, _ in micro] == [4, 2]
    assert not all(bool(b.attention_mask.all()) for b, _ in micro)  # some rows are padded
    assert all(bool(b.attention_mask[:, -1].all()) for b, _ in micro)  # on the left
    targets = sum(b.num_targets for b, counts in micro if counts)
    assert targets == count
    loss = step_forward_backward(wrap_for_training(teacher, SINGLE), micro, targets, contextlib.nullcontext(), SINGLE)
    assert loss == pytest.approx(float(expected_loss), rel=1e-6)
    for name, q in params.items():
        scale = float(expected[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(q.grad, expected[name].to(q.grad.dtype), rtol=1e-4, atol=1e-5 * scale, msg=name)



def _first_items_only(ds, name: str):
    """``ds`` with split ``name``'s histories cut to their first item (len_seq 1): ``--min-len 2``
    then drops every sample of that split."""
    from ilora.data.dataset import Split

    split = ds.split(name)
    history = split.history.copy()
    history[:, 1:] = ds.catalog.padding_id
    ds.splits[name] = Split(history, np.ones_like(split.length), split.target.copy())
    return ds


@pytest.mark.parametrize("name", ["val", "train"])
def test_a_split_emptied_by_min_len_is_refused_before_any_model_loads_or_out_is_written(tmp_path, monkeypatch, name) -> None:
    """Training validates every epoch and keeps the best epoch: without val samples it has
    nothing to select by (and without train samples nothing to train). Both are refused up
    front, naming the split and what the loader dropped, not after an epoch by torch."""
    from ilora.data import make_synthetic
    from ilora.data.io import filter_min_len
    from ilora.errors import IloraError
    from ilora.teacher import train

    ds = filter_min_len(_first_items_only(make_synthetic(users=40, items=30, seed=5), name), 2)
    assert len(ds.split(name)) == 0 and len(ds.split("val" if name == "train" else "train")) > 0
    rows = ds.load_info["splits"][name]["rows_in_source"]
    monkeypatch.setattr(train, "load_sasrec", lambda *a, **k: pytest.fail("the SASRec was loaded"))
    monkeypatch.setattr(train, "build_teacher", lambda *a, **k: pytest.fail("the teacher was built"))
    expected = rf"the {name} split has no samples \({rows} rows in the source, {rows} dropped below min_len=2\); .*lower --min-len"
    with pytest.raises(IloraError, match=expected):
        train.train_teacher(ds, TeacherConfig(**SMALL, max_steps=1), tmp_path / "rec", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    ds.splits[name] = None  # an absent split: refused as well
    with pytest.raises(IloraError, match=f"the {name} split is absent"):
        train.train_teacher(ds, TeacherConfig(**SMALL, max_steps=1), tmp_path / "rec", tmp_path / "out")


def test_cli_train_and_eval_refuse_a_val_split_that_min_len_empties(tmp_path, capsys) -> None:
    from ilora.cli.main import main
    from ilora.data import make_synthetic, write_native
    from ilora.rec.sasrec import SASRec, SASRecConfig

    ds = _first_items_only(make_synthetic(users=40, items=30, seed=5), "val")
    write_native(ds, tmp_path / "data")
    SASRec(SASRecConfig(num_items=ds.num_items, max_len=ds.max_len, hidden=16)).save(tmp_path / "rec")
    args = ["teacher", "train", str(tmp_path / "data"), "--min-len", "2", "--rec", str(tmp_path / "rec"), "--out", str(tmp_path / "t"),
            "--max-steps", "1", "--tiny-hidden", "32", "--tiny-vocab", "300"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the val split has no samples" in err[0] and "dropped below min_len=2" in err[0], err
    assert not (tmp_path / "t").exists()
    assert main(args[:3] + args[5:] + ["--val-samples", "4"]) == 0  # without --min-len the val split has samples
    capsys.readouterr()
    assert main(["teacher", "eval", str(tmp_path / "data"), "--teacher", str(tmp_path / "t"), "--split", "val", "--min-len", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the val split has no samples (min_len=2)" in err[0], err


def test_a_sliding_window_validation_cannot_score_in_is_refused_before_training(tmp_path, monkeypatch, sliding_window_llm) -> None:
    """Validation scores every epoch; a window shorter than a val prompt is refused before the first
    step (and before --out is written), not after the epoch's training."""
    from ilora.data import make_synthetic
    from ilora.errors import IloraError
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.train import train_teacher

    ds = make_synthetic(users=40, items=30, seed=5)
    SASRec(SASRecConfig(num_items=ds.num_items, max_len=ds.max_len, hidden=16)).save(tmp_path / "rec")
    cfg = TeacherConfig(**{**WITHOUT_TINY, "llm": sliding_window_llm(ds.catalog.titles, 32)}, max_steps=2, batch_size=4, val_samples=4, eval_batch_size=1, threads=1)
    threads: list[int] = []
    before = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    with pytest.raises(IloraError, match="sliding window of 32 tokens, and sample 0 of the val split.*teacher training validates by the score protocol"):
        train_teacher(ds, cfg, tmp_path / "rec", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert threads == [1, before]  # the threads option is applied first, and the count before it restored

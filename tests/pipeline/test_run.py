"""`ilora run`: stages run once, are skipped when up to date, rerun when their config changes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from ilora.cli.main import main
from ilora.errors import DataError, IloraError

SMALL = {
    "data": {"synth": {"users": 60, "items": 40, "seed": 1}},
    "rec": {"epochs": 2},
    "teacher": {"max_steps": 2, "batch_size": 4, "val_samples": 6, "tiny_hidden": 32, "tiny_vocab": 300},
    "eval": {"limit": 6, "gates": ["learned", "expert:1"]},
    "export": {"top_k": 3, "pool_sasrec": 4, "pool_candidates": 5, "batch_size": 8},
    "distill": {"epochs": 2, "top_k": 3},
}


def _stage_keys(run):
    return {p.parent.name: json.loads(p.read_text())["key"] for p in run.glob("*/stage.json")}


def test_run_skips_up_to_date_stages_and_reruns_changed_ones(tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run")}))
    assert main(["run", str(config), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    run = tmp_path / "run"
    assert set(first["eval"]["teacher"]) == {"score/learned", "score/expert:1"}
    assert (run / "report.md").is_file() and (run / "gate.png").is_file() and (run / "curves.png").is_file()
    assert (run / "students.png").is_file() and set(first["distill"]) >= {"baseline", "distilled", "gain"}
    assert first["export"]["rows"] == first["data"]["train_rows"]
    assert first["sasrec_train"]["epochs_run"] == 2 and first["sasrec_train"]["seconds"] > 0
    report = (run / "report.md").read_text()
    times = report.split("## Stage times (s)")[1]  # columns named as the stages are
    assert times.splitlines()[2] == "| data | sasrec | sasrec_eval | teacher | eval | export | distill |"
    # the headings say which split and how many candidates; the run's config is in the summary
    assert f"## SASRec on {first['config']['eval']['split']} (full ranking" in report
    assert f"cand_hr@1 over {first['config']['eval']['candidates']} fixed candidates" in report
    assert json.loads((run / "config.json").read_text()) == first["config"]
    keys = _stage_keys(run)
    mtimes = {name: (run / name / "stage.json").stat().st_mtime_ns for name in keys}

    assert main(["run", str(config)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("up to date, skipped") == len(keys)
    assert "report:" in captured.out
    assert {name: (run / name / "stage.json").stat().st_mtime_ns for name in keys} == mtimes

    assert main(["run", str(config), "teacher.max_steps=3"]) == 0
    capsys.readouterr()
    changed = _stage_keys(run)
    assert changed["data"] == keys["data"] and changed["sasrec"] == keys["sasrec"]
    assert changed["teacher"] != keys["teacher"] and changed["eval"] != keys["eval"]
    assert changed["export"] != keys["export"] and changed["distill"] != keys["distill"]

    # a run that fails leaves config.json as the report describes it (it was written first, and
    # then named options no stage had run with)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recorded = (run / "config.json").read_text()
    assert main(["run", str(config), "teacher.max_steps=3", "teacher.lr=0.009", "teacher.device=cuda"]) == 2
    assert (run / "config.json").read_text() == recorded


def test_changing_the_teachers_evaluation_does_not_retrain_anything(tmp_path, capsys):
    """eval.* options other than the split, candidates and seed are read by the eval stage only:
    changing them must not retrain SASRec (nor, through it, the teacher, export and students)."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run")}))
    assert main(["run", str(config)]) == 0
    run = tmp_path / "run"
    keys = _stage_keys(run)
    capsys.readouterr()
    assert main(["run", str(config), "eval.gates=learned", "eval.limit=4"]) == 0
    changed = _stage_keys(run)
    assert {k for k in keys if changed[k] != keys[k]} == {"eval"}
    assert main(["run", str(config), "eval.seed=7"]) == 0  # other fixed candidates: both evaluations rerun
    after = _stage_keys(run)
    assert {k for k in keys if after[k] != changed[k]} == {"eval", "sasrec_eval"}
    capsys.readouterr()
    # the generate protocol writes each sample's output and verdict beside the stage's results
    assert main(["run", str(config), "eval.seed=7", "eval.protocols=score,generate", "eval.gates=learned,expert:1", "eval.limit=4", "--json"]) == 0
    teacher = json.loads(capsys.readouterr().out)["eval"]["teacher"]
    for gate, name in (("learned", "generations_test_learned.jsonl"), ("expert:1", "generations_test_expert1.jsonl")):
        assert teacher[f"generate/{gate}"]["generations_file"] == name and "generations" not in teacher[f"generate/{gate}"]
        records = [json.loads(line) for line in (run / "eval" / name).read_text().splitlines()]
        assert len(records) == 4 and teacher[f"generate/{gate}"]["valid_ratio"] == sum(r["valid"] for r in records) / 4
    assert "generations_file" not in teacher["score/learned"]
    # SASRec's evaluations leave the history out of the ranking when its trainer does
    assert main(["run", str(config), "rec.mask_history=true", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sasrec"]["sasrec"]["mask_history"] and summary["sasrec"]["popularity"]["mask_history"]
    assert summary["eval"]["sasrec_same_candidates"]["mask_history"]


def test_a_finished_run_goes_on_on_another_device_without_redoing_its_stages(tmp_path, capsys, monkeypatch):
    """A stage's device is checked only when that stage (or one it feeds) has work, before its
    directory is touched; a finished stage recorded on another device stays up to date."""
    import torch

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run")}))
    assert main(["run", str(config)]) == 0
    run = tmp_path / "run"
    keys = _stage_keys(run)
    eval_files = sorted(p.name for p in (run / "eval").iterdir())
    capsys.readouterr()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # as if the teacher had been trained on a GPU: a changed evaluation needs its device, and is refused untouched
    assert main(["run", str(config), "teacher.device=cuda", "eval.limit=5"]) == 2
    assert "teacher.device=cuda but torch sees no CUDA device (set teacher.device=cpu)" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "eval").iterdir()) == eval_files and _stage_keys(run) == keys
    # input the students' training would refuse is refused before their finished stage is cleared
    distill_files = sorted(p.name for p in (run / "distill").iterdir())
    assert main(["run", str(config), "distill.train_min_len=999"]) == 2
    assert "min_len=999" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "distill").iterdir()) == distill_files and _stage_keys(run) == keys
    # the teacher, finished "on cuda", is not redone for the device; only the students, whose option changed, run
    assert main(["run", str(config), "teacher.device=cuda", "distill.lambda_d=0.5"]) == 0
    err = capsys.readouterr().err
    assert "teacher: up to date" in err and "distill: running" in err
    changed = _stage_keys(run)
    assert {k for k in keys if changed[k] != keys[k]} == {"distill"}


def test_interrupted_stage_is_rerun(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run")}))
    assert main(["run", str(config)]) == 0
    run = tmp_path / "run"
    (run / "eval" / "stage.json").unlink()  # as if killed before the stage finished
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    err = capsys.readouterr().err
    assert "eval: running" in err and "teacher: up to date" in err


def test_a_stage_rerun_with_the_same_config_refreshes_what_reads_it(tmp_path, capsys):
    """Retraining need not reproduce the same weights (GPU), so a stage whose stage.json was lost
    and that ran again makes its downstream stages run again too, even with unchanged configs."""
    from ilora.pipeline.stages import run_stage

    calls = []

    def stage(name):
        return lambda directory: calls.append(name) or {"name": name}

    def both():
        token, _ = run_stage(tmp_path, "a", {"x": 1}, [], stage("a"))
        run_stage(tmp_path, "b", {"y": 1}, [token], stage("b"))

    both()
    both()
    assert calls == ["a", "b"]  # the second time both are up to date
    (tmp_path / "a" / "stage.json").unlink()
    both()
    assert calls == ["a", "b", "a", "b"]
    # a stage.json written before completion ids existed: its key alone is the token
    marker = json.loads((tmp_path / "a" / "stage.json").read_text())
    del marker["run_id"]
    (tmp_path / "a" / "stage.json").write_text(json.dumps(marker))
    token, _ = run_stage(tmp_path, "a", {"x": 1}, [], stage("a"))
    assert token == marker["key"] and calls == ["a", "b", "a", "b"]


def test_a_stage_refused_by_its_check_keeps_the_finished_stage_files(tmp_path):
    """The device check runs before a stale stage's directory is cleared: a run refused for want
    of a GPU must not first delete the finished stage it would have redone."""
    from ilora.errors import ConfigError
    from ilora.pipeline.stages import run_stage

    def work(directory):
        (directory / "weights.bin").write_text("trained")
        return {}

    def refuse():
        raise ConfigError("distill.device=cuda but torch sees no CUDA device")

    run_stage(tmp_path, "distill", {"lambda_d": 0.8}, [], work)
    before = sorted(p.name for p in (tmp_path / "distill").iterdir())
    assert before == ["stage.json", "weights.bin"]
    run_stage(tmp_path, "distill", {"lambda_d": 0.8}, [], work, check=refuse)  # up to date: no check, no work
    with pytest.raises(ConfigError, match="no CUDA device"):
        run_stage(tmp_path, "distill", {"lambda_d": 0.5}, [], work, check=refuse)  # stale: checked first
    assert sorted(p.name for p in (tmp_path / "distill").iterdir()) == before



def test_a_stage_that_fails_with_other_options_keeps_the_finished_results_for_the_old_ones(tmp_path, capsys):
    """A finished stage run again with other options is moved aside until the new run finishes:
    when that run fails (a mistyped path), the results stay in ``<stage>.previous`` and a run
    with the old options puts them back and skips the stage with its token, so the stages
    after it stay current; once a run with other options finishes, they are gone."""
    from ilora.pipeline.stages import run_stage

    calls = []

    def work(tag, fail=False):
        def fn(directory):
            calls.append(tag)
            (directory / "weights.bin").write_text(tag)
            if fail:
                raise IloraError("cannot load LLM '/nonexist/llm'")
            return {"tag": tag}

        return fn

    token, _ = run_stage(tmp_path, "teacher", {"llm": "tiny"}, [], work("tiny"), keep_partial=True)
    with pytest.raises(IloraError, match="cannot load LLM"):
        run_stage(tmp_path, "teacher", {"llm": "/nonexist/llm"}, [], work("typo", fail=True), keep_partial=True)
    assert (tmp_path / "teacher.previous" / "weights.bin").read_text() == "tiny"
    assert "its finished results (other options) are kept in teacher.previous until this run finishes" in capsys.readouterr().err
    assert run_stage(tmp_path, "teacher", {"llm": "tiny"}, [], work("again"), keep_partial=True) == (token, {"tag": "tiny", "seconds": pytest.approx(0, abs=5)})
    assert calls == ["tiny", "typo"] and (tmp_path / "teacher" / "weights.bin").read_text() == "tiny"
    assert not (tmp_path / "teacher.previous").exists()
    assert "teacher: the finished results kept in teacher.previous are current again, put back" in capsys.readouterr().err
    # a failed attempt, then one with a third option that finishes: the kept results go
    with pytest.raises(IloraError):
        run_stage(tmp_path, "teacher", {"llm": "/nonexist/llm"}, [], work("typo", fail=True), keep_partial=True)
    run_stage(tmp_path, "teacher", {"llm": "other"}, [], work("other"), keep_partial=True)
    assert (tmp_path / "teacher" / "weights.bin").read_text() == "other" and not (tmp_path / "teacher.previous").exists()
    # an interrupted run of the new options still resumes its own files, and drops the kept ones when it finishes
    run_stage(tmp_path, "teacher", {"llm": "tiny"}, [], work("tiny"), keep_partial=True)
    with pytest.raises(IloraError):
        run_stage(tmp_path, "teacher", {"llm": "big"}, [], work("big-1", fail=True), keep_partial=True)
    run_stage(tmp_path, "teacher", {"llm": "big"}, [], lambda d: calls.append(sorted(p.name for p in d.iterdir())) or {}, keep_partial=True)
    assert calls[-1] == ["stage.pending", "weights.bin"] and not (tmp_path / "teacher.previous").exists()
    # stopped after finishing "big" but before deleting the kept "tiny": going back to tiny swaps them
    import shutil

    run_stage(tmp_path, "teacher", {"llm": "tiny"}, [], work("tiny"), keep_partial=True)
    shutil.copytree(tmp_path / "teacher", tmp_path / "tiny-kept")
    run_stage(tmp_path, "teacher", {"llm": "big"}, [], work("big"), keep_partial=True)
    (tmp_path / "tiny-kept").rename(tmp_path / "teacher.previous")
    capsys.readouterr()
    run_stage(tmp_path, "teacher", {"llm": "tiny"}, [], work("unused"), keep_partial=True)
    assert "unused" not in calls and (tmp_path / "teacher" / "weights.bin").read_text() == "tiny"
    assert "the finished results of other options there are kept in teacher.previous" in capsys.readouterr().err
    assert json.loads((tmp_path / "teacher.previous" / "stage.json").read_text())["config"] == {"llm": "big"}
    # a stage directory that is a link (moved to another disk) is refused before the stage runs, not after
    shutil.move(tmp_path / "teacher", tmp_path / "elsewhere")
    (tmp_path / "teacher").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(IloraError, match="teacher: a file or link where the run keeps its teacher stage directory"):
        run_stage(tmp_path, "teacher", {"llm": "third"}, [], work("third"), keep_partial=True)
    assert "third" not in calls
    assert run_stage(tmp_path, "teacher", {"llm": "tiny"}, [], work("unused"), keep_partial=True)[1]["tag"] == "tiny"  # up to date: read through the link


def test_run_refuses_an_out_that_is_not_a_run_directory(tmp_path, capsys):
    """`--out` pointed at a directory of the user's own: what the run would overwrite or delete
    there (a model's config.json, a data/ of the user's) is refused before anything is written
    or deleted; other files (a log, the run's YAML) do not stand in the way."""
    from ilora.pipeline.run import check_run_dir

    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "my_dataset.csv").write_text("precious")
    (mine / "config.json").write_text('{"model_type": "llama"}')  # a model directory's config.json is not a run's
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(mine)}))
    assert main(["run", str(config)]) == 2
    assert f"{mine / 'config.json'}: not the config.json of an `ilora run`, which would overwrite it" in capsys.readouterr().err
    (mine / "config.json").unlink()
    with pytest.raises(IloraError, match=r"mine/data: not a stage directory of an `ilora run` \(no stage.json or stage.pending\)"):
        check_run_dir(mine)
    assert (mine / "data" / "my_dataset.csv").read_text() == "precious"
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "run.log").write_text("tee'd here")
    (logs / "run.yaml").write_text("out: logs")
    check_run_dir(logs)  # a new run's own log and YAML
    (mine / "teacher").mkdir()
    (mine / "teacher" / "stage.pending").write_text("k")
    (mine / "config.json").write_text('{"out": "x", "data": {}, "rec": {}, "teacher": {}}')  # an early version's: fewer sections
    check_run_dir(mine)
    (mine / "config.json").write_text(json.dumps({"out": "x", "data": {}, "rec": {}, "teacher": {}, "eval": {}, "export": {}, "distill": {}}))
    check_run_dir(mine)

def test_a_device_change_keeps_a_finished_stage_but_not_an_interrupted_one(tmp_path, capsys):
    """Finished work is the same on any device; interrupted work resumes only on the device its
    checkpoints came from (another device starts the stage clean, the interrupted run set aside
    until it finishes)."""
    from ilora.pipeline.stages import PENDING, run_stage, stage_key

    calls = []

    def work(directory):
        calls.append(sorted(p.name for p in directory.iterdir()))
        (directory / "checkpoint.bin").write_text("step 5")
        return {}

    run_stage(tmp_path, "a", {"x": 1, "device": "cuda"}, [], work, keep_partial=True)
    run_stage(tmp_path, "a", {"x": 1, "device": "cpu"}, [], work, keep_partial=True)
    assert len(calls) == 1  # finished on cuda: up to date on cpu
    on_cuda = {"x": 1, "device": "cuda"}

    def interrupt():  # as if interrupted on cuda, its checkpoint written
        (tmp_path / "a" / "stage.json").unlink(missing_ok=True)
        (tmp_path / "a" / "checkpoint.bin").write_text("step 5")
        (tmp_path / "a" / PENDING).write_text(json.dumps({"key": stage_key(on_cuda, []), "config": on_cuda}))

    interrupt()
    run_stage(tmp_path, "a", {"x": 1, "device": "cuda", "workers": 2}, [], work, keep_partial=True)
    assert calls[-1] == ["checkpoint.bin", PENDING]  # the same device: resumed
    capsys.readouterr()
    interrupt()
    run_stage(tmp_path, "a", {"x": 1, "device": "cpu"}, [], work, keep_partial=True)
    assert calls[-1] == [PENDING]  # another device: started clean, the cuda checkpoint not offered
    err = capsys.readouterr().err
    assert "a: an interrupted run of other options (device: 'cuda' -> 'cpu') is kept in a.interrupted until this run finishes" in err
    assert not (tmp_path / "a.interrupted").exists()  # the cpu run finished


def test_an_interrupted_run_of_other_options_is_set_aside_not_deleted(tmp_path, capsys):
    """A re-typed command with one option wrong (a mistyped path that fails once the stage runs)
    deleted an interrupted stage's checkpoints (found by an independent review). It is set aside
    instead, saying what differs; the command with the right options puts it back and resumes it;
    a run of other options that finishes deletes it."""
    from ilora.pipeline.stages import PENDING, run_stage

    calls = []

    def work(directory):
        calls.append(sorted(p.name for p in directory.iterdir()))
        (directory / "checkpoint.bin").write_text("step 5")
        raise KeyboardInterrupt  # interrupted after its first checkpoint

    def finish(directory):
        calls.append(sorted(p.name for p in directory.iterdir()))
        return {}

    def fail(directory):
        raise FileNotFoundError("/tmp/no_such_llm: no such directory")

    right, wrong = {"lr": 0.004, "llm": "/models/7b"}, {"lr": 0.004, "llm": "/tmp/no_such_llm"}
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "teacher", right, [], work, keep_partial=True)
    capsys.readouterr()
    with pytest.raises(FileNotFoundError):
        run_stage(tmp_path, "teacher", wrong, [], fail, keep_partial=True)
    err = capsys.readouterr().err
    assert "teacher: an interrupted run of other options (llm: '/models/7b' -> '/tmp/no_such_llm') is kept in teacher.interrupted" in err
    assert (tmp_path / "teacher.interrupted" / "checkpoint.bin").read_text() == "step 5"
    run_stage(tmp_path, "teacher", right, [], finish, keep_partial=True)
    assert calls[-1] == ["checkpoint.bin", PENDING]  # put back and resumed
    assert not (tmp_path / "teacher.interrupted").exists()

    # interrupted under each of two option sets in turn: each resumes its own checkpoint
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "teacher", {"lr": 1}, [], work, keep_partial=True)
    (tmp_path / "teacher" / "checkpoint.bin").write_text("lr 1")
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "teacher", {"lr": 2}, [], work, keep_partial=True)
    assert (tmp_path / "teacher.interrupted" / "checkpoint.bin").read_text() == "lr 1"
    run_stage(tmp_path, "teacher", {"lr": 1}, [], finish, keep_partial=True)
    assert calls[-1] == ["checkpoint.bin", PENDING] and not (tmp_path / "teacher.interrupted").exists()
    assert "the interrupted run in teacher.interrupted has these options: put back" in capsys.readouterr().err

    # two mistyped runs in a row: the second does not replace the work set aside by the first
    # (a run that failed before writing anything is just removed), and two runs that both hold
    # work are refused rather than one deleted
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "teacher", right, [], work, keep_partial=True)
    for typo in ("/tmp/typo1", "/tmp/typo2"):
        with pytest.raises(FileNotFoundError):
            run_stage(tmp_path, "teacher", {**right, "llm": typo}, [], fail, keep_partial=True)
    assert (tmp_path / "teacher.interrupted" / "checkpoint.bin").read_text() == "step 5"
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "teacher", {**right, "llm": "/tmp/typo3"}, [], work, keep_partial=True)
    with pytest.raises(IloraError, match=r"teacher: holds an interrupted run of other options \(llm: '/tmp/typo3' -> '/tmp/typo4'\) and .*teacher.interrupted another one"):
        run_stage(tmp_path, "teacher", {**right, "llm": "/tmp/typo4"}, [], finish, keep_partial=True)
    assert (tmp_path / "teacher.interrupted" / "checkpoint.bin").read_text() == "step 5" and (tmp_path / "teacher" / "checkpoint.bin").exists()

    # a run stopped in the middle of an exchange: the half-moved directory is put back
    (tmp_path / "teacher").rename(tmp_path / "teacher.interrupted.swap")
    run_stage(tmp_path, "teacher", {**right, "llm": "/tmp/typo3"}, [], finish, keep_partial=True)
    assert calls[-1] == ["checkpoint.bin", PENDING]  # the typo3 run found its checkpoint again


def test_a_record_of_the_same_work_under_another_key_counts_as_current(tmp_path):
    """A finished or interrupted stage is kept when its record differs only in how the run is
    carried out (compile, workers, ...) or was written before an option existed (the legacy
    form drops that option at its default); the skipped stage keeps its token, so what reads
    it stays up to date. Anything else still reruns."""
    from ilora.pipeline.stages import run_stage, stage_key

    calls = []

    def stage(name):
        return lambda directory: calls.append(name) or {"name": name}

    def legacy(config):  # "depth" became an option later; before, it was always 2
        return {k: v for k, v in config.items() if not (k == "depth" and v == 2)}

    def both(config):
        token, _ = run_stage(tmp_path, "a", config, [], stage("a"), keep_partial=True, legacy=legacy)
        run_stage(tmp_path, "b", {"y": 1}, [token], stage("b"))
        return token

    first = both({"x": 1, "depth": 2, "compile": False})
    assert both({"x": 1, "depth": 2, "compile": True, "workers": 4}) == first and calls == ["a", "b"]
    # a record from before "depth" existed: its key was made without it
    old = {"x": 1, "compile": False}
    marker = json.loads((tmp_path / "a" / "stage.json").read_text())
    (tmp_path / "a" / "stage.json").write_text(json.dumps({**marker, "key": stage_key(old, []), "config": old}))
    token = both({"x": 1, "depth": 2, "compile": False})
    assert token.startswith(stage_key(old, [])) and calls == ["a", "b", "b"]  # b read another token
    assert both({"x": 1, "depth": 2, "compile": False}) == token and calls == ["a", "b", "b"]
    both({"x": 1, "depth": 3, "compile": False})  # not the default it had: another config
    assert calls == ["a", "b", "b", "a", "b"]
    # interrupted: an older bare-key stage.pending of the legacy form, and a JSON one that
    # differs only in a resumable option, are resumed (files kept); another config is not
    for pending in (stage_key(old, []), json.dumps({"key": "k", "config": {"x": 1, "depth": 2, "compile": True}})):
        (tmp_path / "a" / "stage.json").unlink()
        (tmp_path / "a" / "stage.pending").write_text(pending.replace('"k"', json.dumps(stage_key({"x": 1, "depth": 2, "compile": True}, []))))
        (tmp_path / "a" / "partial").write_text("checkpoint")
        both({"x": 1, "depth": 2, "compile": False})
        assert (tmp_path / "a" / "partial").is_file()
    (tmp_path / "a" / "stage.json").unlink()
    (tmp_path / "a" / "stage.pending").write_text(json.dumps({"key": stage_key({"x": 9}, []), "config": {"x": 9}}))
    both({"x": 1, "depth": 2, "compile": False})
    assert not (tmp_path / "a" / "partial").exists()


def test_an_older_teacher_stage_without_the_gate_options_stays_up_to_date(tmp_path, capsys):
    """A run directory whose teacher stage was recorded before gate_blocks, gate_pool and
    gate_temperature were options is not retrained (nor anything downstream of it)."""
    from ilora.pipeline.stages import stage_key
    from ilora.teacher.config import ADDED_OPTIONS

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run")}))
    assert main(["run", str(config)]) == 0
    run = tmp_path / "run"
    sasrec = json.loads((run / "sasrec" / "stage.json").read_text())
    marker = json.loads((run / "teacher" / "stage.json").read_text())
    old = {k: v for k, v in marker["config"].items() if k not in ADDED_OPTIONS}
    upstream = [f"{sasrec['key']}:{sasrec['run_id']}"]
    assert stage_key(marker["config"], upstream) == marker["key"]  # the upstream the test rebuilds is the real one
    (run / "teacher" / "stage.json").write_text(json.dumps({**marker, "key": stage_key(old, upstream), "config": old}))

    def token(name):
        m = json.loads((run / name / "stage.json").read_text())
        return f"{m['key']}:{m['run_id']}"

    def rekey(name, upstream):  # as the older version keyed the stages downstream of that teacher
        m = json.loads((run / name / "stage.json").read_text())
        (run / name / "stage.json").write_text(json.dumps({**m, "key": stage_key(m["config"], upstream)}))

    rekey("eval", [token("teacher")])
    rekey("export", [token("teacher")])
    # and a distill stage recorded before control_seed was an option
    from ilora.distill.train import ADDED_OPTIONS as DISTILL_ADDED

    distill_marker = json.loads((run / "distill" / "stage.json").read_text())
    distill_old = {k: v for k, v in distill_marker["config"].items() if k not in DISTILL_ADDED}
    assert distill_old != distill_marker["config"]
    (run / "distill" / "stage.json").write_text(json.dumps({**distill_marker, "config": distill_old, "key": stage_key(distill_old, [token("export"), token("data")])}))
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    err = capsys.readouterr().err
    assert "teacher: up to date" in err and "eval: up to date" in err and "distill: up to date" in err
    assert main(["run", str(config), "teacher.gate_temperature=0.5"]) == 0
    assert "teacher: running" in capsys.readouterr().err


def test_the_teacher_stage_is_keyed_by_a_template_files_text_not_only_its_name(tmp_path):
    """Editing the template file a run names makes its teacher stage stale; a packaged domain adds
    nothing to the record (runs recorded before keep their key)."""
    from ilora.config import to_dict
    from ilora.pipeline.config import RunConfig
    from ilora.pipeline.run import teacher_stage_config

    cfg = RunConfig()
    assert teacher_stage_config(cfg) == to_dict(cfg.teacher)
    template = tmp_path / "mine.txt"
    template.write_text("A [HistoryHere] B [CansHere] C\n", encoding="utf-8")
    cfg.teacher.domain = str(template)
    first = teacher_stage_config(cfg)
    assert first == {**to_dict(cfg.teacher), "domain_template_sha256": first["domain_template_sha256"]}
    template.write_text("A [HistoryHere] B [CansHere] D\n", encoding="utf-8")
    assert teacher_stage_config(cfg)["domain_template_sha256"] != first["domain_template_sha256"]



def test_editing_a_runs_template_file_retrains_its_teacher(tmp_path, capsys):
    template = tmp_path / "mine.txt"
    template.write_text("Heard: [HistoryHere] Choose from [CansHere] Answer:\n", encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run"), "teacher": {**SMALL["teacher"], "domain": str(template)}}))
    assert main(["run", str(config)]) == 0
    capsys.readouterr()
    template.write_text("# a comment changes nothing\nHeard: [HistoryHere] Choose from [CansHere] Answer:\n", encoding="utf-8")
    assert main(["run", str(config)]) == 0
    assert "teacher: up to date" in capsys.readouterr().err
    template.write_text("Played: [HistoryHere] Pick from [CansHere] Answer:\n", encoding="utf-8")
    assert main(["run", str(config)]) == 0
    assert "teacher: running" in capsys.readouterr().err


def test_a_missing_data_path_is_refused_before_the_data_stage_starts(tmp_path, capsys, monkeypatch):
    """A relative data.path is looked up from the working directory (the error says which); a run
    refused for it leaves no stage behind."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run"), "data": {"path": "no_such_data"}}))
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(config)]) == 2
    assert f"no_such_data: not found (relative to the working directory {tmp_path})" in capsys.readouterr().err
    assert not (tmp_path / "run" / "data").exists()


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    assert main(["run", str(config), "teacher.no_such_option=1"]) == 2
    assert "no_such_option" in capsys.readouterr().err


def test_a_setting_a_later_stage_would_refuse_fails_before_the_first_stage(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    assert main(["run", str(config), f"out={out}", "distill.top_k=0"]) == 2
    assert "top_k must be >= 1" in capsys.readouterr().err
    assert main(["run", str(config), f"out={out}", "eval.gates=learned,expert:9"]) == 2
    assert "eval.gates: gate 'expert:9': expert index must be in 0..3" in capsys.readouterr().err
    assert not (out / "data").exists()  # nothing ran
    # the device is checked as the first stage that has work to do starts (a finished run's
    # report can be rebuilt without a GPU), before that work
    for section in ("rec", "export", "distill"):
        assert main(["run", str(config), f"out={out}", f"{section}.device=cuda"]) == 2
        assert f"{section}.device=cuda but torch sees no CUDA device (set {section}.device=cpu)" in capsys.readouterr().err
    assert main(["run", str(config), f"out={out}", "rec.threads=0"]) == 2
    assert "rec: threads must be >= 1" in capsys.readouterr().err
    assert not (out / "data" / "dataset").exists() and not (out / "data" / "stage.json").exists()


def test_data_the_teacher_would_refuse_fails_before_sasrec_trains(tmp_path, capsys):
    """An empty val split used to train SASRec first and fail at the teacher stage."""
    from ilora.data import make_synthetic, write_native

    dataset = make_synthetic(users=60, items=40, seed=1)
    dataset.splits["val"] = dataset.splits["val"].subset(slice(0, 0))
    write_native(dataset, tmp_path / "no_val")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "data": {"path": str(tmp_path / "no_val")}, "out": str(tmp_path / "run")}))
    assert main(["run", str(config)]) == 2
    assert "the val split has no samples" in capsys.readouterr().err
    assert not (tmp_path / "run" / "sasrec" / "stage.json").exists() and not (tmp_path / "run" / "sasrec" / "model").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"teacher": {**SMALL["teacher"], "num_candidates": 38}}, "train split, row"),
        ({"eval": {**SMALL["eval"], "candidates": 38}}, "test split, row"),
        ({"export": {**SMALL["export"], "pool_candidates": 38, "splits": ["train", "val"]}}, "train split, row"),
    ],
)
def test_candidate_sets_a_row_cannot_fill_fail_before_sasrec_trains(tmp_path, capsys, override, message):
    """40 items, histories of up to 10: 38 candidates leave some rows short of negatives. The
    teacher, eval or export stage found that only after SASRec (and the teacher) had trained."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, **override, "out": str(tmp_path / "run")}))
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and "cannot draw 37 negatives" in err
    assert not (tmp_path / "run" / "sasrec" / "stage.json").exists() and not (tmp_path / "run" / "sasrec" / "model").exists()


def test_interrupted_training_stage_resumes_from_its_checkpoints(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run"), "teacher": {**SMALL["teacher"], "checkpoint_every": 1}}))
    assert main(["run", str(config)]) == 0
    run = tmp_path / "run"
    marker = json.loads((run / "teacher" / "stage.json").read_text())
    weights = (run / "teacher" / "model" / "adapter_model.safetensors").read_bytes()
    # As if killed after the teacher's checkpoints were written but before the stage finished.
    (run / "teacher" / "stage.json").unlink()
    (run / "teacher" / "stage.pending").write_text(marker["key"])
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    err = capsys.readouterr().err
    # the teacher stage completed anew, so what reads it runs again (its old results were
    # built on the previous completion)
    assert "teacher: resuming" in err and "eval: running" in err and "sasrec: up to date" in err
    assert (run / "teacher" / "model" / "adapter_model.safetensors").read_bytes() == weights
    # A pending marker of another config is not resumed: the stage starts clean.
    (run / "teacher" / "stage.json").unlink()
    (run / "teacher" / "stage.pending").write_text("another-config")
    assert main(["run", str(config)]) == 0
    assert "teacher: running" in capsys.readouterr().err


def test_an_interrupted_distillation_keeps_its_finished_baseline(tmp_path, capsys):
    """Killed after the baseline student finished, before the distilled one wrote a checkpoint:
    the stage resumes, the baseline is returned as it was, the distilled student is trained."""
    import shutil

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run")}))
    assert main(["run", str(config)]) == 0
    stage = tmp_path / "run" / "distill"
    marker = json.loads((stage / "stage.json").read_text())
    baseline = stage / "baseline" / "model.safetensors"
    written = baseline.stat().st_mtime_ns
    (stage / "stage.json").unlink()
    (stage / "stage.pending").write_text(marker["key"])
    (stage / "result.json").unlink()
    shutil.rmtree(stage / "distilled")
    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    assert "distill: resuming" in capsys.readouterr().err
    assert baseline.stat().st_mtime_ns == written  # not trained again
    assert (stage / "distilled" / "result.json").is_file() and (stage / "stage.json").is_file()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_passes_the_run_checks(path):
    """The configs README points users to parse into a `RunConfig` whose options every stage accepts
    (devices aside: a CUDA config is checked on a machine without one)."""
    from ilora.config import load_config
    from ilora.pipeline.config import RunConfig, check_run_config

    cfg = load_config(RunConfig, yaml_path=path)
    check_run_config(cfg)  # TeacherConfig checked its own options (batch multiples, shared inputs) when built
    if cfg.teacher.device == "cuda":  # no stage left on the CPU default (a 7B export there would never finish)
        assert {section: getattr(cfg, section).device for section in ("rec", "export", "distill")} == dict.fromkeys(("rec", "export", "distill"), "cuda")


def test_a_stage_leaves_no_cycle_held_model_behind(tmp_path):
    """What a stage's work kept only in reference cycles (a compiled model holds some, and with
    them its weights) is freed when the stage ends, before the next stage loads its own model,
    without waiting for the cyclic collector's own schedule."""
    import gc
    import weakref

    import torch

    from ilora.pipeline.stages import run_stage

    left = []

    def stage(directory):
        weight = torch.zeros(4)
        holder = {"weight": weight}
        holder["self"] = holder  # a cycle: refcounting alone never frees it
        left.append(weakref.ref(weight))
        return {}

    gc.disable()
    try:
        run_stage(tmp_path, "a", {"x": 1}, [], stage)
        assert left[0]() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "override, message",
    [
        ("export.limit=100", r"export\.limit=100 with distill\.train_limit=0: the students need a teacher row for every train sample"),
        ("export.splits=test", r"export\.splits=\['test'\]: the run's distillation reads the train split"),
        ("distill.top_k=5", r"distill\.top_k=5 exceeds export\.top_k=3"),
        ("eval.batch_size=0", r"eval\.batch_size: must be >= 1, got 0"),
        ("eval.limit=-1", r"eval\.limit: must be >= 0 \(0: every sample\), got -1"),
        ("eval.split=tset", r"eval\.split.*'tset'.*train, val, test"),
        ("data.format=parquet", r"data\.format.*'parquet'.*auto, native, llara, interactions"),
        ("data.format=native", r"data\.format=native: applies to data\.path, which is empty"),
        ("data.min_len=0", r"data\.min_len: must be >= 1, got 0"),
    ],
)
def test_run_refuses_options_a_later_stage_cannot_use_before_any_stage(tmp_path, capsys, override, message):
    """A partial or train-less export, or a student reading more of each row than was exported,
    would fail only at the distill stage, after SASRec, the teacher, evaluation and export had
    run; an unknown split or a zero batch only at evaluation: refused up front, with nothing
    written."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run")}))
    assert main(["run", str(config), override]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_run_with_a_partial_export_trains_the_students_on_the_samples_it_covers(tmp_path, capsys):
    """export.limit=N with distill.train_limit=N: the export holds the first N samples of each split
    and the students train on the first N train samples (distill's own test checks them against
    students of a dataset cut by hand); a train_limit beyond the export is refused before any stage."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run")}))
    assert main(["run", str(config), "export.limit=20", "distill.train_limit=21"]) == 2
    assert "set distill.train_limit to at most 20" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main(["run", str(config), "distill.train_limit=100000"]) == 2  # beyond the train split: before SASRec trains
    assert "train_limit=100000: " in capsys.readouterr().err and not (tmp_path / "run" / "sasrec").exists()
    assert main(["run", str(config), "export.limit=20", "distill.train_limit=20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["export"]["rows"] == 20 < result["data"]["train_rows"]
    students = json.loads((tmp_path / "run" / "distill" / "result.json").read_text())
    assert students["config"]["train_limit"] == 20 and students["distilled"]["steps"] == 2  # 2 epochs of one batch of 20
    train_rows = result["data"]["train_rows"]
    assert f"The students trained on the first 20 of the {train_rows:,} train samples" in (tmp_path / "run" / "report.md").read_text()
    # the stages before the export up to date: a train_limit beyond the train split is refused
    # before the export runs again (it was found by distill, after a whole new export)
    export_record = (tmp_path / "run" / "export" / "stage.json").read_text()
    assert main(["run", str(config), f"export.limit={train_rows + 10}", f"distill.train_limit={train_rows + 10}"]) == 2
    err = capsys.readouterr().err
    assert f"train_limit={train_rows + 10}: " in err and "export: running" not in err
    assert (tmp_path / "run" / "export" / "stage.json").read_text() == export_record


def test_run_and_teacher_eval_refuse_fewer_than_two_candidates(tmp_path, capsys):
    """One candidate is the target alone: hr@1 would be 1.0 for any model."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run")}))
    assert main(["run", str(config), "eval.candidates=1"]) == 2
    assert "eval.candidates: must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["teacher", "eval", str(tmp_path), "--teacher", str(tmp_path), "--candidates", "1"])
    assert exit_info.value.code == 2
    assert "--candidates: must be >= 2, got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["rec", "eval", str(tmp_path), "--model", str(tmp_path), "--candidates", "1"])
    assert exit_info.value.code == 2
    assert "--candidates: must be 0 (none) or >= 2" in capsys.readouterr().err
    config.write_text(yaml.safe_dump({**SMALL, "out": str(tmp_path / "run"), "teacher": {**SMALL["teacher"], "num_candidates": 1}}))
    assert main(["run", str(config)]) == 2
    assert "num_candidates: must be >= 2" in capsys.readouterr().err


def test_the_data_sections_min_len_applies_to_synthetic_data_too(tmp_path):
    """data.min_len filters the synthetic dataset as it filters a dataset read from data.path
    (it was ignored without a path)."""
    from ilora.config import load_config
    from ilora.data import read_native
    from ilora.pipeline.config import RunConfig
    from ilora.pipeline.run import stage_data

    rows = {}
    for min_len in (1, 3):
        cfg = load_config(RunConfig, overrides=["data.synth.users=60", "data.synth.items=40", f"data.min_len={min_len}"])
        result = stage_data(cfg, tmp_path / str(min_len))
        train = read_native(tmp_path / str(min_len) / "dataset").split("train")
        assert result["train_rows"] == len(train) and int(train.length.min()) >= min_len
        rows[min_len] = len(train)
    assert 0 < rows[3] < rows[1]
    # the data stage's record: unchanged at the default (runs recorded before stay current), marked
    # where the filter now applies (a synthetic stage recorded with min_len 3 before held unfiltered data)
    from ilora.config import to_dict
    from ilora.pipeline.run import data_stage_config

    plain = load_config(RunConfig, overrides=[])
    assert data_stage_config(plain) == to_dict(plain.data)
    assert data_stage_config(cfg) == {**to_dict(cfg.data), "min_len_filters_synthetic": True}


def test_the_data_stage_reruns_when_the_files_at_data_path_change(tmp_path, caplog):
    """A data stage is keyed by what data.path holds, not by the path alone: new files rerun it
    (and so every stage after it, which reads its token); the same data leaves it current, also
    for a record made before the fingerprint was kept; a source since removed leaves the
    finished stage in use, with a warning."""
    from ilora.config import load_config
    from ilora.data import make_synthetic, read_native, write_native
    from ilora.pipeline.config import RunConfig
    from ilora.pipeline.run import run_data_stage
    from ilora.pipeline.stages import stage_key

    source, run_dir = tmp_path / "source", tmp_path / "run"
    write_native(make_synthetic(users=30, items=20, seed=1), source)
    cfg = load_config(RunConfig, overrides=[f"data.path={source}"])
    first, result = run_data_stage(cfg, run_dir)
    assert result["train_rows"] == len(make_synthetic(users=30, items=20, seed=1).split("train"))
    assert run_data_stage(cfg, run_dir)[0] == first  # the same files: current
    changed = make_synthetic(users=40, items=20, seed=2)
    write_native(changed, source, overwrite=True)
    second, result = run_data_stage(cfg, run_dir)
    assert second != first and result["train_rows"] == len(changed.split("train"))
    assert read_native(run_dir / "data" / "dataset").sha256() == changed.sha256()
    # a record made before the fingerprint was kept: current while the data it wrote is the source's
    record = json.loads((run_dir / "data" / "stage.json").read_text())
    del record["config"]["source_sha256"]
    record["key"] = stage_key(record["config"], [])
    (run_dir / "data" / "stage.json").write_text(json.dumps(record))
    third, _ = run_data_stage(cfg, run_dir)
    assert third.startswith(record["key"])  # skipped with its recorded token
    write_native(make_synthetic(users=30, items=20, seed=1), source, overwrite=True)
    assert not run_data_stage(cfg, run_dir)[0].startswith(record["key"])  # other data: rerun
    # the source removed: the finished stage stays in use, with a warning
    kept = run_data_stage(cfg, run_dir)[0]
    import shutil

    shutil.rmtree(source)
    with caplog.at_level("WARNING"):
        assert run_data_stage(cfg, run_dir)[0] == kept
    assert f"data.path {source}: not found; the run goes on with the dataset its data stage wrote" in caplog.text
    # ... but a stage with work to do (other options) refuses it before its finished files are moved
    recorded = (run_dir / "data" / "stage.json").read_text()
    with pytest.raises(DataError, match="not found"):
        run_data_stage(load_config(RunConfig, overrides=[f"data.path={source}", "data.min_len=3"]), run_dir)
    assert (run_dir / "data" / "stage.json").read_text() == recorded and not (run_dir / "data.previous").exists()


def test_an_older_data_record_kept_aside_is_judged_by_the_dataset_beside_it(tmp_path):
    """A data stage recorded before the source's fingerprint, moved to data.previous by a run of
    other options that was then interrupted, is current again by the dataset in data.previous,
    not by whatever the interrupted run left in data/."""
    import shutil

    from ilora.config import load_config
    from ilora.data import make_synthetic, write_native
    from ilora.pipeline.config import RunConfig
    from ilora.pipeline.run import run_data_stage
    from ilora.pipeline.stages import stage_key

    first, second = make_synthetic(users=30, items=20, seed=1), make_synthetic(users=40, items=20, seed=2)
    source, run_dir = tmp_path / "source", tmp_path / "run"
    write_native(first, source)
    cfg = load_config(RunConfig, overrides=[f"data.path={source}"])
    run_data_stage(cfg, run_dir)
    record = json.loads((run_dir / "data" / "stage.json").read_text())  # made older: no fingerprint
    del record["config"]["source_sha256"]
    record["key"] = stage_key(record["config"], [])
    (run_dir / "data" / "stage.json").write_text(json.dumps(record))

    def interrupted(written) -> None:  # the older record in data.previous; data/ as a killed run leaves it
        shutil.rmtree(run_dir / "data.previous", ignore_errors=True)
        shutil.copytree(run_dir / "data", run_dir / "data.previous")
        shutil.rmtree(run_dir / "data")
        (run_dir / "data").mkdir()
        (run_dir / "data" / "stage.pending").write_text("{}")
        if written is not None:
            write_native(written, run_dir / "data" / "dataset")

    interrupted(None)  # killed before it wrote its dataset: the older record, whose data is the source's, is put back
    assert run_data_stage(cfg, run_dir)[0].startswith(record["key"])
    interrupted(second)  # the source changed since, and the killed run wrote the new data: the older record is not current
    write_native(second, source, overwrite=True)
    assert not run_data_stage(cfg, run_dir)[0].startswith(record["key"])

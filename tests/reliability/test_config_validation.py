"""Impossible configurations fail before any work, with a message naming the option.

"Before any work" is shown two ways: the config object itself refuses the values (nothing
else has run), and through the CLI the error comes out even when DATA and the SASRec
directory do not exist (so neither was opened) and no output directory is created.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ilora.cli.main import main
from ilora.config import load_config
from ilora.errors import ConfigError, IloraError
from ilora.teacher.config import SELECT_METRICS, TeacherConfig


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


INVALID_TEACHER = [
    ({"num_experts": 0}, "num_experts: must be >= 1, got 0"),
    ({"num_experts": -3}, "num_experts: must be >= 1, got -3"),
    ({"rank_per_expert": 0}, "rank_per_expert: must be >= 1, got 0"),
    ({"batch_size": 0}, "batch_size: must be >= 1, got 0"),
    ({"batch_size": 8, "micro_batch_size": 3}, "batch_size 8 is not a multiple of micro_batch_size 3"),
    ({"micro_batch_size": -1}, "micro_batch_size: must be >= 0, got -1"),
    ({"epochs": 0}, "epochs: must be >= 1"),
    ({"max_steps": -1}, "max_steps: must be >= 0"),
    ({"num_candidates": 0}, "num_candidates: must be >= 1"),
    ({"val_samples": -2}, "val_samples: must be >= 0"),
    ({"workers": -1}, "workers: must be >= 0"),
    ({"lr": 0.0}, "lr: must be a finite number > 0.0"),
    ({"lr": float("nan")}, "lr: must be a finite number > 0.0, got nan"),
    ({"lr": float("inf")}, "lr: must be a finite number"),
    ({"warmup_ratio": 1.5}, "warmup_ratio: must be a finite number >= 0.0 and <= 1.0"),
    ({"min_lr_ratio": -0.1}, "min_lr_ratio: must be a finite number >= 0.0"),
    ({"grad_clip": -1.0}, "grad_clip: must be a finite number >= 0.0"),
    ({"router_lr_scale": -1.0}, "router_lr_scale: must be a finite number >= 0.0"),
    ({"weight_decay": -0.5}, "weight_decay: must be a finite number >= 0.0"),
    ({"alpha": 0.0}, "alpha: must be a positive number"),
    ({"lora_dropout": 1.0}, "lora_dropout: must be in [0, 1)"),
    ({"gate_hidden": 0}, "gate_hidden: must be >= 1"),
    ({"gate": "transformer"}, "gate: 'transformer' is not one of mlp, resnet"),
    ({"gate_blocks": 3}, "gate_blocks (3) and gate_pool (8) apply to the resnet gate only"),
    ({"gate": "resnet", "gate_pool": 0}, "gate_pool: must be >= 1"),
    ({"gate": "resnet", "gate_blocks": -1}, "gate_blocks: must be >= 0"),
    ({"gate_temperature": 0.0}, "gate_temperature: must be positive"),
    ({"select_metric": "accuracy"}, "select_metric: 'accuracy' is not one of hr@1"),
    ({"tiny_hidden": 0}, "tiny_hidden: must be >= 1"),
    ({"tiny_heads": 3}, "tiny_hidden 64 / tiny_heads 3: the head size must be a whole, even number"),
    ({"tiny_hidden": 12, "tiny_heads": 4}, "tiny_hidden 12 / tiny_heads 4"),  # head size 3: RoPE needs an even one
    ({"max_title_tokens": 0}, "max_title_tokens: must be >= 1"),
    ({"threads": 0}, "threads: must be >= 1 (or none: torch's default), got 0"),
]


@pytest.mark.parametrize("values, message", INVALID_TEACHER, ids=[next(iter(v)) + "=" + str(next(iter(v.values()))) for v, _ in INVALID_TEACHER])
def test_teacher_config_refuses(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        TeacherConfig(**values)
    assert message in str(info.value)


def test_an_unknown_domain_is_refused_for_training_and_a_saved_teacher_needs_no_file() -> None:
    """A saved teacher records its template (a file it was trained with may be gone): the config
    itself accepts any domain, training (`check_training_options`) refuses one it cannot read."""
    from ilora.teacher.config import check_training_options

    cfg = TeacherConfig(domain="no-such-template")
    with pytest.raises(ConfigError, match="prompt template 'no-such-template': not a domain"):
        check_training_options(cfg)



def test_tiny_options_with_another_base_llm_are_refused_for_training() -> None:
    """They would be recorded in the teacher's config and used for nothing."""
    from ilora.teacher.config import check_training_options

    check_training_options(TeacherConfig(llm="some/model"))
    with pytest.raises(ConfigError, match=r"tiny_arch=qwen2, tiny_layers=4: the tiny_\* options build --llm tiny only, and the base LLM is 'some/model'"):
        check_training_options(TeacherConfig(llm="some/model", tiny_arch="qwen2", tiny_layers=4))



def test_a_run_or_resume_recorded_with_unused_tiny_options_stays_the_same_work_without_them(tmp_path) -> None:
    """Before the refusal, tiny_* options given with another base LLM were recorded: removing them
    (as the refusal asks) must not retrain a finished `ilora run` teacher stage or refuse a resume."""
    from ilora.config import to_dict
    from ilora.errors import IloraError
    from ilora.pipeline.stages import _same_work
    from ilora.teacher.config import same_teacher_form
    from ilora.teacher.train import check_same_options

    model = tmp_path / "model"
    model.mkdir()
    now = TeacherConfig(llm=str(model))
    recorded = {**to_dict(now), "tiny_vocab": 4000, "tiny_arch": "qwen2"}
    assert _same_work(recorded, to_dict(now), same_teacher_form)
    check_same_options(recorded, now, tmp_path)
    assert not _same_work({**recorded, "lr": 0.5}, to_dict(now), same_teacher_form)
    with pytest.raises(IloraError, match="lr: 0.5 -> "):
        check_same_options({**recorded, "lr": 0.5}, now, tmp_path)
    tiny = TeacherConfig()  # where the tiny model is the base, they are its sizes
    assert not _same_work({**to_dict(tiny), "tiny_vocab": 4000}, to_dict(tiny), same_teacher_form)


def test_select_metrics_are_the_ones_training_reports() -> None:
    from ilora.teacher import train

    assert SELECT_METRICS == train._PROTECTED_METRICS


def test_tiny_sizes_are_only_checked_for_the_tiny_llm() -> None:
    TeacherConfig(llm="some/model", tiny_heads=3)  # the tiny options are unused then


def test_there_is_no_total_rank_option() -> None:
    """Documented decision: rank is per expert, so total rank = E x r is always divisible by E."""
    names = {f.name for f in dataclasses.fields(TeacherConfig)}
    assert "rank_per_expert" in names and not any("total_rank" in n or n == "rank" for n in names)
    cfg = TeacherConfig(num_experts=3, rank_per_expert=5)
    assert cfg.adapter_config().total_rank == 15
    assert "total rank = E x rank" in TeacherConfig.__dataclass_fields__["rank_per_expert"].metadata["help"]


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("num_experts: 4\nbogus_key: 3\n", "unknown option bogus_key"),
        ("batch_size: [1, 2]\n", "batch_size: expected a single value, got a list ([1, 2])"),
        ("llm: {name: x}\n", "llm: expected a single value, got a mapping ({'name': 'x'})"),  # was taken as the text "{'name': 'x'}"
        # a billion laughs: aliases make 600 bytes a shared graph whose repr or str() is exponential
        ("llm: [&a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(f"&{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdefghi", "bcdefghij")) + "]\n",
         "llm: expected a single value, got a list ([['x', 'x', 'x', 'x', ...], [[...], [...], [...], [...], ...],"),
        ("num_experts: 2.5\n", "num_experts: 2.5 is not a valid int"),
        ("curriculum: maybe\n", "curriculum: 'maybe' is not a boolean"),
        ("gate: transformer\n", "gate: 'transformer' is not one of mlp, resnet"),
        ("- a\n- b\n", "expected a mapping of options at the top level"),
        ("lr: [\n", "not valid YAML"),
        ("lr: !!python/object/apply:os.system ['touch /tmp/should-not-exist']\n", "not valid YAML"),
        ("lr: 0.1\nepochs: [1, 2\nbatch_size: 8\n", ", line 3, column 11: not valid YAML (while parsing a flow sequence: expected ',' or ']', but got ':')"),
    ],
)
def test_yaml_unknown_keys_wrong_types_and_tags(yaml_text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(TeacherConfig, yaml_path=path)
    assert message in str(info.value) and str(info.value).startswith(f"{path}")  # names the file (and the line of a YAML error)


def test_an_error_the_file_does_not_cause_does_not_name_it(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("micro_batch_size: 4\n", encoding="utf-8")  # fine alone; the flag makes it wrong
    with pytest.raises(ConfigError) as info:
        load_config(TeacherConfig, yaml_path=path, flags={"batch_size": 6})
    assert str(info.value).startswith("batch_size 6 is not a multiple of micro_batch_size 4")


def test_overrides_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="unknown option expert_count"):
        load_config(TeacherConfig, overrides=["expert_count=3"])
    with pytest.raises(ConfigError, match="num_experts: 'abc' is not a valid int"):
        load_config(TeacherConfig, overrides=["num_experts=abc"])
    with pytest.raises(ConfigError, match="is not of the form key=value"):
        load_config(TeacherConfig, overrides=["num_experts"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-experts", "0"], "num_experts: must be >= 1"),
        (["--batch-size", "6", "--micro-batch-size", "4"], "batch_size 6 is not a multiple of micro_batch_size 4"),
        (["--lr", "nan"], "lr: 'nan' is not a finite number"),
        (["--select-metric", "bogus"], "select_metric: 'bogus'"),
        (["rank_per_expert=0"], "rank_per_expert: must be >= 1"),
        (["nonsense_option=1"], "unknown option nonsense_option"),
    ],
)
def test_teacher_train_cli_fails_before_touching_anything(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["teacher", "train", str(tmp_path / "no-data"), "--rec", str(tmp_path / "no-rec"), "--out", str(out), *argv])
    line = error_line(capsys)
    assert code == 2 and message in line
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--batch-size", "x"], "batch_size: 'x' is not a valid int"),
        (["bogus=1"], "unknown option bogus"),
        (["--threads", "0"], "threads must be >= 1"),
        (["--hidden", "0"], "hidden, heads and blocks must be >= 1"),
        (["--heads", "3"], "hidden 64 must be divisible by heads 3"),
        (["--dropout", "1.5"], "dropout must be in [0, 1), got 1.5"),
    ],
)
def test_rec_train_cli_fails_before_touching_anything(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["rec", "train", str(tmp_path / "no-data"), "--out", str(out), *argv])
    assert code == 2 and message in error_line(capsys)
    assert not out.exists()


def test_unknown_gate_mode_for_evaluation() -> None:
    from ilora.teacher.model import parse_gate_mode

    assert parse_gate_mode("expert:1", 4) == ("expert", 1)
    # one spelling per expert (it names result files): no spaces, signs or leading zeros
    for mode, message in [("sometimes", "expected learned, uniform or expert:N"), ("expert:4", "in 0..3"), ("expert:x", "in 0..3"),
                          ("expert: 1", "in 0..3"), ("expert:+1", "in 0..3"), ("expert:01", "in 0..3"), ("expert:１", "in 0..3")]:
        with pytest.raises(ConfigError, match=message):
            parse_gate_mode(mode, 4)
    assert parse_gate_mode("expert:7", None) == ("expert", 7)  # syntax only: before a teacher is loaded
    with pytest.raises(ConfigError, match="non-negative integer"):
        parse_gate_mode("expert:x", None)


@pytest.mark.parametrize("command", [["teacher", "eval"], ["teacher", "export", "--out", "OUT"]])
def test_teacher_eval_and_export_refuse_a_bad_gate_before_reading_anything(command, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    code = main([*argv, str(tmp_path / "no-data"), "--teacher", str(tmp_path / "no-teacher"), "--gate", "bogus"])
    assert code == 2 and "gate 'bogus': expected learned, uniform or expert:N" in error_line(capsys)


@pytest.mark.parametrize("command", [["teacher", "eval"], ["teacher", "export", "--out", "OUT"]])
def test_teacher_eval_and_export_take_threads_as_training_does(command, tmp_path: Path, capsys, monkeypatch) -> None:
    """--threads sets torch's threads for the command before anything is read, and the count
    before it is restored after; 0 is refused by argparse."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: asked.append(n))
    asked: list[int] = []
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    assert main([*argv, str(tmp_path / "no-data"), "--teacher", str(tmp_path / "no-teacher"), "--threads", "1"]) == 2  # no teacher
    assert asked == [1, before] and "no-teacher" in error_line(capsys)
    with pytest.raises(SystemExit):
        main([*argv, str(tmp_path / "no-data"), "--teacher", str(tmp_path / "no-teacher"), "--threads", "0"])
    assert asked == [1, before]


def test_teacher_eval_refuses_max_new_tokens_for_the_score_protocol_before_reading_anything(tmp_path: Path, capsys) -> None:
    """Was refused only once the teacher (a 7B model, say) had been loaded."""
    code = main(["teacher", "eval", str(tmp_path / "no-data"), "--teacher", str(tmp_path / "no-teacher"), "--max-new-tokens", "5"])
    assert code == 2 and "--max-new-tokens applies to the generate protocol only, not to 'score'" in error_line(capsys)


@pytest.mark.parametrize("command", [["teacher", "eval"], ["teacher", "export", "--out", "OUT"]])
def test_teacher_eval_and_export_refuse_cuda_without_a_gpu_before_reading_anything(command, tmp_path: Path, capsys, monkeypatch) -> None:
    """Was a traceback (torch's 'not compiled with CUDA' assertion) once the teacher was loaded."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    code = main([*argv, str(tmp_path / "no-data"), "--teacher", str(tmp_path / "no-teacher"), "--device", "cuda"])
    assert code == 2 and "device=cuda but torch sees no CUDA device (use --device cpu)" in error_line(capsys)


def test_unknown_target_modules_fail_at_build_before_training() -> None:
    from ilora.data.dataset import Catalog
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.build import build_teacher

    catalog = Catalog(tuple(f"song {i}" for i in range(12)))
    rec = SASRec(SASRecConfig(num_items=12, max_len=4, hidden=8, heads=1, blocks=1))
    tiny = {"tiny_hidden": 16, "tiny_layers": 1, "tiny_heads": 2, "tiny_vocab": 200}
    for targets, message in [
        (["attention_proj"], "target module 'attention_proj' matches no layer of this llama model"),
        (["lm_head"], "which cannot be adapted"),
        (["embed_tokens"], "which cannot be adapted"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_teacher(TeacherConfig(target_modules=targets, **tiny), catalog, rec)
    bundle = build_teacher(TeacherConfig(target_modules=["q_proj", "v_proj"], **tiny), catalog, rec)
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in bundle.teacher.llm.state_dict() if ".lora_A." in n}
    assert adapted == {"q_proj", "v_proj"}


def test_sasrec_catalog_mismatch_fails_at_build() -> None:
    from ilora.data.dataset import Catalog
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.build import build_teacher

    rec = SASRec(SASRecConfig(num_items=7, max_len=4, hidden=8, heads=1, blocks=1))
    with pytest.raises(IloraError, match="SASRec was trained on 7 items but the dataset has 3"):
        build_teacher(TeacherConfig(), Catalog(("a", "b", "c")), rec)


def test_export_top_k_larger_than_the_pool() -> None:
    export = pytest.importorskip("ilora.outputs.export")
    if not hasattr(export, "check_pool"):
        pytest.skip("teacher export has no pool check yet")
    opts = export.ExportOptions(top_k=30, pool_sasrec=0, pool_candidates=20)
    with pytest.raises(ConfigError, match="top-k 30 exceeds the candidate pool size"):
        export.check_pool(opts, num_items=100, max_len=10)
    with pytest.raises(ConfigError, match="the catalog has only 15 items"):
        export.check_pool(export.ExportOptions(top_k=5, pool_sasrec=50, pool_candidates=20), num_items=15, max_len=10)
    with pytest.raises(ConfigError, match="top_k|top-k"):
        export.ExportOptions(top_k=0)


@dataclasses.dataclass
class _FloatOptions:
    """A stand-in config with a float option that no other check looks at."""

    weight: float = 0.5
    margin: float | None = None


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_float_options_refuse_non_finite_values_from_overrides(text: str) -> None:
    with pytest.raises(ConfigError, match=rf"weight: '{text}' is not a finite number"):
        load_config(_FloatOptions, overrides=[f"weight={text}"])
    with pytest.raises(ConfigError, match=rf"margin: '{text}' is not a finite number"):
        load_config(_FloatOptions, overrides=[f"margin={text}"])
    assert load_config(_FloatOptions, overrides=["weight=1e300", "margin=none"]) == _FloatOptions(1e300, None)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_float_options_refuse_non_finite_values_from_yaml(value: str, tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"weight: {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"weight: -?(nan|inf) is not a finite number"):
        load_config(_FloatOptions, yaml_path=path)


def test_no_float_option_defaults_to_a_non_finite_value() -> None:
    """The finite-only rule must not lock out a default: every float option in the CLI's configs is finite."""
    import math
    import typing

    from ilora.data.synthetic import SynthConfig
    from ilora.rec.train import RecTrainConfig

    for cls in (TeacherConfig, SynthConfig, RecTrainConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (float, float | None) and isinstance(f.default, float):
                assert math.isfinite(f.default), (cls.__name__, f.name)


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"deep\.yaml: YAML nested too deeply to read"):
        load_config(TeacherConfig, yaml_path=path)


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("eval", ["--limit", "-55"], "--limit: must be >= 0, got -55"),
        ("eval", ["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        ("eval", ["--candidates", "0"], "--candidates: must be >= 2, got 0"),
        ("export", ["--top-k", "0"], "--top-k: must be >= 1, got 0"),
        ("export", ["--shard-rows", "-1"], "--shard-rows: must be >= 1, got -1"),
        ("export", ["--pool-sasrec", "-2"], "--pool-sasrec: must be >= 0, got -2"),
    ],
)
def test_teacher_eval_and_export_refuse_bad_counts_before_loading_anything(command, argv, message, tmp_path, capsys) -> None:
    """A negative --limit used to evaluate a silently shortened split (slice(0, -55)); batch size 0 a traceback."""
    extra = ["--out", str(tmp_path / "o")] if command == "export" else []
    with pytest.raises(SystemExit) as exit_info:
        main(["teacher", command, str(tmp_path / "no-data"), "--teacher", str(tmp_path / "no-teacher"), *extra, *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rec_train_refuses_more_candidates_than_items_before_creating_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    assert main(["data", "synth", str(data), "--users", "30", "--items", "20"]) == 0
    capsys.readouterr()
    assert main(["rec", "train", str(data), "--out", str(out), "--eval-candidates", "5000"]) == 2
    assert "cannot draw 4999 negatives" in capsys.readouterr().err
    assert not out.exists()


def test_select_metric_hr5_over_5_candidates_is_refused_by_training_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """hr@5 over <= 5 candidates is 1.0 every epoch, so it would keep the first; a teacher saved
    with that setting must still load, evaluate and export (its select_metric is unused there)."""
    from ilora.pipeline.config import RunConfig, check_run_config
    from ilora.teacher.config import check_training_options

    constant = TeacherConfig(select_metric="hr@5", num_candidates=5)  # a saved teacher's config: accepted
    with pytest.raises(ConfigError, match="select_metric hr@5 is 1.0 for every epoch with num_candidates 5"):
        check_training_options(constant)
    check_training_options(TeacherConfig(select_metric="hr@5", num_candidates=6))
    with pytest.raises(ConfigError, match="teacher: select_metric hr@5"):
        check_run_config(RunConfig(out=str(tmp_path / "run"), teacher=constant))
    assert main(["data", "synth", str(tmp_path / "data"), "--users", "20", "--items", "20"]) == 0
    capsys.readouterr()
    out = tmp_path / "teacher"
    argv = ["teacher", "train", str(tmp_path / "data"), "--rec", str(tmp_path / "no-rec"), "--out", str(out), "select_metric=hr@5", "num_candidates=5"]
    assert main(argv) == 2
    assert "select_metric hr@5 is 1.0" in capsys.readouterr().err and not out.exists()  # before the SASRec is read


def test_one_candidate_is_refused_by_sasrec_training_and_distillation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A set of the target alone gives cand_hr@1 = 1.0 for any model."""
    from ilora.distill.train import DistillConfig
    from ilora.rec.train import RecTrainConfig

    for make in (lambda: RecTrainConfig(eval_candidates=1).validate(), lambda: DistillConfig(eval_candidates=1).validate()):
        with pytest.raises(ConfigError, match="eval_candidates must be 0 .* or >= 2 .* got 1"):
            make()
    RecTrainConfig(eval_candidates=0).validate()
    RecTrainConfig(eval_candidates=2).validate()
    assert main(["rec", "train", str(tmp_path / "no-data"), "--out", str(tmp_path / "out"), "--eval-candidates", "1"]) == 2
    assert "eval_candidates must be 0" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["teacher", "eval"], ["teacher", "export", "--out", "OUT"]])
def test_an_expert_the_teacher_lacks_is_refused_before_reading_data(command, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """expert:N is checked against the saved teacher's config before the data (here: missing) is read."""
    import torch

    from ilora.data import make_synthetic
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.build import build_teacher, save_teacher

    dataset = make_synthetic(users=20, items=15, seed=0)
    torch.manual_seed(0)
    rec = SASRec(SASRecConfig(num_items=dataset.num_items, max_len=dataset.max_len, hidden=16)).eval()
    cfg = TeacherConfig(tiny_hidden=32, tiny_layers=1, tiny_heads=4, tiny_vocab=300, max_title_tokens=8)
    save_teacher(build_teacher(cfg, dataset.catalog, rec), tmp_path / "teacher", dataset.catalog)
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    code = main([*argv, str(tmp_path / "no-data"), "--teacher", str(tmp_path / "teacher"), "--gate", "expert:9"])
    assert code == 2 and "expert index must be in 0..3" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_sections_own_check_names_the_section_in_a_run_config() -> None:
    """`ilora run` has five batch_size keys: 'teacher: batch_size 8 is not a multiple of ...',
    not the bare message the section's check gives (found by an independent review)."""
    from ilora.config import from_dict
    from ilora.pipeline.config import RunConfig

    with pytest.raises(ConfigError, match=r"^teacher: lr: must be a finite number > 0.0, got -1"):
        from_dict(RunConfig, {"teacher": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"^teacher: batch_size 8 is not a multiple of micro_batch_size 3"):
        from_dict(RunConfig, {"teacher": {"batch_size": 8, "micro_batch_size": 3}})
    with pytest.raises(ConfigError, match=r"^eval\.candidates: must be >= 2"):  # already qualified: left as it is
        from_dict(RunConfig, {"eval": {"candidates": 1}})


def test_changed_entries_lists_every_differing_key_once_sorted_and_skips_what_it_is_told():
    from ilora.config import changed_entries

    old, new = {"lr": 0.001, "epochs": 2, "seed": 1, "gone": "x"}, {"lr": 0.0007, "epochs": 2, "seed": 3, "added": True}
    assert changed_entries(old, new) == ["added: None -> True", "gone: 'x' -> None", "lr: 0.001 -> 0.0007", "seed: 1 -> 3"]
    assert changed_entries(old, new, skip={"seed", "gone", "added"}) == ["lr: 0.001 -> 0.0007"]
    assert changed_entries(old, dict(old)) == []


def test_a_threads_option_holds_inside_its_trainer_only(tmp_path: Path) -> None:
    """``threads`` sets torch's threads while its trainer runs and the count before it comes
    back after, also when the trainer raises: one pipeline stage's option never carries into
    the next (an `ilora run` with teacher.threads=1 ran its distill stage on 1 thread)."""
    import torch

    from ilora.config import torch_threads
    from ilora.data import make_synthetic
    from ilora.rec.sasrec import SASRec
    from ilora.rec.train import RecTrainConfig, train_sasrec

    seen: list[int] = []

    def model(arch):
        seen.append(torch.get_num_threads())
        return SASRec(arch)

    dataset = make_synthetic(users=20, items=15, seed=1)
    with torch_threads(2):
        train_sasrec(dataset, RecTrainConfig(epochs=1, hidden=16, eval_candidates=0, threads=1), tmp_path / "rec", model_factory=model)
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="stop"), torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("stop")
        assert torch.get_num_threads() == 2
        with torch_threads(None):  # unset: left as it is
            assert torch.get_num_threads() == 2
    with pytest.raises(ConfigError, match="threads must be >= 1"):  # named as the option, before torch sees it
        train_sasrec(dataset, RecTrainConfig(epochs=1, hidden=16, eval_candidates=0, threads=0), tmp_path / "bad")

"""The run report's note on a teacher weaker than SASRec (the demo's case)."""

from __future__ import annotations

from ilora.pipeline.report import summary_table, weak_teacher_note


def summary(teacher_hr1: float, sasrec_cand_hr1: float) -> dict:
    metrics = {"hr@1": teacher_hr1, "ndcg@5": 0.3, "mrr": 0.3, "valid_ratio": 1.0, "gate_stats": {"mean_entropy": 1.3}}
    return {
        "out": "run",
        "eval": {"split": "test", "samples": 200, "teacher": {"score/learned": metrics}, "sasrec_same_candidates": {"cand_hr@1": sasrec_cand_hr1}},
        "distill": {"baseline": {"ndcg@10": 0.64}, "distilled": {"ndcg@10": 0.47}, "gain": {"ndcg@10": -0.27}},
    }


def test_a_teacher_weaker_than_sasrec_is_said_to_be_so():
    note = weak_teacher_note(summary(0.165, 0.775))
    assert note is not None and "0.1650 vs 0.7750" in note and "expected to lower" in note
    assert note in summary_table(summary(0.165, 0.775))


def test_no_note_for_a_stronger_teacher_or_without_evaluation():
    assert weak_teacher_note(summary(0.8, 0.775)) is None
    assert weak_teacher_note(summary(0.775, 0.775)) is None
    assert weak_teacher_note({"distill": {}}) is None
    assert "teacher ranks" not in summary_table(summary(0.8, 0.775))


def test_a_seed_control_is_shown_beside_the_distillation_gain(tmp_path):
    from ilora.pipeline.report import write_report

    run = summary(0.8, 0.775)
    run["out"] = str(tmp_path)
    del run["eval"]  # the students' part of the report alone
    interval = {"samples": 200, "metrics": {"ndcg@10": {"gain": 0.05, "interval": [-0.01, 0.12], "better": 9, "worse": 4, "same": 187}}}
    run["distill"]["gain_interval"] = {"samples": 200, "metrics": {"ndcg@10": {"gain": -0.27, "interval": [-0.3, -0.2], "better": 1, "worse": 30, "same": 169}}}
    run["distill"]["control"] = {"seed": 1, "test": {"ndcg@10": 0.672}, "gain": {"ndcg@10": 0.05}, "gain_interval": interval}
    table = summary_table(run)
    assert "seed control gain (ndcg@10)" in table and "+5.0%" in table and "-1.0 % to +12.0 %" in table
    report = write_report(tmp_path, run).read_text()
    assert "control (seed 1): gain, interval" in report and "| +5.0 %, -1.0 % to +12.0 % |" in report
    del run["distill"]["control"]
    assert "seed control" not in summary_table(run)
    assert "`distill.control_seed`" in write_report(tmp_path, run).read_text()


def test_the_demo_trains_a_seed_control_unless_told_otherwise():
    from ilora.config import from_dict, merge_trees, parse_overrides, to_dict
    from ilora.pipeline.config import RunConfig, demo_config, with_demo_control

    def demo(*overrides):
        tree = parse_overrides(list(overrides))
        return with_demo_control(from_dict(RunConfig, merge_trees(to_dict(demo_config()), tree)), tree).distill

    assert demo().control_seed == demo().seed + 1 == 1
    assert demo("distill.seed=1").control_seed == 2  # follows the seed: never the seed itself
    assert demo("distill.control_seed=7").control_seed == 7
    assert demo("distill.control_seed=none").control_seed is None


def test_the_gate_plot_is_the_learned_gates_against_ln_e_and_absent_without_it(tmp_path, monkeypatch):
    """The plot took the first evaluated gate as 'learned' and a learned entropy as 'uniform'
    when score/uniform was not evaluated (found by an independent review)."""
    import math

    import ilora.pipeline.report as report

    plotted = []
    monkeypatch.setattr(report, "plot_gate", lambda stats, uniform, out, where="": plotted.append((stats, uniform, where)))
    stats = {"uniform": {"mean_entropy": math.log(4), "max_entropy": math.log(4)}, "learned": {"mean_entropy": 1.1, "max_entropy": math.log(4)}}
    run = summary(0.8, 0.775)
    del run["distill"]
    run["eval"]["teacher"] = {"generate/uniform": {"hr@1": 0.1, "gate_stats": stats["uniform"]}, "generate/learned": {"hr@1": 0.2, "gate_stats": stats["learned"]}}
    text = report.write_report(tmp_path, run).read_text()
    assert plotted == [(stats["learned"], math.log(4), "generate protocol, test, 200 samples")] and "![gate](gate.png)" in text
    plotted.clear()
    run["eval"]["teacher"] = {"score/expert:0": {"hr@1": 0.1, "gate_stats": stats["uniform"]}}
    (tmp_path / "gate.png").write_bytes(b"an earlier run's")
    assert "![gate]" not in report.write_report(tmp_path, run).read_text() and not plotted
    assert not (tmp_path / "gate.png").exists()


def test_an_empty_list_of_protocols_or_gates_is_refused():
    """It passed the checks, every stage ran, and the report then failed with a traceback."""
    import pytest

    from ilora.errors import ConfigError
    from ilora.pipeline.config import EvalSection

    for field in ("protocols", "gates"):
        with pytest.raises(ConfigError, match=f"eval.{field}: empty"):
            EvalSection(**{field: []})


def test_metrics_a_protocol_does_not_have_print_as_a_dash_not_nan():
    run = summary(0.8, 0.775)
    run["eval"]["teacher"]["generate/learned"] = {"hr@1": 0.1, "valid_ratio": 0.5, "gate_stats": {"mean_entropy": 1.25}}
    row = next(line for line in summary_table(run).splitlines() if line.startswith("generate/learned"))
    assert row.split() == ["generate/learned", "0.1000", "-", "-", "0.5000", "1.250"]
    assert "nan" not in summary_table(run)

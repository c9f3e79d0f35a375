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

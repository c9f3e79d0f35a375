"""MetricsLog: CSV + TensorBoard rows; a fresh run replaces an earlier run's logs, a resumed one keeps them."""

from __future__ import annotations

import csv

from ilora.metrics_log import MetricsLog


def scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows in ``tb_dir``: tag -> [(step, value)] in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run(out, losses, purge_step=None, first_step=1):
    steps = MetricsLog(out, "train_steps", purge_step=purge_step)
    epochs = MetricsLog(out, "metrics", writer=steps.writer, purge_step=purge_step)
    for i, loss in enumerate(losses):
        steps.log({"step": first_step + i, "loss": loss}, first_step + i)
    epochs.log({"epoch": 1, "val_mrr": losses[-1] / 10}, first_step + len(losses) - 1)
    steps.close()


def rows(path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_fresh_run_replaces_an_earlier_runs_csv_and_tensorboard_events(tmp_path) -> None:
    """A run started over in the same directory (--overwrite, or --resume without a checkpoint)
    shows only its own rows: one curve per tag, not two runs' steps interleaved."""
    run(tmp_path, [3.0, 2.0, 1.0])
    (tmp_path / "other.txt").write_text("kept")
    run(tmp_path, [5.0, 4.0])

    assert scalars(tmp_path / "tb") == {"train_steps/loss": [(1, 5.0), (2, 4.0)], "val_mrr": [(2, 0.4)]}
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    assert rows(tmp_path / "train_steps.csv") == [{"step": "1", "loss": "5.0"}, {"step": "2", "loss": "4.0"}]
    assert rows(tmp_path / "metrics.csv") == [{"epoch": "1", "val_mrr": "0.4"}]
    assert (tmp_path / "other.txt").read_text() == "kept"


def test_a_resumed_run_keeps_the_earlier_events_before_its_purge_step(tmp_path) -> None:
    run(tmp_path, [3.0, 2.0, 1.0])
    log = MetricsLog(tmp_path, "train_steps", purge_step=3)  # resumed after step 2: step 3 is redone
    log.restore("step,loss\n1,3.0\n2,2.0\n")
    log.log({"step": 3, "loss": 0.5}, 3)
    log.close()

    assert scalars(tmp_path / "tb")["train_steps/loss"] == [(1, 3.0), (2, 2.0), (3, 0.5)]
    assert rows(tmp_path / "train_steps.csv") == [{"step": "1", "loss": "3.0"}, {"step": "2", "loss": "2.0"}, {"step": "3", "loss": "0.5"}]

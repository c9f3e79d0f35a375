"""Training commands that reject their input leave no --out directory behind."""

from __future__ import annotations

from ilora.cli.main import main
from ilora.data import make_synthetic, write_native


def test_rejected_training_runs_create_no_output(tmp_path, capsys):
    data = tmp_path / "data"
    write_native(make_synthetic(users=30, items=40, seed=2), data)
    # rec train: no train sample has 50 history items.
    assert main(["rec", "train", str(data), "--out", str(tmp_path / "rec_bad"), "train_min_len=50"]) == 2
    assert "min_len" in capsys.readouterr().err
    assert not (tmp_path / "rec_bad").exists()
    assert main(["rec", "train", str(data), "--out", str(tmp_path / "rec"), "--max-steps", "1", "--epochs", "1"]) == 0
    capsys.readouterr()
    # teacher train: a target module the model does not have is found at build time.
    out = tmp_path / "teacher_bad"
    code = main(["teacher", "train", str(data), "--rec", str(tmp_path / "rec"), "--out", str(out), "--tiny-vocab", "300",
                 "--target-modules", "no_such_proj"])
    assert code == 2 and "no_such_proj" in capsys.readouterr().err
    assert not out.exists()

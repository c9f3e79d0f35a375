"""`ilora rec ...` on the shared LastFM data and LLaRA checkpoint (skipped when shared/ is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ilora.cli.main import main

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
CKPT = SHARED / "checkpoints" / "llara_sasrec_lastfm.pt"
LASTFM = SHARED / "datasets" / "lastfm"
needs_shared = pytest.mark.skipif(not (CKPT.is_file() and LASTFM.is_dir()), reason="shared data not available")


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return json.loads(out[0])


@needs_shared
def test_import_then_eval(tmp_path, capsys) -> None:
    assert main(["rec", "import-llara", str(CKPT), "--out", str(tmp_path / "m")]) == 2
    assert "allow-pickle" in capsys.readouterr().err
    info = run_json(capsys, ["rec", "import-llara", str(CKPT), "--out", str(tmp_path / "m"), "--allow-pickle", "--json"])
    assert (info["num_items"], info["max_len"], info["hidden"]) == (4606, 10, 64)
    # a second import into the same directory replaces nothing without --overwrite
    assert main(["rec", "import-llara", str(CKPT), "--out", str(tmp_path / "m"), "--allow-pickle"]) == 2
    assert "holds an earlier run's model.safetensors, config.json; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["rec", "import-llara", str(CKPT), "--out", str(tmp_path / "m"), "--allow-pickle", "--overwrite"]) == 0
    capsys.readouterr()
    cands = tmp_path / "test_candidates.npy"
    argv = ["rec", "eval", str(LASTFM), "--allow-pickle", "--model", str(tmp_path / "m"), "--json"]
    result = run_json(capsys, argv + ["--save-candidates", str(cands)])
    assert result["split"] == "test" and result["num_samples"] == 122 and result["mask_history"] is False
    assert result["cand_count"] == 20 and cands.is_file()
    for key in ("hr@1", "ndcg@10", "hr@20", "cand_hr@1"):
        assert 0.0 <= result[key] <= 1.0
        assert key in result["popularity"]
    assert result["cand_hr@1"] > result["popularity"]["cand_hr@1"]
    masked = run_json(capsys, argv + ["--mask-history", "--candidates", "0"])
    assert masked["mask_history"] is True and "cand_hr@1" not in masked
    assert masked["hr@20"] >= result["hr@20"]  # masking history only removes competitors


@needs_shared
def test_eval_errors(tmp_path, capsys) -> None:
    assert main(["rec", "eval", str(LASTFM), "--model", str(tmp_path / "missing"), "--allow-pickle"]) == 2
    assert "not found" in capsys.readouterr().err
    # it used to report a candidates_file it never wrote
    argv = ["rec", "eval", str(LASTFM), "--model", str(tmp_path / "missing"), "--allow-pickle", "--candidates", "0"]
    assert main([*argv, "--save-candidates", str(tmp_path / "c.npy")]) == 2
    assert "--save-candidates needs --candidates > 0" in capsys.readouterr().err and not (tmp_path / "c.npy").exists()


@pytest.mark.slow
@needs_shared
def test_short_training_on_lastfm_beats_popularity(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    # key=value overrides must follow DATA directly (argparse fills both positionals in one go).
    argv = ["rec", "train", str(LASTFM), "threads=1", "--allow-pickle", "--out", str(out)]
    result = run_json(capsys, argv + ["--epochs", "3", "--json"])
    assert result["epochs_run"] == 3 and (out / "model.safetensors").is_file()
    val = run_json(capsys, ["rec", "eval", str(LASTFM), "--allow-pickle", "--model", str(out), "--split", "val", "--json"])
    assert val["ndcg@10"] == pytest.approx(result["val"]["ndcg@10"])
    pop = val["popularity"]
    assert val["ndcg@10"] > pop["ndcg@10"] and val["hr@20"] > pop["hr@20"]
    assert val["cand_hr@1"] > pop["cand_hr@1"]

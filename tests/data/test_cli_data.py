"""`ilora data {synth,convert,stats}` through the real entry point."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ilora.cli.main import build_parser, main
from ilora.data.io import load_dataset
from ilora.data.legacy import read_legacy
from ilora.data.native import read_native


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # exactly one JSON object on stdout
    return json.loads(out)


def test_stats_json_on_real_lastfm(lastfm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stats = run_json(capsys, "data", "stats", str(lastfm_dir), "--allow-pickle", "--json")
    assert stats["num_items"] == 4606 and stats["padding_id"] == 4606 and stats["max_len"] == 10
    rows = {name: s["rows"] for name, s in stats["splits"].items()}
    assert rows == {"train": 50800, "val": 122, "test": 122}
    train = stats["splits"]["train"]
    assert train["rows_len_ge_3"] == 47872 and train["samples"] == 49824 and train["dropped_no_history"] == 976


def test_stats_json_absent_split_is_null(small_lastfm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (small_lastfm / "Val_data.df").unlink()
    stats = run_json(capsys, "data", "stats", str(small_lastfm), "--allow-pickle", "--json", "--min-len", "2")
    assert stats["splits"]["val"] is None
    assert stats["min_len"] == 2
    # small_lastfm train: histories of length 0 (dropped), 1, 2, 3, 4
    train = stats["splits"]["train"]
    assert (train["rows"], train["samples"], train["dropped_no_history"], train["dropped_below_min_len"]) == (5, 3, 1, 1)
    assert train["rows_len_ge_3"] == 2


def test_stats_table(small_lastfm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "stats", str(small_lastfm), "--allow-pickle"]) == 0
    out = capsys.readouterr().out
    assert "items     6 (padding id 6)" in out
    assert any(line.split()[:4] == ["train", "5", "2", "4"] for line in out.splitlines())


def test_pickle_without_opt_in_exits_2(small_lastfm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "stats", str(small_lastfm)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--allow-pickle" in err and err.count("\n") == 1


def test_convert_then_read_native(small_lastfm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "converted"
    result = run_json(capsys, "data", "convert", str(small_lastfm), str(out), "--allow-pickle", "--json")
    assert result["output"] == str(out)
    legacy, native = read_legacy(small_lastfm, allow_pickle=True), read_native(out)
    assert native.catalog == legacy.catalog
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(native.splits[name].history, legacy.splits[name].history)
        np.testing.assert_array_equal(native.splits[name].target, legacy.splits[name].target)
    assert main(["data", "convert", str(small_lastfm), str(out), "--allow-pickle"]) == 2  # exists, no --overwrite
    assert capsys.readouterr().err == f"error: {out}: already exists (pass --overwrite to replace it)\n"  # before reading the source
    assert main(["data", "convert", str(tmp_path / "absent"), str(out)]) == 2  # the target is refused first
    assert "already exists" in capsys.readouterr().err


def test_convert_records_how_the_source_was_read(small_lastfm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    once, twice = tmp_path / "once", tmp_path / "twice"
    run_json(capsys, "data", "convert", str(small_lastfm), str(once), "--allow-pickle", "--min-len", "2", "--json")
    record = json.loads((once / "dataset.json").read_text())["converted_from"]
    # small_lastfm train: histories of length 0 (dropped), 1 (below min_len 2), 2, 3, 4
    assert (record["format"], record["source"], record["min_len"]) == ("llara", str(small_lastfm), 2)
    assert record["splits"]["train"] == {"rows_in_source": 5, "dropped_no_history": 1, "rows_len_ge_3": 2, "dropped_below_min_len": 1}
    # the converted dataset holds what its source gives at the same min_len
    converted, source = read_native(once), load_dataset(small_lastfm, allow_pickle=True, min_len=2)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(converted.splits[name].history, source.splits[name].history)
    run_json(capsys, "data", "convert", str(once), str(twice), "--min-len", "3", "--json")
    stats = run_json(capsys, "data", "stats", str(twice), "--json")
    assert stats["min_len"] == 1 and stats["converted_from"]["min_len"] == 3
    assert stats["converted_from"]["converted_from"] == record  # the earlier conversion, nested
    assert main(["data", "stats", str(twice)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == [f"from      {once} (native, min_len 3)", f"from      {small_lastfm} (llara, min_len 2)"]


@pytest.mark.parametrize("record", ["llara", {"format": "llara"}, {"format": "llara", "min_len": 0}, {"format": 3, "min_len": 2}, {"format": "native", "min_len": 1, "converted_from": {"min_len": True}}])
def test_a_malformed_conversion_record_is_named(small_lastfm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], record) -> None:
    out = tmp_path / "converted"
    run_json(capsys, "data", "convert", str(small_lastfm), str(out), "--allow-pickle", "--json")
    meta = json.loads((out / "dataset.json").read_text())
    meta["converted_from"] = record
    (out / "dataset.json").write_text(json.dumps(meta))
    assert main(["data", "stats", str(out)]) == 2
    assert f"{out / 'dataset.json'}: converted_from" in capsys.readouterr().err


def test_synth_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("a", "b"):
        stats = run_json(capsys, "data", "synth", str(tmp_path / name), "--users", "40", "--items", "30", "--seed", "9", "--json")
    assert stats["num_items"] == 30 and stats["splits"]["test"]["rows"] == 40
    for file in ("train.parquet", "val.parquet", "test.parquet", "items.csv"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    run_json(capsys, "data", "synth", str(tmp_path / "c"), "--users", "40", "--items", "30", "--seed", "10", "--json")
    assert (tmp_path / "a" / "test.parquet").read_bytes() != (tmp_path / "c" / "test.parquet").read_bytes()


def test_every_option_has_help() -> None:
    parser = build_parser()
    data = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["data"]
    actions = next(a for a in data._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(actions) == {"synth", "convert", "stats"}
    for name, sub in actions.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 10, (name, action.dest)
        assert sub.format_help()


def test_subprocess_stdout_is_only_json(tmp_path: Path) -> None:
    synth = subprocess.run(
        [sys.executable, "-m", "ilora.cli.main", "data", "synth", str(tmp_path / "s"), "--users", "20", "--items", "15", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(synth.stdout)["output"] == str(tmp_path / "s")
    assert "wrote" in synth.stderr


def test_stats_of_a_log_count_duplicates_dropped_and_users_without_a_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog) -> None:
    rows = ["user,item,timestamp", "a,x,1", "a,y,2", "a,z,3", "a,y,2", "b,x,5", "c,x,1", "c,z,2"]  # line 5 repeats line 3
    (tmp_path / "interactions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="ilora.data.interactions"):
        stats = run_json(capsys, "data", "stats", str(tmp_path / "interactions.csv"), "--json")
    assert stats["log"] == {"users": 3, "interactions": 7, "duplicates_dropped": 1, "users_with_one_interaction": 1}
    assert stats["splits"]["test"]["samples"] == 2  # a (x, y -> z) and c (x -> z); b has no history
    assert "dropped 1 duplicate interaction(s) (same user, item and timestamp as an earlier row; the first: row 3 (line 5))" in caplog.text
    assert main(["data", "stats", str(tmp_path / "interactions.csv")]) == 0
    log_line = "log       7 interactions of 3 users; dropped: 1 duplicate rows, 1 users with one interaction (no sample)"
    assert log_line in capsys.readouterr().out
    # converted: the counts are in converted_from, and the table shows them under its from line
    run_json(capsys, "data", "convert", str(tmp_path / "interactions.csv"), str(tmp_path / "native"), "--json")
    assert main(["data", "stats", str(tmp_path / "native")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == [f"from      {tmp_path / 'interactions.csv'} (interactions, min_len 1)", log_line]

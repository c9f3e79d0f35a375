"""The native format: round trips, atomic writes, validation of foreign files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ilora.data.native as native
from ilora.data.dataset import Catalog, SeqDataset, Split
from ilora.data.native import read_native, write_native
from ilora.data.synthetic import make_synthetic
from ilora.errors import DataError, IloraError


def small_dataset() -> SeqDataset:
    titles = ("Plain", 'With "quotes", and commas', "Multi\nline", "Ünïcödé ✓", "", "NA")
    pad = len(titles)
    train = Split(np.array([[0, pad, pad], [0, 1, pad], [5, 4, 3]]), np.array([1, 2, 3]), np.array([1, 2, 0]))
    test = Split(np.array([[2, 3, pad]]), np.array([2]), np.array([4]))
    return SeqDataset(Catalog(titles), {"train": train, "val": None, "test": test}, source="memory")


def assert_same(a: SeqDataset, b: SeqDataset) -> None:
    assert a.catalog == b.catalog
    for name in ("train", "val", "test"):
        x, y = a.splits.get(name), b.splits.get(name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x.history, y.history)
            np.testing.assert_array_equal(x.length, y.length)
            np.testing.assert_array_equal(x.target, y.target)


def test_round_trip_with_awkward_titles_and_absent_split(tmp_path: Path) -> None:
    ds = small_dataset()
    out = write_native(ds, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "items.csv", "test.parquet", "train.parquet"]
    back = read_native(out)
    assert_same(ds, back)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["num_items"] == 6 and meta["padding_id"] == 6 and meta["max_len"] == 3
    assert meta["splits"] == {"train": {"rows": 3}, "val": None, "test": {"rows": 1}}


def test_parquet_holds_unpadded_lists(tmp_path: Path) -> None:
    out = write_native(small_dataset(), tmp_path / "out")
    table = pq.read_table(out / "train.parquet")
    assert table.column("history").to_pylist() == [[0], [0, 1], [5, 4, 3]]
    assert table.column("length").to_pylist() == [1, 2, 3]


def test_round_trip_synthetic(tmp_path: Path) -> None:
    ds = make_synthetic(users=60, items=40, seed=5)
    assert_same(ds, read_native(write_native(ds, tmp_path / "synth")))


def test_existing_output_needs_overwrite_and_overwrite_replaces(tmp_path: Path) -> None:
    out = write_native(small_dataset(), tmp_path / "out")
    with pytest.raises(IloraError, match="already exists"):
        write_native(make_synthetic(users=20, items=10, seed=1), out)
    other = make_synthetic(users=20, items=10, seed=1)
    write_native(other, out, overwrite=True)
    assert_same(other, read_native(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_refuses_a_foreign_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(IloraError, match="not an ilora native dataset"):
        write_native(small_dataset(), foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_failure_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return pq.write_table(*args, **kwargs)

    monkeypatch.setattr(native.pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_native(small_dataset(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_invalid_dataset_is_not_written(tmp_path: Path) -> None:
    ds = small_dataset()
    ds.splits["train"].target[1] = 99
    with pytest.raises(DataError, match=r"row 1, id 99: next item outside the catalog"):
        write_native(ds, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ reading foreign / damaged files


@pytest.fixture
def written(tmp_path: Path) -> Path:
    return write_native(small_dataset(), tmp_path / "ds")


def rewrite_train(directory: Path, history: list, length: list, target: list) -> None:
    table = pa.table({"history": pa.array(history, type=pa.list_(pa.int64())), "length": length, "target": target})
    pq.write_table(table, directory / "train.parquet")


@pytest.mark.parametrize(
    ("history", "length", "target", "pattern"),
    [
        ([[0], [0, 1], [5, 4, 3]], [1, 3, 3], [1, 2, 0], r"train.parquet, row 1: length=3 but the history holds 2 ids"),
        ([[0], [0, 7], [5, 4, 3]], [1, 2, 3], [1, 2, 0], r"train.parquet, row 1, id 7: history item outside the catalog"),
        ([[0], [0, 1], [5, 4, 3]], [1, 2, 3], [1, 2, -1], r"train.parquet, row 2, id -1: next item outside the catalog"),
        ([[0], [], [5, 4, 3]], [1, 0, 3], [1, 2, 0], r"train.parquet, row 1: empty history"),
        ([[0], [0, 1], [5, 4, 3, 2]], [1, 2, 4], [1, 2, 0], r"train.parquet, row 2: history of 4 ids \(expected at most max_len=3\)"),
        ([[0], None, [5]], [1, 2, 1], [1, 2, 0], r"train.parquet, row 1: null history"),
    ],
)
def test_damaged_split_errors(written: Path, history, length, target, pattern: str) -> None:
    rewrite_train(written, history, length, target)
    with pytest.raises(DataError, match=pattern):
        read_native(written)


def test_missing_column(written: Path) -> None:
    pq.write_table(pa.table({"history": pa.array([[0]]), "target": [1]}), written / "train.parquet")
    with pytest.raises(DataError, match=r"train.parquet: missing column\(s\) length"):
        read_native(written)


def test_split_listed_but_missing_and_present_but_unlisted(written: Path) -> None:
    (written / "test.parquet").rename(written / "val.parquet")
    with pytest.raises(DataError, match="val.parquet: dataset.json lists the val split as absent"):
        read_native(written)
    (written / "val.parquet").unlink()
    with pytest.raises(DataError, match="test.parquet: the test split is missing"):
        read_native(written)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("id,title\n0,a\n2,b\n", r"items.csv, row 1, id 2: ids must be 0..n-1 in order"),
        ("id,title\n0,a\nx,b\n", r"items.csv, row 1: non-integer id 'x'"),
        ("id,name\n0,a\n", r"items.csv: header is \['id', 'name'\]"),
        ("id,title\n0,a,extra\n", r"items.csv, row 0: 3 fields"),
    ],
)
def test_items_csv_errors(written: Path, content: str, pattern: str) -> None:
    (written / "items.csv").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=pattern):
        read_native(written)


def test_catalog_size_must_match_dataset_json(written: Path) -> None:
    (written / "items.csv").write_text("id,title\n0,a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dataset.json: num_items=6, padding_id=6 but items.csv has 1 items"):
        read_native(written)


def test_items_json_catalog(written: Path) -> None:
    meta = json.loads((written / "dataset.json").read_text())
    meta["items_file"] = "items.json"
    (written / "dataset.json").write_text(json.dumps(meta))
    titles = small_dataset().catalog.titles
    (written / "items.json").write_text(json.dumps([{"id": i, "title": t} for i, t in enumerate(titles)]))
    assert read_native(written).catalog.titles == titles


def test_bad_dataset_json(written: Path) -> None:
    (written / "dataset.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="not an ilora native dataset description"):
        read_native(written)


# ------------------------------------------------------------------ overwrite safety, limits, crafted files


def test_overwrite_restores_the_old_dataset_when_the_second_rename_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = write_native(small_dataset(), tmp_path / "ds")
    real_rename, calls = native.os.rename, []

    def flaky(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # out -> .old-*, then tmp -> out fails
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(native.os, "rename", flaky)
    with pytest.raises(OSError, match="No space"):
        write_native(make_synthetic(users=20, items=15, seed=1), out, overwrite=True)
    assert calls[0][0] == "ds" and calls[1][1] == "ds"
    assert_same(read_native(out), small_dataset())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_next_write_sweeps_leftovers_of_an_interrupted_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    old = write_native(small_dataset(), tmp_path / ".ds.old-0123abcd")  # as if killed between renames
    with pytest.raises(DataError, match=r"interrupted overwrite left the previous dataset in .*\.ds\.old-0123abcd"):
        read_native(out)
    (tmp_path / ".ds.89abcdef.tmp").mkdir()
    (tmp_path / ".ds.89abcdef.tmp" / "train.parquet").write_bytes(b"partial")
    (tmp_path / ".dsx.old-0123abcd").mkdir()  # another dataset's leftover: not ours to remove
    synth = make_synthetic(users=20, items=15, seed=1)
    write_native(synth, out)
    assert not old.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dsx.old-0123abcd", "ds"]
    assert_same(read_native(out), synth)


def test_files_and_directory_are_fsynced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_open, real_rename = native.os.fsync, native.os.open, native.os.rename
    names: dict[int, str] = {}

    def tracking_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        names[fd] = Path(path).name
        return fd

    monkeypatch.setattr(native.os, "open", tracking_open)
    monkeypatch.setattr(native.os, "fsync", lambda fd: (events.append(("fsync", names[fd])), real_fsync(fd))[1])
    monkeypatch.setattr(native.os, "rename", lambda a, b: (events.append(("rename", Path(b).name)), real_rename(a, b))[1])
    out = write_native(small_dataset(), tmp_path / "ds")
    first_rename = events.index(("rename", "ds"))
    synced = {name for kind, name in events[:first_rename] if kind == "fsync"}
    expected = {p.name for p in out.iterdir()}
    assert expected == {"dataset.json", "items.csv", "train.parquet", "test.parquet"}
    assert expected <= synced
    assert any(name.startswith(".ds.") and name.endswith(".tmp") for name in synced)  # the directory itself


def test_max_len_is_bounded_on_read_and_write(written: Path) -> None:
    meta = json.loads((written / "dataset.json").read_text())
    meta["max_len"] = 10**11
    (written / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"dataset\.json: max_len=100000000000 is over the limit \(expected max_len <= 4096\)"):
        read_native(written)
    pad = 3
    history = np.array([[0] + [pad] * 4096])  # width 4097
    wide = SeqDataset(Catalog(("a", "b", "c")), {"train": Split(history, np.array([1]), np.array([1])), "val": None, "test": None})
    with pytest.raises(IloraError, match="max_len=4097 is over the limit of 4096"):
        write_native(wide, written.parent / "wide")
    assert not (written.parent / "wide").exists()


@pytest.mark.parametrize("name", ["dataset.json", "items.json"])
def test_deeply_nested_json_is_a_data_error(written: Path, name: str) -> None:
    if name == "items.json":
        meta = json.loads((written / "dataset.json").read_text())
        meta["items_file"] = "items.json"
        (written / "dataset.json").write_text(json.dumps(meta))
        (written / "items.csv").unlink()
    (written / name).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError, match=rf"{name}: JSON nested too deeply"):
        read_native(written)


def test_titles_longer_than_the_csv_field_limit_round_trip(tmp_path: Path) -> None:
    import csv

    limit = csv.field_size_limit()
    titles = ("x" * 200_000, "short", 'y,"' * 70_000)
    pad = len(titles)
    ds = SeqDataset(Catalog(titles), {"train": Split(np.array([[0, pad]]), np.array([1]), np.array([2])), "val": None, "test": None})
    back = read_native(write_native(ds, tmp_path / "ds"))
    assert back.catalog.titles == titles
    assert csv.field_size_limit() == limit  # the process-wide limit is restored


@pytest.mark.parametrize("bad_id", [3.5, 2.0, True, "2", None])
def test_items_json_ids_must_be_json_integers(written: Path, bad_id: object) -> None:
    titles = small_dataset().catalog.titles
    items = [{"id": i, "title": t} for i, t in enumerate(titles)]
    items[2]["id"] = bad_id
    (written / "items.json").write_text(json.dumps(items))
    (written / "items.csv").unlink()
    meta = json.loads((written / "dataset.json").read_text())
    meta["items_file"] = "items.json"
    (written / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"items\.json, row 2: id .* is not an integer"):
        read_native(written)

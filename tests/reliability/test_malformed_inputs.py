"""Hostile and malformed datasets: every one fails with one line naming file, row and id.

Each case builds a small broken dataset in one of the supported formats (llara ``.df`` +
``id2name.txt`` / ``u.item``, native Parquet + ``items.csv``, interaction logs CSV/Parquet)
and runs ``ilora data convert`` and ``ilora data stats --json`` on it (in-process, through
the real entry point). Expected: exit 2, exactly one ``error: ...`` line on stderr with the
substrings the case names, nothing on stdout, and no output directory left behind. A few
subprocess runs prove the exit codes and that tracebacks appear only with ``--debug``.
Property-based cases (hypothesis) corrupt one random cell of a valid dataset and check
that the error names exactly that row and id (the reference is the corruption itself).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ilora.cli.main import main
from ilora.data import load_dataset
from ilora.data.dataset import check_prompt_title
from ilora.errors import DataError, IloraError

REPO = Path(__file__).resolve().parents[2]
TITLES = ["Morcheeba", "Enigma", "Café Del Mar", "Fläsh", "Zed"]  # 5 items, padding id 5


# --------------------------------------------------------------------------- helpers


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The one ``error:`` line of stderr (log lines of other loggers may precede it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    return errors[0]


def legacy_frame(rows: list[tuple[list, object]], width: int = 4, pad: object = 5) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "seq": [list(h) + [pad] * (width - len(h)) for h, _ in rows],
            "len_seq": [max(len(h), 1) for h, _ in rows],
            "next": [t for _, t in rows],
        }
    )


GOOD_ROWS = [([0, 1], 2), ([1, 2, 3], 4), ([4], 0)]


def write_llara(
    directory: Path,
    *,
    train: pd.DataFrame | bytes | None = None,
    id2name: bytes | None = None,
    u_item: bytes | None = None,
    val: pd.DataFrame | None = None,
) -> Path:
    directory.mkdir(parents=True)
    if u_item is not None:
        (directory / "u.item").write_bytes(u_item)
    else:
        default = "".join(f"{i}::{t}\n" for i, t in enumerate(TITLES)).encode()
        (directory / "id2name.txt").write_bytes(default if id2name is None else id2name)
    frames = {"train_data.df": legacy_frame(GOOD_ROWS) if train is None else train, "Val_data.df": val, "Test_data.df": legacy_frame(GOOD_ROWS)}
    for name, frame in frames.items():
        if frame is None:
            frame = legacy_frame(GOOD_ROWS)
        if isinstance(frame, bytes):
            (directory / name).write_bytes(frame)
        else:
            frame.to_pickle(directory / name)
    return directory


def good_pickle() -> bytes:
    buf = io.BytesIO()
    legacy_frame(GOOD_ROWS).to_pickle(buf)
    return buf.getvalue()


def protocol_2_pickle() -> bytes:
    buf = io.BytesIO()
    legacy_frame(GOOD_ROWS).to_pickle(buf, protocol=2)
    return buf.getvalue()


def history_table(histories: list[list[int]], lengths: list[int] | None = None, targets: list[int] | None = None) -> pa.Table:
    return pa.table(
        {
            "history": pa.array(histories, pa.list_(pa.int64())),
            "length": pa.array(lengths if lengths is not None else [len(h) for h in histories], pa.int64()),
            "target": pa.array(targets if targets is not None else [0] * len(histories), pa.int64()),
        }
    )


def write_native(directory: Path, *, train: pa.Table | bytes | None = None, items: bytes | None = None, meta: dict | None = None) -> Path:
    """A native dataset (5 items, max_len 4) with the given replacements."""
    directory.mkdir(parents=True)
    good = history_table([[0, 1], [1, 2, 3], [4]], targets=[2, 4, 0])
    splits = {"train": train if train is not None else good, "val": good, "test": good}
    for name, table in splits.items():
        if isinstance(table, bytes):
            (directory / f"{name}.parquet").write_bytes(table)
        else:
            pq.write_table(table, directory / f"{name}.parquet")
    rows = {name: (t.num_rows if isinstance(t, pa.Table) else 3) for name, t in splits.items()}
    items_csv = ("id,title\n" + "".join(f"{i},{t}\n" for i, t in enumerate(TITLES))).encode()
    (directory / "items.csv").write_bytes(items_csv if items is None else items)
    description = {
        "format": "ilora-native", "version": 1, "num_items": 5, "padding_id": 5, "max_len": 4,
        "splits": {name: {"rows": n} for name, n in rows.items()}, "items_file": "items.csv", "source": "test",
    }  # fmt: skip
    description.update(meta or {})
    (directory / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return directory


GOOD_LOG = "user,item,timestamp\n" + "".join(f"u{u},{(u + k) % 5},{k}\n" for u in range(3) for k in range(5))
GOOD_ITEMS = "item,title\n" + "".join(f"{i},{t}\n" for i, t in enumerate(TITLES))


def write_interactions(directory: Path, log: str | bytes | pd.DataFrame, items: str | bytes | None = None) -> Path:
    directory.mkdir(parents=True)
    if isinstance(log, pd.DataFrame):
        log.to_parquet(directory / "interactions.parquet")
    else:
        (directory / "interactions.csv").write_bytes(log.encode() if isinstance(log, str) else log)
    if items is not None:
        (directory / "items.csv").write_bytes(items.encode() if isinstance(items, str) else items)
    return directory


def replaced(frame: pd.DataFrame, column: str, row: int, value: object) -> pd.DataFrame:
    frame = frame.copy()
    values = frame[column].tolist()
    values[row] = value
    frame[column] = pd.Series(values, dtype=object) if not all(isinstance(v, int) for v in values) else values
    return frame


def _good() -> pd.DataFrame:
    return legacy_frame(GOOD_ROWS)


# (case id, builder(dir) -> dataset path, substrings of the error line)
Case = tuple[str, Callable[[Path], Path], tuple[str, ...]]

LLARA_CASES: list[Case] = [
    ("llara-truncated-df", lambda d: write_llara(d, train=good_pickle()[: len(good_pickle()) // 2]), ("train_data.df", "not a readable pickle")),
    ("llara-empty-df", lambda d: write_llara(d, train=b""), ("train_data.df", "not a readable pickle")),
    ("llara-protocol-2-df", lambda d: write_llara(d, train=protocol_2_pickle()), ("train_data.df", "pickle protocol 2", "expected protocol 3, 4 or 5")),
    ("llara-wrong-columns", lambda d: write_llara(d, train=_good().rename(columns={"len_seq": "length"})), ("train_data.df", "missing column(s) len_seq", "expected columns seq, len_seq, next")),
    ("llara-non-integer-id", lambda d: write_llara(d, train=replaced(_good(), "seq", 1, [1, "x", 3, 5])), ("train_data.df, row 1", "non-integer value 'x' in column seq", "expected integers")),
    ("llara-float-id", lambda d: write_llara(d, train=replaced(_good(), "next", 2, 1.5)), ("train_data.df, row 2", "non-integer value 1.5 in column next")),
    ("llara-next-outside-catalog", lambda d: write_llara(d, train=replaced(_good(), "next", 1, 7)), ("train_data.df, row 1, id 7", "next item outside the catalog", "expected 0 <= id < 5")),
    ("llara-history-outside-catalog", lambda d: write_llara(d, train=replaced(_good(), "seq", 2, [9, 5, 5, 5])), ("train_data.df, row 2, id 9", "history item outside the catalog", "ids in 0..4")),
    ("llara-negative-id", lambda d: write_llara(d, train=replaced(_good(), "seq", 0, [0, -1, 5, 5])), ("train_data.df, row 0, id -1", "history item outside the catalog")),
    ("llara-negative-next", lambda d: write_llara(d, train=replaced(_good(), "next", 0, -3)), ("train_data.df, row 0, id -3", "next item outside the catalog")),
    ("llara-len-seq-0", lambda d: write_llara(d, train=replaced(_good(), "len_seq", 1, 0)), ("train_data.df, row 1", "empty history (len_seq=0)", "expected len_seq >= 1")),
    ("llara-len-seq-over-width", lambda d: write_llara(d, train=replaced(_good(), "len_seq", 1, 9)), ("train_data.df, row 1", "len_seq=9 is longer than the history width 4", "expected 1 <= len_seq <= 4")),
    ("llara-len-seq-over-history", lambda d: write_llara(d, train=replaced(_good(), "len_seq", 0, 3)), ("train_data.df, row 0, id 5", "the padding id inside the first len_seq positions")),
    ("llara-history-longer-than-width", lambda d: write_llara(d, train=replaced(_good(), "seq", 1, [1, 2, 3, 4, 0])), ("train_data.df, row 1", "seq has 5 entries, row 0 has 4", "expected one padded width")),
    ("llara-item-after-len-seq", lambda d: write_llara(d, train=replaced(_good(), "seq", 2, [4, 5, 3, 5])), ("train_data.df, row 2, id 3", "history position 2 holds an item after len_seq=1")),
    ("llara-duplicate-catalog-id", lambda d: write_llara(d, id2name=b"0::a\n1::b\n2::c\n2::d\n4::e\n"), ("id2name.txt (line 4), id 2", "duplicate catalog id")),
    ("llara-missing-title-line", lambda d: write_llara(d, id2name=b"0::a\n1::b\n2::c\n4::e\n"), ("id2name.txt (line 4), id 4", "id 3 is missing", "ids must have no gaps", "expected ids 0..3")),
    ("llara-non-integer-catalog-id", lambda d: write_llara(d, id2name=b"0::a\nx::b\n2::c\n3::d\n4::e\n"), ("id2name.txt (line 2)", "non-integer id 'x'", "expected id::name")),
    ("llara-non-utf8-catalog", lambda d: write_llara(d, id2name=b"0::a\n1::b\xff\n2::c\n3::d\n4::e\n"), ("id2name.txt (line 2)", "undecodable text at byte 9", "expected utf-8 text")),
    ("llara-empty-catalog", lambda d: write_llara(d, id2name=b""), ("id2name.txt", "the item catalog is empty")),
    ("llara-ids-beyond-one-item-catalog", lambda d: write_llara(d, id2name=b"0::only\n"), ("train_data.df, row 0, id 2", "next item outside the catalog (catalog: ", "id2name.txt, 1 item, padding id 1)", "expected 0 <= id < 1")),
    ("llara-u-item-duplicate", lambda d: write_llara(d, u_item=b"1|a (1995)|x\n2|b|x\n2|c|x\n4|d|x\n5|e|x\n"), ("u.item (line 3), id 1", "duplicate catalog id")),
]

NATIVE_CASES: list[Case] = [
    ("native-truncated-parquet", lambda d: write_native(d, train=b"PAR1\x15\x04\x15\x10"), ("train.parquet", "not a readable Parquet file")),
    ("native-empty-parquet", lambda d: write_native(d, train=b""), ("train.parquet", "not a readable Parquet file")),
    ("native-wrong-columns", lambda d: write_native(d, train=history_table([[0]]).rename_columns(["hist", "length", "target"])), ("train.parquet", "missing column(s) history", "expected columns history, length, target")),
    ("native-non-integer-target", lambda d: write_native(d, train=pa.table({"history": pa.array([[0]], pa.list_(pa.int64())), "length": [1], "target": ["x"]})), ("train.parquet", "column target has type string", "expected integers")),
    ("native-float-history", lambda d: write_native(d, train=pa.table({"history": pa.array([[0.5]], pa.list_(pa.float64())), "length": [1], "target": [1]})), ("train.parquet", "column history has type list<element: double>", "expected list<int64>")),
    ("native-target-outside-catalog", lambda d: write_native(d, train=history_table([[0], [1, 2]], targets=[1, 11])), ("train.parquet, row 1, id 11", "next item outside the catalog")),
    ("native-negative-history-id", lambda d: write_native(d, train=history_table([[0], [1, -4]], targets=[1, 2])), ("train.parquet, row 1, id -4", "history item outside the catalog")),
    ("native-huge-unsigned-id", lambda d: write_native(d, train=pa.table({"history": pa.array([[2**64 - 1]], pa.list_(pa.uint64())), "length": [1], "target": [1]})), ("train.parquet", "history value 18446744073709551615 does not fit in int64")),
    ("native-length-0", lambda d: write_native(d, train=history_table([[0], []], targets=[1, 2])), ("train.parquet, row 1", "empty history (len_seq=0)")),
    ("native-length-disagrees", lambda d: write_native(d, train=history_table([[0], [1, 2]], lengths=[1, 4], targets=[1, 2])), ("train.parquet, row 1", "length=4 but the history holds 2 ids")),
    ("native-history-over-max-len", lambda d: write_native(d, train=history_table([[0], [0, 1, 2, 3, 4]], targets=[1, 2])), ("train.parquet, row 1", "history of 5 ids", "expected at most max_len=4")),
    ("native-duplicate-catalog-id", lambda d: write_native(d, items=b"id,title\n0,a\n1,b\n1,c\n3,d\n4,e\n"), ("items.csv, row 2, id 1", "ids must be 0..n-1 in order", "expected id 2")),
    ("native-missing-title", lambda d: write_native(d, items=b"id,title\n0,a\n1\n2,c\n3,d\n4,e\n"), ("items.csv, row 1", "1 fields", "expected 2 fields: id,title")),
    ("native-non-integer-catalog-id", lambda d: write_native(d, items=b"id,title\n0,a\nx,b\n2,c\n3,d\n4,e\n"), ("items.csv, row 1", "non-integer id 'x'")),
    ("native-non-utf8-catalog", lambda d: write_native(d, items=b"id,title\n0,a\n1,\xff\n2,c\n3,d\n4,e\n"), ("items.csv", "undecodable text", "expected UTF-8")),
    ("native-catalog-shorter-than-description", lambda d: write_native(d, items=b"id,title\n0,a\n"), ("dataset.json", "items.csv has 1 items", "num_items == padding_id")),
    ("native-truncated-description", lambda d: (write_native(d), (d / "dataset.json").write_text('{"format": "ilora-na'))[0], ("dataset.json", "not valid JSON")),
    ("native-items-file-outside", lambda d: write_native(d, meta={"items_file": "../../../../etc/passwd"}), ("dataset.json", "items_file is '../../../../etc/passwd'", "a file in the dataset directory")),
    ("native-max-len-0", lambda d: write_native(d, meta={"max_len": 0}), ("dataset.json", "max_len=0", "expected both >= 1")),
    ("native-bad-split-entry", lambda d: write_native(d, meta={"splits": {"train": 5, "val": None, "test": None}}), ("dataset.json", "splits.train is 5", 'null or {"rows": N}')),
    ("native-row-count-disagrees", lambda d: write_native(d, meta={"splits": {"train": {"rows": 9}, "val": {"rows": 3}, "test": {"rows": 3}}}), ("train.parquet", "3 rows, but dataset.json says 9")),
]

INTERACTION_CASES: list[Case] = [
    ("interactions-empty-file", lambda d: write_interactions(d, b""), ("interactions.csv", "the file is empty")),
    ("interactions-header-only", lambda d: write_interactions(d, "user,item,timestamp\n"), ("interactions.csv", "no samples", "expected users with at least 2 interactions")),
    ("interactions-truncated-csv", lambda d: write_interactions(d, "".join(GOOD_LOG.splitlines(True)[:4]) + '"u1,2'), ("interactions.csv", "not a readable table", "EOF inside string")),
    ("interactions-extra-field", lambda d: write_interactions(d, "user,item,timestamp\na,0,1,5\na,1,2\n"), ("interactions.csv", "Expected 3 fields in line 2, saw 4")),
    ("interactions-wrong-columns", lambda d: write_interactions(d, GOOD_LOG.replace("timestamp", "time")), ("interactions.csv", "missing column(s) 'timestamp' (has 'user', 'item', 'time')", "expected columns user, item, timestamp")),
    # a space after each comma is part of the name: the names are quoted so that it shows
    ("interactions-spaced-header", lambda d: write_interactions(d, GOOD_LOG.replace("user,item,timestamp", "user, item, timestamp")), ("interactions.csv", "missing column(s) 'item', 'timestamp' (has 'user', ' item', ' timestamp')")),
    ("interactions-bad-timestamp", lambda d: write_interactions(d, GOOD_LOG.replace("u1,2,1\n", "u1,2,abc\n")), ("interactions.csv, row 6", "timestamp 'abc'", "expected a finite number like row 0")),
    ("interactions-item-outside-catalog", lambda d: write_interactions(d, GOOD_LOG.replace("u1,2,1\n", "u1,9,1\n"), GOOD_ITEMS), ("interactions.csv, row 6", "item '9' is not in items.csv", "expected an item key listed in")),
    ("interactions-negative-item", lambda d: write_interactions(d, GOOD_LOG.replace("u1,2,1\n", "u1,-1,1\n"), GOOD_ITEMS), ("interactions.csv, row 6", "item '-1' is not in items.csv")),
    ("interactions-duplicate-catalog-id", lambda d: write_interactions(d, GOOD_LOG, GOOD_ITEMS.replace("3,Fläsh", "1,Fläsh")), ("items.csv, row 3", "duplicate item key '1' (first in row 1)")),
    ("interactions-missing-title", lambda d: write_interactions(d, GOOD_LOG, GOOD_ITEMS.replace("3,Fläsh", "3,")), ("items.csv, row 3", "missing title")),
    ("interactions-non-utf8", lambda d: write_interactions(d, GOOD_LOG.encode().replace(b"u1,2,1", b"u\xff,2,1")), ("interactions.csv", "undecodable text at byte 63 (line 8)", "expected utf-8 text")),
    ("interactions-parquet-float-item", lambda d: write_interactions(d, pd.DataFrame({"user": [1, 1, 1], "item": [0.5, 1.0, 2.0], "timestamp": [1, 2, 3]})), ("interactions.parquet, row 0", "item key 0.5 is a float", "expected an integer or a string")),
    ("interactions-parquet-missing-user", lambda d: write_interactions(d, pd.DataFrame({"user": [1, 1, None], "item": [0, 1, 2], "timestamp": [1, 2, 3]})), ("interactions.parquet, row 2", "missing user")),
    ("interactions-nobody-has-two", lambda d: write_interactions(d, "user,item,timestamp\na,0,1\nb,1,2\n"), ("interactions.csv", "no samples: 2 interactions")),
]

ALL_CASES = LLARA_CASES + NATIVE_CASES + INTERACTION_CASES


@pytest.mark.parametrize("case_id, build, needles", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_malformed_dataset_fails_with_one_line(
    case_id: str, build: Callable[[Path], Path], needles: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = build(tmp_path / "src")
    dst = tmp_path / "dst"
    code, out, err = run_cli(capsys, "data", "convert", str(source), str(dst), "--allow-pickle")
    line = error_line(err)
    assert code == 2 and out == ""
    for needle in needles:
        assert needle in line, (needle, line)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary directory left either
    code, out, err = run_cli(capsys, "data", "stats", str(source), "--allow-pickle", "--json")
    assert code == 2 and out == "" and error_line(err) == line


# --------------------------------------------------------------------------- accepted oddities


def test_special_token_titles_are_ordinary_titles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    titles = ["[HistoryEmb]", "a [CansEmb] b", "[PH]", "</s>", "<|endoftext|>"]
    source = write_llara(tmp_path / "src", id2name="".join(f"{i}::{t}\n" for i, t in enumerate(titles)).encode())
    code, out, _ = run_cli(capsys, "data", "convert", str(source), str(tmp_path / "dst"), "--allow-pickle", "--json")
    assert code == 0 and json.loads(out)["num_items"] == 5
    assert load_dataset(tmp_path / "dst").catalog.titles == tuple(titles)
    for item, title in enumerate(titles):
        check_prompt_title(title, "x", item=item)  # the teacher accepts them too


@pytest.mark.parametrize(
    "title, what",
    [("", "empty title"), ("   ", "empty title"), ("a\nb", "'\\n'"), ("a\x1b[31mred", "'\\x1b'"), ("nul\x00", "'\\x00'"), ("del\x7f", "'\\x7f'"), ("ls\u2028x", "'\\u2028'")],
)
def test_unpromptable_titles_are_kept_by_data_and_refused_by_the_teacher(title: str, what: str, tmp_path: Path) -> None:
    """Decision: the data layer stores titles verbatim; the teacher refuses them with the file, row, id."""
    items = ("id,title\n0,a\n" + f'1,"{title}"\n' + "2,c\n3,d\n4,e\n").encode()
    source = write_native(tmp_path / "src", items=items)
    ds = load_dataset(source)
    assert ds.catalog.titles[1] == title
    from ilora.teacher.build import build_teacher
    from ilora.teacher.config import TeacherConfig

    with pytest.raises(DataError) as info:
        build_teacher(TeacherConfig(), ds.catalog, rec=None)  # type: ignore[arg-type]  # refused before the SASRec is read
    message = str(info.value)
    assert "items.csv, row 1, id 1" in message and what in message


def test_tab_in_title_is_prompt_safe() -> None:
    check_prompt_title("Artist\tName", "x", item=0)


def test_one_item_catalog_converts_and_candidates_beyond_it_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = legacy_frame([([0], 0)], width=2, pad=1)
    source = tmp_path / "src"
    source.mkdir()
    (source / "id2name.txt").write_text("0::solo\n", encoding="utf-8")
    for name in ("train_data.df", "Val_data.df", "Test_data.df"):
        one.to_pickle(source / name)
    code, out, _ = run_cli(capsys, "data", "convert", str(source), str(tmp_path / "dst"), "--allow-pickle", "--json")
    assert code == 0 and json.loads(out)["num_items"] == 1
    model = save_untrained_sasrec(tmp_path / "model", num_items=1, max_len=2)
    code, out, err = run_cli(capsys, "rec", "eval", str(tmp_path / "dst"), "--model", str(model), "--candidates", "2")
    line = error_line(err)
    assert code == 2 and out == ""
    assert "test split, row 0" in line and "cannot draw 1 negatives" in line and "expected count <= 1" in line


def save_untrained_sasrec(directory: Path, *, num_items: int, max_len: int) -> Path:
    from ilora.rec.sasrec import SASRec, SASRecConfig

    SASRec(SASRecConfig(num_items=num_items, max_len=max_len, hidden=8, heads=1, blocks=1)).save(directory)
    return directory


def test_empty_split_is_read_but_not_evaluated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_llara(tmp_path / "src", val=legacy_frame(GOOD_ROWS).iloc[:0])
    code, out, _ = run_cli(capsys, "data", "stats", str(source), "--allow-pickle", "--json")
    assert code == 0 and json.loads(out)["splits"]["val"]["samples"] == 0
    model = save_untrained_sasrec(tmp_path / "model", num_items=5, max_len=4)
    code, out, err = run_cli(capsys, "rec", "eval", str(source), "--allow-pickle", "--model", str(model), "--split", "val")
    assert code == 2 and out == ""
    line = error_line(err)
    assert str(source) in line and "the val split has no samples" in line
    # filtering every sample of every split away with --min-len is refused when the data is read
    code, _, err = run_cli(capsys, "rec", "eval", str(source), "--allow-pickle", "--model", str(model), "--min-len", "4")
    assert code == 2 and "no samples in any split (expected at least one sample with at least 4 history items (--min-len))" in error_line(err)


def test_dataset_without_any_sample_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = legacy_frame(GOOD_ROWS).iloc[:0]
    source = tmp_path / "src"
    source.mkdir()
    (source / "id2name.txt").write_text("0::a\n", encoding="utf-8")
    empty.to_pickle(source / "train_data.df")
    code, _, err = run_cli(capsys, "data", "convert", str(source), str(tmp_path / "dst"), "--allow-pickle")
    assert code == 2 and "no samples in any split" in error_line(err) and not (tmp_path / "dst").exists()


def test_output_path_under_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_native(tmp_path / "src")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out, err = run_cli(capsys, "data", "convert", str(source), str(blocker / "dst"))
    assert code == 2 and out == "" and str(blocker) in error_line(err)


# --------------------------------------------------------------------------- property-based


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_native_single_corrupted_cell_is_named(data: st.DataObject) -> None:
    """Corrupt one id of a random valid native split: the error names exactly that row and id."""
    n_items = data.draw(st.integers(2, 30), label="items")
    rows = data.draw(st.integers(1, 12), label="rows")
    max_len = 5
    histories = [
        data.draw(st.lists(st.integers(0, n_items - 1), min_size=1, max_size=max_len), label=f"h{r}") for r in range(rows)
    ]
    targets = [data.draw(st.integers(0, n_items - 1), label=f"t{r}") for r in range(rows)]
    row = data.draw(st.integers(0, rows - 1), label="row")
    bad = data.draw(st.one_of(st.integers(-(2**40), -1), st.integers(n_items + 1, 2**40)), label="bad id")
    where = data.draw(st.sampled_from(["target", "history"]), label="where")
    if where == "target":
        targets[row] = bad
    else:
        histories[row][data.draw(st.integers(0, len(histories[row]) - 1), label="col")] = bad
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_native(Path(tmp) / "ds", train=history_table(histories, targets=targets), items=("id,title\n" + "".join(f"{i},t{i}\n" for i in range(n_items))).encode(), meta={"num_items": n_items, "padding_id": n_items, "max_len": max_len})
        # the val/test tables of write_native use ids < 5; keep them inside small catalogs
        for name in ("val", "test"):
            pq.write_table(history_table([[0]], targets=[1]), directory / f"{name}.parquet")
        description = json.loads((directory / "dataset.json").read_text())
        description["splits"].update({"val": {"rows": 1}, "test": {"rows": 1}})
        (directory / "dataset.json").write_text(json.dumps(description))
        with pytest.raises(DataError) as info:
            load_dataset(directory)
    message = str(info.value)
    assert f"train.parquet, row {row}, id {bad}:" in message
    assert ("next item" if where == "target" else "history item") + " outside the catalog" in message


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_llara_single_corrupted_cell_is_named(data: st.DataObject) -> None:
    n_items, width = 6, 4
    rows = data.draw(st.integers(1, 8), label="rows")
    histories = [data.draw(st.lists(st.integers(0, n_items - 1), min_size=1, max_size=width), label=f"h{r}") for r in range(rows)]
    frame = legacy_frame([(h, 0) for h in histories], width=width, pad=n_items)
    row = data.draw(st.integers(0, rows - 1), label="row")
    bad = data.draw(st.one_of(st.integers(-(2**31), -1), st.integers(n_items + 1, 2**31)), label="bad id")
    frame = replaced(frame, "next", row, bad)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ds"
        directory.mkdir()
        (directory / "id2name.txt").write_text("".join(f"{i}::t{i}\n" for i in range(n_items)), encoding="utf-8")
        frame.to_pickle(directory / "train_data.df")
        with pytest.raises(DataError) as info:
            load_dataset(directory, allow_pickle=True)
    assert f"train_data.df, row {row}, id {bad}: next item outside the catalog" in str(info.value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 10_000), kind=st.sampled_from(["csv", "parquet", "items"]))
def test_truncated_files_load_or_fail_cleanly(cut: int, kind: str) -> None:
    """Any prefix of a valid file either loads or raises IloraError: never another exception."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ds"
        if kind == "csv":
            write_interactions(directory, GOOD_LOG, GOOD_ITEMS)
            target = directory / "interactions.csv"
        else:
            write_native(directory)
            target = directory / ("train.parquet" if kind == "parquet" else "items.csv")
        raw = target.read_bytes()
        target.write_bytes(raw[: cut % (len(raw) + 1)])
        try:
            load_dataset(directory)
        except IloraError:
            pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=3), cut=st.none() | st.integers(0, 10**6))
def test_damaged_df_pickles_fail_cleanly(flips: list[tuple[int, int]], cut: int | None) -> None:
    """Flipped bytes or a cut in a .df file: a dataset or an IloraError, never a crash or another exception.

    (Found this way: NumPy's ndarray/dtype ``__setstate__`` crash the interpreter on a
    short object list or a rewritten descriptor; the restricted unpickler checks both.)
    """
    raw = bytearray(good_pickle())
    for position, value in flips:
        raw[position % len(raw)] = value
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ds"
        write_llara(directory, train=bytes(raw))
        try:
            load_dataset(directory, allow_pickle=True)
        except IloraError:
            pass


# --------------------------------------------------------------------------- subprocess: exit codes, tracebacks


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "ilora.cli.main", *argv], capture_output=True, text=True, env=env, timeout=120)


def test_subprocess_one_line_without_debug_and_traceback_with_it(tmp_path: Path) -> None:
    source = write_llara(tmp_path / "src", train=replaced(_good(), "next", 1, 7))
    dst = tmp_path / "dst"
    plain = _cli("data", "convert", str(source), str(dst), "--allow-pickle")
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith(f"error: {source / 'train_data.df'}, row 1, id 7: next item outside the catalog")
    assert not dst.exists()
    debug = _cli("--debug", "data", "convert", str(source), str(dst), "--allow-pickle")
    assert debug.returncode == 2 and debug.stdout == ""
    assert "Traceback (most recent call last)" in debug.stderr and "DataError" in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.rstrip("\n")
    assert not dst.exists()
    after = _cli("data", "convert", str(source), str(dst), "--allow-pickle", "--debug")  # after the command, too
    assert after.returncode == 2 and "Traceback (most recent call last)" in after.stderr
    assert after.stderr.splitlines()[-1] == plain.stderr.rstrip("\n")


def test_subprocess_stats_json_failure_and_success(tmp_path: Path) -> None:
    bad = write_native(tmp_path / "bad", train=history_table([[0], [1, -4]], targets=[1, 2]))
    result = _cli("data", "stats", str(bad), "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "train.parquet, row 1, id -4" in result.stderr
    good = write_native(tmp_path / "good")
    result = _cli("data", "stats", str(good), "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["num_items"] == 5


def test_rec_eval_names_a_sasrec_of_another_catalog_or_a_narrower_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ilora.data import make_synthetic, write_native

    ds = make_synthetic(users=20, items=15, seed=2)
    write_native(ds, tmp_path / "data")
    for name, items, width, message in (
        ("other", ds.num_items + 1, ds.max_len, f"this SASRec was trained on {ds.num_items + 1} items but the dataset has {ds.num_items} (a SASRec of another dataset?)"),
        ("short", ds.num_items, ds.max_len - 1, f"this SASRec reads histories of at most {ds.max_len - 1} items, but the dataset's are {ds.max_len} wide (a SASRec trained with another --max-len?)"),
    ):
        model = save_untrained_sasrec(tmp_path / name, num_items=items, max_len=width)
        code, out, err = run_cli(capsys, "rec", "eval", str(tmp_path / "data"), "--model", str(model))
        assert (code, out) == (2, "")
        assert error_line(err) == f"error: {model}: {message}"

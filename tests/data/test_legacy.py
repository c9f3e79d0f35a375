"""iLoRA/LLaRA legacy directories: pickles, catalogs, validation, the real LastFM files."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ilora.data.legacy import movielens_title, read_legacy
from ilora.data.safe_pickle import UnsafePickleError
from ilora.errors import DataError


def reference_split(frame: pd.DataFrame, pad: int) -> tuple[list[list[int]], list[int]]:
    """Obviously-correct conversion: strip padding row by row, skip rows without history."""
    histories, targets = [], []
    for seq, nxt in zip(frame["seq"], frame["next"]):
        ids = [int(x[0]) if isinstance(x, tuple) else int(x) for x in seq]
        real = [i for i in ids if i != pad]
        if real:
            histories.append(real)
            targets.append(int(nxt[0]) if isinstance(nxt, tuple) else int(nxt))
    return histories, targets


def unpadded(split) -> list[list[int]]:
    return [list(map(int, split.history[i, : split.length[i]])) for i in range(len(split))]


def test_lastfm_like_reads_and_matches_reference(small_lastfm: Path) -> None:
    ds = read_legacy(small_lastfm, allow_pickle=True)
    assert ds.catalog.titles == ("Morcheeba", "Enigma", "Café Del Mar", "Fläsh", "A::B", "Zed")
    assert ds.padding_id == 6
    for name, file in (("train", "train_data.df"), ("val", "Val_data.df"), ("test", "Test_data.df")):
        frame = pd.read_pickle(small_lastfm / file)
        histories, targets = reference_split(frame, 6)
        assert unpadded(ds.splits[name]) == histories
        assert ds.splits[name].target.tolist() == targets
        assert ds.splits[name].history.shape[1] == 4
    assert ds.load_info["splits"]["train"] == {"rows_in_source": 5, "dropped_no_history": 1}


def test_column_order_and_extra_columns_do_not_matter(write_lastfm_like, legacy_frame) -> None:
    rows = [([0, 1], 2), ([2], 0)]
    frame = legacy_frame(rows, 3, order=("next", "len_seq", "seq"))
    frame["user"] = ["u1", "u2"]
    directory = write_lastfm_like(["a", "b", "c"], {"train": frame})
    ds = read_legacy(directory, allow_pickle=True)
    assert unpadded(ds.splits["train"]) == [[0, 1], [2]]
    assert ds.splits["train"].target.tolist() == [2, 0]


def test_absent_split_is_none_and_only_its_use_fails(write_lastfm_like, legacy_frame) -> None:
    directory = write_lastfm_like(["a", "b", "c"], {"train": legacy_frame([([0], 1)], 3)})
    ds = read_legacy(directory, allow_pickle=True)
    assert ds.splits["val"] is None and ds.splits["test"] is None
    assert len(ds.split("train")) == 1
    with pytest.raises(Exception, match="val split is absent"):
        ds.split("val")


def test_split_file_names_match_without_case_and_two_spellings_are_refused(write_lastfm_like, legacy_frame) -> None:
    """DLLM2Rec's folders write val_data.df / test_data.df; LLaRA's Val_data.df / Test_data.df."""
    directory = write_lastfm_like(["a", "b", "c"], {"train": legacy_frame([([0], 1)], 3), "val": legacy_frame([([1], 2)], 3)})
    (directory / "Val_data.df").rename(directory / "val_data.df")
    ds = read_legacy(directory, allow_pickle=True)
    assert ds.splits["val"].target.tolist() == [2] and ds.splits["test"] is None
    legacy_frame([([2], 0)], 3).to_pickle(directory / "Val_data.df")
    with pytest.raises(DataError, match=r"two val split files, Val_data.df and val_data.df"):
        read_legacy(directory, allow_pickle=True)


def movielens_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ml"
    directory.mkdir()
    lines = [
        "1|Toy Story (1995)|01-Jan-1995||http://x|0|1",
        "2|Usual Suspects, The (1995)|01-Jan-1995||http://x|0|1",
        "3|Cité des enfants perdus, La (1995)|x",
        "4|Seven (Se7en) (1995)|x",
        "5|unknown||",
    ]
    (directory / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    pad = (np.int64(5), np.int64(0))

    def seq(*pairs: tuple[int, int]) -> list[tuple[np.int64, np.int64]]:
        items = [(np.int64(i), np.int64(r)) for i, r in pairs]
        return items + [pad] * (3 - len(items))

    frame = pd.DataFrame(
        {
            "seq": [seq(), seq((0, 4)), seq((0, 4), (1, 5)), seq((3, 3), (2, 1), (4, 2))],
            "len_seq": [1, 1, 2, 3],
            "next": [(np.int64(0), np.int64(4)), (np.int64(1), np.int64(5)), (np.int64(3), np.int64(3)), (np.int64(1), np.int64(2))],
        }
    )
    frame = frame[frame["len_seq"] >= 1]  # a plain Index, as after the reference filters
    frame.to_pickle(directory / "train_data.df")
    frame.iloc[[3]].to_pickle(directory / "Test_data.df")
    return directory


def test_movielens_tuple_variant_and_u_item(tmp_path: Path) -> None:
    ds = read_legacy(movielens_dir(tmp_path), allow_pickle=True)
    assert ds.catalog.titles == ("Toy Story", "The Usual Suspects", "Cité des enfants perdus, La", "Seven (Se7en)", "unknown")
    train = ds.splits["train"]
    assert unpadded(train) == [[0], [0, 1], [3, 2, 4]]
    assert train.target.tolist() == [1, 3, 1]
    assert ds.splits["val"] is None
    assert unpadded(ds.splits["test"]) == [[3, 2, 4]]


@pytest.mark.parametrize(
    ("raw", "title"),
    [("Toy Story (1995)", "Toy Story"), ("Usual Suspects, The (1995)", "The Usual Suspects"), ("Big Night (1996)", "Big Night"),
     ("Postino, Il (1994)", "Postino, Il"), ("Seven (Se7en) (1995)", "Seven (Se7en)"), ("unknown", "unknown")],
)  # fmt: skip
def test_movielens_title(raw: str, title: str) -> None:
    assert movielens_title(raw) == title


# ------------------------------------------------------------------ pickle safety


def test_pickles_need_opt_in(small_lastfm: Path) -> None:
    with pytest.raises(UnsafePickleError, match="--allow-pickle") as info:
        read_legacy(small_lastfm)
    assert "ilora data convert" in str(info.value)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(small_lastfm: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (small_lastfm / "Val_data.df").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(UnsafePickleError, match=r"refused to load global (posix|nt|os)\.system") as info:
        read_legacy(small_lastfm, allow_pickle=True)
    assert "Val_data.df" in str(info.value)
    assert not marker.exists()


def test_malicious_global_inside_a_dataframe_is_refused(small_lastfm: Path, tmp_path: Path, legacy_frame) -> None:
    marker = tmp_path / "pwned2"
    frame = legacy_frame([([0], 1)], 6)
    frame["seq"] = [_Exploit(marker)]
    frame.to_pickle(small_lastfm / "Test_data.df")
    with pytest.raises(UnsafePickleError, match=r"system"):
        read_legacy(small_lastfm, allow_pickle=True)
    assert not marker.exists()


def test_pickle_of_something_else_is_a_data_error(small_lastfm: Path) -> None:
    (small_lastfm / "Val_data.df").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="Val_data.df.*holds a list"):
        read_legacy(small_lastfm, allow_pickle=True)


# ------------------------------------------------------------------ validation


def frame_with(seq: list, len_seq: list, nxt: list) -> pd.DataFrame:
    return pd.DataFrame({"seq": seq, "len_seq": len_seq, "next": nxt})


P = 6  # padding id of small_lastfm


@pytest.mark.parametrize(
    ("frame", "pattern"),
    [
        (frame_with([[0, P], [0, 9]], [1, 2], [1, 1]), r"row 1, id 9: history item outside the catalog"),
        (frame_with([[0, P], [0, P]], [1, 1], [1, 6]), r"row 1, id 6: next item outside the catalog"),
        (frame_with([[0, P], [0, 2]], [1, 1], [1, 3]), r"row 1, id 2: history position 1 holds an item after len_seq=1"),
        (frame_with([[0, P], [0, P]], [1, 2], [1, 3]), r"row 1, id 6: the padding id inside the first len_seq"),
        (frame_with([[0, P], [1, P]], [1, 3], [1, 3]), r"row 1: len_seq=3 is longer than the history width 2"),
        (frame_with([[0, P], [1, P]], [1, 0], [1, 3]), r"row 1: empty history \(len_seq=0\)"),
        (frame_with([[0, P], []], [1, 1], [1, 3]), r"row 1: empty history list"),
        (frame_with([[0, P], [0, P, P]], [1, 1], [1, 3]), r"row 1: seq has 3 entries, row 0 has 2"),
        (frame_with([[0, P], [0, "x"]], [1, 1], [1, 3]), r"row 1: non-integer value 'x' in column seq"),
        (frame_with([[0, P], [0.5, P]], [1, 1], [1, 3]), r"row 1: non-integer value 0.5 in column seq"),
        (frame_with([[0, P], [1, P]], [1, 1], [1, 2.5]), r"row 1: non-integer value 2.5 in column next"),
        (frame_with([[0, P], [1, P]], [1, None], [1, 2]), r"row 1: non-integer value nan in column len_seq"),
        (frame_with([[0, P], 7], [1, 1], [1, 2]), r"row 1: seq is a int, not a list"),
        (pd.DataFrame({"seq": [[0, P]], "next": [1]}), r"Val_data.df: missing column\(s\) len_seq"),
    ],
)
def test_validation_errors_name_file_row_and_id(small_lastfm: Path, frame: pd.DataFrame, pattern: str) -> None:
    frame.to_pickle(small_lastfm / "Val_data.df")
    with pytest.raises(DataError, match=pattern) as info:
        read_legacy(small_lastfm, allow_pickle=True)
    assert str(small_lastfm / "Val_data.df") in str(info.value)


def test_rows_without_history_are_dropped_and_counted_whether_len_seq_says_1_or_0(small_lastfm: Path) -> None:
    frame_with([[P, P], [0, P], [P, P], [2, 1]], [1, 1, 0, 2], [1, 3, 1, 0]).to_pickle(small_lastfm / "Val_data.df")
    ds = read_legacy(small_lastfm, allow_pickle=True)
    assert unpadded(ds.splits["val"]) == [[0], [2, 1]] and ds.splits["val"].target.tolist() == [3, 0]
    assert ds.load_info["splits"]["val"] == {"rows_in_source": 4, "dropped_no_history": 2}


def test_reported_row_is_the_file_row_after_dropped_rows(small_lastfm: Path) -> None:
    # rows 0 and 1 have no history and are dropped; the error is still reported at file row 2
    frame_with([[P, P], [P, P], [0, 9]], [1, 0, 2], [1, 1, 1]).to_pickle(small_lastfm / "Val_data.df")
    with pytest.raises(DataError, match=r"row 2, id 9"):
        read_legacy(small_lastfm, allow_pickle=True)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"0::a\n1::b\n1::c\n", r"id2name.txt \(line 3\), id 1: duplicate catalog id \(first on line 2\)"),
        (b"0::a\n1::b\n3::c\n", r"id2name.txt \(line 3\), id 3: catalog id out of range: id 2 is missing \(ids must have no gaps\) \(expected ids 0..2\)"),
        (b"0::a\n2::b\n3::c\n4::d\n", r"id2name.txt \(line 4\), id 4: catalog id out of range: id 1 is missing \(ids must have no gaps\)"),
        (b"0::a\n5::b\n6::c\n", r"id2name.txt \(line 2\), id 5: catalog id out of range: ids 1, 2 are missing \(ids must have no gaps\)"),
        ("".join(f"{i}::t\n" for i in [0, *range(8, 15)]).encode(), r"ids 1, 2, 3, 4, 5 and 2 more are missing"),
        (b"1::a\n2::b\n3::c\n", r"id2name.txt \(line 3\), id 3: catalog id out of range: id 0 is missing \(ids must have no gaps; the ids run 1..3: numbered from 1\?\)"),
        (b"0::a\nx::b\n", r"id2name.txt \(line 2\): non-integer id 'x'"),
        (b"0::a\n1_0::b\n", r"id2name.txt \(line 2\): non-integer id '1_0'"),  # int() reads it as 10
        ("0::a\n\u0661::b\n".encode(), r"id2name.txt \(line 2\): non-integer id '\u0661'"),  # an Arabic-Indic 1
        (b"0::a\n" + b"9" * 5000 + b"::b\n", r"id2name.txt \(line 2\): non-integer id '9999999999999999999999999999999999999999'"),  # past int()'s digit limit
        (b"0::a\n1 b\n", r"id2name.txt \(line 2\): no '::' separator"),
        (b"0::a\n1::caf\xe9\n", r"id2name.txt \(line 2\): undecodable text at byte 11 \(expected utf-8 text\)"),
        (b"0::a\r1::caf\xe9\r", r"id2name.txt \(line 2\): undecodable text at byte 11"),  # old Mac line ends count too
        (b"\n\n", r"id2name.txt: the item catalog is empty"),
    ],
)
def test_catalog_errors(small_lastfm: Path, content: bytes, pattern: str) -> None:
    (small_lastfm / "id2name.txt").write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        read_legacy(small_lastfm, allow_pickle=True)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_catalog_lines_end_in_any_convention(small_lastfm: Path, newline: bytes) -> None:
    """Old Mac files end lines with a bare CR: they used to read as one item titled 'a\\r1::b...'."""
    titles = [f"t{i}" for i in range(6)]
    (small_lastfm / "id2name.txt").write_bytes(newline.join(f"{i}::  {t} ".encode() for i, t in enumerate(titles)) + newline)
    catalog = read_legacy(small_lastfm, allow_pickle=True).catalog
    assert [catalog.title(i) for i in range(catalog.num_items)] == titles


def test_missing_catalog(small_lastfm: Path) -> None:
    (small_lastfm / "id2name.txt").unlink()
    with pytest.raises(DataError, match="no item catalog"):
        read_legacy(small_lastfm, allow_pickle=True)


def test_duplicate_id_in_u_item(tmp_path: Path) -> None:
    directory = movielens_dir(tmp_path)
    (directory / "u.item").write_bytes(b"1|A (1995)|\n2|B (1995)|\n2|C (1995)|\n")
    with pytest.raises(DataError, match=r"u.item \(line 3\), id 1: duplicate catalog id"):
        read_legacy(directory, allow_pickle=True)


# ------------------------------------------------------------------ the real data


def test_real_lastfm(lastfm_dir: Path) -> None:
    ds = read_legacy(lastfm_dir, allow_pickle=True)
    assert ds.num_items == 4606 and ds.padding_id == 4606
    assert ds.catalog.title(0) == "Morcheeba"
    counts = ds.load_info["splits"]
    assert {k: v["rows_in_source"] for k, v in counts.items()} == {"train": 50800, "val": 122, "test": 122}
    assert counts["train"]["dropped_no_history"] == 976
    assert len(ds.splits["train"]) == 50800 - 976
    assert len(ds.splits["val"]) == 122 and len(ds.splits["test"]) == 122
    # against an independent read through pandas itself
    frame = pd.read_pickle(lastfm_dir / "Test_data.df")
    histories, targets = reference_split(frame, 4606)
    assert unpadded(ds.splits["test"]) == histories and ds.splits["test"].target.tolist() == targets


# ------------------------------------------------------------------ pairs, big ids, deep values


@pytest.mark.parametrize(
    ("frame", "pattern"),
    [
        # one-element lists are not (id, rating) pairs, and neither are triples
        (frame_with([[[0], [1], [P]]], [2], [2]), r"row 0: \[0\] in column seq is not an \(id, rating\) pair"),
        (frame_with([[(0, 5, 1), (1, 4, 1), (P, 0, 0)]], [2], [(2, 3, 1)]), r"row 0: \(0, 5, 1\) in column seq is not an \(id, rating\) pair"),
        (frame_with([[(0, 5), (1, 4), (P, 0)]] * 2, [2, 2], [(2, 3), (2, 3, 9)]), r"row 1: \(2, 3, 9\) in column next is not an \(id, rating\) pair"),
        (frame_with([[(0, 5), (1, 4), (P, 0)]] * 2, [2, 2], [(2, 3), 2]), r"row 1: 2 in column next is not an \(id, rating\) pair"),
        (
            pd.DataFrame({"seq": [[0, 1, P]], "len_seq": [2], "next": np.array([2**63 + 5], dtype=np.uint64)}),
            r"row 0: value 9223372036854775813 in column next does not fit in int64",
        ),
        (
            pd.DataFrame({"seq": [[0, 1, P]], "len_seq": np.array([2**64 - 1], dtype=np.uint64), "next": [2]}),
            r"row 0: value 18446744073709551615 in column len_seq does not fit in int64",
        ),
        (
            pd.DataFrame({"seq": [np.array([0, 2**63, P], dtype=np.uint64)], "len_seq": [2], "next": [2]}),
            r"row 0: value 9223372036854775808 in column seq does not fit in int64",
        ),
        # pairs stored as arrays, and a 2-D cell, stack into a 3-D matrix (was an IndexError traceback)
        (
            pd.DataFrame({"seq": [[np.array([0, 5]), np.array([1, 4]), np.array([P, 0])]], "len_seq": [2], "next": [2]}),
            r"row 0: non-integer value a ndarray of length 2 in column seq",
        ),
        (pd.DataFrame({"seq": [np.zeros((3, 2), dtype=np.int64)], "len_seq": [2], "next": [2]}), r"row 0: seq is a 2-d array, not a list"),
    ],
)
def test_pairs_must_be_pairs_and_big_ids_keep_their_value(small_lastfm: Path, frame: pd.DataFrame, pattern: str) -> None:
    frame.to_pickle(small_lastfm / "Val_data.df")
    with pytest.raises(DataError, match=pattern):
        read_legacy(small_lastfm, allow_pickle=True)


def test_movielens_pairs_still_read(small_lastfm: Path) -> None:
    frame_with([[(0, 5), (1, 4), (P, 0)], [(2, 1), (P, 0), (P, 0)]], [2, 1], [(3, 5), (4, 2)]).to_pickle(small_lastfm / "Val_data.df")
    split = read_legacy(small_lastfm, allow_pickle=True).splits["val"]
    assert unpadded(split) == [[0, 1], [2]] and split.target.tolist() == [3, 4]


def test_deeply_nested_cell_gives_a_bounded_message(small_lastfm: Path) -> None:
    deep: list = []
    node = deep
    for _ in range(3000):
        node.append([])
        node = node[0]
    frame = frame_with([[(0, 1), (1, 1), (P, 0)], [deep, (1, 1), (P, 0)]], [2, 2], [(2, 1), (2, 1)])
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pickling the value needs the depth; reading must not
    try:
        (small_lastfm / "Val_data.df").write_bytes(pickle.dumps(frame, protocol=4))
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(DataError, match=r"Val_data\.df, row 1: a list of length 1 in column seq is not an \(id, rating\) pair") as info:
        read_legacy(small_lastfm, allow_pickle=True)
    assert len(str(info.value)) < 300


def test_histories_wider_than_the_limit_are_refused_on_read(small_lastfm: Path) -> None:
    """The same 4,096 limit the native writer enforces, so a dataset that loads can be converted."""
    from ilora.data.dataset import MAX_HISTORY_LEN

    wide = MAX_HISTORY_LEN + 1
    frame_with([[0] + [P] * (wide - 1)], [1], [1]).to_pickle(small_lastfm / "Val_data.df")
    with pytest.raises(DataError, match=rf"Val_data\.df, row 0: seq has {wide} entries \(expected a history width of at most 4096\)"):
        read_legacy(small_lastfm, allow_pickle=True)

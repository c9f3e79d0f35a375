"""Interaction logs: file discovery, id mapping, and the leave-one-out / sliding-window split."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ilora.data.interactions import leave_one_out, read_interactions, sequences_to_splits
from ilora.errors import ConfigError, DataError


def reference_samples(users: list, items: list, times: list, item_id: dict, max_len: int) -> dict[str, list]:
    """Obviously-correct split: one user at a time, a plain loop over positions, after dropping
    each row that repeats an earlier row's (user, item, timestamp)."""
    order_of_users: list = []
    events: dict = {}
    seen: set = set()
    for row, (u, i, ts) in enumerate(zip(users, items, times)):
        if (u, i, ts) in seen:
            continue
        seen.add((u, i, ts))
        if u not in events:
            order_of_users.append(u)
            events[u] = []
        events[u].append((ts, row, item_id[i]))
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for u in order_of_users:
        seq = [item for _, _, item in sorted(events[u])]
        big_t = len(seq)
        for t in range(1, big_t):
            sample = (seq[max(0, t - max_len) : t], seq[t])
            if t == big_t - 1:
                out["test"].append(sample)
            elif t == big_t - 2:
                out["val"].append(sample)
            else:
                out["train"].append(sample)
    return out


def samples(split) -> list:
    return [(list(map(int, split.history[i, : split.length[i]])), int(split.target[i])) for i in range(len(split))]


def random_log(rng: np.random.Generator, n_users: int, n_items: int, n_rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": [f"user{u}" for u in rng.integers(0, n_users, n_rows)],
            "item": [f"k{i:03d}" for i in rng.integers(0, n_items, n_rows)],
            "timestamp": rng.integers(0, 50, n_rows),  # many ties: file order must break them
        }
    )


@pytest.mark.parametrize("max_len", [1, 3, 10])
def test_split_matches_reference_csv(tmp_path: Path, np_rng: np.random.Generator, max_len: int) -> None:
    log = random_log(np_rng, 25, 30, 400)
    items = pd.DataFrame({"item": [f"k{i:03d}" for i in range(30)][::-1], "title": [f"Title {i}" for i in range(30)]})
    log.to_csv(tmp_path / "interactions.csv", index=False)
    items.to_csv(tmp_path / "items.csv", index=False)
    ds = read_interactions(tmp_path, max_len=max_len)
    item_id = {k: i for i, k in enumerate(items["item"])}
    expected = reference_samples(log["user"].tolist(), log["item"].tolist(), log["timestamp"].tolist(), item_id, max_len)
    for name in ("train", "val", "test"):
        assert samples(ds.splits[name]) == expected[name], name
        assert ds.splits[name].max_len == max_len
    assert ds.catalog.titles == tuple(items["title"])
    ds.validate()
    rows = list(zip(log["user"], log["item"], log["timestamp"]))
    per_user = pd.Series([u for u, _, _ in dict.fromkeys(rows)]).value_counts()
    assert ds.load_info["log"] == {
        "users": log["user"].nunique(), "interactions": len(log), "duplicates_dropped": len(rows) - len(set(rows)),
        "users_with_one_interaction": int((per_user == 1).sum()),
    }
    assert ds.load_info["log"]["duplicates_dropped"] > 0  # the random log has some: they were exercised


def test_parquet_with_integer_keys_and_items_beside(tmp_path: Path, np_rng: np.random.Generator) -> None:
    log = pd.DataFrame({"user": np_rng.integers(0, 8, 120), "item": np_rng.integers(100, 120, 120), "timestamp": np_rng.random(120)})
    log.to_parquet(tmp_path / "clicks.parquet")
    items = pd.DataFrame({"item": np.arange(100, 125), "title": [f"Song {i}" for i in range(25)]})
    items.to_parquet(tmp_path / "items.parquet")
    ds = read_interactions(tmp_path / "clicks.parquet")  # items.parquet found beside the file
    item_id = {k: k - 100 for k in range(100, 125)}
    expected = reference_samples(log["user"].tolist(), log["item"].tolist(), log["timestamp"].tolist(), item_id, 10)
    assert {n: samples(ds.splits[n]) for n in expected} == expected
    assert ds.num_items == 25  # unused catalog items stay in the catalog


def test_without_items_file_ids_follow_first_appearance(tmp_path: Path) -> None:
    pd.DataFrame(
        {"user": ["a", "a", "a", "b", "b"], "item": ["z", "y", "z", "x", "y"], "timestamp": [3, 1, 2, 1, 2]}
    ).to_csv(tmp_path / "interactions.csv", index=False)
    ds = read_interactions(tmp_path)
    assert ds.catalog.titles == ("z", "y", "x")  # file order, not time order
    # user a by time: y(1) z(0) z(0) ; user b: x(2) y(1)
    assert samples(ds.splits["val"]) == [([1], 0)]
    assert samples(ds.splits["test"]) == [([1, 0], 0), ([2], 1)]
    assert samples(ds.splits["train"]) == []


def test_iso_datetimes_and_explicit_items_file(tmp_path: Path) -> None:
    pd.DataFrame(
        {"user": [1, 1, 1], "item": [5, 6, 7], "timestamp": ["2024-01-03T10:00:00", "2024-01-01", "2024-01-02 08:00"]}
    ).to_csv(tmp_path / "log.csv", index=False)
    pd.DataFrame({"item": [7, 6, 5], "title": ["seven", "six", "five"]}).to_csv(tmp_path / "catalog.csv", index=False)
    ds = read_interactions(tmp_path / "log.csv", items=tmp_path / "catalog.csv")
    # time order: 6, 7, 5 -> ids 1, 0, 2
    assert samples(ds.splits["test"]) == [([1, 0], 2)]
    assert samples(ds.splits["val"]) == [([1], 0)]


def test_titles_that_look_like_missing_values_stay_text(tmp_path: Path) -> None:
    pd.DataFrame({"user": [1, 1], "item": ["NA", "None"], "timestamp": [1, 2]}).to_csv(tmp_path / "interactions.csv", index=False)
    pd.DataFrame({"item": ["NA", "None"], "title": ["NA", "null"]}).to_csv(tmp_path / "items.csv", index=False)
    ds = read_interactions(tmp_path)
    assert ds.catalog.titles == ("NA", "null")


@pytest.mark.parametrize(
    ("log", "items", "pattern"),
    [
        ("user,item\n1,a\n", None, r"interactions.csv: missing column\(s\) 'timestamp'"),
        ("user,item,timestamp\n1,a,1\n1,,2\n", None, r"interactions.csv, row 1 \(line 3\): missing item"),
        ("user,item,timestamp\n1,a,1\n1,b,yesterday\n", None, r"interactions.csv, row 1 \(line 3\): timestamp 'yesterday'"),
        ("user,item,timestamp\n1,a,1\n1,q,2\n", "item,title\na,A\nb,B\n", r"interactions.csv, row 1 \(line 3\): item 'q' is not in items.csv"),
        ("user,item,timestamp\n1,a,1\n", "item,title\na,A\na,B\n", r"items.csv, row 1 \(line 3\): duplicate item key 'a' \(first in row 0\)"),
        ("user,item,timestamp\n1,a,1\n", "item,name\na,A\n", r"items.csv: missing column\(s\) 'title'"),
    ],
)
def test_errors_name_file_and_row(tmp_path: Path, log: str, items: str | None, pattern: str) -> None:
    (tmp_path / "interactions.csv").write_text(log)
    if items is not None:
        (tmp_path / "items.csv").write_text(items)
    with pytest.raises(DataError, match=pattern):
        read_interactions(tmp_path)


def test_directory_without_or_with_two_logs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no interactions file"):
        read_interactions(tmp_path)
    (tmp_path / "interactions.csv").write_text("user,item,timestamp\n")
    pd.DataFrame({"user": [1], "item": [1], "timestamp": [1]}).to_parquet(tmp_path / "interactions.parquet")
    with pytest.raises(DataError, match="both interactions.csv and interactions.parquet"):
        read_interactions(tmp_path)


def test_leave_one_out_small_users_and_bad_max_len() -> None:
    splits = sequences_to_splits([[4], [1, 2], [1, 2, 3], [0, 1, 2, 3, 4]], num_items=5, max_len=2)
    assert samples(splits["test"]) == [([1], 2), ([1, 2], 3), ([2, 3], 4)]
    assert samples(splits["val"]) == [([1], 2), ([1, 2], 3)]
    assert samples(splits["train"]) == [([0], 1), ([0, 1], 2)]
    assert splits["train"].history[0].tolist() == [0, 5]  # padded with num_items
    with pytest.raises(ConfigError):
        leave_one_out(np.array([2]), np.array([0, 1]), max_len=0, padding_id=2)


@pytest.mark.parametrize(
    ("log", "pattern"),
    [
        ("user,item,timestamp\nu,a,1\nu,b,inf\nu,c,2\n", r"interactions\.csv, row 1 \(line 3\): timestamp 'inf' is not finite"),
        ("user,item,timestamp\nu,a,1\nu,b,2\nu,c,-Infinity\n", r"interactions\.csv, row 2 \(line 4\): timestamp '-Infinity' is not finite"),
        ("user,item,timestamp\nu,a,1\nu,b,nan\nu,c,2\n", r"interactions\.csv, row 1 \(line 3\): timestamp 'nan' \(expected a finite number"),
        ("user,item,timestamp\nu,a,NaN\nu,b,1\nu,c,2\n", r"interactions\.csv, row 0 \(line 2\): timestamp 'NaN'"),
        ("user,item,timestamp\nu,a,2020-01-01\nu,b,NaT\nu,c,2021-01-01\n", r"interactions\.csv, row 1 \(line 3\): timestamp 'NaT' \(expected an ISO-8601"),
    ],
)
def test_non_finite_csv_timestamps_name_the_row(tmp_path: Path, log: str, pattern: str) -> None:
    (tmp_path / "interactions.csv").write_text(log)
    with pytest.raises(DataError, match=pattern):
        read_interactions(tmp_path)


@pytest.mark.parametrize(
    ("timestamps", "pattern"),
    [
        ([True, False, True], r"row 0: timestamp True is a bool"),
        ([1.0, float("inf"), 2.0], r"row 1: timestamp inf is not finite"),
    ],
)
def test_parquet_bool_and_infinite_timestamps_are_refused(tmp_path: Path, timestamps: list, pattern: str) -> None:
    frame = pd.DataFrame({"user": [1, 1, 1], "item": [1, 2, 3], "timestamp": timestamps})
    frame.to_parquet(tmp_path / "interactions.parquet")
    with pytest.raises(DataError, match=rf"interactions\.parquet, {pattern}"):
        read_interactions(tmp_path)


@pytest.mark.parametrize(
    ("log", "line"),
    [
        ("user,item,timestamp\r\nu,a,1\r\nu,b,x\r\n", " (line 3)"),  # CRLF: one record per line
        ("\ufeffuser,item,timestamp\nu,a,1\nu,b,x\n", " (line 3)"),  # a BOM
        ("user,item,timestamp\nu,a,1\n\nu,b,x\n", ""),  # a blank line: records and lines part, no line given
        ('user,item,timestamp\n"u\nv",a,1\nu,b,x\n', ""),  # a quoted cell spanning two lines
    ],
)
def test_the_csv_line_is_given_only_where_it_is_certain(tmp_path, log, line):
    (tmp_path / "interactions.csv").write_text(log, encoding="utf-8", newline="")
    with pytest.raises(DataError) as error:
        read_interactions(tmp_path)
    assert f"interactions.csv, row 1{line}: timestamp 'x'" in str(error.value)


def test_item_titles_that_are_lists_or_floats_are_refused_not_turned_into_their_repr(tmp_path: Path) -> None:
    pd.DataFrame({"user": [1, 1], "item": ["a", "b"], "timestamp": [1, 2]}).to_parquet(tmp_path / "interactions.parquet")
    for titles, shown in (([["x", "y"], ["z"]], "title <a ndarray> is a ndarray"), ([1.5, 2.5], "title 1.5 is a float")):
        pd.DataFrame({"item": ["a", "b"], "title": titles}).to_parquet(tmp_path / "items.parquet")
        with pytest.raises(DataError, match=r"items\.parquet, row 0: " + re.escape(shown)):
            read_interactions(tmp_path)
    pd.DataFrame({"item": ["a", "b"], "title": [1984, 2046]}).to_parquet(tmp_path / "items.parquet")
    assert read_interactions(tmp_path).catalog.titles == ("1984", "2046")  # integer titles stay readable


def test_a_key_with_spaces_around_it_is_kept_as_written_with_a_warning(tmp_path: Path, caplog) -> None:
    """``10 `` and ``10`` are different items (keys are text, not cleaned), which a log written by
    hand can mean by mistake: the first such key is named by its line."""
    (tmp_path / "log.csv").write_text("user,item,timestamp\nu,10,1\nu,10 ,2\nu,11,3\nv,10,1\nv,11,2\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="ilora.data.interactions"):
        ds = read_interactions(tmp_path / "log.csv")
    assert ds.catalog.titles == ("10", "10 ", "11")
    assert "1 item key(s) begin or end with whitespace, kept as written ('10 ' and '10' are different items); the first: row 1 (line 3)" in caplog.text
    assert "user key" not in caplog.text

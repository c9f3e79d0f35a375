"""Candidate sets: contents, determinism, independence from batching, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ilora.data.candidates import candidate_sets, check_candidate_room, load_candidates, save_candidates
from ilora.data.dataset import Split
from ilora.data.synthetic import make_synthetic
from ilora.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def split_and_items() -> tuple[Split, int]:
    ds = make_synthetic(users=300, items=80, seed=11)
    return ds.splits["train"], ds.num_items


def check_row(row: np.ndarray, history: set[int], target: int, num_items: int) -> None:
    """The contract, checked one row at a time with Python sets."""
    assert len(set(row.tolist())) == len(row), "duplicates"
    assert row.tolist().count(target) == 1, "target exactly once"
    negatives = set(row.tolist()) - {target}
    assert not negatives & history, "a history item became a negative"
    assert all(0 <= x < num_items for x in row)


def test_contract_on_every_row(split_and_items) -> None:
    split, n = split_and_items
    cands = candidate_sets(split, n, count=20, seed=3, split_name="train")
    assert cands.shape == (len(split), 20) and cands.dtype == np.int64
    for i in range(len(split)):
        check_row(cands[i], set(split.history[i, : split.length[i]].tolist()), int(split.target[i]), n)


def test_same_seed_same_sets_and_other_seed_or_split_differs(split_and_items) -> None:
    split, n = split_and_items
    a = candidate_sets(split, n, count=20, seed=3, split_name="train")
    b = candidate_sets(split, n, count=20, seed=3, split_name="train")
    np.testing.assert_array_equal(a, b)
    c = candidate_sets(split, n, count=20, seed=4, split_name="train")
    d = candidate_sets(split, n, count=20, seed=3, split_name="val")
    assert (a != c).any(axis=1).mean() > 0.9
    assert (a != d).any(axis=1).mean() > 0.9


def test_independent_of_subset_order_and_chunking(split_and_items, np_rng: np.random.Generator) -> None:
    split, n = split_and_items
    full = candidate_sets(split, n, count=15, seed=7, split_name="test")
    index = np_rng.permutation(len(split))[:200]
    part = candidate_sets(split.subset(index), n, count=15, seed=7, split_name="test", index=index)
    np.testing.assert_array_equal(part, full[index])
    chunked = candidate_sets(split, n, count=15, seed=7, split_name="test", chunk=37)
    np.testing.assert_array_equal(chunked, full)


def test_target_position_and_negatives_look_uniform() -> None:
    # 4000 samples with an empty-ish history: every position and item should appear often
    n, count, rows = 30, 10, 4000
    split = Split(np.tile([[0, n]], (rows, 1)), np.ones(rows, dtype=np.int64), np.ones(rows, dtype=np.int64))
    cands = candidate_sets(split, n, count=count, seed=0, split_name="train")
    positions = np.argmax(cands == 1, axis=1)
    assert np.bincount(positions, minlength=count).min() > rows / count * 0.8
    counts = np.bincount(cands[cands != 1], minlength=n)
    assert counts[0] == 0 and counts[1] == 0
    expected = rows * (count - 1) / (n - 2)
    assert np.all(np.abs(counts[2:] - expected) < 0.15 * expected)


def test_tight_catalog_takes_every_allowed_item() -> None:
    # 12 items, history of 2 distinct + target: exactly 9 negatives are possible
    split = Split(np.array([[3, 4, 3, 12]]), np.array([3]), np.array([5]))
    cands = candidate_sets(split, 12, count=10, seed=1, split_name="val")
    assert sorted(cands[0].tolist()) == [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]


def test_too_many_candidates_names_the_row() -> None:
    split = Split(np.array([[0, 1, 12], [3, 4, 5]]), np.array([2, 3]), np.array([2, 6]))
    with pytest.raises(DataError, match=r"val split, row 1: only 8 items are neither in the history nor the target"):
        candidate_sets(split, 12, count=10, seed=1, split_name="val")
    with pytest.raises(ConfigError):
        candidate_sets(split, 12, count=0, seed=1, split_name="val")


@pytest.mark.parametrize("count", [2, 5, 8, 9, 10, 11, 12])
def test_the_room_check_refuses_exactly_what_drawing_refuses(count: int, np_rng: np.random.Generator) -> None:
    """`check_candidate_room` looks only at rows whose length could leave too little room; it
    must still refuse (with the same message) exactly when `candidate_sets` does."""
    rows, width, items = 300, 6, 12
    history = np_rng.integers(0, items, size=(rows, width))  # repeats: fewer distinct items than the length
    length = np_rng.integers(0, width + 1, size=rows)
    split = Split(np.where(np.arange(width) < length[:, None], history, items), length, np_rng.integers(0, items, size=rows))
    try:
        candidate_sets(split, items, count=count, seed=0, split_name="train")
        expected = None
    except DataError as err:
        expected = str(err)
    if expected is None:
        check_candidate_room(split, items, count=count, split_name="train")
    else:
        with pytest.raises(DataError) as refused:
            check_candidate_room(split, items, count=count, split_name="train")
        assert str(refused.value) == expected


def test_save_and_load(tmp_path: Path, split_and_items) -> None:
    split, n = split_and_items
    cands = candidate_sets(split, n, count=5, seed=0, split_name="val")
    path = save_candidates(tmp_path / "eval" / "val_candidates.npy", cands)
    np.testing.assert_array_equal(load_candidates(path, rows=len(split), num_items=n), cands)
    with pytest.raises(DataError, match="rows"):
        load_candidates(path, rows=len(split) + 1)
    with pytest.raises(DataError, match=r"row \d+, id \d+: candidate outside the catalog"):
        load_candidates(path, num_items=3)
    with pytest.raises(ConfigError):
        save_candidates(tmp_path / "c.pkl", cands)


def test_load_refuses_pickled_arrays(tmp_path: Path) -> None:
    path = tmp_path / "obj.npy"
    np.save(path, np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a plain .npy array"):
        load_candidates(path)


def test_count_one_is_the_target_alone() -> None:
    ds = make_synthetic(users=50, items=40, seed=0)
    split = ds.splits["test"]
    out = candidate_sets(split, ds.num_items, count=1, seed=0, split_name="test")
    assert out.shape == (len(split), 1)
    assert out[:, 0].tolist() == split.target.tolist()


def test_npz_archive_named_npy_is_a_data_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "cands", a=np.zeros((2, 2), dtype=np.int64))
    (tmp_path / "cands.npz").rename(tmp_path / "cands.npy")
    with pytest.raises(DataError, match=r"cands\.npy: is a zip \(\.npz\) archive, not a \.npy array"):
        load_candidates(tmp_path / "cands.npy")


def test_a_candidate_file_whose_header_claims_more_than_it_holds_is_refused_before_allocating(tmp_path):
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (10**6, 10**4)})
    (tmp_path / "huge.npy").write_bytes(header.getvalue())  # 128 bytes claiming 74.5 GiB
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(DataError, match=r"huge\.npy: its header claims a int64 array of shape \(1000000, 10000\), more than the file holds"):
        load_candidates(tmp_path / "huge.npy")
    with pytest.raises(DataError, match=r"empty\.npy: not a plain \.npy array"):
        load_candidates(tmp_path / "empty.npy")


@pytest.mark.parametrize(("num_items", "width"), [(50, 10), (4606, 10), (300, 200), (20, 1)])
def test_row_membership_equals_a_broadcast_comparison(num_items, width) -> None:
    """The negatives' history check (a binary search over all rows at once, so wide histories
    do not cost rows x draws x width) answers as comparing every draw with every history item."""
    from ilora.data.candidates import _in_rows

    rng = np.random.default_rng(width)
    history = np.sort(rng.integers(-1, num_items, (300, width)), axis=1)  # -1: padding
    draws = rng.integers(0, num_items, (300, 38))
    expected = (draws[:, :, None] == history[:, None, :]).any(axis=2)
    assert np.array_equal(_in_rows(draws, history), expected)
    assert expected.any() and not expected.all()
    # any values, not only ids of the catalog: an id past it in one row leaves the others right
    history[0, -1], draws[1, 0] = 10 * num_items, history[1, -1]
    expected = (draws[:, :, None] == np.sort(history, axis=1)[:, None, :]).any(axis=2)
    assert np.array_equal(_in_rows(draws, np.sort(history, axis=1)), expected)
    assert _in_rows(draws[:, :0], history).shape == (300, 0) and not _in_rows(draws, history[:, :0]).any()

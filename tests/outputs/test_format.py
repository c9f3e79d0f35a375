"""The teacher-outputs reader: arrays equal what was written, only the columns asked for,
no Python object per value, and every malformed shard a one-line error naming file and row."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file

from ilora.errors import DataError, IloraError
from ilora.outputs.format import FORMAT, ITEM_EMBEDDINGS, MANIFEST, VERSION, file_sha256, read_teacher_outputs

K, E, D, ITEMS, H = 3, 2, 5, 20, 4
FLOATS = ("topk_scores", "topk_confidence", "gate", "user_embedding")


def rows(n: int, seed: int, k: int = K, e: int = E, d: int = D) -> dict[str, np.ndarray]:
    """One shard's columns as NumPy arrays: the reference the reader must give back."""
    rng = np.random.default_rng(seed)
    conf = rng.dirichlet(np.ones(k + 2), size=n)[:, :k].astype(np.float32)
    return {
        "topk_items": rng.integers(0, ITEMS, (n, k)),
        "topk_scores": np.log(conf),
        "topk_confidence": conf,
        "gate": rng.dirichlet(np.ones(e), size=n).astype(np.float32),
        "user_embedding": rng.normal(size=(n, d)).astype(np.float32),
    }


def table(first: int, cols: dict, **override) -> pa.Table:
    """A shard written through Python lists (``override``: column -> list of rows, may hold None)."""
    data = {"index": pa.array(range(first, first + len(cols["topk_items"])), pa.int64())}
    for name, values in cols.items():
        values = override.get(name, values)
        values = values.tolist() if isinstance(values, np.ndarray) else values
        data[name] = pa.array(values, pa.list_(pa.int64() if name == "topk_items" else pa.float32()))
    return pa.table(data)


def write(directory, shards: list[pa.Table], *, top_k=K, emb_sha: bool = True, **parquet) -> None:
    """A teacher-outputs directory (format.py's layout) holding ``shards`` of the train split."""
    (directory / "train").mkdir(parents=True, exist_ok=True)
    entries, first = [], 0
    for number, shard in enumerate(shards):
        path = directory / "train" / f"part-{number:05d}.parquet"
        pq.write_table(shard, path, **parquet)
        entries.append({"file": f"train/{path.name}", "first_index": first, "rows": shard.num_rows, "sha256": file_sha256(path)})
        first += shard.num_rows
    save_file({"item_embeddings": np.arange(ITEMS * H, dtype=np.float32).reshape(ITEMS, H)}, str(directory / ITEM_EMBEDDINGS))
    emb = {"file": ITEM_EMBEDDINGS, "dim": H}
    if emb_sha:
        emb["sha256"] = file_sha256(directory / ITEM_EMBEDDINGS)
    manifest = {"format": FORMAT, "version": VERSION, "top_k": top_k, "dataset": {"num_items": ITEMS}, "item_embeddings": emb,
                "splits": {"train": {"rows": first, "complete": True, "shards": entries}}}
    (directory / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


def one_line_error(directory, match: str, error=DataError, **kw) -> str:
    with pytest.raises(error, match=match) as info:
        read_teacher_outputs(directory, ("train",), **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- what the reader returns ---------------------------------------------------------------


def test_arrays_equal_the_rows_written_across_shards_and_row_groups(tmp_path) -> None:
    parts = [rows(7, 0), rows(5, 1), rows(9, 2)]
    write(tmp_path, [table(0, parts[0]), table(7, parts[1]), table(12, parts[2])], row_group_size=4)  # several chunks per column
    got = read_teacher_outputs(tmp_path, ("train",))
    train = got.split("train")
    assert len(train) == 21
    for name in parts[0]:
        expected = np.concatenate([p[name] for p in parts])
        value = getattr(train, name)
        assert value.dtype == (np.int64 if name == "topk_items" else np.float32), name
        assert value.flags.writeable and value.flags.c_contiguous, name
        np.testing.assert_array_equal(value, expected, err_msg=name)
    np.testing.assert_array_equal(got.item_embeddings, np.arange(ITEMS * H, dtype=np.float32).reshape(ITEMS, H))


def test_columns_reads_only_the_columns_asked_for(tmp_path) -> None:
    cols = rows(6, 3)
    broken = table(0, cols, gate=[[float("nan")] * E] * 6).drop_columns(["user_embedding"])  # what is not read is not checked
    write(tmp_path, [broken])
    train = read_teacher_outputs(tmp_path, ("train",), columns=("topk_items", "topk_confidence")).split("train")
    np.testing.assert_array_equal(train.topk_items, cols["topk_items"])
    np.testing.assert_array_equal(train.topk_confidence, cols["topk_confidence"])
    assert train.topk_scores is None and train.gate is None and train.user_embedding is None and len(train) == 6
    with pytest.raises(ValueError, match="unknown teacher-output column"):
        read_teacher_outputs(tmp_path, ("train",), columns=("topk_items", "gates"))
    with pytest.raises(ValueError, match="no teacher-output columns"):  # its splits would have no rows
        read_teacher_outputs(tmp_path, ("train",), columns=())


@pytest.mark.parametrize("claimed", [10**15, -3, "7"])
def test_shard_row_counts_are_checked_against_the_files_before_anything_is_sized(tmp_path, claimed) -> None:
    """A manifest claiming 10**15 rows used to make the reader ask NumPy for hundreds of TiB."""
    write(tmp_path, [table(0, rows(5, 4))])
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][0]["rows"] = claimed
    manifest["splits"]["train"]["rows"] = claimed
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    expected = {10**15: "holds 5 rows, the manifest says", -3: "expected a count", "7": "splits.train.rows is '7', expected int"}[claimed]
    one_line_error(tmp_path, expected, error=IloraError)


def test_reading_allocates_no_python_object_per_value(tmp_path) -> None:
    """The Python-heap peak while reading stays near the arrays' own bytes (``to_pylist`` of
    the 440,000 values would need tens of MB of Python ints, floats and lists)."""
    write(tmp_path, [table(0, rows(5000, 4, k=10, e=4, d=64))], top_k=10)
    read_teacher_outputs(tmp_path, ("train",))  # warm-up: imports, Arrow's first use
    tracemalloc.start()
    try:
        train = read_teacher_outputs(tmp_path, ("train",)).split("train")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    arrays = sum(getattr(train, name).nbytes for name in ("topk_items", *FLOATS))
    assert arrays == 5000 * (10 * 8 + (10 + 10 + 4 + 64) * 4)
    assert peak < 1.5 * arrays + (1 << 20), (peak, arrays)


# -- malformed shards: one line, naming the file and the row --------------------------------


def test_a_null_item_inside_a_row_is_a_data_error(tmp_path) -> None:
    cols = rows(4, 5)
    items = cols["topk_items"].tolist()
    items[2][1] = None
    write(tmp_path, [table(0, cols, topk_items=items)])
    message = one_line_error(tmp_path, "topk_items has a null value at position 1")
    assert "part-00000.parquet, row 2:" in message


@pytest.mark.parametrize("name", ["topk_confidence", "topk_scores", "gate", "user_embedding"])
def test_a_null_float_value_is_a_data_error_not_nan(tmp_path, name) -> None:
    cols = rows(4, 6)
    values = cols[name].tolist()
    values[3][0] = None
    write(tmp_path, [table(0, cols, **{name: values})])
    assert "part-00000.parquet, row 3:" in one_line_error(tmp_path, f"{name} has a null value at position 0")


def test_a_null_row_and_a_short_row_are_data_errors(tmp_path) -> None:
    cols = rows(4, 7)
    gate = cols["gate"].tolist()
    gate[1] = None
    write(tmp_path / "null", [table(0, cols, gate=gate)])
    assert "row 1:" in one_line_error(tmp_path / "null", "column gate is null")
    items = cols["topk_items"].tolist()
    items[2] = items[2][:-1]
    write(tmp_path / "short", [table(0, cols, topk_items=items)])
    assert "row 2:" in one_line_error(tmp_path / "short", rf"topk_items has {K - 1} values \(expected {K} values\)")


def test_shards_with_different_k_or_widths_name_the_odd_shard(tmp_path) -> None:
    write(tmp_path / "k", [table(0, rows(4, 8)), table(4, rows(3, 9, k=K + 1))], top_k=K)
    message = one_line_error(tmp_path / "k", rf"topk_items has {K + 1} values \(expected {K} values\)")
    assert "part-00001.parquet, row 0:" in message
    write(tmp_path / "manifest", [table(0, rows(4, 8))], top_k=K + 2)  # every shard disagrees with the manifest's top_k
    assert "part-00000.parquet, row 0:" in one_line_error(tmp_path / "manifest", rf"has {K} values \(expected {K + 2} values\)")
    write(tmp_path / "gate", [table(0, rows(4, 8)), table(4, rows(3, 9, e=E + 1))])
    assert "part-00001.parquet, row 0:" in one_line_error(tmp_path / "gate", rf"gate has {E + 1} values \(expected {E} values\)")
    write(tmp_path / "user", [table(0, rows(4, 8)), table(4, rows(3, 9, d=D - 1))])
    assert "part-00001.parquet" in one_line_error(tmp_path / "user", rf"user_embedding has {D - 1} values \(expected {D} values\)")


@pytest.mark.parametrize(
    "name,value",
    [("gate", float("nan")), ("user_embedding", float("nan")), ("user_embedding", float("inf")), ("topk_confidence", float("nan")),
     ("topk_confidence", float("inf")), ("topk_scores", float("nan")), ("topk_scores", float("inf"))],
)
def test_non_finite_values_are_data_errors(tmp_path, name, value) -> None:
    cols = rows(5, 10)
    values = cols[name].copy()
    values[4, 1] = value
    write(tmp_path, [table(0, rows(3, 11)), table(3, cols, **{name: values})])
    message = one_line_error(tmp_path, rf"column {name} holds {value} at position 1")
    assert "part-00001.parquet, row 4:" in message


def test_a_minus_inf_score_is_valid(tmp_path) -> None:
    cols = rows(3, 12)
    cols["topk_scores"][1, 2] = -np.inf
    write(tmp_path, [table(0, cols)])
    assert read_teacher_outputs(tmp_path, ("train",)).split("train").topk_scores[1, 2] == -np.inf


def test_wrong_types_and_missing_columns_are_data_errors(tmp_path) -> None:
    cols = rows(3, 13)
    shard = table(0, cols)
    floats = shard.set_column(1, "topk_items", pa.array(cols["topk_items"].astype(float).tolist(), pa.list_(pa.float64())))
    write(tmp_path / "float_ids", [floats])
    one_line_error(tmp_path / "float_ids", r"topk_items holds float64 values \(expected integer item ids\)")
    flat = shard.set_column(4, "gate", pa.array(cols["gate"][:, 0]))
    write(tmp_path / "flat", [flat])
    one_line_error(tmp_path / "flat", r"column gate is float \(expected a list column\)")
    write(tmp_path / "missing", [shard.drop_columns(["gate"])])
    one_line_error(tmp_path / "missing", r"part-00000.parquet: missing column\(s\) gate")
    write(tmp_path / "junk", [shard])
    (tmp_path / "junk" / "train" / "part-00000.parquet").write_bytes(b"not parquet at all")
    one_line_error(tmp_path / "junk", "part-00000.parquet: not a readable Parquet shard", verify=False)


# -- item embeddings: the manifest's sha256 is required ---------------------------------------


def test_item_embeddings_without_a_manifest_sha256_are_refused(tmp_path) -> None:
    write(tmp_path, [table(0, rows(3, 14))], emb_sha=False)
    one_line_error(tmp_path, r"manifest.json: no item_embeddings.sha256, so .*item_embeddings.safetensors cannot be verified", IloraError)
    assert read_teacher_outputs(tmp_path, ("train",), verify=False).item_embeddings.shape == (ITEMS, H)
    (tmp_path / ITEM_EMBEDDINGS).unlink()  # no file: nothing to verify (distillation with w_ed = 0 needs none)
    assert read_teacher_outputs(tmp_path, ("train",)).item_embeddings is None


def test_item_embeddings_the_manifest_records_but_missing_are_an_error_not_none(tmp_path) -> None:
    """An export whose file was lost (not copied along) is not an export without embeddings."""
    write(tmp_path, [table(0, rows(3, 14))])
    (tmp_path / ITEM_EMBEDDINGS).unlink()
    for verify in (True, False):
        one_line_error(tmp_path, r"item_embeddings.safetensors: missing, though .*manifest.json records it", IloraError, verify=verify)


def test_a_shard_past_32_bit_list_offsets_is_refused_not_wrapped() -> None:
    from ilora.outputs.export import _list_column

    big = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(2**25, 64), strides=(0, 0))  # 2^31 values, no memory
    with pytest.raises(IloraError, match="passes Parquet's 32-bit list offsets; use a smaller --shard-rows"):
        _list_column(big, np.float32)
    assert _list_column(np.ones((3, 4), np.float32), np.float32).to_pylist() == [[1.0] * 4] * 3


@pytest.mark.parametrize(
    "splits,match",
    [
        ([], r"splits is list, expected an object"),
        ({"train": {"complete": True}}, r"splits\.train\.rows is None, expected int"),
        ({"train": {"rows": 3, "complete": "yes", "shards": []}}, r"splits\.train\.complete is 'yes', expected bool"),
        ({"train": {"rows": 3, "complete": True, "shards": [{"file": "train/part-00000.parquet", "rows": 3, "sha256": "x"}]}},
         r"splits\.train\.shards\[0\]\.first_index is None, expected int"),
        ({"train": {"rows": 3, "complete": True, "shards": ["train/part-00000.parquet"]}}, r"splits\.train\.shards\[0\] is str, expected an object"),
        ({"train": {"rows": 3, "complete": True, "shards": [{"file": "../../etc/passwd", "first_index": 0, "rows": 3, "sha256": "x"}]}},
         r"splits\.train\.shards\[0\]\.file is '\.\./\.\./etc/passwd', expected train/part-NNNNN\.parquet"),
    ],
)
def test_a_malformed_manifest_is_an_error_naming_the_file_and_key(tmp_path, splits, match) -> None:
    write(tmp_path, [table(0, rows(3, 13))])
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["splits"] = splits
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    message = one_line_error(tmp_path, match, error=IloraError)
    assert message.startswith(str(tmp_path / MANIFEST))

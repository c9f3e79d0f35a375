"""`ilora.data.frame_pickle`: the records a DataFrame pickle leaves, read without pandas.

The attacks on the reader (blocks outside the columns, axes sized by a number, copied
buffers) are in tests/reliability/test_untrusted_files.py; here, the pieces read against
what pandas and pyarrow themselves make of the same data.
"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ilora.data import frame_pickle as fp


def arrow_labels(offsets: list[int], text: bytes, alias: str = "large_string", length: int | None = None) -> fp._Record:
    """The records pandas >= 3 pickles for an ArrowStringArray of column labels."""
    width = "<i8" if alias.startswith("large") else "<i4"
    buffers = [None, fp.ArrowBuffer(np.array(offsets, dtype=width).tobytes()), fp.ArrowBuffer(text)]
    array = fp.ArrowArray((fp.ArrowType(alias), len(offsets) - 1 if length is None else length, 0, 0, buffers, [], None))
    labels = fp.ArrowStringArray()
    labels.__setstate__({"_pa_array": array, "_dtype": fp.StringDtype("pyarrow", np.nan)})
    return labels


@pytest.mark.parametrize("alias", ["string", "large_string"])
def test_arrow_labels_decode_as_pyarrow_does(alias: str) -> None:
    names = ["seq", "", "len_seq", "névé"]
    reference = pa.array(names, type=pa.large_string() if alias.startswith("large") else pa.string())
    offsets = np.frombuffer(reference.buffers()[1], dtype="<i8" if alias.startswith("large") else "<i4")[: len(names) + 1]
    text = reference.buffers()[2].to_pybytes()
    assert fp._arrow_strings(arrow_labels(offsets.tolist(), text, alias)) == reference.to_pylist()


@pytest.mark.parametrize(
    ("offsets", "text", "alias", "length", "problem"),
    [
        ([0, 3, 99], b"seqlen_seq", "large_string", None, "offsets out of range"),
        ([0, 5, 3], b"seqlen_seq", "large_string", None, "offsets out of range"),
        ([0, 3], b"seq", "large_string", 2**40, "shorter than its length"),
        ([0, 3], b"seq", "null", None, "of type 'null'"),
        ([0, 2], b"\xff\xfe", "string", None, "not UTF-8"),
    ],
)
def test_malformed_arrow_labels_are_refused(offsets: list[int], text: bytes, alias: str, length: int | None, problem: str) -> None:
    with pytest.raises(fp._Bad, match=problem):
        fp._arrow_strings(arrow_labels(offsets, text, alias, length))


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_columns_equal_what_pandas_reads(protocol: int) -> None:
    frame = pd.DataFrame({"seq": [[0, 1, 5], [(1, 4), (5, 0), (5, 0)]], "len_seq": [2, 1], "next": [2, 3], "w": [0.5, 1.5]})
    frame["title"] = ["a", "b"]  # a string column: its own (Arrow) block, placed but never decoded
    frame = frame.iloc[[1, 0]]  # an index of ints, not a range
    data = pickle.dumps(frame, protocol=protocol)
    labels, rows, columns = fp.read_frame_pickle("mem.df", data, ("seq", "next", "w"))
    reference = pickle.loads(data)
    assert labels == list(reference.columns) and rows == len(reference)
    assert {name: values.tolist() for name, values in columns.items()} == {c: reference[c].tolist() for c in ("seq", "next", "w")}


def test_records_keep_calls_inert() -> None:
    """A pandas name called with arguments records them; nothing of pandas runs."""
    call = fp.Manager((), [fp.RangeIndexClass(0, 10**12)])
    assert call.args[1][0].args == (0, 10**12) and call.state is None
    with pytest.raises(ValueError, match="two states"):
        record = fp.Frame()
        record.__setstate__({})
        record.__setstate__({})

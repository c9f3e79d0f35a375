"""Untrusted files: no pickle runs code, with or without ``--allow-pickle``.

* Without the opt-in no pickle is read at all; with it, legacy ``.df`` DataFrames and LLaRA
  SASRec checkpoints go through restricted unpicklers whose allow-lists are spelled out in
  the module docstrings. Planted pickles whose loading would run ``os.system``,
  ``builtins.exec`` or ``subprocess.Popen`` (alone, nested in a real DataFrame, inside a
  torch zip checkpoint's ``data.pkl``) are refused with the file and the global named, and
  the marker file they would create never appears.
* The source never calls ``torch.load`` without ``weights_only=True``, never unpickles
  outside the restricted unpickler, and never trusts remote model code unless asked.
* The project's own outputs (``data synth``, ``rec train``, ``teacher train``) hold no pickle.
"""

from __future__ import annotations

import ast
import builtins
import copyreg
import io
import os
import pickle
import re
import struct
import subprocess
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ilora.cli.main import main
from ilora.data import frame_pickle, legacy, safe_pickle
from ilora.rec import llara_import

SRC = Path(__file__).resolve().parents[2] / "src" / "ilora"
TITLES = "".join(f"{i}::t{i}\n" for i in range(5))


class _Payload:
    """An object whose unpickling calls ``func(*args)``."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, tuple[object, str]]:
    """name -> (object whose unpickling creates ``marker``, the global it needs)."""
    return {
        "os.system": (_Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        "builtins.exec": (_Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        "subprocess.Popen": (_Payload(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
        "builtins.eval": (_Payload(builtins.eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
    }


PAYLOADS = ["os.system", "builtins.exec", "subprocess.Popen", "builtins.eval"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and sum(l.startswith("error: ") for l in lines) == 1, err
    assert "Traceback" not in err
    return code, lines[-1]


def legacy_dir(directory: Path, train_bytes: bytes) -> Path:
    directory.mkdir()
    (directory / "id2name.txt").write_text(TITLES, encoding="utf-8")
    (directory / "train_data.df").write_bytes(train_bytes)
    return directory


# --------------------------------------------------------------------------- .df pickles


@pytest.mark.parametrize("name", PAYLOADS)
def test_df_payload_refused_with_and_without_opt_in(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    payload, refused = payloads(marker)[name]
    directory = legacy_dir(tmp_path / "ds", pickle.dumps(payload, protocol=4))
    code, line = run_cli(capsys, "data", "stats", str(directory))
    assert code == 2 and "train_data.df: is a pickle" in line and "--allow-pickle" in line
    code, line = run_cli(capsys, "data", "convert", str(directory), str(tmp_path / "out"), "--allow-pickle")
    assert code == 2
    assert f"{directory / 'train_data.df'}: refused to load global {refused}" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", PAYLOADS)
def test_payload_nested_in_a_real_dataframe_is_refused(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    payload, refused = payloads(marker)[name]
    frame = pd.DataFrame({"seq": [[0, 1, 5, 5], [1, 2, 5, 5]], "len_seq": [2, 2], "next": [2, 3]})
    frame["extra"] = pd.Series([1, payload], dtype=object)  # deep inside an object block
    buffer = io.BytesIO()
    frame.to_pickle(buffer)
    assert refused.split(".")[-1].encode() in buffer.getvalue()
    directory = legacy_dir(tmp_path / "ds", buffer.getvalue())
    code, line = run_cli(capsys, "data", "stats", str(directory), "--allow-pickle", "--json")
    assert code == 2 and f"refused to load global {refused}" in line and "train_data.df" in line
    assert not marker.exists()


def test_persistent_ids_and_non_dataframes_are_refused(tmp_path: Path) -> None:
    class WithPersistentId(pickle.Pickler):
        def persistent_id(self, obj):
            return "ext" if obj == "x" else None

    buffer = io.BytesIO()
    WithPersistentId(buffer, protocol=4).dump(["x"])
    (tmp_path / "pid.df").write_bytes(buffer.getvalue())
    with pytest.raises(safe_pickle.IloraError, match=r"pid\.df: not a readable pickle"):
        legacy.read_dataframe_pickle(tmp_path / "pid.df", allow_pickle=True)
    (tmp_path / "list.df").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(safe_pickle.IloraError, match=r"list\.df: the pickle holds a list"):
        legacy.read_dataframe_pickle(tmp_path / "list.df", allow_pickle=True)


def test_dtype_state_cannot_rewrite_numpy_builtins(tmp_path: Path) -> None:
    """A pickle that BUILDs a bogus state onto ``numpy.dtype('i8', False, False)`` is refused and int64 is intact."""
    data = (
        b"\x80\x04cnumpy\ndtype\n(X\x02\x00\x00\x00i8\x89\x89tR"
        b"(K\x03X\x01\x00\x00\x00<NNNK\x01K\x01K\x00tb."
    )
    (tmp_path / "dtype.df").write_bytes(data)
    with pytest.raises(safe_pickle.IloraError, match=r"dtype\.df: not a readable pickle"):
        legacy.read_dataframe_pickle(tmp_path / "dtype.df", allow_pickle=True)
    assert np.dtype("i8").itemsize == 8 and np.arange(3, dtype=np.int64).sum() == 3


def _index_from_range_pickle(n: int) -> bytes:
    """A real pickle (protocol 4, ~170 bytes) of ``_new_Index(Index, {"data": RangeIndex(0, n), "dtype": "float64"})``."""
    import pickle

    import pandas as pd
    from pandas.core.indexes.base import _new_Index

    class Crafted:
        def __reduce__(self):
            return (_new_Index, (pd.Index, {"data": pd.RangeIndex(0, n), "dtype": "float64"}))

    return pickle.dumps(Crafted(), protocol=4)


UNREADABLE = r"not a readable pickle \(ValueError: "
NOT_A_FRAME = r"not a DataFrame pickle this reader accepts: "


@pytest.mark.parametrize(
    ("data", "refusal"),
    [
        # each would allocate what a number in a 40-byte file asks for (here only 1 MB; 1.5 GB works the same)
        (b"cbuiltins\nbytearray\n(L1000000L\ntR.", UNREADABLE + r"refused bytearray\(int\)"),
        (b"cnumpy\nndarray\n((L1000000L\ntS'O'\ntR.", UNREADABLE + r"refused initial ndarray shape \(1000000,\)"),
        (b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(L1000000L\ntS'O'\ntR.", UNREADABLE + r"refused initial ndarray shape \(1000000,\)"),
        (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(K\x00tS'V9'\ntR.", UNREADABLE + r"refused dtype 'V9'"),
        (b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(K\x00tS'longer-than-8'\ntR.", UNREADABLE + r"refused dtype spec"),
        # pandas names are inert records: DataFrame(None, RangeIndex(0, 10**6), ["seq"]) would fill a million cells
        (b"cpandas\nDataFrame\n(Ncpandas\nRangeIndex\n(I0\nI1000000\ntR(Vseq\nltR.", NOT_A_FRAME + r"DataFrame with 3 arguments \(expected 0\)"),
        (b"cpandas\nDataFrame\n(NNNtR.", NOT_A_FRAME + r"DataFrame with 3 arguments"),
        # _new_Index(Index, {"data": RangeIndex(0, 10**6), "dtype": "float64"}) would materialise a million floats
        (_index_from_range_pickle(10**6), r"the pickle holds a _new_Index"),
    ],
)
def test_tiny_pickles_cannot_ask_for_big_allocations(data: bytes, refusal: str, tmp_path: Path) -> None:
    (tmp_path / "bomb.df").write_bytes(data)
    with pytest.raises(safe_pickle.IloraError, match=rf"bomb\.df: {refusal}"):
        legacy.read_dataframe_pickle(tmp_path / "bomb.df", allow_pickle=True)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_dataframe_pickles_of_every_python3_protocol_still_load(protocol: int, tmp_path: Path) -> None:
    frame = pd.DataFrame({"seq": [[0, 1, 5, 5], [(1, 4), (2, 3), (5, 0), (5, 0)]], "len_seq": [2, 2], "next": [2, 3]})
    frame["floats"] = [0.5, 1.5]
    (tmp_path / "ok.df").write_bytes(pickle.dumps(frame, protocol=protocol))
    back = legacy.read_dataframe_pickle(tmp_path / "ok.df", allow_pickle=True)
    assert back["seq"].tolist() == frame["seq"].tolist()
    assert back["len_seq"].tolist() == [2, 2] and back["next"].tolist() == [2, 3]


def test_short_object_list_cannot_crash_the_interpreter(tmp_path: Path) -> None:
    """NumPy's own ndarray.__setstate__ segfaults on this; the restricted unpickler refuses it."""
    obj = np.empty((2, 1), dtype=object)
    obj[0, 0], obj[1, 0] = [0, 1], [1, 2]
    raw = pickle.dumps(obj, protocol=4)
    assert raw.count(b"K\x02K\x01\x86") == 1  # the shape (2, 1) in the array's state; make it (2, 9)
    (tmp_path / "array.df").write_bytes(raw.replace(b"K\x02K\x01\x86", b"K\x02K\x09\x86"))
    out = _read_in_a_subprocess(tmp_path / "array.df")
    assert "refused:" in out and "object array of shape (2, 9)" in out


# pandas' own unpickling trusts block placements and axis lengths; the reader treats both as data.


class _NewObj:
    """An object whose unpickling is ``cls.__new__(cls)`` and then ``BUILD state`` (NEWOBJ + BUILD)."""

    def __init__(self, cls, state) -> None:
        self.cls, self.state = cls, state

    @property  # type: ignore[misc]
    def __class__(self):  # pickle checks that NEWOBJ's class is the object's own
        return self.cls

    def __reduce__(self):
        return copyreg.__newobj__, (self.cls,), self.state


def _frame_pickle(manager) -> bytes:
    return pickle.dumps(_NewObj(pd.DataFrame, {"_mgr": manager, "_typ": "dataframe"}), protocol=5)


def _block_manager(values: np.ndarray, placement, columns, rows, layout: str):
    """A BlockManager as pandas >= 1.3 pickles it (``reduce``) or as earlier pandas did (``setstate``)."""
    from pandas._libs.internals import _unpickle_block
    from pandas.core.internals.managers import BlockManager

    axes = [columns if isinstance(columns, pd.Index) else pd.Index(columns, dtype=object), rows]
    if layout == "reduce":
        return _Payload(BlockManager, (_Payload(_unpickle_block, values, placement, 2),), axes)
    blocks = [{"values": values, "mgr_locs": placement}]
    return _NewObj(BlockManager, (axes, [values], [columns], {"0.14.1": {"axes": axes, "blocks": blocks}}))


def _read_in_a_subprocess(path: Path) -> str:
    """Read ``path`` in a child process: a regression here is a crash, which must not take pytest down."""
    script = (
        "from pathlib import Path; from ilora.data.legacy import read_dataframe_pickle\n"
        "from ilora.errors import IloraError\n"
        f"try:\n    frame = read_dataframe_pickle(Path({str(path)!r}), allow_pickle=True)\n    print('read:', frame.to_dict('list'))\n"
        "except IloraError as e:\n    print('refused:', e)\n"
    )
    result = subprocess.run([os.sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"rc {result.returncode}: {result.stderr[-500:]}"  # a crash is a negative return code
    return result.stdout


@pytest.mark.parametrize("layout", ["reduce", "setstate"])
@pytest.mark.parametrize("position", [0, 5, 10**8])
def test_a_block_placed_past_the_columns_is_refused_not_written_out_of_bounds(layout: str, position: int, tmp_path: Path) -> None:
    """pandas writes a block's number at its placement in arrays sized by the columns: past them, out of bounds."""
    manager = _block_manager(np.array([[7]]), slice(position, position + 1, 1), ["next"], pd.RangeIndex(1), layout)
    (tmp_path / "oob.df").write_bytes(_frame_pickle(manager))
    out = _read_in_a_subprocess(tmp_path / "oob.df")
    if position == 0:
        assert out.strip() == "read: {'next': [7]}"
    else:
        assert f"refused: {tmp_path / 'oob.df'}: not a DataFrame pickle this reader accepts: a block placed at {position}:" in out


@pytest.mark.parametrize("layout", ["reduce", "setstate"])
def test_both_block_manager_layouts_read_a_real_frame(layout: str, tmp_path: Path) -> None:
    frame = pd.DataFrame({"seq": [[0, 1, 5], [2, 5, 5]], "len_seq": [2, 1], "next": [2, 3]})
    seq = np.empty((1, 2), dtype=object)
    seq[0, 0], seq[0, 1] = [0, 1, 5], [2, 5, 5]
    ints = np.array([[2, 1], [2, 3]])
    from pandas._libs.internals import _unpickle_block
    from pandas.core.internals.managers import BlockManager

    axes = [pd.Index(["len_seq", "seq", "next"], dtype=object), pd.RangeIndex(2)]
    placements = [(seq, slice(1, 2, 1)), (ints, np.array([0, 2]))]
    if layout == "reduce":
        manager = _Payload(BlockManager, tuple(_Payload(_unpickle_block, v, p, 2) for v, p in placements), axes)
    else:
        blocks = [{"values": v, "mgr_locs": p} for v, p in placements]
        manager = _NewObj(BlockManager, (axes, [v for v, _ in placements], [], {"0.14.1": {"axes": axes, "blocks": blocks}}))
    (tmp_path / "ok.df").write_bytes(_frame_pickle(manager))
    back = legacy.read_dataframe_pickle(tmp_path / "ok.df", allow_pickle=True)
    assert {c: back[c].tolist() for c in frame.columns} == frame.to_dict("list")


@pytest.mark.parametrize(
    ("values", "placement", "columns", "rows", "refusal"),
    [
        # a column axis of 2**26 labels and no block: pandas fills two arrays of that length
        (None, None, pd.RangeIndex(2**26), pd.RangeIndex(1), r"67108864 columns in a file of \d+ bytes"),
        # no rows: a block of 2**25 columns holds no bytes, yet listing its positions would take gigabytes
        (np.zeros((2**25, 0)), slice(0, 2**25, 1), pd.RangeIndex(2**25), pd.RangeIndex(0), r"33554432 columns in a file of \d+ bytes"),
        (np.array([[7], [8]]), slice(0, 2, 1), ["next", "seq"], pd.RangeIndex(3), r"a block of shape \(2, 1\) in a frame of 3 rows"),
        (np.array([[7], [8]]), slice(0, 1, 1), ["next", "seq"], pd.RangeIndex(1), "a block of 2 columns placed at 1 positions"),
        (np.array([[7], [8]]), np.array([1, 1]), ["next", "seq"], pd.RangeIndex(1), "a column placed in two blocks"),
        (np.array([[7]]), slice(0, 1, 1), ["next", "next"], pd.RangeIndex(1), "blocks that place 1 columns in a frame of 2"),
    ],
)
def test_axes_must_agree_with_the_blocks(values, placement, columns, rows, refusal: str, tmp_path: Path) -> None:
    from pandas.core.internals.managers import BlockManager

    if values is None:
        manager = _Payload(BlockManager, (), [columns, rows])
    else:
        manager = _block_manager(values, placement, columns, rows, "reduce")
    (tmp_path / "axes.df").write_bytes(_frame_pickle(manager))
    tracemalloc.start()
    try:
        with pytest.raises(safe_pickle.IloraError, match=rf"axes\.df: not a DataFrame pickle this reader accepts: {refusal}"):
            legacy.read_dataframe_pickle(tmp_path / "axes.df", allow_pickle=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak


class _RebuiltArray:
    """Unpickles as NumPy's own arrays do: ``_reconstruct(ndarray, (0,), b"b")`` and then ``BUILD state``."""

    def __init__(self, state) -> None:
        self.state = state

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (0,), b"b"), self.state


def test_a_buffer_stored_once_cannot_be_copied_a_thousand_times(tmp_path: Path) -> None:
    """The memo lets a file name one stored buffer again and again; each copy is charged to a budget."""
    from numpy._core.multiarray import scalar
    from numpy._core.numeric import _frombuffer

    buffer = bytes(1 << 20)
    copies = {
        "bytearray": lambda: _Payload(bytearray, buffer),
        "frombuffer": lambda: _Payload(_frombuffer, buffer, np.dtype("u1"), (1 << 20,), "C"),
        "scalar": lambda: _Payload(scalar, np.dtype(f"U{len(buffer) // 4}"), buffer),  # a 1 MiB string scalar
        "object-array": lambda: _RebuiltArray(pointers),  # 1 MiB of pointers to one stored list of Nones
    }
    pointers = (1, (2**17,), np.dtype(object), False, [None] * 2**17)
    for name, copy in copies.items():
        (tmp_path / f"{name}.df").write_bytes(pickle.dumps([copy() for _ in range(1000)], protocol=4))
        assert (tmp_path / f"{name}.df").stat().st_size < 1.1 * len(buffer), name
        with pytest.raises(safe_pickle.IloraError, match="would take the data built from this pickle past"):
            legacy.read_dataframe_pickle(tmp_path / f"{name}.df", allow_pickle=True)


def _shared_graph(depth: int) -> list:
    """A list whose two entries are one list, down ``depth`` levels: 2**depth leaves when expanded,
    a few bytes per level when pickled (the memo shares each level)."""
    graph: list = [0]
    for _ in range(depth):
        graph = [graph, graph]
    return graph


@pytest.mark.parametrize(
    ("make", "refusal"),
    [
        # the C unpickler's memo is an array: a 9-byte file would size it to 2**27 entries (a dict here)
        (lambda: b"\x80\x04Nr\x00\x00\x00\x08.", r"the pickle holds a NoneType"),
        # hashing a tuple graph shared through the memo takes 2**depth steps: dict keys must be atoms
        (lambda: pickle.dumps([{(1, 2): 3}], protocol=4), r"refused a dict key or set member of type tuple \(atoms only\)"),
        # a scalar without its bytes makes NumPy allocate the dtype's width on every call
        (lambda: pickle.dumps([_Payload(np._core.multiarray.scalar, np.dtype("U4"))], protocol=4), r"refused a NumPy scalar of dtype <U4 without exactly its 16 bytes"),
        # a string dtype whose width never came: an array of it holds no bytes at any length
        (lambda: pickle.dumps(_RebuiltArray((1, (3, 10**9), _Payload(np.dtype, "U"), False, b"")), protocol=4), r"refused the zero-width dtype '<U0'"),
        # an error message quoting a shared graph would expand it: quoted values are bounded
        (lambda: pickle.dumps(_Payload(np._core.multiarray._reconstruct, np.ndarray, _shared_graph(40), b"b"), protocol=4), r"refused initial ndarray shape \[\[\[\.\.\.\], \[\.\.\.\]\], \[\[\.\.\.\], \[\.\.\.\]\]\]"),
        # a 12-byte file: CPython's BYTEARRAY8 allocates the length the file states before reading
        (lambda: b"\x80\x05\x96" + (3 * 10**9).to_bytes(8, "little") + b".", r"BYTEARRAY8 of 3000000000 bytes, the file holds 1"),
        # slices of slices: 300,000 levels crash CPython when freed; slice bounds must be integers
        (lambda: pickle.dumps(_Payload(slice, _Payload(slice, 1)), protocol=4), r"refused a slice of slice \(integers only\)"),
        # SETITEMS on an array would write (and convert) every element: items go into dicts only
        (lambda: pickle.dumps(_RebuiltArray((1, (4,), np.dtype("i8"), False, bytes(32))), protocol=4)[:-1] + b"(\x88K\x01u.", r"refused to add items to a _BudgetedArray \(only to a dict\)"),
        # BUILD sets state only on the reader's own types (torch's Tensor.__setstate__ resizes a storage)
        (lambda: pickle.dumps(_Payload(bytearray, b"ab"), protocol=4)[:-1] + b"}b.", r"refused to set the state of a bytearray"),
        # a memoised million-digit integer costs its size at every hash: 64-bit integers only
        (lambda: pickle.dumps([2**600], protocol=4), r"refused an integer of 76 bytes \(64-bit integers only\)"),
        (lambda: b"\x80\x04I" + b"9" * 40 + b"\n.", r"refused a long text integer"),  # a protocol-2 header is refused first
        # a cell holding a shared graph: NumPy would expand it before any check
        (lambda: pickle.dumps(pd.DataFrame({"seq": [[0, 1]], "len_seq": [2], "next": pd.Series([_shared_graph(40)], dtype=object)}), protocol=5), r"row 0: non-integer value a list of length 2 in column next"),
    ],
)
def test_small_files_cannot_ask_for_exponential_work(make, refusal: str, tmp_path: Path) -> None:
    data = make()
    assert len(data) < 2000
    (tmp_path / "small.df").write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(safe_pickle.IloraError, match=refusal):
            legacy.read_legacy(legacy_dir(tmp_path / "ds", data), allow_pickle=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak


def test_rows_sharing_one_history_list_cannot_ask_for_a_huge_matrix(tmp_path: Path) -> None:
    shared = list(range(4000))
    frame = pd.DataFrame({"seq": [shared] * 5000, "len_seq": [1] * 5000, "next": [1] * 5000})
    (tmp_path / "shared.df").write_bytes(pickle.dumps(frame, protocol=5))
    with pytest.raises(safe_pickle.IloraError, match=r"shared\.df: the seq lists hold 20000000 ids in a file of \d+ bytes \(rows share lists\)"):
        legacy.read_dataframe_pickle(tmp_path / "shared.df", allow_pickle=True)


def test_string_columns_are_refused_without_decoding_them(tmp_path: Path) -> None:
    """An Arrow array of nulls has no buffers: a tiny file could claim a billion rows of it."""
    import pyarrow as pa

    nulls = pd.arrays.ArrowStringArray.__new__(pd.arrays.ArrowStringArray)
    nulls.__dict__.update({"_pa_array": pa.chunked_array([pa.nulls(2**24)]), "_dtype": pd.StringDtype("pyarrow", na_value=np.nan), "_cache": {}})
    frame = pd.DataFrame({"seq": nulls}, copy=False)
    frame.to_pickle(tmp_path / "nulls.df")
    assert (tmp_path / "nulls.df").stat().st_size < 2000
    with pytest.raises(safe_pickle.IloraError, match=r"nulls\.df: not a DataFrame pickle this reader accepts: column seq holds strings"):
        legacy.read_dataframe_pickle(tmp_path / "nulls.df", allow_pickle=True)
    pd.DataFrame({"seq": ["a", "b"]}, dtype=pd.StringDtype("pyarrow", na_value=np.nan)).to_pickle(tmp_path / "strings.df")
    with pytest.raises(safe_pickle.IloraError, match=r"strings\.df: not a DataFrame pickle this reader accepts: column seq holds strings"):
        legacy.read_dataframe_pickle(tmp_path / "strings.df", allow_pickle=True)


# --------------------------------------------------------------------------- torch checkpoints


def _checkpoint_with(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    assert zipfile.is_zipfile(path)
    return path


@pytest.mark.parametrize("name", PAYLOADS)
def test_checkpoint_payload_refused(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    payload, refused = payloads(marker)[name]
    ckpt = _checkpoint_with({"model": payload, "weights": torch.zeros(2)}, tmp_path / "evil.pt")
    code, line = run_cli(capsys, "rec", "import-llara", str(ckpt), "--out", str(tmp_path / "out"))
    assert code == 2 and "evil.pt: is a pickle" in line
    code, line = run_cli(capsys, "rec", "import-llara", str(ckpt), "--out", str(tmp_path / "out"), "--allow-pickle")
    assert code == 2 and "evil.pt: " in line
    # torch writes protocol 2, whose Python 2 spellings rename modules (builtins -> __builtin__,
    # subprocess -> commands); the refused name is the same
    assert re.search(rf"refused to load global [\w.]+\.{refused.rsplit('.', 1)[1]} ", line), line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_hand_made_zip_data_pkl_payload_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload, refused = payloads(marker)["os.system"]
    path = tmp_path / "ckpt.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        archive.writestr("archive/byteorder", "little")
    with pytest.raises(safe_pickle.UnsafePickleError, match=rf"ckpt\.pt: refused to load global {re.escape(refused)}"):
        llara_import.read_module_pickle(path, allow_pickle=True)
    assert not marker.exists()


def test_whole_torch_module_checkpoint_is_not_a_sasrec(tmp_path: Path) -> None:
    ckpt = _checkpoint_with(torch.nn.Linear(2, 2), tmp_path / "linear.pt")
    with pytest.raises(safe_pickle.IloraError, match=r"linear\.pt: the checkpoint holds .*expected a pickled SASRec module"):
        llara_import.import_llara_checkpoint(ckpt, allow_pickle=True)


def test_checkpoint_tensors_cannot_ask_for_more_than_their_storage(tmp_path: Path) -> None:
    # a zero stride: one stored float viewed as 10**8 of them, cloned on rebuild
    ckpt = _checkpoint_with({"w": torch.zeros(1).expand(10**8)}, tmp_path / "stride0.pt")
    with pytest.raises(safe_pickle.IloraError, match=r"tensor of size \(100000000,\) holds more elements than its storage of 1"):
        llara_import.read_module_pickle(ckpt, allow_pickle=True)
    # a thousand views of one 1 MiB storage: each would be cloned
    shared = torch.zeros(2**18)
    ckpt = _checkpoint_with([shared[:] for _ in range(1000)], tmp_path / "views.pt")
    assert ckpt.stat().st_size < 2 * 2**20
    with pytest.raises(safe_pickle.IloraError, match="would take the data built from this pickle past"):
        llara_import.read_module_pickle(ckpt, allow_pickle=True)


def _overlapping_storages_zip(n: int, payload: int) -> bytes:
    """A torch-like zip whose n stored entries each run from their own header to the end of one
    shared payload: the archive holds about n * payload bytes in a file of about payload bytes."""
    header = struct.Struct("<IHHHHHIIIHH")  # a local file header without its name

    def local(name: bytes, crc: int, size: int) -> bytes:
        return header.pack(0x04034B50, 20, 0, 0, 0, 0, crc, size, size, len(name), 0) + name

    names = [f"d/data/{k:07d}".encode() for k in range(n)]  # 44-byte headers: sizes stay multiples of 4
    region = b"".join(local(name, 0, 0) for name in names) + b"\0" * (payload // 4 * 4)
    step = header.size + len(names[0])
    pids = b"".join(
        b"(X\x07\x00\x00\x00storage" + b"ctorch\nFloatStorage\n" + b"X\x07\x00\x00\x00" + f"{k:07d}".encode()
        + b"X\x03\x00\x00\x00cpu" + b"J" + struct.pack("<i", (len(region) - (k + 1) * step) // 4) + b"tQ"
        for k in range(n)
    )
    pkl = b"\x80\x02](" + pids + b"e."
    entries = [(name, region[(k + 1) * step :], k * step) for k, name in enumerate(names)]
    out = bytearray(region)
    for name, data in ((b"d/data.pkl", pkl), (b"d/version", b"3\n")):
        entries.append((name, data, len(out)))
        out += local(name, zlib.crc32(data), len(data)) + data
    directory = b"".join(
        struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data), len(name), 0, 0, 0, 0, 0, offset) + name
        for name, data, offset in entries
    )
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(directory), len(out), 0)
    return bytes(out + directory + end)


def test_overlapping_checkpoint_entries_cannot_multiply_the_file(tmp_path: Path) -> None:
    (tmp_path / "overlap.pt").write_bytes(_overlapping_storages_zip(300, 40_000))
    assert (tmp_path / "overlap.pt").stat().st_size < 100_000
    with pytest.raises(safe_pickle.IloraError, match=r"overlap\.pt: a storage of \d+ bytes would take the data built from this pickle past"):
        llara_import.read_module_pickle(tmp_path / "overlap.pt", allow_pickle=True)


@pytest.mark.parametrize(("opcode", "charged"), [(b"\x8f", "a set of 216 bytes"), (b"(", "a mark of 64 bytes"), (b"N\x94", "a memo entry of 100 bytes")])
def test_many_one_byte_objects_are_charged(opcode: bytes, charged: str, tmp_path: Path) -> None:
    """EMPTY_SET is one byte and a set 216; a MARK makes a stack, a MEMOIZE a memo entry: a file of them
    would be 70-200 times its size in memory."""
    data = b"\x80\x04" + opcode * (2_000_000 // len(opcode)) + b"."
    (tmp_path / "flood.df").write_bytes(data)
    with pytest.raises(safe_pickle.IloraError, match=rf"{charged} would take the data built from this pickle past"):
        legacy.read_dataframe_pickle(tmp_path / "flood.df", allow_pickle=True)


def test_one_memoised_argument_tuple_passed_to_many_calls_is_charged(tmp_path: Path) -> None:
    """A record keeps its call's arguments: a tuple of M Nones stored once and passed to K calls
    (three bytes each) would hold K copies of it. Each call's arguments are charged."""
    out = bytearray(b"\x80\x04\x8c\x11pandas.core.frame\x94\x8c\x09DataFrame\x94\x93\x94")  # memo 2: the class
    out += b"(" + b"N" * 20_000 + b"t\x94]\x94"  # memo 3: the tuple; memo 4: a list
    out += b"h\x02h\x03\x81a" * 3_000 + b"."  # BINGET class, BINGET args, NEWOBJ, APPEND
    (tmp_path / "calls.df").write_bytes(bytes(out))
    assert len(out) < 40_000  # 480 MB of argument copies, unbudgeted
    with pytest.raises(safe_pickle.IloraError, match=r"a call's arguments of 160064 bytes would take the data built from this pickle past"):
        legacy.read_dataframe_pickle(tmp_path / "calls.df", allow_pickle=True)
    (tmp_path / "iter.df").write_bytes(b"\x80\x04\x8c\x11pandas.core.frame\x94\x8c\x09DataFrame\x94\x93\x94\x8c\x03abc\x94R.")
    with pytest.raises(safe_pickle.IloraError, match=r"refused a call with arguments of type str \(a tuple and a dict only\)"):
        legacy.read_dataframe_pickle(tmp_path / "iter.df", allow_pickle=True)


@pytest.mark.parametrize("kind", ["encode", "set"])
def test_checkpoint_calls_that_copy_a_memoised_value_are_charged(kind: str, tmp_path: Path) -> None:
    """``_codecs.encode`` and ``set`` build a new object from their argument on every call: one
    stored string or list named a thousand times would be a thousand copies."""
    p = bytearray(b"\x80\x02")
    if kind == "encode":
        p += b"c_codecs\nencode\nq\x00X" + struct.pack("<I", 100_000) + b"a" * 100_000 + b"X\x06\x00\x00\x00latin1\x86q\x01"
    else:
        p += b"cbuiltins\nset\nq\x00(" + b"".join(b"J" + struct.pack("<i", i) for i in range(20_000)) + b"l\x85q\x01"
    p += b"]q\x02" + b"h\x00h\x01Ra" * 1_000 + b"."
    with zipfile.ZipFile(tmp_path / "copies.pt", "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", bytes(p))
        archive.writestr("archive/byteorder", "little")
    what = "encoded bytes" if kind == "encode" else "set members"
    with pytest.raises(safe_pickle.IloraError, match=rf"copies\.pt: not a readable module pickle \(ValueError: {what} of \d+ bytes would take"):
        llara_import.read_module_pickle(tmp_path / "copies.pt", allow_pickle=True)


def test_checkpoint_sets_and_ordered_dicts_hash_only_plain_values() -> None:
    """Their calls would hash a tuple graph shared through the memo (2**depth steps)."""
    assert safe_pickle.atom_set(["a", 1]) == {"a", 1} and llara_import._ordered_dict() == {}
    with pytest.raises(ValueError, match="refused a set"):
        safe_pickle.atom_set([((1, 2), (1, 2))])
    with pytest.raises(ValueError, match="refused an OrderedDict"):
        llara_import._ordered_dict([((1, 2), 3)])


def test_a_damaged_checkpoint_archive_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _checkpoint_with({"w": torch.zeros(4)}, tmp_path / "good.pt").read_bytes()
    (tmp_path / "damaged.pt").write_bytes(good.replace(b"PK\x03\x04", b"PK\x03\x05", 1))  # the first local header
    code, line = run_cli(capsys, "rec", "import-llara", str(tmp_path / "damaged.pt"), "--out", str(tmp_path / "out"), "--allow-pickle")
    assert code == 2 and "damaged.pt: not a readable torch zip checkpoint (BadZipFile" in line


def test_compressed_checkpoint_entries_are_refused(tmp_path: Path) -> None:
    """torch.save stores every entry; a deflated one could inflate far past the file's size."""
    plain = _checkpoint_with({"w": torch.zeros(4)}, tmp_path / "plain.pt")
    with pytest.raises(safe_pickle.IloraError, match=r"plain\.pt: the checkpoint holds dict"):  # read, then found not a SASRec
        llara_import.read_module_pickle(plain, allow_pickle=True)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(tmp_path / "deflated.pt", "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(safe_pickle.IloraError, match=r"deflated\.pt: compressed archive entry"):
        llara_import.read_module_pickle(tmp_path / "deflated.pt", allow_pickle=True)


# --------------------------------------------------------------------------- allow-lists are documented


def test_dataframe_allow_list_is_in_the_docstring() -> None:
    doc = " ".join(frame_pickle.__doc__.split())
    for module, name in frame_pickle.dataframe_pickle_globals():
        assert name in doc, (module, name)
        assert module.split(".")[-1] in doc or module in ("builtins", "pandas", "numpy", "pyarrow.lib"), (module, name)


def test_checkpoint_allow_list_is_in_the_docstring() -> None:
    doc = " ".join(llara_import.__doc__.split())
    for module, name in llara_import._allowed_globals():
        assert name in doc, (module, name)


# --------------------------------------------------------------------------- the source itself


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_source_never_unpickles_unsafely() -> None:
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call, func in _calls(tree):
            kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
            where = f"{path.relative_to(SRC)}:{call.lineno} {func}"
            if func.endswith("torch.load") or func == "load" and "weights_only" in kwargs:
                if kwargs.get("weights_only") != "True":
                    problems.append(where + " without weights_only=True")
            if func in ("pickle.load", "pickle.loads", "pickle.Unpickler", "pd.read_pickle", "pandas.read_pickle", "joblib.load", "dill.load"):
                problems.append(where)
            if func in ("np.load", "numpy.load") and kwargs.get("allow_pickle") != "False":
                problems.append(where + " without allow_pickle=False")
            if kwargs.get("trust_remote_code") == "True":
                problems.append(where + " with trust_remote_code=True")
    assert problems == []
    unpicklers = [p.name for p in SRC.rglob("*.py") if re.search(r"pickle\._?Unpickler", p.read_text(encoding="utf-8"))]
    assert unpicklers == ["safe_pickle.py"]


def test_remote_code_is_not_trusted_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from ilora.teacher import build
    from ilora.teacher.config import TeacherConfig
    from ilora.teacher.tiny import load_llm

    assert TeacherConfig().trust_remote_code is False
    seen: list[dict] = []

    class Fake:
        eos_token_id = 2  # load_llm refuses a tokenizer without eos

        def to(self, device):
            return self

    def record(*args, **kwargs):
        seen.append(kwargs)
        return Fake()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text("{}")  # a model directory (the loaders are fakes)
    load_llm(tmp_path / "llm", device="cpu")
    assert [k["trust_remote_code"] for k in seen] == [False, False]

    asked: list[bool] = []
    monkeypatch.setattr(build, "load_llm", lambda name, *, device, trust_remote_code, **kwargs: asked.append(trust_remote_code) or (None, None))
    build._base_llm(TeacherConfig(llm=str(tmp_path / "llm")), None, "cpu")  # type: ignore[arg-type]
    build._base_llm(TeacherConfig(llm=str(tmp_path / "llm"), trust_remote_code=True), None, "cpu")  # type: ignore[arg-type]
    assert asked == [False, True]


def test_a_teacher_checkpoint_cannot_decide_to_trust_remote_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint's own teacher_config.json may say trust_remote_code: loading it needs the
    caller's opt-in, and the tokenizer and tiny LLM saved inside it always load without remote
    code (transformers would otherwise ask on stdin whether to run code the checkpoint names)."""
    import transformers

    from ilora.data import make_synthetic
    from ilora.errors import IloraError
    from ilora.teacher import build
    from ilora.teacher.config import TeacherConfig

    catalog = make_synthetic(users=20, items=15, seed=0).catalog
    monkeypatch.setattr(build, "read_teacher_config", lambda ckpt: (TeacherConfig(llm="/some/model", trust_remote_code=True), {}))
    with pytest.raises(IloraError, match=r"trained with trust_remote_code .* pass --trust-remote-code"):
        build.load_teacher(tmp_path, catalog)

    class Stop(Exception):
        pass

    seen: list[dict] = []
    monkeypatch.setattr(build, "read_teacher_config", lambda ckpt: (TeacherConfig(llm="tiny"), {"catalog": catalog.sha256(), "format_version": 1}))
    monkeypatch.setattr(build, "load_sasrec", lambda path: torch.nn.Linear(1, 1))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: seen.append(k) or (_ for _ in ()).throw(Stop()))
    for caller_trusts in (False, True):
        with pytest.raises(Stop):
            build.load_teacher(tmp_path, catalog, trust_remote_code=caller_trusts)
    assert [k.get("trust_remote_code") for k in seen] == [False, False]  # a tiny teacher's own tokenizer: never


# --------------------------------------------------------------------------- our own outputs


PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".df", ".joblib", ".bin", ".ckpt"}


def _pickle_like(path: Path) -> str | None:
    head = path.read_bytes()[:2]
    if path.suffix in PICKLE_SUFFIXES:
        return "suffix"
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle protocol header"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(n.endswith(".pkl") for n in archive.namelist()):
                return "zip with a pickle"
    return None


@pytest.mark.slow
def test_pipeline_outputs_hold_no_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, rec, teacher = tmp_path / "data", tmp_path / "rec", tmp_path / "teacher"
    assert main(["data", "synth", str(data), "--users", "40", "--items", "40", "--seed", "3"]) == 0
    assert main(["rec", "train", str(data), "--out", str(rec), "--epochs", "1", "--hidden", "16", "--eval-candidates", "10"]) == 0
    assert main([
        "teacher", "train", str(data), "--rec", str(rec), "--out", str(teacher), "--max-steps", "1", "--batch-size", "4",
        "--val-samples", "4", "--num-candidates", "5", "--tiny-hidden", "32", "--tiny-layers", "1", "--tiny-vocab", "300",
    ]) == 0  # fmt: skip
    capsys.readouterr()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".parquet", ".csv", ".json", ".safetensors"}
    flagged = {str(p.relative_to(tmp_path)): why for p in files if (why := _pickle_like(p))}
    assert flagged == {}

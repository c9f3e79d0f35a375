"""`ilora.state_io`: nested training state round-trips exactly through safetensors + JSON.

(Kept with the data-layer tests: state files are inputs the project reads back.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ilora.errors import IloraError
from ilora.state_io import load_state, read_json, save_state, save_tensors


def same(a: object, b: object) -> bool:
    """Structural equality, by hand: same types (tuple vs list, int vs str keys), equal tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and [(type(k), k) for k in a] == [(type(k), k) for k in b]
            and all(same(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def round_trip(state: object, tmp_path: Path) -> object:
    save_state(state, tmp_path / "state")
    return load_state(tmp_path / "state")


def test_dotted_paths_that_spell_the_same_key_stay_apart(tmp_path: Path) -> None:
    state = {
        "a.b": torch.tensor([1.0]),
        "a": {"b": torch.tensor([2.0]), "b#1": torch.tensor([3.0])},
        "root": torch.tensor([4.0]),
        "": torch.tensor([5.0]),
        "__metadata__": torch.tensor([6.0]),
        "x": [torch.tensor([7.0]), {0: torch.tensor([8.0])}],
        "x.0": torch.tensor([9.0]),
    }
    back = round_trip(state, tmp_path)
    assert same(state, back)
    assert back["a.b"].item() == 1.0 and back["a"]["b"].item() == 2.0


def test_marker_like_keys_and_empty_containers_round_trip(tmp_path: Path) -> None:
    state = {
        "__tensor__": "not a tensor",
        "inner": {"__int_keys__": {"1": 2}},
        "t": {"__tuple__": [1, 2]},
        "s": {"__str_keys__": torch.zeros(2)},
        "tuple": (1, "two", None, 3.5, True, torch.ones(1)),
        "empty": {},
        "nothing": [],
        "ints": {0: {1: torch.arange(3)}, -5: "neg"},
    }
    assert same(state, round_trip(state, tmp_path))


def test_tensors_sharing_memory_are_saved_as_copies(tmp_path: Path) -> None:
    weight = torch.randn(3, 2)
    buffer = torch.arange(10.0)
    state = {"emb": weight, "out": weight, "tied": {"again": weight}, "x": buffer[:4], "y": buffer[4:], "t": weight.t()}
    back = round_trip(state, tmp_path)
    assert same(state, back)
    save_tensors({"emb": weight, "out": weight, "view": buffer[2:5]}, tmp_path / "w.safetensors")


def test_root_tensor_and_plain_values(tmp_path: Path) -> None:
    assert same(round_trip(torch.tensor([1, 2]), tmp_path), torch.tensor([1, 2]))
    assert same(round_trip([1, 2.5, "x", None], tmp_path), [1, 2.5, "x", None])


@pytest.mark.parametrize(
    ("state", "pattern"),
    [
        ({True: 1, 2: 3}, r"state at '<root>': dict keys are bool, int; only all-str or all-int keys"),
        ({"opt": {False: torch.zeros(1)}}, r"state at 'opt': dict keys are bool"),
        ({"a": {1: 1, "b": 2}}, r"state at 'a': dict keys are int, str"),
        ({"a": {(1, 2): 1}}, r"state at 'a': dict keys are tuple"),
    ],
)
def test_unsupported_keys_are_an_ilora_error(state: dict, pattern: str, tmp_path: Path) -> None:
    with pytest.raises(IloraError, match=pattern):
        save_state(state, tmp_path / "state")
    assert not list(tmp_path.iterdir())


def test_files_of_the_original_format_still_load(tmp_path: Path) -> None:
    """Skeletons written before the collision suffix and the __str_keys__ marker existed."""
    save_file({"model.w": torch.ones(2), "optimizer.state.0.exp_avg": torch.zeros(3)}, tmp_path / "old.safetensors")
    skeleton = {
        "model": {"w": {"__tensor__": "model.w"}},
        "optimizer": {"state": {"__int_keys__": {"0": {"exp_avg": {"__tensor__": "optimizer.state.0.exp_avg"}}}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "step": 7,
        "pair": {"__tuple__": [1, 2]},
    }
    (tmp_path / "old.json").write_text(json.dumps(skeleton))
    expected = {
        "model": {"w": torch.ones(2)},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "step": 7,
        "pair": (1, 2),
    }
    assert same(load_state(tmp_path / "old"), expected)


def test_damaged_state_files_are_ilora_errors(tmp_path: Path) -> None:
    save_state({"a": torch.ones(1)}, tmp_path / "state")
    (tmp_path / "state.json").write_text('{"a": {"__tensor__": "nope"}}')
    with pytest.raises(IloraError, match=r"state\.json: refers to tensor 'nope'"):
        load_state(tmp_path / "state")
    (tmp_path / "state.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(IloraError, match=r"state\.safetensors: not a readable safetensors file"):
        load_state(tmp_path / "state")
    (tmp_path / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IloraError, match=r"state\.json: JSON nested too deeply"):
        load_state(tmp_path / "state")
    (tmp_path / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IloraError, match=r"meta\.json: JSON nested too deeply"):
        read_json(tmp_path / "meta.json")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomically_written_files_get_the_mode_open_would_give_them(tmp_path: Path, umask: int) -> None:
    """Not mkstemp's 0o600: a model saved on a shared cluster stays readable by the group when
    the umask says so."""
    import os

    from ilora.state_io import atomic_write_text, save_tensors

    from ilora.rec.sasrec import SASRec, SASRecConfig

    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "result.json", "{}")
        save_tensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors")  # safetensors alone writes 0o600
        SASRec(SASRecConfig(num_items=5, max_len=3, hidden=8)).save(tmp_path / "sasrec")
        (tmp_path / "plain.txt").write_text("x")  # what open() gives
    finally:
        os.umask(previous)
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("result.json", "model.safetensors", "sasrec/model.safetensors", "sasrec/config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_load_tensors_names_the_file_and_lets_other_failures_through(tmp_path: Path, monkeypatch) -> None:
    import ilora.state_io as state_io

    with pytest.raises(IloraError, match=r"nope\.safetensors: not found \(the weights\)"):
        state_io.load_tensors(tmp_path / "nope.safetensors", "the weights")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{'a': 1}")
    with pytest.raises(IloraError, match=r"bad\.safetensors: not a readable safetensors file \(the weights; "):
        state_io.load_tensors(tmp_path / "bad.safetensors", "the weights")

    def out_of_memory(path):
        raise MemoryError

    monkeypatch.setattr(state_io, "load_file", out_of_memory)  # not a bad file: passes through as itself
    with pytest.raises(MemoryError):
        state_io.load_tensors(tmp_path / "bad.safetensors", "the weights")


def test_atomic_writes_flush_the_folder_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    """A manifest written after a shard must not survive a power loss that the shard's rename does
    not: every atomic write flushes its folder's entries once the file is in place."""
    import ilora.state_io as state_io
    from ilora.outputs.export import write_shard

    flushed, real = [], state_io.fsync_file

    def recording(path) -> None:
        if Path(path).is_dir():
            flushed.append((Path(path), sorted(p.name for p in Path(path).iterdir())))
        real(path)

    monkeypatch.setattr(state_io, "fsync_file", recording)
    state_io.atomic_write_text(tmp_path / "a" / "m.json", "{}")
    state_io.save_tensors({"x": torch.ones(1)}, tmp_path / "b" / "t.safetensors")
    import pyarrow as pa

    write_shard(tmp_path / "c" / "part-0.parquet", pa.table({"index": [0]}))
    assert flushed == [(tmp_path / "a", ["m.json"]), (tmp_path / "b", ["t.safetensors"]), (tmp_path / "c", ["part-0.parquet"])]


def test_a_folder_its_file_system_cannot_flush_does_not_fail_the_write(tmp_path: Path, monkeypatch) -> None:
    """Some FUSE and network mounts refuse to fsync a directory: the file is in place and the write
    goes on; a disk error while flushing (EIO) is an error naming the folder."""
    import errno
    import os

    import ilora.state_io as state_io

    real = os.fsync

    def refusing(code):
        def fsync(fd):
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                raise OSError(code, os.strerror(code))
            real(fd)

        return fsync

    monkeypatch.setattr(os, "fsync", refusing(errno.EINVAL))
    state_io.atomic_write_text(tmp_path / "a.json", '{"new": 1}')
    assert (tmp_path / "a.json").read_text() == '{"new": 1}'
    monkeypatch.setattr(os, "fsync", refusing(errno.EIO))
    with pytest.raises(IloraError, match=rf"{tmp_path}: cannot flush the folder's entries to disk \(Input/output error\)"):
        state_io.atomic_write_text(tmp_path / "b.json", "{}")

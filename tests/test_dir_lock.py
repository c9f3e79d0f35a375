"""`ilora.dir_lock`: one process at a time writes an output directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ilora.dir_lock import claim_out_dir, holder_pid
from ilora.distributed import Dist
from ilora.errors import IloraError

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys
from ilora.dir_lock import claim_out_dir
with claim_out_dir(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""
BUSY = "is writing here; wait until it ends, or use another --out"
NESTED = "this process holds it already"


def start_holder(path: Path) -> subprocess.Popen:
    """A process that claims ``path`` and holds it until its stdin gets a line."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_claim_is_refused_and_the_first_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with claim_out_dir(out) as claimed:
        assert claimed == out and out.is_dir()
        (out / "written").write_text("first")
        with pytest.raises(IloraError, match=NESTED):
            with claim_out_dir(out):  # in this process: a bug, and said so
                (out / "written").write_text("second")  # never reached
        assert (out / "written").read_text() == "first"
    with claim_out_dir(out):  # released at the end of the block
        pass
    assert sorted(p.name for p in out.iterdir()) == ["written"]  # the lock is no file in the directory


def test_another_process_holding_it_refuses_until_it_ends_or_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = start_holder(out)
    with pytest.raises(IloraError, match=BUSY) as refused:
        with claim_out_dir(out):
            pass
    assert str(refused.value).startswith(f"{out}: another process")
    pid = holder_pid(out)  # None where /proc/locks names the file system's device otherwise (btrfs subvolumes)
    assert pid in (holder.pid, None) and (pid is None or f"(pid {pid})" in str(refused.value))
    holder.communicate("\n", timeout=30)  # ends normally
    with claim_out_dir(out):
        pass
    holder = start_holder(out)
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
    holder.wait(timeout=30)
    with claim_out_dir(out):
        pass


def test_a_refusal_in_the_block_leaves_no_directory_it_created(tmp_path: Path) -> None:
    with pytest.raises(IloraError, match="refused"):
        with claim_out_dir(tmp_path / "a" / "b" / "c"):
            raise IloraError("refused")
    assert not (tmp_path / "a").exists()
    # ... but keeps a directory that existed, and one something was written to
    (tmp_path / "kept").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with claim_out_dir(tmp_path / "kept"):
            raise KeyboardInterrupt
    assert (tmp_path / "kept").is_dir()
    with pytest.raises(IloraError):
        with claim_out_dir(tmp_path / "x" / "y") as out:
            (out / "checkpoint").write_text("")
            raise IloraError("crashed after writing")
    assert (tmp_path / "x" / "y" / "checkpoint").is_file()


def test_a_file_is_no_output_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(IloraError, match="file: exists and is not a directory"):
        with claim_out_dir(tmp_path / "file"):
            pass
    with pytest.raises(IloraError, match="cannot create, open or lock it as --out"):
        with claim_out_dir(tmp_path / "file" / "run"):
            pass
    assert (tmp_path / "file").read_text() == ""


@dataclass(frozen=True)
class OtherRank(Dist):
    """A rank other than 0 of a 2-process job, whose broadcast receives ``rank0_says``."""

    rank0_says: str | None = None

    def broadcast(self, obj):
        assert obj is None  # only rank 0's refusal counts
        return self.rank0_says


def test_under_torchrun_rank_0_alone_claims_and_every_rank_refuses_with_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with claim_out_dir(out, OtherRank(rank=1, world_size=2)):
        with claim_out_dir(out, OtherRank(rank=1, world_size=2)):  # no lock taken on this rank
            pass
    assert not out.exists()  # nor the directory created: rank 0 does that
    with pytest.raises(IloraError, match="^run: busy$"):
        with claim_out_dir(out, OtherRank(rank=1, world_size=2, rank0_says="run: busy")):
            pass


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    """A DataLoader worker forked during a run must not hold the run's --out after the run."""
    out = tmp_path / "run"
    read, write = os.pipe()
    ready_read, ready_write = os.pipe()
    with claim_out_dir(out):
        pid = os.fork()
        if pid == 0:  # the child (its at-fork hooks have run): say so, wait for the parent's word, then go
            os.write(ready_write, b"r")
            os.read(read, 1)
            os._exit(0)
        assert os.read(ready_read, 1) == b"r"
    os.close(ready_read)
    os.close(ready_write)
    try:
        with claim_out_dir(out):  # the child is still alive
            pass
    finally:
        os.write(write, b"x")
        os.waitpid(pid, 0)
        os.close(read)
        os.close(write)


def test_a_file_system_that_cannot_lock_runs_unlocked_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    import errno

    import ilora.dir_lock as dir_lock

    def flock_fails(fd, op, errno_=errno.ENOLCK):
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(dir_lock.fcntl, "flock", flock_fails)
    with caplog.at_level("WARNING", logger="ilora.dir_lock"):
        with claim_out_dir(tmp_path / "nfs" / "run") as out:
            (out / "written").write_text("")
    assert "cannot lock a directory" in caplog.text and "will not be refused" in caplog.text
    # any other failure refuses, without leaving what it created
    monkeypatch.setattr(dir_lock.fcntl, "flock", lambda fd, op: flock_fails(fd, op, errno.EBADF))
    with pytest.raises(IloraError, match="other/run: cannot create, open or lock it as --out"):
        with claim_out_dir(tmp_path / "other" / "run"):
            pass
    assert not (tmp_path / "other").exists()


@dataclass(frozen=True)
class MainRank(Dist):
    """Rank 0 of a 2-process job; records what it broadcasts."""

    sent: list = None

    def broadcast(self, obj):
        self.sent.append(obj)
        return obj


def test_rank_0_reaches_the_broadcast_whatever_refuses_the_directory(tmp_path: Path) -> None:
    """Otherwise the other ranks would wait in the broadcast until the process group times out."""
    for out, refusal in (
        (tmp_path / ("x" * 300) / "run", "cannot create, open or lock it as --out"),  # a name too long for the file system
        (tmp_path / "file", "exists and is not a directory"),
    ):
        (tmp_path / "file").write_text("")
        ctx = MainRank(rank=0, world_size=2, sent=[])
        with pytest.raises(IloraError, match=refusal):
            with claim_out_dir(out, ctx):
                pass
        assert len(ctx.sent) == 1 and refusal in ctx.sent[0]


def test_every_command_that_writes_a_run_directory_claims_it(tmp_path: Path) -> None:
    """The lock is taken before each entry point reads its arguments (None here)."""
    from ilora.distill.train import distill
    from ilora.outputs.export import export_teacher_outputs
    from ilora.pipeline.config import RunConfig
    from ilora.pipeline.run import run_pipeline
    from ilora.rec.train import train_sasrec
    from ilora.teacher.train import train_teacher

    out = tmp_path / "busy"
    calls = {
        "rec train": lambda: train_sasrec(None, None, out),
        "teacher train": lambda: train_teacher(None, None, None, out),
        "export": lambda: export_teacher_outputs(None, None, out, None, teacher_dir=tmp_path),
        "distill": lambda: distill(None, None, None, out),
        "run": lambda: run_pipeline(RunConfig(out=str(out))),
    }
    holder = start_holder(out)
    try:
        for name, call in calls.items():
            with pytest.raises(IloraError, match=BUSY):
                call()
    finally:
        holder.communicate("\n", timeout=30)
    assert list(out.iterdir()) == []


def test_teacher_export_refuses_a_busy_out_before_loading_the_teacher(tmp_path: Path, capsys, monkeypatch) -> None:
    import ilora.cli.teacher as cli_teacher
    import ilora.teacher.build as build
    from ilora.cli.main import main

    def load_teacher(*args, **kwargs):
        raise IloraError("the teacher was loaded")

    from ilora.teacher.config import TeacherConfig

    monkeypatch.setattr(cli_teacher, "check_gate_and_device", lambda args: TeacherConfig())  # reads the teacher's config
    monkeypatch.setattr(build, "load_teacher", load_teacher)
    assert main(["data", "synth", str(tmp_path / "data"), "--users", "20", "--items", "20"]) == 0
    capsys.readouterr()
    out = tmp_path / "outputs"
    export = ["teacher", "export", str(tmp_path / "data"), "--teacher", str(tmp_path / "teacher"), "--out", str(out),
              "--pool-sasrec", "5", "--pool-candidates", "5", "--top-k", "2"]  # a pool the 20 items can fill
    holder = start_holder(out)
    try:
        assert main(export) == 2
    finally:
        holder.communicate("\n", timeout=30)
    assert BUSY in capsys.readouterr().err
    assert main(export) == 2
    assert "the teacher was loaded" in capsys.readouterr().err  # free again: on to loading the teacher

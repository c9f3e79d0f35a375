"""One writer per output directory: an exclusive lock held for the whole of a command's run.

Two processes writing one ``--out`` (say a resumed ``teacher train`` started beside a live
one) would interleave checkpoints, logs and teacher files. `claim_out_dir` takes an
exclusive ``flock`` on the directory itself, so the second process is refused at once
with the holder's pid (where the system can tell), and nothing is left behind: the lock
is no file in the directory, and the kernel releases it when its holder exits, however it
exits. A child forked while it is held (a DataLoader worker) closes its copy at once, so
it does not keep the lock beyond its parent.

If the claim created the directory (or some of its parents) and the block raises before
anything is written there, the empty directories are removed again: a refused command
leaves no ``--out`` behind, as if it had checked before touching the disk.

The lock holds among the processes of one machine: on NFS and most network file systems a
directory's ``flock`` is local to the client. Where the file system cannot lock at all,
the command runs unlocked with a warning; on platforms without ``fcntl`` (Windows) there
is no lock.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ilora.distributed import SINGLE, Dist
from ilora.errors import IloraError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

# errnos of a file system that cannot lock (rather than of a lock held by someone else)
CANNOT_LOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}

# Descriptors holding a claim in this process: a forked child closes its copies (closing a
# copy releases nothing while the parent holds the original).
_held: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def holder_pid(path: Path) -> int | None:
    """The pid holding a ``flock`` on ``path``, from ``/proc/locks`` (Linux); None where unknown."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
        if "FLOCK" in fields and "->" not in fields and len(fields) >= 6 and fields[5] == inode:
            pid = fields[4]
            # 0: a holder in another pid namespace, or one that is gone
            return int(pid) if pid.isdigit() and int(pid) > 0 else None
    return None


def _held_here(path: Path) -> bool:
    """Whether a claim of this process holds directory ``path`` (compared by device and inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    for fd in _held:
        with contextlib.suppress(OSError):
            held = os.fstat(fd)
            if (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


def busy_message(path: Path) -> str:
    pid = holder_pid(path)
    if _held_here(path) or pid == os.getpid():
        return f"{path}: this process holds it already (a nested claim of one --out)"
    who = f"another process (pid {pid})" if pid is not None else "another process"
    return f"{path}: {who} is writing here; wait until it ends, or use another --out"


def lock_directory(path: Path, warn: bool = True) -> int | None:
    """An open descriptor of directory ``path`` holding its exclusive lock, or None where no
    lock can be taken (no ``fcntl``; a file system that cannot lock: warned if ``warn``).

    Raises `IloraError` when another process (or another claim in this one) holds it."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise IloraError(busy_message(path)) from None
        if err.errno in CANNOT_LOCK:
            if warn:
                log.warning("%s: this file system cannot lock a directory (%s); a second command on this --out will not be refused",
                            path, err.strerror)
            return None
        raise
    _held.add(fd)
    return fd


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and the ancestors of it that do not exist yet, deepest first."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def _remove_if_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first; stop at the first one something was written to
        try:
            d.rmdir()
        except OSError:
            return


def _claim_on_this_rank(out: Path) -> tuple[int | None, list[Path]]:
    """Create ``out`` and lock it: (descriptor or None, the directories created). Raises
    `IloraError` when it cannot, with every directory it created removed again; a busy
    directory is someone else's (an empty one they created too), so nothing is removed then."""
    created: list[Path] = []
    try:
        if out.exists() and not out.is_dir():
            raise IloraError(f"{out}: exists and is not a directory; --out must name a directory")
        created = _missing_dirs(out)
        out.mkdir(parents=True, exist_ok=True)
        return lock_directory(out), created
    except OSError as err:  # e.g. a parent it may not enter
        _remove_if_empty(created)
        raise IloraError(f"{out}: cannot create, open or lock it as --out ({err.strerror or err})") from None


def _raise_on_every_rank(refusal: str | None, ctx: Dist) -> None:
    """`IloraError` with rank 0's ``refusal`` on every rank, if it has one: every rank reaches
    this broadcast, so none waits for rank 0 forever."""
    refusal = ctx.broadcast(refusal)
    if refusal is not None:
        raise IloraError(refusal)


@contextlib.contextmanager
def claim_out_dir(out: str | Path, ctx: Dist = SINGLE) -> Iterator[Path]:
    """Create ``out`` if needed and hold its exclusive lock for the block; yields ``out`` as a Path.

    Under ``torchrun`` rank 0 alone locks (and creates) it and tells every rank whether it
    could, so all ranks raise together instead of the others waiting for rank 0 forever.
    """
    out = Path(out)
    fd, created, refusal = None, [], None
    if ctx.is_main:
        try:
            fd, created = _claim_on_this_rank(out)
        except IloraError as err:
            refusal = str(err)
    _raise_on_every_rank(refusal, ctx)
    try:
        yield out
    except BaseException:
        _remove_if_empty(created)
        raise
    finally:
        release(fd)


def release(fd: int | None) -> None:
    if fd is not None:
        _held.discard(fd)
        os.close(fd)  # closing the descriptor releases the lock


def refuse_if_busy(out: str | Path, ctx: Dist = SINGLE) -> None:
    """`IloraError` on every rank now if another process holds ``out``: a check before minutes
    of model loading, for a command whose claim comes after it (``teacher export``)."""
    refusal = None
    if ctx.is_main:
        try:
            if Path(out).is_dir():
                release(lock_directory(Path(out), warn=False))
        except IloraError as err:
            refusal = str(err)
        except OSError:  # the claim itself says what is wrong with --out
            pass
    _raise_on_every_rank(refusal, ctx)


def claims_out_dir(param: str):
    """Decorator: each call holds `claim_out_dir` on its argument ``param`` (with its ``ctx``
    argument, when the function takes one) from its first line to its return."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with claim_out_dir(bound.arguments[param], bound.arguments.get("ctx", SINGLE)):
                return fn(*args, **kwargs)

        return call

    return decorate

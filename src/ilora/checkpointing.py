"""Crash-safe training checkpoints, shared by every trainer (SASRec, distillation students, teacher).

A trainer's output directory holds ``checkpoints/step-<9 digits>/``, each with:

    state.safetensors, state.json   the training state (`ilora.state_io.save_state`: tensors
                                    in safetensors, the rest in JSON, never pickle)
    manifest.json                   {"format": "ilora-checkpoint", "version": 1, "step": S,
                                     "files": {name: {"sha256": ..., "bytes": ...}}}

A checkpoint is written into a temporary directory (``.tmp-step-...``), every file and
the directory are fsynced, and only then is it renamed to its final name (and the parent
fsynced), so a crash never leaves a half-written ``step-*`` directory. Resuming
(`CheckpointManager.latest`) takes the newest ``step-*`` whose manifest verifies (step
matches the name, every file present with its size and sha256); any other directory is
skipped with a warning. Only the newest ``keep`` (2) checkpoints are kept.

The state a trainer stores is its own (see `ilora.rec.train` and `ilora.teacher.train`);
this module also provides the pieces they share: every RNG's state (`rng_state`,
`restore_rng_state`), the check that a resumed run has the same configuration
(`check_resume_config`) and the handling of non-finite losses and gradients
(`NonFiniteGuard`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ilora.config import changed_entries
from ilora.errors import IloraError
from ilora.state_io import file_sha256, fsync_directory, fsync_file, load_state, read_json, save_state

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = "ilora-checkpoint"
VERSION = 1
KEEP = 2
_NAME = re.compile(r"^step-(\d{9})$")
_STATE = "state"
STATE_FILES = (f"{_STATE}.json", f"{_STATE}.safetensors")  # what every checkpoint must hold


# -- RNG state -------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's CPU and (if available) every CUDA generator."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, np_gauss = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state` (the CUDA part only where CUDA is available, for the devices both
    the saving and this machine have: a run may resume on a node with fewer or more GPUs)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        for device, cuda_state in enumerate(list(state["cuda"])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


# -- configuration check on resume ----------------------------------------------------------------

# Options that may differ between the interrupted run and its resumption: they change how a run
# is carried out, not what it computes (some change the rounding, and the dropout masks drawn:
# a smaller micro_batch_size or gradient_checkpointing is what a run resumed after running out
# of memory needs).
RESUMABLE_CHANGES = frozenset(
    {"checkpoint_every", "skip_nonfinite", "threads", "workers", "eval_batch_size", "compile", "micro_batch_size", "gradient_checkpointing"}
)


def check_resume_config(saved: dict[str, Any] | None, current: dict[str, Any], where: Path, what: str = "other options") -> None:
    """`IloraError` naming every entry (outside `RESUMABLE_CHANGES`) that differs from the
    interrupted run's record ``saved``; ``what`` says what those entries are."""
    diff = changed_entries(saved or {}, current, skip=RESUMABLE_CHANGES)
    if diff:
        raise IloraError(
            f"{where}: cannot resume with {what} than the earlier run's ({'; '.join(diff)}); "
            "rerun with --overwrite instead of --resume to start over (in `ilora run`: delete that stage's directory)"
        )


# -- checkpoint directories ---------------------------------------------------------------------


def verify_checkpoint(path: Path) -> int:
    """The step of the checkpoint in ``path``; `IloraError` saying why if it is not complete and intact."""
    match = _NAME.match(path.name)
    if not match:
        raise IloraError(f"{path}: not a checkpoint directory name (step-NNNNNNNNN)")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise IloraError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    manifest = read_json(manifest_path, MANIFEST)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise IloraError(f"{manifest_path}: not an {FORMAT} manifest of version {VERSION}")
    if manifest.get("step") != int(match.group(1)):
        raise IloraError(f"{manifest_path}: records step {manifest.get('step')}, the directory is {path.name}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise IloraError(f"{manifest_path}: lists no files")
    for required in STATE_FILES:
        if required not in files:
            raise IloraError(f"{manifest_path}: does not list {required} (incomplete checkpoint)")
    for name, info in files.items():
        if not isinstance(info, dict) or "/" in name or name.startswith("."):
            raise IloraError(f"{manifest_path}: entry {name!r} is not a file of this directory with its size and sha256")
        file = path / name
        if not file.is_file():
            raise IloraError(f"{file}: listed in the manifest but missing")
        if file.stat().st_size != info.get("bytes") or file_sha256(file) != info.get("sha256"):
            raise IloraError(f"{file}: size or sha256 differs from the manifest (corrupt checkpoint)")
    return int(manifest["step"])


@dataclass
class Checkpoint:
    """A verified checkpoint directory."""

    path: Path
    step: int

    def load(self) -> dict[str, Any]:
        """The training state saved in it."""
        return load_state(self.path / _STATE)


class CheckpointManager:
    """Writes, lists and prunes the checkpoints under ``<out_dir>/checkpoints``.

    ``every`` is the interval in optimiser steps (0: no periodic checkpoints; `save` still
    works, e.g. for the last good state before a numeric fault).
    """

    def __init__(self, out_dir: str | Path, every: int, keep: int = KEEP) -> None:
        if every < 0:
            raise IloraError(f"checkpoint_every must be >= 0, got {every}")
        self.root = Path(out_dir) / CHECKPOINTS
        self.every, self.keep = every, keep

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint belongs after optimiser step ``step``."""
        return self.every > 0 and step > 0 and step % self.every == 0

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:09d}"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as the checkpoint of ``step`` atomically, then keep only the newest ``keep``.

        An intact checkpoint of the same step is kept as it is (the state of a step is
        the same whoever writes it); a damaged one is replaced.
        """
        final = self.path_for(step)
        if final.exists():
            try:
                verify_checkpoint(final)
                return final
            except IloraError:
                shutil.rmtree(final)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_state(state, tmp / _STATE)
        files = {}
        for file in sorted(p for p in tmp.iterdir() if p.is_file()):
            fsync_file(file)
            files[file.name] = {"sha256": file_sha256(file), "bytes": file.stat().st_size}
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(manifest, indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        fsync_directory(tmp)
        os.rename(tmp, final)
        fsync_directory(self.root)
        self._prune()
        return final

    def _prune(self) -> None:
        """Remove all but the newest ``keep`` checkpoints, and temporary directories of crashed writes."""
        named = sorted((p for p in self.root.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)
        for old in named[: -self.keep] if self.keep else named:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        """Every ``step-*`` directory, newest first (verified or not)."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name, reverse=True)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies (others are skipped with a warning), or None."""
        for path in self.checkpoints():
            try:
                return Checkpoint(path, verify_checkpoint(path))
            except IloraError as exc:
                log.warning("skipping checkpoint: %s", exc)
        return None

    def resume_point(self) -> Checkpoint | None:
        """`latest`, after removing every checkpoint newer than it: those failed verification,
        and left in place they would sort newest, so `save` would prune the resumed run's own
        checkpoints (up to those steps) as soon as it wrote them. None (all removed) when no
        checkpoint verifies."""
        found = self.latest()
        for path in self.checkpoints():
            if found is not None and path == found.path:
                break
            log.warning("removing %s: it did not verify (see above) and the resumed run will write its step again", path)
            shutil.rmtree(path)
        return found

    def clear(self) -> None:
        """Remove every checkpoint (a fresh run must never resume an older run's state)."""
        if self.root.exists():
            shutil.rmtree(self.root)


@contextlib.contextmanager
def restoring(path: Path) -> Iterator[None]:
    """Within the block a verified checkpoint's state is restored into a run: a key it lacks or a
    tensor that does not fit (another version's or another model's checkpoint) is an
    `IloraError` naming the checkpoint, with the cause chained, instead of a bare ``KeyError``."""
    try:
        yield
    except torch.OutOfMemoryError:  # not the checkpoint's fault: the caller sees it as it is
        raise
    except (KeyError, RuntimeError, ValueError) as exc:  # a missing key, load_state_dict's size / key mismatches
        raise IloraError(f"{path}: its state does not fit this run ({type(exc).__name__}: {exc})") from exc


# -- numeric faults -------------------------------------------------------------------------------


class NonFiniteGuard:
    """What a trainer does when a step's loss or gradient norm is NaN or infinite.

    `ok` returns True for a finite step. For a non-finite one it either returns False
    (``skip``: the caller drops the update and counts ``skipped``), or calls
    ``save_last_good()`` (which writes a checkpoint of the state before the step and
    returns its path) and raises `IloraError` naming the step.
    """

    def __init__(self, skip: bool, save_last_good: Callable[[], Path]) -> None:
        self.skip, self.save_last_good = skip, save_last_good
        self.skipped: list[int] = []

    def ok(self, step: int, loss: float, grad_norm: float, where: str = "") -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return True
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if self.skip:
            log.warning("step %d%s: non-finite %s; step skipped (skip_nonfinite)", step, where, what)
            self.skipped.append(step)
            return False
        path = self.save_last_good()
        raise IloraError(
            f"non-finite {what} at step {step}{where}; the state before it is saved in {path} "
            "(lower lr, or resume with --resume skip_nonfinite=true to skip such steps)"
        )


def finished_run_config(out: Path, result_file: str, config_file: str = "train_config.json") -> Path | None:
    """The config file of the run that finished in ``out`` (its ``result_file`` is there), or None
    when none finished; `IloraError` when the config is gone: without it ``--resume`` cannot tell
    whether the finished run is this one."""
    if not (out / result_file).is_file():
        return None
    if not (out / config_file).is_file():
        raise IloraError(
            f"{out}: holds a finished run's {result_file} but not its {config_file}, so --resume cannot tell "
            "whether it is this run; pass --overwrite to start over, or use another --out"
        )
    return out / config_file


@dataclass(frozen=True)
class EarlierRun:
    """What an earlier run left in a directory: ``what`` in words, and whether ``--resume``
    can take it up (a finished run or checkpoints) or it can only be replaced (a saved model)."""

    what: str
    resumable: bool


def earlier_run(out: Path, result_file: str, others: tuple[str, ...] = ()) -> EarlierRun | None:
    """What an earlier run left in ``out`` that a fresh run would delete or overwrite (its
    ``result_file``, checkpoints, or any of ``others``: a saved model), or None."""
    if (out / result_file).is_file():
        return EarlierRun(f"a finished run ({result_file})", resumable=True)
    if CheckpointManager(out, 0).checkpoints():
        return EarlierRun("an interrupted run's checkpoints", resumable=True)
    found = [name for name in others if (out / name).exists()]
    return EarlierRun(f"an earlier run's {', '.join(found)}", resumable=False) if found else None


def earlier_run_error(out: str | Path, earlier: EarlierRun, resuming: bool = False) -> IloraError:
    """The refusal of a run in ``out``, which holds ``earlier``: a fresh one (say how to go on),
    or with ``resuming`` one that finds nothing to resume."""
    if resuming:
        return IloraError(
            f"{out}: holds {earlier.what} but no checkpoint or finished run to resume; pass --overwrite to replace it, or use another --out"
        )
    how = "pass --resume to continue or return it, --overwrite to start over" if earlier.resumable else "pass --overwrite to replace it"
    return IloraError(f"{out}: holds {earlier.what}; {how}, or use another --out")


def refuse_earlier_run(out: Path, result_file: str, others: tuple[str, ...] = ()) -> None:
    """`earlier_run_error` when ``out`` holds an earlier run."""
    earlier = earlier_run(out, result_file, others)
    if earlier:
        raise earlier_run_error(out, earlier)


def open_run(
    out_dir: str | Path, checkpoint_every: int, resume: bool, result_file: str, finished: Callable[[Path], Any], overwrite: bool = False,
    others: tuple[str, ...] = (),
) -> tuple[Path, "CheckpointManager", Any]:
    """Create ``out_dir`` for a training run; returns ``(out, checkpoints, finished_result)``.

    With ``resume``, ``finished(out)`` gives the stored result of a run that already
    completed (returned as the third item; the caller returns it as is), or None; a directory
    with only ``others`` (a saved model, nothing to resume) is refused too. Without
    ``resume``, a directory holding an earlier run (its ``result_file``, checkpoints or any of
    ``others``, see `earlier_run`) is refused unless ``overwrite``: then its checkpoints and
    ``result_file`` are removed and the run starts over. A re-typed command must not delete
    hours of training.
    """
    out = Path(out_dir)
    checkpoints = CheckpointManager(out, checkpoint_every)
    earlier = None if overwrite else earlier_run(out, result_file, others)
    if earlier and not resume:
        raise earlier_run_error(out, earlier)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        result = finished(out)
        if result is None and earlier and not earlier.resumable:  # --resume would train over it from the start
            raise earlier_run_error(out, earlier, resuming=True)
        return out, checkpoints, result
    checkpoints.clear()
    (out / result_file).unlink(missing_ok=True)
    return out, checkpoints, None

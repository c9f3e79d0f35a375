"""Resumable stages: a stage is skipped when its outputs exist and match its inputs.

Each stage writes its outputs into ``<run>/<stage>/`` and, last, ``stage.json`` holding
a key (a hash of the stage's config and of the keys of the stages it reads) and the
stage's result. A stage whose ``stage.json`` holds the current key (or a record of the same
work, below) is skipped and its recorded result reused; any other stage (never run,
configured differently, or whose ``stage.json`` was lost) is run again from a clean
directory (an interrupted run of the same work resumes instead), and so is everything
downstream of it: downstream keys include its token, its key plus the random
id of the run that completed it, so a rerun with the very same config (which need not
give bit-identical weights, e.g. on a GPU) still refreshes what was built on it.

Two records count as the current config too, so that a finished or interrupted stage is
not thrown away for a change that does not touch its results: one whose config differs only
in options that change how a run is carried out (`RESUMABLE_CHANGES`: ``compile``,
``workers``, ...; for a finished stage also ``device``, so a run finished on a GPU is not
redone to rebuild or extend it on a CPU), and one written before an option existed, which ran with the option's old
fixed value (the stage's ``legacy`` form of the config drops such options where they hold
that value; for the teacher `ilora.teacher.config.same_teacher_form`, which also leaves out tiny_* options a non-tiny base LLM never used). A skipped stage keeps its
recorded token, so the stages downstream of it stay up to date as well.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ilora.checkpointing import RESUMABLE_CHANGES
from ilora.config import changed_entries
from ilora.errors import IloraError
from ilora.state_io import atomic_write_text

MARKER = "stage.json"
PENDING = "stage.pending"
PREVIOUS = ".previous"  # <stage>.previous: a finished stage's results while other options run in <stage>
INTERRUPTED = ".interrupted"  # <stage>.interrupted: an interrupted run of other options, resumable by them
# What a finished stage's record may differ in and still stand for the config: how a run is
# carried out, and its device (the results are made; only a resume of interrupted work must
# stay on the device its checkpoints were written from).
FINISHED_IGNORED = RESUMABLE_CHANGES | {"device"}


def stage_key(config: Any, upstream: list[str]) -> str:
    text = json.dumps({"config": config, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def stage_token(key: str, run_id: str | None) -> str:
    """What downstream keys include: the key and the id of the run that completed the stage
    (markers written before run ids existed have none: their key alone)."""
    return key if run_id is None else f"{key}:{run_id}"


def _as_recorded(config: Any) -> Any:
    """``config`` as a record of it reads back (JSON, as `run_stage` writes it)."""
    return json.loads(json.dumps(config, default=str))


def _same_work(recorded: Any, config: Any, legacy: Callable[[Any], Any], ignored: frozenset[str] = RESUMABLE_CHANGES) -> bool:
    """``recorded`` and ``config`` are equal once ``ignored`` (`RESUMABLE_CHANGES`) and options
    at the defaults they had before they existed (``legacy``) are left out."""

    def essential(c: Any) -> Any:
        c = legacy(c)
        return {k: v for k, v in c.items() if k not in ignored} if isinstance(c, dict) else c

    return essential(_as_recorded(recorded)) == essential(_as_recorded(config))


def _matches(
    key: str, recorded_key: str | None, recorded_config: Any, config: Any, upstream: list[str], legacy: Callable[[Any], Any],
    ignored: frozenset[str] = RESUMABLE_CHANGES,
) -> bool:
    """Whether a record (its key, and its config when it kept one) stands for ``config`` on
    ``upstream``: the same key; or a config that is the same work (`_same_work` leaving out
    ``ignored``) and whose key was made with this very upstream; or, for a record that kept
    only its key, the key an older version made from ``config``'s legacy form."""
    if recorded_key == key:
        return True
    if recorded_config is not None:
        return stage_key(recorded_config, upstream) == recorded_key and _same_work(recorded_config, config, legacy, ignored)
    return recorded_key == stage_key(legacy(_as_recorded(config)), upstream)


def _read_pending(path: Path) -> tuple[str | None, Any]:
    """(key, config) of a ``stage.pending`` file: JSON ``{"key", "config"}``, or a bare key (older runs)."""
    if not path.is_file():
        return None, None
    text = path.read_text(encoding="utf-8").strip()
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return text, None
    if isinstance(record, dict) and isinstance(record.get("key"), str):
        return record["key"], record.get("config")
    return text, None


def read_marker(directory: Path) -> dict | None:
    path = directory / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def is_stage_dir(path: Path) -> bool:
    return (path / MARKER).is_file() or (path / PENDING).is_file()


def remove_stage_dir(path: Path) -> None:
    """Delete ``path``, a stage directory of a run directory that `check_run_dir` accepted (a
    stage whose ``stage.json`` was lost is one too); `IloraError` for a file or a link there."""
    _refuse_links(path)
    if path.exists():
        shutil.rmtree(path)


def _refuse_links(*paths: Path) -> None:
    """`IloraError` for a stage path that is a file or a symbolic link: a stage that must run
    again moves or deletes its directory, which it does only with real directories (checked
    before any work, not after the stage has run)."""
    for path in paths:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise IloraError(f"{path}: a file or link where the run keeps its {path.name} stage directory; not moving or deleting it: move it away")


def _swap_path(kept: Path) -> Path:
    return kept.with_name(f"{kept.name}.swap")


def _swap(directory: Path, kept: Path) -> None:
    """Exchange the contents of two stage directories (both exist), through ``<kept>.swap``,
    which `_finish_swaps` puts back where a run stopped mid-exchange left it."""
    swap = _swap_path(kept)
    remove_stage_dir(swap)
    directory.rename(swap)
    kept.rename(directory)
    swap.rename(kept)


def _finish_swaps(directory: Path, *kept: Path) -> None:
    """Complete an exchange of `_swap` that a stopped run left half done: ``<kept>.swap`` goes
    where a directory is missing (the stage's own first, then ``kept``)."""
    for other in kept:
        swap = _swap_path(other)
        if swap.is_dir() and not swap.is_symlink():
            if not directory.exists():
                swap.rename(directory)
            elif not other.exists():
                swap.rename(other)


def _holds_work(directory: Path) -> bool:
    """An interrupted stage directory holds more than its ``stage.pending`` (checkpoints, shards)."""
    return any(p.name != PENDING for p in directory.iterdir())


def _differences(old: Any, new: Any) -> str:
    """The options an interrupted run started with that differ from this run's, in words."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return "its options are not recorded"
    diff = changed_entries(old, new)
    return "; ".join(diff) if diff else "the same options, other upstream results"


def _set_aside(directory: Path, aside: Path, config: Any) -> None:
    """Move the interrupted run of other options in ``directory`` to ``aside``, saying what
    differs: a mistyped option must not delete hours of work. One that holds nothing but its
    ``stage.pending`` (a run that failed before its first checkpoint) is removed instead, and
    one that would replace other work already set aside is refused: `IloraError` naming both."""
    old_config = _read_pending(directory / PENDING)[1]
    differs = _differences(old_config, config)
    if not _holds_work(directory):
        remove_stage_dir(directory)
        return
    if aside.is_dir() and _holds_work(aside):
        raise IloraError(
            f"{directory}: holds an interrupted run of other options ({differs}) and {aside} another one; "
            "rerun with the options of one of them to resume it, or delete the one you do not need"
        )
    remove_stage_dir(aside)
    directory.rename(aside)
    print(
        f"[run] {directory.name}: an interrupted run of other options ({differs}) is kept in "
        f"{aside.name} until this run finishes; a run with the options it started with resumes it",
        file=sys.stderr, flush=True,
    )


def _restore_previous(directory: Path, previous: Path, finished: bool, aside: Path | None, config: Any = None) -> str:
    """Put the finished results kept in ``previous`` back as ``directory``; returns what became
    of what was in ``directory``: its ``finished`` results of other options are kept in
    ``previous`` in turn (a run stopped between finishing them and deleting the kept ones
    leaves both), an interrupted run of other options is kept in ``aside`` (where the stage
    resumes interrupted runs) or discarded with its files."""
    if finished:
        _swap(directory, previous)
        return f"; the finished results of other options there are kept in {previous.name}"
    interrupted = (directory / PENDING).is_file() and _holds_work(directory)
    if interrupted and aside is not None:
        _set_aside(directory, aside, config)
    else:
        remove_stage_dir(directory)
    previous.rename(directory)
    if not interrupted:
        return ""
    return f"; an interrupted run of other options there is kept in {aside.name}" if aside is not None else "; an interrupted run of other options there is discarded with its files"


def release_memory() -> None:
    """Free what a finished stage's models left behind before the next stage loads its own:
    objects only reference cycles keep (compiled modules hold some, and with them a model's
    weights) and, on CUDA, the caching allocator's unused blocks."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_stage(
    run_dir: Path,
    name: str,
    config: Any,
    upstream: list[str],
    fn: Callable[[Path], dict],
    *,
    keep_partial: bool = False,
    legacy: Callable[[Any], Any] = lambda config: config,
    legacy_in: Callable[[Path], Callable[[Any], Any]] | None = None,
    check: Callable[[], None] = lambda: None,
) -> tuple[str, dict]:
    """Run ``fn(stage_dir)`` unless ``stage.json`` already records the same key (or the same
    work, `_matches`).

    ``keep_partial``: an interrupted run of the same work (``stage.pending`` records it, no
    ``stage.json``) keeps its files, for ``fn`` to resume them (trainers from their
    checkpoints, export from its shards); any other stage starts from a clean directory.
    Returns ``(token, result)``: the token (key and completion id) is what downstream stages
    pass as ``upstream``. A record of the same work under another key (module docstring;
    ``legacy`` gives the config as a version before its newest options recorded it) counts
    as current: a finished stage is skipped with its recorded token, an interrupted one resumed.
    ``legacy_in(directory)``, where given, is the legacy form for a record found in
    ``directory`` (the stage's own, ``.previous`` or ``.interrupted``), for a form that reads
    the files the record's run left there.
    ``check()`` runs when the stage has work to do, before its directory is touched (a refusal
    there, e.g. no CUDA device, leaves a finished stage's files in place).

    A finished stage that must run again (other options) is moved aside to
    ``<stage>.previous`` and deleted only once the new run finishes: a run that fails (a
    mistyped path, say) leaves it there, and a later run with the options it was made with
    puts it back and skips the stage, with its token, so the stages after it stay current.
    An interrupted run of other options (``keep_partial`` stages) is likewise moved to
    ``<stage>.interrupted``, saying which options differ, and deleted once the new run
    finishes; a later run with the options it started with puts it back and resumes it.
    """
    directory = run_dir / name
    previous = run_dir / f"{name}{PREVIOUS}"
    aside = run_dir / f"{name}{INTERRUPTED}" if keep_partial else None
    key = stage_key(config, upstream)
    marker = read_marker(directory)

    def legacy_at(where: Path) -> Callable[[Any], Any]:
        return legacy if legacy_in is None else legacy_in(where)

    def current(record: dict | None, where: Path) -> bool:
        return record is not None and _matches(key, record.get("key"), record.get("config"), config, upstream, legacy_at(where), FINISHED_IGNORED)

    def resumes(pending: Path) -> bool:
        pending_key, pending_config = _read_pending(pending)
        return pending_key is not None and _matches(key, pending_key, pending_config, config, upstream, legacy_at(pending.parent))

    if current(marker, directory):
        print(f"[run] {name}: up to date, skipped", file=sys.stderr, flush=True)
        return stage_token(marker["key"], marker.get("run_id")), marker["result"]
    _refuse_links(directory, previous, *([aside] if aside else []))
    _finish_swaps(directory, previous, *([aside] if aside else []))
    kept = read_marker(previous)
    if current(kept, previous):
        became = _restore_previous(directory, previous, finished=marker is not None, aside=aside, config=config)
        print(f"[run] {name}: the finished results kept in {previous.name} are current again, put back{became}", file=sys.stderr, flush=True)
        return stage_token(kept["key"], kept.get("run_id")), kept["result"]
    # Resume only an interrupted run of this config (stage.pending records it, in the stage's
    # directory or set aside by a run of other options); anything else starts clean.
    check()
    pending = directory / PENDING
    interrupted = aside is not None and marker is None and pending.is_file()
    resumable = interrupted and resumes(pending)
    if interrupted and not resumable:
        if aside.is_dir() and resumes(aside / PENDING):  # the one set aside is this run's: exchange them
            _swap(directory, aside)
            print(f"[run] {name}: the interrupted run in {aside.name} has these options: put back; the one of other options is kept there", file=sys.stderr, flush=True)
            resumable = True
        else:
            _set_aside(directory, aside, config)
    if marker is not None:  # finished with other options: kept until this run finishes
        remove_stage_dir(previous)
        directory.rename(previous)
        print(f"[run] {name}: its finished results (other options) are kept in {previous.name} until this run finishes", file=sys.stderr, flush=True)
    elif not resumable:
        remove_stage_dir(directory)
    if not resumable and aside is not None and aside.is_dir() and resumes(aside / PENDING):
        aside.rename(directory)  # a run of these options interrupted earlier, set aside since
        print(f"[run] {name}: the interrupted run in {aside.name} has these options: put back", file=sys.stderr, flush=True)
        resumable = True
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(pending, json.dumps({"key": key, "config": config}, default=str))
    print(f"[run] {name}: {'resuming' if resumable else 'running'}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = fn(directory)
    release_memory()
    result = {**result, "seconds": round(time.perf_counter() - started, 2)}
    run_id = uuid.uuid4().hex
    atomic_write_text(directory / MARKER, json.dumps({"key": key, "run_id": run_id, "config": config, "result": result}, indent=2, default=str))
    pending.unlink(missing_ok=True)
    remove_stage_dir(previous)
    if aside is not None:
        remove_stage_dir(aside)
    return stage_token(key, run_id), result

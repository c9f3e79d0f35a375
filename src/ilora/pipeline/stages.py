"""Resumable stages: a stage is skipped when its outputs exist and match its inputs.

Each stage writes its outputs into ``<run>/<stage>/`` and, last, ``stage.json`` holding
a key (a hash of the stage's config and of the keys of the stages it reads) and the
stage's result. A stage whose ``stage.json`` holds the current key is skipped and its
recorded result reused; any other stage (never run, interrupted, configured differently,
or whose ``stage.json`` was lost) is run again from a clean directory, and so is
everything downstream of it: downstream keys include its token, its key plus the random
id of the run that completed it, so a rerun with the very same config (which need not
give bit-identical weights, e.g. on a GPU) still refreshes what was built on it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ilora.state_io import atomic_write_text

MARKER = "stage.json"
PENDING = "stage.pending"


def stage_key(config: Any, upstream: list[str]) -> str:
    text = json.dumps({"config": config, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def stage_token(key: str, run_id: str | None) -> str:
    """What downstream keys include: the key and the id of the run that completed the stage
    (markers written before run ids existed have none: their key alone)."""
    return key if run_id is None else f"{key}:{run_id}"


def read_marker(directory: Path) -> dict | None:
    path = directory / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def run_stage(
    run_dir: Path,
    name: str,
    config: Any,
    upstream: list[str],
    fn: Callable[[Path], dict],
    *,
    keep_partial: bool = False,
) -> tuple[str, dict]:
    """Run ``fn(stage_dir)`` unless ``stage.json`` already records the same key.

    ``keep_partial``: an interrupted run of the same config (``stage.pending`` holds its
    key, no ``stage.json``) keeps its files, for ``fn`` to resume them (trainers from their
    checkpoints, export from its shards); any other stage starts from a clean directory.
    Returns ``(token, result)``: the token (key and completion id) is what downstream stages
    pass as ``upstream``.
    """
    directory = run_dir / name
    key = stage_key(config, upstream)
    marker = read_marker(directory)
    if marker is not None and marker.get("key") == key:
        print(f"[run] {name}: up to date, skipped", file=sys.stderr, flush=True)
        return stage_token(key, marker.get("run_id")), marker["result"]
    # Resume only an interrupted run of this very config (stage.pending holds its key);
    # anything else (another config, a finished stage now stale) starts clean.
    pending = directory / PENDING
    resumable = keep_partial and marker is None and pending.is_file() and pending.read_text().strip() == key
    if directory.exists() and not resumable:
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(pending, key)
    print(f"[run] {name}: {'resuming' if resumable else 'running'}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = fn(directory)
    result = {**result, "seconds": round(time.perf_counter() - started, 2)}
    run_id = uuid.uuid4().hex
    atomic_write_text(directory / MARKER, json.dumps({"key": key, "run_id": run_id, "config": config, "result": result}, indent=2, default=str))
    pending.unlink(missing_ok=True)
    return stage_token(key, run_id), result

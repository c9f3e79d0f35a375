"""Dataset statistics (``ilora data stats``): a JSON-safe dict and a readable table.

Per split (``null`` if the split is absent):

* ``rows``: rows in the source (file rows for legacy pickles, samples otherwise);
* ``rows_len_ge_3``: rows with at least 3 history items (what the reference iLoRA/LLaRA
  loaders keep), counted before the ``min_len`` filter;
* ``samples``: samples actually loaded, after dropping rows without history
  (``dropped_no_history``) and below ``min_len`` (``dropped_below_min_len``);
* ``length_min`` / ``length_max`` / ``length_mean`` of the loaded samples, the number of
  ``distinct_targets`` and of ``distinct_items`` (history and target).

``log`` (``null`` unless read from an interaction log): its users and interactions, the
duplicate rows dropped and the users with one interaction (no sample). ``converted_from`` (``null`` if none) is a native dataset's record of how ``ilora data
convert`` read its source (format, path and ``min_len``, and a log's counts); ``min_len`` is the filter of
this load. The table names the source and every ``min_len`` along the way, with a log's counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ilora.data.dataset import SPLITS, SeqDataset, Split


def split_stats(split: Split, counts: dict[str, int] | None) -> dict[str, Any]:
    counts = counts or {}
    valid = np.arange(split.max_len)[None, :] < split.length[:, None]
    items = np.union1d(split.history[valid], split.target)
    empty = len(split) == 0
    return {
        "rows": int(counts.get("rows_in_source", len(split))),
        "rows_len_ge_3": int(counts.get("rows_len_ge_3", int((split.length >= 3).sum()))),
        "samples": len(split),
        "dropped_no_history": int(counts.get("dropped_no_history", 0)),
        "dropped_below_min_len": int(counts.get("dropped_below_min_len", 0)),
        "length_min": None if empty else int(split.length.min()),
        "length_max": None if empty else int(split.length.max()),
        "length_mean": None if empty else round(float(split.length.mean()), 4),
        "distinct_targets": int(np.unique(split.target).size),
        "distinct_items": int(items.size),
    }


def dataset_stats(ds: SeqDataset) -> dict[str, Any]:
    """One JSON-safe dict describing ``ds`` (see the module docstring)."""
    info = ds.load_info.get("splits", {}) or {}
    splits = {
        name: None if ds.splits.get(name) is None else split_stats(ds.splits[name], info.get(name))  # type: ignore[arg-type]
        for name in SPLITS
    }
    present = [s for s in ds.splits.values() if s is not None]
    return {
        "source": ds.source,
        "format": ds.load_info.get("format"),
        "num_items": ds.num_items,
        "padding_id": ds.padding_id,
        "max_len": max((s.max_len for s in present), default=None),
        "min_len": ds.load_info.get("min_len", 1),
        "converted_from": ds.load_info.get("converted_from"),
        "log": ds.load_info.get("log"),
        "splits": splits,
    }


COLUMNS = (
    ("rows", "rows"),
    ("rows_len_ge_3", "len>=3"),
    ("samples", "samples"),
    ("dropped_no_history", "no hist"),
    ("dropped_below_min_len", "<min_len"),
    ("length_mean", "mean len"),
    ("distinct_targets", "targets"),
    ("distinct_items", "items"),
)


def _conversion_lines(record: dict[str, Any] | None) -> list[str]:
    """One line per conversion along the way, the latest first, each followed by its source's
    log line when that source was an interaction log."""
    lines = []
    while record:
        lines.append(f"from      {record.get('source') or '?'} ({record['format']}, min_len {record['min_len']})")
        lines += _log_lines(record.get("log"))
        record = record.get("converted_from")
    return lines


def _log_lines(counts: Any) -> list[str]:
    if not isinstance(counts, dict) or not counts:
        return []
    count = lambda key: counts.get(key, "?")  # noqa: E731  (a dataset.json's record is informational: not checked)
    return [
        f"log       {count('interactions')} interactions of {count('users')} users; dropped: {count('duplicates_dropped')} "
        f"duplicate rows, {count('users_with_one_interaction')} users with one interaction (no sample)"
    ]


def format_stats(stats: dict[str, Any]) -> str:
    """`dataset_stats` output as a plain-text table."""
    lines = [
        f"dataset   {stats['source']} ({stats['format']})",
        *_conversion_lines(stats.get("converted_from")),
        *_log_lines(stats.get("log")),
        f"items     {stats['num_items']} (padding id {stats['padding_id']})",
        f"max_len   {stats['max_len']}   min_len {stats['min_len']}",
        "",
        f"{'split':<6}" + "".join(f"{label:>10}" for _, label in COLUMNS),
    ]
    for name, row in stats["splits"].items():
        if row is None:
            lines.append(f"{name:<6}{'absent':>10}")
            continue
        cells = ["-" if row[key] is None else str(row[key]) for key, _ in COLUMNS]
        lines.append(f"{name:<6}" + "".join(f"{cell:>10}" for cell in cells))
    return "\n".join(lines)

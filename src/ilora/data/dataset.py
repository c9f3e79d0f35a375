"""The one in-memory representation of a sequential-recommendation dataset.

* `Catalog`: item id -> title, ids ``0 .. num_items - 1``.
* `Split`: samples of (history ids, history length, next id). Histories are
  left-aligned in a fixed-width int64 matrix and padded with ``padding_id``.
* `SeqDataset`: a catalog plus the ``train`` / ``val`` / ``test`` splits. A split
  whose file was absent is ``None``; asking for it with `SeqDataset.split` fails
  with a clear error, so only commands that need it fail.

The padding id is explicit and always equals ``num_items`` (the iLoRA/LLaRA and
DLLM2Rec convention: the embedding table has one extra row for padding).

Titles are stored verbatim: the readers and the native format keep any text (empty
titles, newlines, control characters) and never clean it, except that the legacy
``id2name.txt`` / ``u.item`` readers drop the whitespace around each name. Only the teacher, which puts
titles into prompts, requires prompt-safe titles (`check_prompt_title`, run by
`validate_prompt_titles` when a teacher is built or loaded): at least one non-space
character, one line (no character that ``str.splitlines`` breaks on) and no other control
character but tab (NUL, ESC, DEL, ...). They are refused, not cleaned: a title is part of
the catalog fingerprint, and the generate protocol matches titles in the output's first
line. `load_dataset` logs a warning for the first such title. Text that looks like a
special token (``[HistoryEmb]``, ``</s>``) is an ordinary title; the prompt builder never
turns title text into placeholders.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ilora.errors import DataError, IloraError

SPLITS = ("train", "val", "test")
# The longest history window any reader or writer accepts: a bound on what a (possibly
# crafted) max_len can make us allocate (n_samples x max_len int64).
MAX_HISTORY_LEN = 4096

# C0 controls but tab, DEL, and the line breaks of str.splitlines beyond C0 (NEL, LS, PS).
_NOT_IN_PROMPT = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


def check_prompt_title(title: str, path: str | Path | None, *, item: int) -> None:
    """A `DataError` naming the file, the item and the character unless ``title`` is prompt-safe.

    Prompt-safe: a string with a non-space character, on one line, with no control
    character but tab (see the module docstring). The row reported is the item id.
    """
    if not isinstance(title, str):
        raise DataError(path, f"title is a {type(title).__name__}", row=item, item=item, expected="a string")
    if not title.strip():
        raise DataError(path, f"empty title {title!r}", row=item, item=item, expected="a title with a non-space character")
    bad = _NOT_IN_PROMPT.search(title)
    if bad:
        raise DataError(
            path,
            f"title {title[:60]!r} holds the control character {bad.group()!r} at position {bad.start()}, "
            "which cannot go into a prompt",
            row=item,
            item=item,
            expected="one line of printable text",
        )


def validate_prompt_titles(catalog: Catalog) -> None:
    """`check_prompt_title` on every title of ``catalog`` (its ``source`` names the file)."""
    for item, title in enumerate(catalog.titles):
        check_prompt_title(title, catalog.source or "item catalog", item=item)


@dataclass(frozen=True)
class Catalog:
    """Item titles indexed by item id (``titles[i]`` is the title of item ``i``).

    ``source`` names the file the titles were read from (for error messages; not part of
    equality).
    """

    titles: tuple[str, ...]
    source: str = field(default="", compare=False)

    @property
    def num_items(self) -> int:
        return len(self.titles)

    @property
    def padding_id(self) -> int:
        return len(self.titles)

    def title(self, item: int) -> str:
        return self.titles[item]

    def sha256(self) -> str:
        """Fingerprint of the titles in id order (16 hex digits): which catalog a teacher or an
        export was made for."""
        h = hashlib.sha256()
        for title in self.titles:
            h.update(title.encode("utf-8", "surrogatepass") + b"\x00")
        return h.hexdigest()[:16]


@dataclass
class Split:
    """Samples of one split.

    Attributes:
        history: int64 ``(n, max_len)``; row ``i`` holds ``length[i]`` ids on the left,
            then ``padding_id``.
        length: int64 ``(n,)``, between 1 and ``max_len``.
        target: int64 ``(n,)``, the next item.
    """

    history: np.ndarray
    length: np.ndarray
    target: np.ndarray

    def __post_init__(self) -> None:
        self.history = np.ascontiguousarray(self.history, dtype=np.int64)
        self.length = np.ascontiguousarray(self.length, dtype=np.int64)
        self.target = np.ascontiguousarray(self.target, dtype=np.int64)
        n = len(self.target)
        if self.history.ndim != 2 or self.history.shape[0] != n or self.length.shape != (n,):
            raise ValueError(
                f"Split arrays disagree: history {self.history.shape}, length {self.length.shape}, target {self.target.shape}"
            )

    def __len__(self) -> int:
        return len(self.target)

    @property
    def max_len(self) -> int:
        return self.history.shape[1]

    def subset(self, index: np.ndarray | slice) -> "Split":
        return Split(self.history[index], self.length[index], self.target[index])

    def sha256(self) -> str:
        """Fingerprint of the samples in order (shapes and int64 bytes of history, length, target)."""
        h = hashlib.sha256()
        for array in (self.history, self.length, self.target):
            h.update(str(array.shape).encode())
            h.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return h.hexdigest()


@dataclass
class SeqDataset:
    """A catalog and its train/val/test splits (absent splits are ``None``).

    ``load_info`` records how the reader got here (filled by `ilora.data.load_dataset`):
    ``{"format": ..., "min_len": ..., "splits": {name: {"rows_in_source": N,
    "dropped_no_history": K, "dropped_below_min_len": M}}}``; empty for datasets built
    in memory.
    """

    catalog: Catalog
    splits: dict[str, Split | None] = field(default_factory=dict)
    source: str = ""
    load_info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return self.catalog.num_items

    @property
    def padding_id(self) -> int:
        return self.catalog.padding_id

    @property
    def max_len(self) -> int:
        present = [s.max_len for s in self.splits.values() if s is not None]
        if not present:
            raise IloraError(f"{self.source or 'dataset'}: no split is present")
        return max(present)

    def sha256(self) -> str:
        """Fingerprint of the catalog titles and every split's samples in order (16 hex digits):
        what a training run read, so that a resume can refuse other data."""
        h = hashlib.sha256(self.catalog.sha256().encode())
        for name in sorted(self.splits):
            split = self.splits[name]
            h.update(f"\x01{name}\x00{'absent' if split is None else split.sha256()}".encode())
        return h.hexdigest()[:16]

    def split(self, name: str) -> Split:
        """The split ``name``; a clear error if it is unknown or was absent on disk."""
        if name not in SPLITS:
            raise IloraError(f"unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        split = self.splits.get(name)
        if split is None:
            raise IloraError(f"{self.source or 'dataset'}: the {name} split is absent, but this command needs it")
        return split

    def validate(self, paths: dict[str, str | Path] | None = None) -> None:
        """Check every split against the catalog; raise `DataError` naming file, row and id."""
        if self.catalog.num_items < 1:
            raise DataError(self.source or None, "the item catalog is empty", expected="at least one item")
        for name, split in self.splits.items():
            if split is not None:
                validate_split(split, self.catalog, path=(paths or {}).get(name, f"{self.source}[{name}]"))


def validate_split(split: Split, catalog: Catalog, path: str | Path, rows: np.ndarray | None = None) -> None:
    """Ids inside the catalog, lengths consistent with the padded history, no empty histories.

    ``rows`` optionally maps sample index -> row number in the source file, so that a
    reader that dropped rows still reports the file's row.
    """
    n_items, pad = catalog.num_items, catalog.padding_id
    if len(split) == 0:
        return
    # the catalog fixes the valid ids and the padding id: name it, as a short catalog file is as likely the fault
    of_catalog = f" (catalog: {catalog.source + ', ' if catalog.source else ''}{n_items} item{'s' * (n_items != 1)}, padding id {pad})"

    def row_of(r: int) -> int:
        return int(rows[r]) if rows is not None else r

    length, hist, target = split.length, split.history, split.target
    bad = np.flatnonzero((length < 1) | (length > split.max_len))
    if bad.size:
        r = int(bad[0])
        if length[r] < 1:
            raise DataError(path, f"empty history (len_seq={int(length[r])})", row=row_of(r), expected="len_seq >= 1")
        raise DataError(
            path,
            f"len_seq={int(length[r])} is longer than the history width {split.max_len}",
            row=row_of(r),
            expected=f"1 <= len_seq <= {split.max_len}",
        )
    bad = np.flatnonzero((target < 0) | (target >= n_items))
    if bad.size:
        r = int(bad[0])
        raise DataError(
            path, f"next item outside the catalog{of_catalog}", row=row_of(r), item=int(target[r]), expected=f"0 <= id < {n_items}"
        )
    positions = np.arange(split.max_len)[None, :]
    valid = positions < length[:, None]
    in_range = (hist >= 0) & (hist < n_items)
    wrong_valid = valid & ~in_range
    if wrong_valid.any():
        r, c = map(int, np.argwhere(wrong_valid)[0])
        item = int(hist[r, c])
        what = "the padding id inside the first len_seq positions" if item == pad else "history item outside the catalog"
        what += of_catalog
        raise DataError(path, what, row=row_of(r), item=item, expected=f"len_seq={int(length[r])} ids in 0..{n_items - 1}")
    wrong_pad = ~valid & (hist != pad)
    if wrong_pad.any():
        r, c = map(int, np.argwhere(wrong_pad)[0])
        raise DataError(
            path,
            f"history position {c} holds an item after len_seq={int(length[r])}{of_catalog}",
            row=row_of(r),
            item=int(hist[r, c]),
            expected=f"padding id {pad} after the first len_seq positions",
        )

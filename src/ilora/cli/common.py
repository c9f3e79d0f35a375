"""Helpers shared by the command modules."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ilora.state_io import strict_json


def print_json(obj: Any) -> None:
    """One JSON object on stdout (the `--json` contract), as `strict_json` writes it."""
    sys.stdout.write(strict_json(obj) + "\n")
    sys.stdout.flush()


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """DATA, --format and --allow-pickle: how every command reads a dataset."""
    parser.add_argument("data", metavar="DATA", help="dataset directory or file (format auto-detected)")
    parser.add_argument(
        "--format",
        dest="data_format",
        default="auto",
        choices=("auto", "native", "llara", "interactions"),
        help="dataset format: native (ilora data convert output), llara (iLoRA/LLaRA .df + id2name.txt/u.item), "
        "interactions (user,item,timestamp logs); default: auto-detect",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow reading legacy pandas pickles (.df); they are read by a restricted unpickler "
        "that refuses anything but pandas/NumPy data",
    )
    parser.add_argument(
        "--min-len",
        type=positive_int,
        default=1,
        metavar="N",
        help="drop samples with fewer than N history items, in every split (the iLoRA/LLaRA loaders use 3); "
        "default 1 keeps every sample that has a history",
    )
    parser.add_argument(
        "--max-len",
        type=positive_int,
        default=None,
        metavar="N",
        help="interactions logs only: each sample's history is at most the N previous items (default 10); "
        "other formats keep the width they were saved with (giving it for them is an error)",
    )
    parser.add_argument(
        "--items",
        default=None,
        metavar="FILE",
        help="interactions logs only: the items file (columns item,title); default: items.csv or items.parquet "
        "next to the interactions file (giving it for other formats is an error)",
    )


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def candidate_count(text: str) -> int:
    """argparse type: candidates per sample, >= 2 (the target and at least one other item to rank it against)."""
    return _int_at_least(text, 2)


def optional_candidate_count(text: str) -> int:
    """argparse type: candidates per sample, 0 (none) or >= 2."""
    value = _int_at_least(text, 0)
    if value == 1:
        raise argparse.ArgumentTypeError("must be 0 (none) or >= 2 (the target and at least one other item), got 1")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def add_run_arguments(parser: argparse.ArgumentParser, resume_help: str) -> None:
    """``--resume`` and ``--overwrite`` (one or the other) of a training command: without either, an
    ``--out`` that holds an earlier run is refused rather than started over."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help=resume_help)
    group.add_argument(
        "--overwrite", action="store_true", help="start over in an --out that holds an earlier run (its checkpoints and results are removed)"
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads for torch (default: torch's, every core)")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


def load_data(args: argparse.Namespace):
    """The dataset named by the DATA / --format / --allow-pickle (and loading) arguments.

    A command with a ``--split`` option evaluates that split: if it is absent, or empty
    (no row at all, or none left after ``--min-len``), this fails here, before any model is
    loaded, instead of reporting metrics over zero samples.
    """
    from ilora.data import load_dataset
    from ilora.errors import IloraError

    dataset = load_dataset(
        args.data,
        format=args.data_format,
        allow_pickle=args.allow_pickle,
        min_len=args.min_len,
        max_len=args.max_len,
        items=args.items,
    )
    name = getattr(args, "split", None)
    if name is not None and len(dataset.split(name)) == 0:
        raise IloraError(f"{args.data}: the {name} split has no samples (min_len={args.min_len}); nothing to evaluate")
    return dataset

"""Helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def print_json(obj: Any) -> None:
    """One JSON object on stdout (the `--json` contract)."""
    json.dump(obj, sys.stdout, indent=None, sort_keys=False, default=_default)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


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


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")

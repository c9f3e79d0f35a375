"""``ilora data {synth,convert,stats}``: make, convert and describe datasets."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ilora.cli.common import add_data_arguments, add_json_argument, load_data, print_json
from ilora.config import add_arguments, add_config_arguments, config_from_args
from ilora.data.dataset import SeqDataset
from ilora.data.native import write_native
from ilora.data.stats import dataset_stats, format_stats
from ilora.data.synthetic import SynthConfig, synthetic_from_config

log = logging.getLogger(__name__)


def _report(args: argparse.Namespace, ds: SeqDataset, extra: dict[str, str] | None = None) -> None:
    stats = dataset_stats(ds)
    if args.json:
        print_json({**(extra or {}), **stats})
    else:
        for key, value in (extra or {}).items():
            print(f"{key:<9} {value}")
        print(format_stats(stats))


def run_synth(args: argparse.Namespace) -> int:
    cfg = config_from_args(SynthConfig, args)
    ds = synthetic_from_config(cfg)
    out = write_native(ds, args.out, overwrite=args.overwrite)
    log.info("wrote %s", out)
    _report(args, ds, {"output": str(out)})
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from ilora.data.native import check_native_target

    check_native_target(Path(args.dst), args.overwrite)  # before reading (and reporting on) the source
    ds = load_data(args)
    out = write_native(ds, args.dst, overwrite=args.overwrite)
    log.info("wrote %s", out)
    _report(args, ds, {"output": str(out)})
    return 0


def run_stats(args: argparse.Namespace) -> int:
    _report(args, load_data(args))
    return 0


def _overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output directory if it exists (only an existing ilora native dataset or an empty directory)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data",
        help="datasets: make a synthetic one, convert to the native format, show statistics",
        description="Dataset tools. Formats: native (this project's Parquet + items.csv + dataset.json), "
        "llara (iLoRA/LLaRA train_data.df/Val_data.df/Test_data.df pickles + id2name.txt or u.item), "
        "interactions (user,item,timestamp logs, split leave-one-out with sliding windows).",
    )
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = actions.add_parser(
        "synth",
        help="write a synthetic dataset (native format) with real sequential signal",
        description="Generate a deterministic synthetic dataset (genres, item successors, user tastes; see "
        "ilora.data.synthetic) and write it in the native format to OUT.",
    )
    synth.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    add_arguments(synth, SynthConfig)
    add_config_arguments(synth)
    _overwrite_argument(synth)
    add_json_argument(synth)
    synth.set_defaults(run=run_synth)

    convert = actions.add_parser(
        "convert",
        help="convert any supported dataset to the native format (so later runs never read pickles)",
        description="Read DATA (any format; pickles need --allow-pickle) and write it atomically to DST in the "
        "native format: train/val/test.parquet, items.csv, dataset.json.",
    )
    add_data_arguments(convert)
    convert.add_argument("dst", metavar="DST", help="output directory (must not exist unless --overwrite)")
    _overwrite_argument(convert)
    add_json_argument(convert)
    convert.set_defaults(run=run_convert)

    stats = actions.add_parser(
        "stats",
        help="print dataset statistics (rows per split, rows with >= 3 history items, lengths, items)",
        description="Load DATA and print its statistics: a table, or one JSON object with --json.",
    )
    add_data_arguments(stats)
    add_json_argument(stats)
    stats.set_defaults(run=run_stats)


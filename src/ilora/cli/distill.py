"""`ilora distill DATA --teacher-outputs DIR --out DIR`: DLLM2Rec distillation into SASRec.

Trains the undistilled baseline and the distilled student with the same seed, split,
epochs and early stopping on the validation split, then reports both students' test
metrics, the relative gain per metric and its 95 % paired-bootstrap interval over the
test samples (``ilora.distill.train``). The output
directory holds ``baseline/`` and ``distilled/`` (SASRec model directories, what
``ilora rec eval --model`` reads; with ``--control-seed N`` also ``control/``, the baseline
trained with seed N, whose gain over the baseline is what another seed alone moves),
``distill_config.json`` and ``result.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ilora.cli.common import add_data_arguments, add_json_argument, add_run_arguments, load_data, print_json
from ilora.config import add_arguments, add_config_arguments, config_from_args


def _print_table(result: dict) -> None:
    from ilora.distill.significance import gain_text, interval_text, metric_intervals

    base, dist, gain = result["baseline"]["test"], result["distilled"]["test"], result["gain"]
    paired = metric_intervals(result.get("gain_interval"))
    control = result.get("control")
    seeds = f"   control (seed {control['seed']}): gain, interval" if control else ""
    print(f"{'metric':<14}{'baseline':>10}{'distilled':>11}{'gain':>9}   {'95 % interval (paired bootstrap)':<34}{seeds}".rstrip())
    for key, g in gain.items():
        span = interval_text(paired.get(key, {}).get("interval"), percent="%")
        row = f"{key:<14}{base[key]:>10.4f}{dist[key]:>11.4f}{gain_text(g, '%'):>9}   {span:<34}"
        if control:
            row += f"   {gain_text(control['gain'].get(key), '%'):>8}, {interval_text(metric_intervals(control.get('gain_interval')).get(key, {}).get('interval'), percent='%')}"
        print(row.rstrip())
    if control:
        print("control: the baseline trained again with another seed; its gain is what the seed alone moves")
    print(f"out: {result['out']}")


def run_distill(args: argparse.Namespace) -> int:
    from ilora.distill.train import DISTILL_COLUMNS, DistillConfig, distill
    from ilora.outputs.format import read_teacher_outputs

    cfg = config_from_args(DistillConfig, args)
    cfg.validate()
    dataset = load_data(args)
    outputs = read_teacher_outputs(args.teacher_outputs, ("train",), columns=DISTILL_COLUMNS, embeddings=cfg.w_ed > 0)
    result = distill(dataset, outputs, cfg, args.out, source=str(args.teacher_outputs), resume=args.resume, overwrite=args.overwrite)
    if args.json:
        print_json(result)
    else:
        _print_table(result)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from ilora.distill.train import DistillConfig

    parser = subparsers.add_parser(
        "distill",
        help="distil teacher outputs into SASRec (DLLM2Rec) and compare with the undistilled baseline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_arguments(parser)
    parser.add_argument("--teacher-outputs", required=True, type=Path, metavar="DIR", help="directory written by `ilora teacher export`")
    parser.add_argument("--out", required=True, type=Path, help="output directory (baseline/, distilled/, control/ with --control-seed, result.json)")
    add_run_arguments(parser, "continue each student from its newest intact checkpoint in --out (see --checkpoint-every)")
    add_json_argument(parser)
    add_arguments(parser, DistillConfig)
    add_config_arguments(parser)
    parser.set_defaults(run=run_distill)

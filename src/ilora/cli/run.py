"""`ilora run CONFIG.yaml [key=value ...]`: the whole pipeline, resumable."""

from __future__ import annotations

import argparse
import textwrap

from ilora.cli.common import add_json_argument, print_json
from ilora.config import load_config, options_epilog
from ilora.pipeline.config import RunConfig


def run_run(args: argparse.Namespace) -> int:
    from ilora.pipeline.run import run_pipeline

    cfg = load_config(RunConfig, yaml_path=args.config, overrides=args.overrides)
    if args.out:
        cfg.out = args.out
    return print_summary(args, run_pipeline(cfg))


def print_summary(args: argparse.Namespace, summary: dict) -> int:
    """The run's summary as JSON (``--json``) or as the final table."""
    from ilora.pipeline.report import summary_table

    if args.json:
        print_json(summary)
    else:
        print(summary_table(summary))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the whole pipeline from a YAML config (resumable)",
        description=textwrap.fill(
            "data -> SASRec -> teacher -> evaluation -> teacher outputs -> baseline and distilled students "
            "-> report.md + plots in the run directory. Stages whose outputs already exist and match the config are "
            "skipped, so an interrupted run continues. Sections of the YAML: out, data, rec, teacher, eval, export, "
            "distill (the options of the matching commands, listed below); key=value overrides use dotted keys "
            "(teacher.max_steps=100).",
            width=100,
        ),
        epilog=options_epilog(RunConfig, "keys (YAML, or key=value overrides):") + "\n\n" + textwrap.fill(
            "A run also requires: export.limit=0, or 0 < distill.train_limit <= export.limit (its students read a "
            "teacher row for every train sample they train on), "
            "train in export.splits, and distill.top_k <= export.top_k. Outputs: <out>/data/dataset, "
            "<out>/sasrec/model, <out>/sasrec_eval, <out>/teacher/model, <out>/eval, <out>/export/outputs, "
            "<out>/distill/{baseline,distilled,control}, <out>/report.md, <out>/summary.json.",
            width=100,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG.yaml", help="run configuration (see configs/ for examples)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, applied last")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (overrides `out` in the config)")
    add_json_argument(p)
    p.set_defaults(run=run_run)

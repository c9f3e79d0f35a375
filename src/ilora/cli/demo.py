"""`ilora demo`: `ilora run` on the embedded synthetic default, offline, on CPU.

The configuration is `ilora.pipeline.config.demo_config` (synthetic data, 1000 users,
500 items; SASRec; a tiny-Llama teacher with 4 experts x rank 2) with the user's overrides,
plus a seed control for the distillation (`with_demo_control`: a third student, the baseline
with seed ``distill.seed + 1``, unless ``distill.control_seed`` is given); it prints the final
table and leaves the report, plots and every artefact in ``--out``.
"""

from __future__ import annotations

import argparse

from ilora.cli.common import add_json_argument
from ilora.cli.run import print_summary


def run_demo(args: argparse.Namespace) -> int:
    from ilora.config import from_dict, merge_trees, parse_overrides, to_dict
    from ilora.pipeline.config import RunConfig, demo_config, with_demo_control
    from ilora.pipeline.run import run_pipeline

    base = to_dict(demo_config(args.out))
    tree = parse_overrides(args.overrides)
    cfg = with_demo_control(from_dict(RunConfig, merge_trees(base, tree)), tree)
    return print_summary(args, run_pipeline(cfg))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the pipeline on the embedded synthetic default (offline, CPU)",
        description="`ilora run` with the embedded default: synthetic data -> SASRec -> tiny iLoRA teacher -> "
        "evaluation -> teacher outputs -> baseline, distilled and seed-control SASRec students. Prints the final table.",
    )
    p.add_argument("--out", default="demo_out", metavar="DIR", help="run directory [default: demo_out]")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="change the default, e.g. teacher.max_steps=50 (the keys `ilora run --help` lists)")
    add_json_argument(p)
    p.set_defaults(run=run_demo)

"""`ilora bench NAME`: run one benchmark, print its result, append it to bench/RESULTS.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ilora.cli.common import add_json_argument, positive_int, print_json

DEFAULT_RESULTS = Path("bench") / "RESULTS.md"


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


BENCHMARKS = ("inputs", "adapter", "step", "eval", "export", "grouping")
# the benchmarks each specific option applies to; giving it to another one is an error, not ignored
APPLIES_TO: dict[str, tuple[str, ...]] = {
    "repeats": tuple(b for b in BENCHMARKS if b != "export"),
    "warmup": tuple(b for b in BENCHMARKS if b != "export"),
    "budget_s": tuple(b for b in BENCHMARKS if b != "export"),
    "hidden": ("inputs", "adapter"),
    "batch_sizes": ("inputs",),
    "shape": ("step", "eval"),
    "batch_size": ("step", "grouping"),
    "gradient_checkpointing": ("step",),
    "compile": ("step",),
    "eager_baseline": ("step",),
    "fp32_baseline": ("step",),
    "lora_baseline": ("step",),
    "profile": ("step",),
    "no_part_syncs": ("step",),
    "group_by_length": ("step",),
    "no_reference": ("step",),
    "compile_mode": ("step",),
    "lora_dropout": ("step",),
    "batches": ("step",),
    "shared_inputs": ("step",),
    "micro_batch_size": ("step",),
    "reference_micro_batch_size": ("step",),
    "reference_eager": ("step",),
    "samples": ("eval", "export"),
    "threads": ("export",),
    "data": ("grouping",),
    "allow_pickle": ("grouping",),
}


def check_options_apply(args: argparse.Namespace) -> None:
    """Raise `ConfigError` for an option given to a benchmark it does not apply to."""
    from ilora.errors import ConfigError

    for key, benchmarks in APPLIES_TO.items():
        value = getattr(args, key)
        if value is not None and value is not False and args.benchmark not in benchmarks:
            raise ConfigError(f"bench {args.benchmark}: --{key.replace('_', '-')} does not apply (only to {', '.join(benchmarks)})")


def run_bench_command(args: argparse.Namespace) -> int:
    from ilora.bench import benchmark_module
    from ilora.bench.common import check_device, record_markdown
    from ilora.errors import ConfigError

    check_options_apply(args)
    device = check_device(args.device)
    module = benchmark_module(args.benchmark)
    kwargs = {"quick": args.quick}
    for key in ("repeats", "warmup", "budget_s"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.benchmark in ("inputs", "adapter") and args.hidden:
        kwargs["hidden"] = args.hidden
    if args.benchmark == "inputs" and args.batch_sizes:
        kwargs["batch_sizes"] = args.batch_sizes
    if args.benchmark == "step":
        kwargs.update(
            shape=args.shape, gradient_checkpointing=args.gradient_checkpointing, compile_layers=args.compile, eager_baseline=args.eager_baseline,
            fp32_baseline=args.fp32_baseline,
            lora_baseline=args.lora_baseline,
            profile=Path(args.profile) if args.profile else None,
            part_times=not args.no_part_syncs,
            group_by_length=args.group_by_length,
            reference=not args.no_reference,
            compile_mode=args.compile_mode,
            lora_dropout=args.lora_dropout,
            batches=args.batches or 1,
            shared_inputs=args.shared_inputs,
            micro_batch_size=args.micro_batch_size or 0,
            reference_micro_batch_size=args.reference_micro_batch_size,
            reference_eager=args.reference_eager,
        )
    if args.benchmark in ("step", "grouping") and args.batch_size:
        kwargs["batch_size"] = args.batch_size
    if args.benchmark == "eval" and args.samples:
        kwargs["num_samples"] = args.samples
    if args.benchmark == "eval" and args.shape:
        kwargs["shape"] = args.shape
    if args.benchmark == "export":
        kwargs.update(samples=args.samples, threads=args.threads)
    if args.benchmark == "grouping":
        if args.allow_pickle and not args.data:
            raise ConfigError("bench grouping: --allow-pickle applies to --data's pickles; no --data was given (the built-in synthetic data has none)")
        kwargs.update(data=args.data, allow_pickle=args.allow_pickle)
    result = module.run_bench(device, **kwargs)
    if args.note:
        result["note"] = args.note
    if not args.no_record:
        path = Path(args.results) if args.results else DEFAULT_RESULTS
        if args.results or path.parent.is_dir():
            record_markdown(result, module.markdown_table(result), path)
            print(f"appended to {path}", file=sys.stderr)
        else:
            print(f"not recorded: {path.parent}/ does not exist here (use --results FILE)", file=sys.stderr)
    if args.json:
        print_json(result)
    else:
        print("\n".join(module.markdown_table(result)))
        ratio = "-" if result["ratio"] is None else f"{result['ratio']:.2f}"
        print(f"ratio: {ratio} ({result['ratio_means']})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark our fast paths against the research code's formulations",
        description="Run one benchmark: inputs (batch assembly + placeholder substitution), adapter (one gated LoRA "
        "layer), step (a full teacher training step), eval (candidate scoring vs generation), export (teacher-output "
        "export throughput and RSS over a 1M-sample synthetic export), grouping (length-grouped batches vs plain order). Variants run interleaved after warm-up; medians "
        "are reported. The result (one JSON object with --json) is appended to bench/RESULTS.md when that directory exists.",
    )
    p.add_argument("benchmark", metavar="NAME", choices=BENCHMARKS, help=", ".join(BENCHMARKS))
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI smoke run)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (default) or cuda")
    p.add_argument("--repeats", type=int, default=None, metavar="N", help="measured rounds per variant (default per benchmark)")
    p.add_argument("--warmup", type=int, default=None, metavar="N", help="discarded warm-up rounds (default per benchmark)")
    p.add_argument(
        "--budget-s", dest="budget_s", type=float, default=None, metavar="S",
        help="start no new measured round after S seconds (beyond the minimum rounds; default per benchmark)",
    )
    p.add_argument("--hidden", type=int, default=None, metavar="H", help="inputs/adapter: hidden size (default 4096; 1024 with --quick)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None, metavar="B,B", help="inputs: batch sizes (default 8,32,128 on CUDA, 8,32 on CPU)")
    p.add_argument("--shape", default=None, choices=("tiny", "tiny-quick", "1b", "7b"), help="step, eval: model shape (default tiny; 1b/7b on CUDA; eval's tiny is the --llm tiny teacher)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="B", help="step: samples per step (default 8); grouping: batch size (default 16)")
    p.add_argument(
        "--micro-batch-size", type=positive_int, default=None, metavar="M",
        help="step: run each step's forward + backward in micro-batches of M samples (a divisor of --batch-size), then one optimizer step, as the trainer does",
    )
    p.add_argument(
        "--reference-micro-batch-size", type=positive_int, default=None, metavar="M",
        help="step: the reference's own micro-batches (a divisor of --batch-size; default: as ours), e.g. the most its "
        "memory allows, so both train on the same samples each as it can",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="step: recompute decoder layers in backward")
    p.add_argument(
        "--compile", action="store_true",
        help="step: torch.compile each decoder layer (a run past torch.compile's recompile limit, 8 graphs per timed variant, fails)",
    )
    p.add_argument(
        "--reference-eager", action="store_true",
        help="step (with --compile): the reference's layers run eager, as the research code runs them; ours compiled",
    )
    p.add_argument(
        "--eager-baseline", action="store_true", help="step: also time ours with eager attention (measures the default SDPA attention)"
    )
    p.add_argument(
        "--lora-baseline", action="store_true",
        help="step: also time plain LoRA on the same weights, without the gate (what iLoRA's gating costs)",
    )
    p.add_argument(
        "--shared-inputs", action="store_true",
        help="step: also time ours with the adapters of q/k/v and of gate/up grouped (one dropout mask and one A product "
        "per input: the teacher's share_adapter_inputs option)",
    )
    p.add_argument(
        "--fp32-baseline", action="store_true",
        help="step (CUDA, eager): also time ours with float32 weights and no autocast (measures bf16 autocast)",
    )
    p.add_argument(
        "--no-part-syncs", action="store_true",
        help="step: time whole steps without syncing the device between their parts (as training runs; no per-part times)",
    )
    p.add_argument(
        "--group-by-length", action="store_true",
        help="step: a length-grouped batch, as training with group_by_length forms them (default: random samples)",
    )
    p.add_argument(
        "--no-reference", action="store_true",
        help="step: leave the reference variant out (batches whose reference step does not fit in memory); no ratio, MFU is the headline",
    )
    p.add_argument(
        "--compile-mode", default=None, choices=("default", "max-autotune-no-cudagraphs"),
        help="step (with --compile): torch.compile's mode for the decoder layers (default: what training uses). Not "
        "reduce-overhead: its CUDA graphs fail when one compiled layer function serves every layer (bench/RESULTS.md)",
    )
    p.add_argument(
        "--lora-dropout", type=float, default=None, metavar="P",
        help="step: the adapters' dropout (default: the teacher's, 0.1; 0 measures what dropout costs)",
    )
    p.add_argument(
        "--batches", type=positive_int, default=None, metavar="N",
        help="step: cycle the steps through N batches of different lengths (length-grouped with --group-by-length, else "
        "random), as training meets them (default 1: one batch); the warm-up covers every batch, so recompilation for new "
        "shapes is not timed",
    )
    p.add_argument(
        "--profile", default=None, metavar="FILE",
        help="step: after timing, profile one step of ours (of ours_shared with --shared-inputs; torch.profiler) and write its top operators to FILE",
    )
    p.add_argument(
        "--samples", type=int, default=None, metavar="N",
        help="eval: samples to evaluate (default 64; 16 with --quick); export: samples to export (default 1,000,000; 20,000 with --quick)",
    )
    p.add_argument("--threads", type=int, default=None, metavar="N", help="export: torch intra-op threads for the run (default: torch's)")
    p.add_argument("--data", default=None, metavar="DIR", help="grouping: dataset whose train split is measured (default: the built-in synthetic one)")
    p.add_argument("--allow-pickle", action="store_true", help="grouping: allow reading --data's pandas pickles (.df; untrusted input)")
    p.add_argument("--results", default=None, metavar="FILE", help=f"append the result here (default {DEFAULT_RESULTS} if bench/ exists)")
    p.add_argument("--no-record", action="store_true", help="do not append the result to any file")
    p.add_argument("--note", default=None, help="a note recorded with the result (e.g. 'shared machine')")
    add_json_argument(p)
    p.set_defaults(run=run_bench_command)

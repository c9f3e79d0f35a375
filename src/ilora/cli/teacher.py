"""`ilora teacher train|eval|export`: the iLoRA teacher from the command line.

Started by ``torchrun`` (``WORLD_SIZE > 1``), each command joins the process group: train
is data-parallel, eval and export split their samples across ranks; only rank 0 writes
files and prints the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ilora.cli.common import (
    add_data_arguments, add_json_argument, add_run_arguments, add_threads_argument, candidate_count, load_data, nonnegative_int,
    optional_candidate_count, positive_int, print_json,
)
from ilora.config import add_arguments, add_config_arguments, config_from_args, torch_threads
from ilora.distributed import process_group, require_device
from ilora.errors import ConfigError, IloraError
from ilora.state_io import atomic_write_text, file_sha256, strict_json
from ilora.teacher.config import TeacherConfig

SPLIT_CHOICES = ("train", "val", "test")


def run_train(args: argparse.Namespace) -> int:
    from ilora.teacher.config import check_training_options
    from ilora.teacher.train import train_teacher

    cfg = config_from_args(TeacherConfig, args)
    check_training_options(cfg)
    if not Path(args.rec).is_dir():
        raise IloraError(f"{args.rec}: SASRec directory not found (train one with `ilora rec train`)")
    dataset = load_data(args)
    finished_before = args.resume and (Path(args.out) / "train_summary.json").is_file()
    with process_group(cfg.device) as ctx:
        summary = train_teacher(dataset, cfg, args.rec, args.out, resume=args.resume, overwrite=args.overwrite, ctx=ctx)
    if not ctx.is_main:
        return 0
    if args.json:
        print_json(summary)
    else:
        best = summary["best_val"] or {}
        what = f"training in {args.out} had already finished (nothing trained now)" if finished_before else f"teacher written to {args.out}"
        print(f"{what}; best val {cfg.select_metric} = {best.get(cfg.select_metric, float('nan')):.4f}")
    return 0


def check_gate_and_device(args: argparse.Namespace) -> TeacherConfig:
    """Before any data or model is read: ``--gate``'s spelling, ``--device``, then ``expert:N``
    against the saved teacher's config (a small JSON file), which it returns."""
    from ilora.teacher.build import read_teacher_config
    from ilora.teacher.model import parse_gate_mode

    parse_gate_mode(args.gate, None)
    require_device(args.device)
    saved = read_teacher_config(args.teacher)[0]
    parse_gate_mode(args.gate, saved.num_experts)
    return saved


def refuse_other_candidates(path: Path, candidates, args: argparse.Namespace) -> None:
    """``teacher eval --out``: an earlier eval's candidate file there must hold these very candidate
    sets, or the result files beside it would describe candidates that are no longer on disk."""
    import numpy as np

    from ilora.data.candidates import load_candidates

    if not path.is_file():
        return
    earlier = load_candidates(path)
    if earlier.shape == candidates.shape and np.array_equal(earlier, candidates):
        return
    limit = f", --limit {args.limit}" if args.limit else ""
    raise IloraError(
        f"{path} holds other candidate sets ({earlier.shape[0]} samples x {earlier.shape[1]}) than this eval's "
        f"({candidates.shape[0]} x {candidates.shape[1]} with --seed {args.seed}{limit}); the results "
        "beside it were computed on them: give another --out, or remove that directory's files to start over"
    )


def run_eval(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    import hashlib

    import numpy as np

    from ilora.data.candidates import candidate_sets, save_candidates
    from ilora.distributed import check_ranks_agree
    from ilora.outputs.export import teacher_identity
    from ilora.teacher.build import base_weights_sample, load_teacher
    from ilora.teacher.evaluate import evaluate_teacher, gate_file_tag, write_generations

    if args.max_new_tokens and args.protocol != "generate":  # before anything is read
        raise ConfigError(f"--max-new-tokens applies to the generate protocol only, not to {args.protocol!r}")
    check_gate_and_device(args)
    dataset = load_data(args)
    split = dataset.split(args.split)
    if args.limit:
        split = split.subset(slice(0, args.limit))
    candidates = candidate_sets(split, dataset.num_items, count=args.candidates, seed=args.seed, split_name=args.split)
    candidates_file = Path(args.out) / f"candidates_{args.split}.npy" if args.out else None
    if candidates_file is not None:  # before the teacher loads
        refuse_other_candidates(candidates_file, candidates, args)
    result = {"split": args.split, "protocol": args.protocol, "gate": args.gate, "candidates": args.candidates, "candidate_seed": args.seed}
    with process_group(args.device) as ctx:  # first: on CUDA it picks this rank's GPU
        bundle = load_teacher(args.teacher, dataset.catalog, device=args.device, trust_remote_code=args.trust_remote_code)
        check_ranks_agree(ctx, lambda: {  # a rank with a stale copy would score other samples into the shared metrics
            "teacher": {k: v for k, v in teacher_identity(args.teacher).items() if k != "path"},
            "llm": base_weights_sample(bundle.teacher.llm),
            "split": [len(split), split.sha256()],
            "candidates": hashlib.sha256(np.ascontiguousarray(candidates).tobytes()).hexdigest(),
            "options": {k: getattr(args, k) for k in ("protocol", "gate", "batch_size", "max_new_tokens")},
        }, "teacher, base LLM, samples and options")
        result.update(
            evaluate_teacher(
                bundle, split, candidates, protocol=args.protocol, gate_mode=args.gate,
                batch_size=args.batch_size, device=args.device, max_new_tokens=args.max_new_tokens or None, ctx=ctx,
                keep_generations=candidates_file is not None,
            )
        )
    if not ctx.is_main:
        return 0
    if candidates_file is not None:
        candidates_file.parent.mkdir(parents=True, exist_ok=True)
        save_candidates(candidates_file, candidates)
        result["candidates_file"] = candidates_file.name
        result["candidates_sha256"] = file_sha256(candidates_file)
        if "generations" in result:  # one JSON line per sample: what it generated and how that was judged
            result["generations_file"] = write_generations(candidates_file.parent, args.split, args.gate, result.pop("generations"))
        atomic_write_text(candidates_file.parent / f"eval_{args.split}_{args.protocol}_{gate_file_tag(args.gate)}.json", strict_json(result, indent=2))
    if args.json:
        print_json(result)
    else:
        for key, value in result.items():
            if key != "gate_stats":
                print(f"{key:<22} {value}")
        stats = result["gate_stats"]
        print(f"{'gate mean weight':<22} {[round(w, 4) for w in stats['mean_weight']]}")
        print(f"{'gate mean entropy':<22} {stats['mean_entropy']:.4f} (max {stats['max_entropy']:.4f})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    from ilora.dir_lock import refuse_if_busy
    from ilora.outputs.export import ExportOptions, check_export_input, export_teacher_outputs
    from ilora.teacher.build import load_teacher

    saved = check_gate_and_device(args)
    opts = ExportOptions(
        splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
        top_k=args.top_k,
        pool_sasrec=args.pool_sasrec,
        pool_candidates=args.pool_candidates,
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        gate=args.gate,
        device=args.device,
        limit=args.limit,
    )
    dataset = load_data(args)
    check_export_input(dataset, opts, saved.num_candidates)  # before loading the teacher
    with process_group(args.device) as ctx:  # first: on CUDA it picks this rank's GPU
        refuse_if_busy(args.out, ctx)  # before loading the teacher; the export claims --out itself
        bundle = load_teacher(args.teacher, dataset.catalog, device=args.device, trust_remote_code=args.trust_remote_code)
        result = export_teacher_outputs(bundle, dataset, args.out, opts, teacher_dir=args.teacher, overwrite=args.overwrite, ctx=ctx).to_dict()
    if not ctx.is_main:
        return 0
    if args.json:
        print_json(result)
    else:
        rows = ", ".join(f"{split} {count} rows" for split, count in result["splits"].items())
        now = f"{result['written']} exported now at {result['samples_per_s']} samples/s" if result["written"] else "already complete, nothing exported now"
        print(f"teacher outputs in {result['out']}: {rows}; {now}")
    return 0


def add_trust_remote_code_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="let a teacher trained with trust_remote_code run its base LLM's own Python code (refused without it)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("teacher", help="train, evaluate and export the iLoRA teacher", description="The iLoRA teacher: an LLM with per-sample gated LoRA experts.")
    sub = group.add_subparsers(dest="teacher_command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train",
        help="train a teacher on DATA with a trained SASRec",
        description="Train the iLoRA teacher (LoRA experts, gate network, projector) on DATA's train split; "
        "validate by the score protocol each epoch; write the best checkpoint to --out.",
    )
    add_data_arguments(train)
    train.add_argument("--rec", required=True, metavar="DIR", help="trained SASRec directory (ilora rec train / rec import-llara)")
    train.add_argument("--out", required=True, metavar="DIR", help="output directory for the teacher checkpoint and logs")
    add_run_arguments(train, "continue from the newest intact checkpoint in --out (see --checkpoint-every)")
    add_json_argument(train)
    add_arguments(train, TeacherConfig)
    add_config_arguments(train)
    train.set_defaults(run=run_train, distributed=True)

    ev = sub.add_parser(
        "eval",
        help="evaluate a teacher on fixed candidate sets",
        description="Evaluate a teacher on a split with fixed candidate sets (target + N-1 items not in the history). "
        "score: exact log-likelihood of every candidate title, ranked; generate: greedy generation and the "
        "iLoRA/LLaRA validity rule (exactly one candidate title in the output; hr@1 = correct / valid).",
    )
    add_data_arguments(ev)
    ev.add_argument("--teacher", required=True, metavar="DIR", help="teacher checkpoint directory (ilora teacher train --out)")
    ev.add_argument("--split", default="test", choices=SPLIT_CHOICES, help="split to evaluate [default: test]")
    ev.add_argument("--protocol", default="score", choices=("score", "generate"), help="score (default) or generate")
    ev.add_argument("--gate", default="learned", metavar="MODE", help="learned (default), uniform (plain LoRA) or expert:N (all weight on expert N, counted from 0)")
    ev.add_argument("--candidates", type=candidate_count, default=20, metavar="N", help="candidates per sample, target included [default: 20]")
    ev.add_argument("--seed", "--cand-seed", dest="seed", type=int, default=0, help="seed of the fixed candidate sets (--cand-seed of rec train and distill) [default: 0]")
    ev.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="prompts per batch [default: 16]")
    ev.add_argument(
        "--max-new-tokens", type=nonnegative_int, default=0, metavar="N",
        help="generate protocol: decode at most N tokens (0: the longest title + 8; LLaRA used 64) [default: 0]",
    )  # fmt: skip
    ev.add_argument("--limit", type=nonnegative_int, default=0, metavar="N", help="evaluate only the first N samples (0: all)")
    ev.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device [default: cpu]")
    add_trust_remote_code_argument(ev)
    add_threads_argument(ev)
    ev.add_argument("--out", default=None, metavar="DIR", help="also write the metrics and the candidate sets used here, and with --protocol generate each sample's output and verdict (refused if DIR holds other candidate sets of this split)")
    add_json_argument(ev)
    ev.set_defaults(run=run_eval, distributed=True)

    ex = sub.add_parser(
        "export",
        help="export the teacher's top-K, confidences, gates and item embeddings (for distillation)",
        description="For every sample of the requested splits: the teacher's top-K items ranked by exact log-likelihood "
        "over a candidate pool (SASRec's top-N unseen items + the sample's fixed candidates), their softmax confidences "
        "over the pool, the gate weights and SASRec's user embedding; plus every item's LLM embedding (mean last hidden "
        "state over its title tokens, uniform gate) and DLLM2Rec's files. Written in Parquet shards with a manifest; "
        "re-running the same command resumes an interrupted export.",
    )
    add_data_arguments(ex)
    ex.add_argument("--teacher", required=True, metavar="DIR", help="teacher checkpoint directory (ilora teacher train --out)")
    ex.add_argument("--out", required=True, metavar="DIR", help="output directory (layout: ilora/outputs/format.py)")
    ex.add_argument("--splits", default="train", metavar="LIST", help="comma-separated splits to export [default: train]")
    ex.add_argument("--top-k", type=positive_int, default=10, metavar="K", help="items kept per sample [default: 10]")
    ex.add_argument("--pool-sasrec", type=nonnegative_int, default=50, metavar="N", help="SASRec's top-N unseen items in the pool (0: none) [default: 50]")
    ex.add_argument("--pool-candidates", type=optional_candidate_count, default=20, metavar="N", help="fixed candidates in the pool and the prompt, 0 (none in the pool) or >= 2 [default: 20]")
    ex.add_argument("--shard-rows", type=positive_int, default=8192, metavar="N", help="rows per Parquet shard [default: 8192]")
    ex.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="prompts per batch [default: 16]")
    ex.add_argument("--gate", default="learned", metavar="MODE", help="learned (default), uniform or expert:N (counted from 0)")
    ex.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device [default: cpu]")
    add_trust_remote_code_argument(ex)
    add_threads_argument(ex)
    ex.add_argument("--limit", type=nonnegative_int, default=0, metavar="N", help="export only the first N samples of each split (0: all; `ilora distill --train-limit N` trains on the train samples such a partial export covers)")
    ex.add_argument("--overwrite", action="store_true", help="replace an export of another teacher, dataset or options in --out")
    add_json_argument(ex)
    ex.set_defaults(run=run_export, distributed=True)

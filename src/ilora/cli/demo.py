"""`ilora demo`: the whole pipeline on the embedded synthetic default, offline, on CPU.

Stages (each writes into ``--out``):
  1. data     a synthetic dataset (`ilora data synth` defaults) in the native format
  2. sasrec   SASRec trained with early stopping on validation, evaluated on test
  3. teacher  a tiny-Llama iLoRA teacher trained on top of that SASRec, evaluated on the
              test candidates with the learned, uniform and single-expert gates
Then it prints one table: full-ranking and candidate metrics, popularity vs SASRec, and
the teacher's candidate metrics next to SASRec's on the same fixed candidates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ilora.cli.common import add_json_argument, print_json


def _log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    from ilora.data import SeqDataset, candidate_sets, make_synthetic, read_native, write_native
    from ilora.rec.evaluate import evaluate_popularity, evaluate_sasrec
    from ilora.rec.sasrec import load_sasrec
    from ilora.rec.train import RecTrainConfig, train_sasrec
    from ilora.teacher.build import load_teacher
    from ilora.teacher.config import TeacherConfig
    from ilora.teacher.evaluate import evaluate_teacher
    from ilora.teacher.train import train_teacher

    out = Path(args.out)
    started = time.perf_counter()
    data_dir = out / "data"
    if not data_dir.exists():
        _log(f"1/3 synthetic data ({args.users} users, {args.items} items) -> {data_dir}")
        write_native(make_synthetic(users=args.users, items=args.items, seed=args.seed), data_dir)
    dataset = read_native(data_dir)

    _log("2/3 SASRec: train with early stopping on val")
    rec_dir = out / "sasrec"
    train_sasrec(dataset, RecTrainConfig(epochs=args.rec_epochs, seed=args.seed), rec_dir)
    rec = load_sasrec(rec_dir)
    test = dataset.split("test")
    cands = candidate_sets(test, dataset.num_items, count=20, seed=0, split_name="test")
    sasrec = evaluate_sasrec(rec, dataset, "test", candidates=cands)
    popularity = evaluate_popularity(dataset, "test", candidates=cands)

    _log("3/3 iLoRA teacher (tiny Llama, 4 experts x rank 2): train, then score the test candidates")
    teacher_dir = out / "teacher"
    cfg = TeacherConfig(max_steps=args.teacher_steps, batch_size=16, lr=2e-3, val_samples=100, seed=args.seed)
    train_teacher(dataset, cfg, rec_dir, teacher_dir)
    bundle = load_teacher(teacher_dir, dataset.catalog)
    limit = min(len(test), args.teacher_eval)
    sub, sub_cands = test.subset(slice(0, limit)), cands[:limit]
    teacher = {
        gate: evaluate_teacher(bundle, sub, sub_cands, dataset.catalog.titles, gate_mode=gate, batch_size=32)
        for gate in ("learned", "uniform", "expert:0", "expert:1")
    }
    sasrec_sub = evaluate_sasrec(rec, SeqDataset(dataset.catalog, {"test": sub}, dataset.source), "test", candidates=sub_cands)
    result = {
        "dataset": {"users": args.users, "items": args.items, **{k: len(v) for k, v in dataset.splits.items() if v is not None}},
        "popularity": popularity,
        "sasrec": sasrec,
        "teacher_test_samples": limit,
        "sasrec_cand_hr@1_same_samples": sasrec_sub["cand_hr@1"],
        "teacher": teacher,
        "seconds": round(time.perf_counter() - started, 1),
        "out": str(out),
    }
    if args.json:
        print_json(result)
    else:
        print(format_table(result))
    return 0


def format_table(r: dict) -> str:
    keys = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@10", "cand_hr@1")
    lines = [f"ilora demo: synthetic data, {r['dataset']['users']} users, {r['dataset']['items']} items, test {r['dataset']['test']} samples", ""]
    lines.append(f"{'model (full ranking)':<26}" + "".join(f"{k:>11}" for k in keys))
    for name in ("popularity", "sasrec"):
        lines.append(f"{name:<26}" + "".join(f"{r[name][k]:>11.4f}" for k in keys))
    lines += ["", f"teacher, score protocol on the first {r['teacher_test_samples']} test samples (20 fixed candidates):"]
    lines.append(f"{'gate':<26}{'hr@1':>11}{'ndcg@5':>11}{'mrr':>11}{'gate entropy':>14}")
    for gate, m in r["teacher"].items():
        lines.append(f"{gate:<26}{m['hr@1']:>11.4f}{m['ndcg@5']:>11.4f}{m['mrr']:>11.4f}{m['gate_stats']['mean_entropy']:>14.3f}")
    lines.append(f"{'sasrec (same candidates)':<26}{r['sasrec_cand_hr@1_same_samples']:>11.4f}")
    lines += ["", f"done in {r['seconds']} s; artefacts in {r['out']}"]
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the pipeline on the embedded synthetic default (offline, CPU)",
        description="Synthetic data -> SASRec -> tiny iLoRA teacher, evaluated, with a printed table.",
    )
    p.add_argument("--out", default="demo_out", metavar="DIR", help="working directory [default: demo_out]")
    p.add_argument("--users", type=int, default=1000, help="synthetic users [default: 1000]")
    p.add_argument("--items", type=int, default=500, help="synthetic items [default: 500]")
    p.add_argument("--seed", type=int, default=0, help="seed of data, SASRec and teacher [default: 0]")
    p.add_argument("--rec-epochs", type=int, default=20, help="SASRec epochs (early stopping on val) [default: 20]")
    p.add_argument("--teacher-steps", type=int, default=150, help="teacher optimiser steps [default: 150]")
    p.add_argument("--teacher-eval", type=int, default=200, help="test samples the teacher scores [default: 200]")
    add_json_argument(p)
    p.set_defaults(run=run_demo)

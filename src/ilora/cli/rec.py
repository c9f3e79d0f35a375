"""`ilora rec ...`: train, evaluate and import SASRec models.

* ``ilora rec train DATA --out DIR``: train on DATA's train split, select on val, write
  the model directory (what ``rec eval --model`` and the teacher take).
* ``ilora rec eval DATA --model DIR``: full-ranking and candidate metrics of a model on
  one split, next to the train-popularity baseline.
* ``ilora rec import-llara CKPT.pt --out DIR --allow-pickle``: convert a LLaRA / iLoRA
  SASRec checkpoint into a model directory, without running its code.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from ilora.cli.common import add_data_arguments, add_json_argument, add_run_arguments, add_threads_argument, load_data, optional_candidate_count, print_json
from ilora.config import add_arguments, add_config_arguments, config_from_args, torch_threads
from ilora.errors import IloraError

log = logging.getLogger(__name__)


def _print_result(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        print_json(result)
        return
    def shown(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key}: " + " ".join(f"{k}={shown(v)}" for k, v in value.items()))
        elif value is not None:  # e.g. resumed_from of a run that started fresh: nothing to say
            print(f"{key}: {shown(value)}")


def run_train(args: argparse.Namespace) -> int:
    from ilora.rec.train import RecTrainConfig, train_sasrec

    cfg = config_from_args(RecTrainConfig, args)
    cfg.validate()
    dataset = load_data(args)
    result = train_sasrec(dataset, cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    _print_result(args, result)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ilora.rec.evaluate import evaluate_popularity, evaluate_sasrec
    from ilora.rec.sasrec import load_sasrec

    if args.candidates < 0:
        raise IloraError("--candidates must be >= 0")
    if args.save_candidates and not args.candidates:
        raise IloraError("--save-candidates needs --candidates > 0 (with 0 there are no candidate sets to save)")
    dataset = load_data(args)
    model = load_sasrec(args.model)
    kwargs = dict(count=args.candidates, cand_seed=args.seed, mask_history=args.mask_history, batch_size=args.batch_size)
    with torch_threads(args.threads):
        result = evaluate_sasrec(model, dataset, args.split, candidates_out=args.save_candidates, source=args.model, **kwargs)  # type: ignore[arg-type]
        popularity = evaluate_popularity(dataset, args.split, **kwargs)  # type: ignore[arg-type]
    result["model"] = str(args.model)
    if args.save_candidates:
        result["candidates_file"] = str(args.save_candidates)
    result["popularity"] = popularity
    _print_result(args, result)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from ilora.checkpointing import earlier_run, earlier_run_error
    from ilora.rec.llara_import import import_llara_checkpoint
    from ilora.rec.sasrec import WEIGHTS_FILE, count_parameters

    earlier = None if args.overwrite else earlier_run(Path(args.out), "result.json", (WEIGHTS_FILE, "config.json"))
    if earlier:  # a trained SASRec (or an earlier import) is not replaced without asking; an import resumes nothing
        raise earlier_run_error(args.out, dataclasses.replace(earlier, resumable=False))
    model = import_llara_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle)
    out = model.save(args.out)
    cfg = model.config
    result = {
        "out": str(out),
        "num_items": cfg.num_items,
        "max_len": cfg.max_len,
        "hidden": cfg.hidden,
        "heads": cfg.heads,
        "blocks": cfg.blocks,
        "parameters": count_parameters(model),
    }
    _print_result(args, result)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    rec = subparsers.add_parser("rec", help="SASRec: train, evaluate, import LLaRA checkpoints", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = rec.add_subparsers(dest="rec_command", metavar="SUBCOMMAND", required=True)

    train = sub.add_parser("train", help="train SASRec (selection on val only) and save the model directory")
    add_data_arguments(train)
    train.add_argument("--out", required=True, type=Path, help="output directory (model.safetensors, config.json, metrics.csv, tb/)")
    add_run_arguments(train, "continue from the newest intact checkpoint in --out (see --checkpoint-every)")
    add_json_argument(train)
    from ilora.rec.train import RecTrainConfig

    add_arguments(train, RecTrainConfig)
    add_config_arguments(train)
    train.set_defaults(run=run_train)

    ev = sub.add_parser("eval", help="evaluate a SASRec model (and the popularity baseline) on a split")
    add_data_arguments(ev)
    ev.add_argument("--model", required=True, type=Path, help="model directory from `ilora rec train` or `rec import-llara`")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to evaluate [default: test]")
    ev.add_argument("--mask-history", action="store_true", help="leave each sample's history items out of the full ranking")
    ev.add_argument("--candidates", type=optional_candidate_count, default=20, metavar="N", help="candidate-set size for cand_hr@1 (0: none) [default: 20]")
    ev.add_argument("--seed", "--cand-seed", dest="seed", type=int, default=0, help="seed of the fixed candidate sets (--cand-seed of rec train and distill) [default: 0]")
    ev.add_argument("--batch-size", type=int, default=1024, help="samples per batch [default: 1024]")
    ev.add_argument("--save-candidates", type=Path, default=None, metavar="FILE.npy", help="also write the candidate sets used to FILE.npy (int64 (samples, N), no pickle)")
    add_threads_argument(ev)
    add_json_argument(ev)
    ev.set_defaults(run=run_eval)

    imp = sub.add_parser("import-llara", help="convert a LLaRA/iLoRA SASRec checkpoint (.pt) without running its code")
    imp.add_argument("checkpoint", type=Path, metavar="CKPT.pt", help="whole-module torch.save checkpoint")
    imp.add_argument("--out", required=True, type=Path, help="output model directory")
    imp.add_argument("--overwrite", action="store_true", help="replace a model (or a training run's files) already in --out")
    imp.add_argument(
        "--allow-pickle",
        action="store_true",
        help="required: the checkpoint is a pickle; it is read by a restricted unpickler that runs none of its code",
    )
    add_json_argument(imp)
    imp.set_defaults(run=run_import)

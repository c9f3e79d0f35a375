"""The pipeline: data -> SASRec (trained, then evaluated) -> teacher -> evaluation -> teacher outputs -> students -> report.

Every stage runs through `ilora.pipeline.stages.run_stage`, so an interrupted run
continues where it stopped and a changed option reruns exactly the stages it affects.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

from ilora.config import to_dict, torch_threads
from ilora.data import SeqDataset, candidate_sets, load_dataset, read_native, synthetic_from_config, write_native
from ilora.data.io import filter_min_len
from ilora.dir_lock import claim_out_dir
from ilora.errors import IloraError
from ilora.distill.train import without_added_defaults as distill_without_added_defaults
from ilora.pipeline.config import DEVICE_SECTIONS, RunConfig, check_devices, check_run_config
from ilora.pipeline.stages import run_stage
from ilora.state_io import atomic_write_text
from ilora.teacher.config import same_teacher_form

log = logging.getLogger(__name__)


def _gate_modes(cfg: RunConfig) -> list[str]:
    modes: list[str] = []
    for gate in cfg.eval.gates:
        modes += [f"expert:{e}" for e in range(cfg.teacher.num_experts)] if gate == "experts" else [gate]
    return modes


RESULT_FILES = ("result.json", "train_summary.json")  # what a finished trainer (or distill student) leaves


def _has_earlier_work(directory: Path) -> bool:
    """Whether an interrupted run of this stage left training checkpoints or finished trainers
    here (`run_stage` keeps a directory only for the same config): the stage then resumes
    them, and a finished one (the baseline student beside an unfinished distilled one) is
    returned instead of being trained again."""
    return any(directory.glob("**/checkpoints/step-*")) or any(any(directory.glob(f"**/{name}")) for name in RESULT_FILES)


def check_data_path(cfg: RunConfig) -> None:
    """`DataError` naming ``data.path`` (and what a relative one was resolved against) if it is
    missing: checked before the data stage's directory is touched."""
    from ilora.data.io import not_found

    if cfg.data.path and not Path(cfg.data.path).exists():
        raise not_found(Path(cfg.data.path))


def load_source(cfg: RunConfig) -> SeqDataset | None:
    """The dataset at ``data.path`` as the data stage writes it; None for synthetic data, and
    for a ``data.path`` that is missing (`run_data_stage` says what then)."""
    if not cfg.data.path or not Path(cfg.data.path).exists():
        return None
    return load_dataset(cfg.data.path, format=cfg.data.format, allow_pickle=cfg.data.allow_pickle, min_len=cfg.data.min_len)


def data_stage_config(cfg: RunConfig, source: SeqDataset | None = None) -> dict:
    """The data stage's record: the data section, with the fingerprint of the ``source`` read
    from ``data.path`` (`load_source`: editing the files reruns the stage and every stage
    after it, which a path alone would leave up to date), and marked where synthetic data is
    filtered by ``min_len`` (a stage recorded before that filter existed holds unfiltered data)."""
    config = to_dict(cfg.data)
    if not cfg.data.path and cfg.data.min_len > 1:
        config["min_len_filters_synthetic"] = True
    if source is not None:
        config["source_sha256"] = source.sha256()
    return config


def data_stage_legacy(directory: Path):
    """For a data stage record in ``directory``: one recorded before the source's fingerprint
    was (`data_stage_config`) stands for the same work while the dataset its run wrote there is
    the one the source gives today."""

    @functools.cache
    def written_sha256() -> str | None:  # read once, though a comparison asks for both records' forms
        written = directory / "dataset"
        return read_native(written).sha256() if (written / "dataset.json").is_file() else None

    def legacy(config):
        sha = config.get("source_sha256") if isinstance(config, dict) else None
        if sha is not None and written_sha256() == sha:
            return {k: v for k, v in config.items() if k != "source_sha256"}
        return config

    return legacy


def stage_data(cfg: RunConfig, directory: Path, source: SeqDataset | None = None) -> dict:
    """Write the dataset: ``source`` (`load_source`) for a ``data.path``, else the synthetic one."""
    if cfg.data.path:
        check_data_path(cfg)
        ds = source if source is not None else load_source(cfg)
    else:
        ds = synthetic_from_config(cfg.data.synth)
        if cfg.data.min_len > 1:
            ds = filter_min_len(ds, cfg.data.min_len)
    write_native(ds, directory / "dataset", overwrite=True)
    return {"source": cfg.data.path or "synthetic", **{f"{k}_rows": (len(v) if v is not None else None) for k, v in ds.splits.items()}, "num_items": ds.num_items}


def run_data_stage(cfg: RunConfig, run_dir: Path, check=lambda: None) -> tuple[str, dict]:
    """`run_stage` of the data stage, keyed by the data section and what ``data.path`` holds
    (`load_source`, `data_stage_config`); its token and result. A ``data.path`` since removed
    leaves a finished stage of the same options in use, with a warning; a stage with work to do
    refuses it (`check_data_path`) before its directory is touched."""
    source = load_source(cfg)

    def checks() -> None:
        check_data_path(cfg)
        check()

    token, result = run_stage(
        run_dir, "data", data_stage_config(cfg, source), [], lambda d: stage_data(cfg, d, source), legacy_in=data_stage_legacy, check=checks
    )
    if cfg.data.path and source is None:
        log.warning("warning: data.path %s: not found; the run goes on with the dataset its data stage wrote (%s)", cfg.data.path, run_dir / "data" / "dataset")
    return token, result


def stage_sasrec(cfg: RunConfig, dataset: SeqDataset, directory: Path) -> dict:
    from ilora.rec.train import train_sasrec

    return train_sasrec(dataset, cfg.rec, directory / "model", resume=_has_earlier_work(directory), overwrite=True)


def teacher_stage_config(cfg: RunConfig) -> dict:
    """The teacher stage's record: the teacher section and, for a template file (not a packaged
    domain), the fingerprint of the template it holds, so that editing the file retrains the
    teacher (its name alone would leave the stage up to date)."""
    from ilora.teacher.prompts import DOMAINS, load_template

    config = to_dict(cfg.teacher)
    if cfg.teacher.domain not in DOMAINS:
        config["domain_template_sha256"] = load_template(cfg.teacher.domain).sha256()
    return config


def sasrec_eval_config(cfg: RunConfig) -> dict:
    """What `stage_sasrec_eval` reads of the config: changing anything else (the teacher's
    evaluation protocols, gates, batch size or sample limit) leaves it, and SASRec, up to date."""
    return {"split": cfg.eval.split, "candidates": cfg.eval.candidates, "seed": cfg.eval.seed, "mask_history": cfg.rec.mask_history}


def stage_sasrec_eval(cfg: RunConfig, dataset: SeqDataset, rec_dir: Path) -> dict:
    """SASRec and the train-popularity baseline on the whole evaluation split (full ranking and
    the fixed candidates), with the history masking SASRec was trained to be evaluated with."""
    from ilora.rec.evaluate import evaluate_popularity, evaluate_sasrec
    from ilora.rec.sasrec import load_sasrec

    split = cfg.eval.split
    cands = candidate_sets(dataset.split(split), dataset.num_items, count=cfg.eval.candidates, seed=cfg.eval.seed, split_name=split)
    mask = cfg.rec.mask_history
    with torch_threads(cfg.rec.threads):
        return {
            "sasrec": evaluate_sasrec(load_sasrec(rec_dir), dataset, split, candidates=cands, mask_history=mask),
            "popularity": evaluate_popularity(dataset, split, candidates=cands, mask_history=mask),
        }


def stage_teacher(cfg: RunConfig, dataset: SeqDataset, rec_dir: Path, directory: Path) -> dict:
    from ilora.teacher.train import train_teacher

    summary = train_teacher(dataset, cfg.teacher, rec_dir, directory / "model", resume=_has_earlier_work(directory), overwrite=True)
    return {"best_val": summary["best_val"], "steps": summary["steps"]}


def stage_eval(cfg: RunConfig, dataset: SeqDataset, teacher_dir: Path, rec_dir: Path, directory: Path) -> dict:
    from ilora.data import save_candidates
    from ilora.rec.evaluate import evaluate_sasrec
    from ilora.rec.sasrec import load_sasrec
    from ilora.teacher.build import load_teacher
    from ilora.teacher.evaluate import evaluate_teacher, write_generations

    split = dataset.split(cfg.eval.split)
    cands = candidate_sets(split, dataset.num_items, count=cfg.eval.candidates, seed=cfg.eval.seed, split_name=cfg.eval.split)
    if cfg.eval.limit:
        split, cands = split.subset(slice(0, cfg.eval.limit)), cands[: cfg.eval.limit]
    save_candidates(directory / f"candidates_{cfg.eval.split}.npy", cands)
    with torch_threads(cfg.teacher.threads):  # the teacher's stages run with its threads
        bundle = load_teacher(teacher_dir, dataset.catalog, device=cfg.teacher.device, trust_remote_code=cfg.teacher.trust_remote_code)
        results: dict = {"split": cfg.eval.split, "samples": len(split), "teacher": {}}
        for protocol in cfg.eval.protocols:
            for gate in _gate_modes(cfg):
                metrics = evaluate_teacher(
                    bundle, split, cands, protocol=protocol, gate_mode=gate,
                    batch_size=cfg.eval.batch_size, device=cfg.teacher.device,
                    max_new_tokens=(cfg.eval.max_new_tokens or None) if protocol == "generate" else None,
                    keep_generations=protocol == "generate",
                )
                if "generations" in metrics:  # what each sample generated and how it was judged, beside the results
                    metrics["generations_file"] = write_generations(directory, cfg.eval.split, gate, metrics.pop("generations"))
                results["teacher"][f"{protocol}/{gate}"] = metrics
        same = SeqDataset(dataset.catalog, {cfg.eval.split: split}, dataset.source)
        results["sasrec_same_candidates"] = evaluate_sasrec(load_sasrec(rec_dir), same, cfg.eval.split, candidates=cands, mask_history=cfg.rec.mask_history)
    return results


def stage_export(cfg: RunConfig, dataset: SeqDataset, teacher_dir: Path, directory: Path) -> dict:
    from ilora.outputs.export import export_teacher_outputs
    from ilora.teacher.build import load_teacher

    with torch_threads(cfg.teacher.threads):
        bundle = load_teacher(teacher_dir, dataset.catalog, device=cfg.export.device, trust_remote_code=cfg.teacher.trust_remote_code)
        result = export_teacher_outputs(bundle, dataset, directory / "outputs", cfg.export, teacher_dir=teacher_dir)
    return result.to_dict()


def stage_distill(cfg: RunConfig, dataset: SeqDataset, outputs_dir: Path, directory: Path) -> dict:
    from ilora.distill.train import DISTILL_COLUMNS, distill
    from ilora.outputs import read_teacher_outputs

    outputs = read_teacher_outputs(outputs_dir, ("train",), columns=DISTILL_COLUMNS, embeddings=cfg.distill.w_ed > 0)
    result = distill(dataset, outputs, cfg.distill, directory, source=str(outputs_dir), resume=_has_earlier_work(directory), overwrite=True)
    summary = {"baseline": result["baseline"]["test"], "distilled": result["distilled"]["test"], "gain": result["gain"], "gain_interval": result["gain_interval"]}
    if cfg.distill.train_limit:
        summary["train_samples"] = {"used": cfg.distill.train_limit, "of": len(dataset.split("train"))}
    if "control" in result:
        control = result["control"]
        summary["control"] = {"seed": control["seed"], "test": control["test"], "gain": control["gain"], "gain_interval": control["gain_interval"]}
    return summary


def check_teacher_input(cfg: RunConfig, dataset: SeqDataset) -> None:
    """What the teacher, evaluation, export and distill stages would refuse in the data (an empty
    train or val split, an empty evaluation split, candidate sets a row cannot fill, a
    ``distill.train_limit`` beyond the train split), checked before SASRec trains, not after."""
    from ilora.data.candidates import check_candidate_room
    from ilora.teacher.train import split_with_samples, val_subset

    split_with_samples(dataset, "train", "teacher training needs training samples")
    split_with_samples(dataset, "val", "teacher training validates every epoch and keeps the best epoch by it")
    split_with_samples(dataset, cfg.eval.split, f"the eval stage evaluates it (eval.split={cfg.eval.split})")
    for name, split in (("train", dataset.split("train")), ("val", val_subset(dataset.split("val"), cfg.teacher.val_samples))):
        check_candidate_room(split, dataset.num_items, count=cfg.teacher.num_candidates, split_name=name)
    check_candidate_room(dataset.split(cfg.eval.split), dataset.num_items, count=cfg.eval.candidates, split_name=cfg.eval.split)
    check_export_and_students_input(cfg, dataset)


def check_export_and_students_input(cfg: RunConfig, dataset: SeqDataset) -> None:
    """What the export and distill stages would refuse in the data: run before SASRec trains
    (`check_teacher_input`) and again before an export with work to do, when the stages before
    it are up to date (a ``distill.train_limit`` beyond the train split was found only after the export)."""
    from ilora.outputs.export import check_export_input

    check_export_input(dataset, cfg.export, cfg.teacher.num_candidates)
    check_students_input(cfg, dataset)


def check_students_input(cfg: RunConfig, dataset: SeqDataset) -> None:
    """What the students' training would refuse in the train samples they read (the first
    ``distill.train_limit``, `first_train_samples`)."""
    from ilora.distill.train import first_train_samples
    from ilora.rec.train import check_training_input

    check_training_input(first_train_samples(dataset, cfg.distill.train_limit), cfg.distill)


RUN_SECTIONS = {"data", "rec", "teacher", "eval", "export", "distill"}
STAGES = ("data", "sasrec", "sasrec_eval", "teacher", "eval", "export", "distill")


def check_run_dir(run_dir: Path) -> None:
    """`IloraError` if ``run_dir`` holds something a run would overwrite or delete that is not
    a run's own: a ``config.json`` that is no run config (a model directory's, say), or, where
    there is no run config, a directory named like a stage (``data/``, ``teacher/``, their
    ``.previous`` and ``.interrupted``) without a stage record. Other files (a log, the run's YAML) are left alone."""
    from ilora.pipeline.stages import INTERRUPTED, PREVIOUS, is_stage_dir

    stage_dirs = [
        p for name in STAGES for p in (run_dir / name, run_dir / f"{name}{PREVIOUS}", run_dir / f"{name}{INTERRUPTED}") if p.is_dir() and not p.is_symlink()
    ]
    config = run_dir / "config.json"
    if config.exists():
        try:
            recorded = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = None
        if (isinstance(recorded, dict) and RUN_SECTIONS <= set(recorded)) or any(is_stage_dir(p) for p in stage_dirs):
            return  # a run's config.json (an early version's lacked some sections; its stage records tell)
        raise IloraError(f"{config}: not the config.json of an `ilora run`, which would overwrite it; use another --out")
    for path in stage_dirs:
        if any(path.iterdir()) and not is_stage_dir(path):
            raise IloraError(
                f"{path}: not a stage directory of an `ilora run` (no stage.json or stage.pending), which the run would "
                "replace; use another --out"
            )


def run_pipeline(cfg: RunConfig) -> dict:
    """Run (or resume) every stage; write ``report.md`` and plots; return the summary."""
    from ilora.pipeline.report import write_report
    from ilora.rec.train import check_training_input

    check_run_config(cfg)

    def devices(*sections: str, then=None):
        """The check of a stage that has work, run before its directory is touched: the devices of
        the sections it and the stages that read it (transitively: they run again after it) use,
        then ``then`` (what the stage's own work would refuse in its input)."""

        def check() -> None:
            check_devices(cfg, sections)
            if then is not None:
                then()

        return check

    with claim_out_dir(cfg.out) as run_dir:  # one process per run directory
        check_run_dir(run_dir)
        results: dict = {}

        data_key, results["data"] = run_data_stage(cfg, run_dir, check=devices(*DEVICE_SECTIONS))
        dataset = read_native(run_dir / "data" / "dataset")
        rec_key, trained = run_stage(
            run_dir, "sasrec", to_dict(cfg.rec), [data_key], lambda d: stage_sasrec(cfg, dataset, d), keep_partial=True,
            check=devices(*DEVICE_SECTIONS, then=lambda: (check_training_input(dataset, cfg.rec), check_teacher_input(cfg, dataset))),
        )
        results["sasrec_train"] = {k: trained.get(k) for k in ("best_epoch", "epochs_run", "steps", "seconds")}
        rec_dir = run_dir / "sasrec" / "model"
        _, results["sasrec"] = run_stage(run_dir, "sasrec_eval", sasrec_eval_config(cfg), [rec_key], lambda d: stage_sasrec_eval(cfg, dataset, rec_dir))
        teacher_key, results["teacher"] = run_stage(
            run_dir, "teacher", teacher_stage_config(cfg), [rec_key], lambda d: stage_teacher(cfg, dataset, rec_dir, d), keep_partial=True,
            legacy=same_teacher_form, check=devices("teacher", "export", "distill", then=lambda: check_teacher_input(cfg, dataset)),
        )
        teacher_dir = run_dir / "teacher" / "model"
        _, results["eval"] = run_stage(
            run_dir, "eval", to_dict(cfg.eval), [teacher_key], lambda d: stage_eval(cfg, dataset, teacher_dir, rec_dir, d), check=devices("teacher")
        )
        export_key, results["export"] = run_stage(
            run_dir, "export", to_dict(cfg.export), [teacher_key], lambda d: stage_export(cfg, dataset, teacher_dir, d), keep_partial=True,
            check=devices("export", "distill", then=lambda: check_export_and_students_input(cfg, dataset)),
        )
        outputs_dir = run_dir / "export" / "outputs"
        _, results["distill"] = run_stage(
            run_dir, "distill", to_dict(cfg.distill), [export_key, data_key], lambda d: stage_distill(cfg, dataset, outputs_dir, d), keep_partial=True,
            legacy=distill_without_added_defaults, check=devices("distill", then=lambda: check_students_input(cfg, dataset)),
        )
        summary = {"out": str(run_dir), **results, "config": to_dict(cfg)}
        # written with the report, once every stage is current: config.json, summary.json and report.md describe one run
        atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
        write_report(run_dir, summary)
        print(f"[run] report: {run_dir / 'report.md'}", file=sys.stderr, flush=True)
        return summary

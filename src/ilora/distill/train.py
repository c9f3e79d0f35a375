"""Distil a teacher's outputs into SASRec (DLLM2Rec) and compare with the undistilled baseline.

`distill` trains two students with `ilora.rec.train.train_sasrec` (one training loop for
both), with the same seed, split, epochs and early stopping on the validation split:

* ``baseline``: SASRec with the recommendation loss only (plus the DRO term when
  ``dro_alpha > 0``, as DLLM2Rec's baseline);
* ``distilled``: the same loss plus ``lambda_d`` x importance-aware ranking distillation
  over the teacher's top-``top_k`` items (`ilora.distill.losses`), and, when
  ``w_ed > 0``, the teacher's item embeddings added to the student's
  (`ilora.distill.student`).

Each student is checkpointed and resumed on its own (``checkpoint_every``, ``resume``;
`ilora.checkpointing`). Each model directory (``baseline/``, ``distilled/``) is what ``ilora rec train`` writes
(the distilled student saved folded, as a plain SASRec). ``result.json`` holds both
runs' test metrics (full-ranking HR/NDCG@1,5,10,20, plus candidate metrics when
``eval_candidates > 0``), the relative gain per metric,
``(distilled - baseline) / baseline`` (``null`` when the baseline is 0), and
``gain_interval``: for each full-ranking metric a 95 % paired-bootstrap interval of that gain
over the test samples and the counts of samples the distilled student ranks better, worse
or the same (`ilora.distill.significance`). The interval covers the test sample, not training
randomness; with ``control_seed`` a third student, ``control``, is the baseline trained with
that seed, and ``result.json``'s ``control`` holds its gain over the baseline and that gain's
interval: how far another seed alone moves the metrics.

Teacher outputs are matched to the dataset before training: the same number of items
(and the same catalog, when the manifest records its fingerprint), one train row per
train sample, ids inside the catalog, at least ``top_k`` items per row.

``train_limit`` N trains all students on the first N train samples only (validation and
test stay whole): a quick trial, or the samples a partial export (``ilora teacher export
--limit N``) covers. The teacher rows are then the first N of the export, which must cover
them; a full export serves any N.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ilora.checkpointing import check_resume_config, refuse_earlier_run
from ilora.config import option, to_dict, without_added_defaults as drop_added_defaults
from ilora.data.dataset import SeqDataset
from ilora.dir_lock import claims_out_dir
from ilora.distill.losses import dro_loss, importance_weights, propensity_scores, ranking_distillation_loss
from ilora.distill.significance import paired_gain_intervals
from ilora.distill.student import student_factory
from ilora.errors import ConfigError, IloraError
from ilora.outputs.format import TeacherOutputs
from ilora.rec.evaluate import load_ranks
from ilora.rec.metrics import FULL_KS, metrics_from_ranks
from ilora.rec.sasrec import WEIGHTS_FILE
from ilora.rec.train import TEST_RANKS_FILE, RecTrainConfig, TrainBatch, check_training_input, train_sasrec
from ilora.state_io import atomic_write_text, read_json

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
DISTILL_COLUMNS = ("topk_items", "topk_confidence")  # what `distill` reads of the teacher outputs' rows


# Options added after distillation runs were first recorded, with the value that reproduces those
# runs: `ilora run` keeps a distill stage recorded without them current while they keep that value.
ADDED_OPTIONS: dict[str, object] = {"control_seed": None, "train_limit": 0}


def without_added_defaults(config: dict) -> dict:
    """``config`` (a ``DistillConfig`` as a dict) as a version before `ADDED_OPTIONS` recorded
    it: those entries dropped where they hold their old values (kept where they do not)."""
    return drop_added_defaults(config, ADDED_OPTIONS)


@dataclass
class DistillConfig(RecTrainConfig):
    """Options of `distill` / ``ilora distill``: SASRec training plus DLLM2Rec's distillation."""

    loss: Literal["ce", "bce"] = option("bce", "recommendation loss: bce = target vs sampled negatives (DLLM2Rec); ce = softmax cross-entropy")
    top_k: int = option(10, "teacher top-K items distilled per sample (the first K of the exported list)")
    lambda_d: float = option(0.8, "weight of the importance-aware ranking distillation loss (0: none)")
    beta: float = option(1.0, "position weight temperature: w_position ~ exp(-rank / beta)")
    gamma_position: float = option(0.3, "factor of the position-aware weights (summing to 1 over the K items) in the importance weights")
    gamma_confidence: float = option(0.5, "factor of the teacher-confidence weights (summing to 1 over the K items) in the importance weights")
    gamma_consistency: float = option(
        0.1, "factor of the teacher/student agreement in the importance weights: 1 per teacher item also in the student's "
        "top-K, not normalised (as DLLM2Rec), so its part of a row can reach K x gamma_consistency before the row is normalised"
    )
    w_ed: float = option(0.2, "weight of the teacher's projected item embedding added to the student's (0: no embedding distillation)")
    dro_alpha: float = option(0.0, "weight of DLLM2Rec's DRO term on the recommendation and distillation losses (0: off; DLLM2Rec uses 1)")
    dro_beta: float = option(1.0, "DRO robustness radius (temperature of its log-sum-exp)")
    train_limit: int = option(
        0, "train the students on the first N train samples only (0: all); val and test stay whole. An export made "
        "with `ilora teacher export --limit N` covers these N; a full export serves any N"
    )
    control_seed: int | None = option(
        None, "also train the baseline again with this seed (control/) and report its gain over the baseline: one other "
        "seed's effect, to set beside the teacher's gain (none: off)"
    )

    def validate(self, *, check_device: bool = True) -> None:
        super().validate(check_device=check_device)
        checks = [
            (self.top_k >= 1, "top_k must be >= 1"),
            (self.lambda_d >= 0, "lambda_d must be >= 0"),
            (self.beta > 0, "beta must be > 0"),
            (min(self.gamma_position, self.gamma_confidence, self.gamma_consistency) >= 0, "gamma_* must be >= 0"),
            (self.gamma_position + self.gamma_confidence + self.gamma_consistency > 0, "at least one gamma_* must be > 0"),
            (self.w_ed >= 0, "w_ed must be >= 0"),
            (self.train_limit >= 0, f"train_limit must be >= 0 (0: every train sample), got {self.train_limit}"),
            (self.dro_alpha >= 0, "dro_alpha must be >= 0"),
            (self.dro_beta > 0, "dro_beta must be > 0"),
            (self.control_seed is None or 0 <= self.control_seed < 2**63 - 1, f"control_seed must be in 0..2**63-2, got {self.control_seed}"),
            (self.control_seed != self.seed, f"control_seed must differ from seed ({self.seed}): the control would be the baseline itself; set another control_seed"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ConfigError(problem)

    def rec_config(self) -> RecTrainConfig:
        """The SASRec training options alone."""
        return RecTrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RecTrainConfig)})


@dataclass
class TeacherTargets:
    """The teacher outputs one distillation run reads, checked against the dataset."""

    items: torch.Tensor  # int64 (n_train, top_k)
    confidence: torch.Tensor  # float32 (n_train, top_k)
    embeddings: torch.Tensor | None  # float32 (num_items, H) or None

    def sha256(self) -> str:
        """Fingerprint of exactly what the distillation reads (shapes and bytes)."""
        h = hashlib.sha256()
        for tensor in (self.items, self.confidence, self.embeddings):
            if tensor is None:
                h.update(b"none")
                continue
            h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
            h.update(memoryview(tensor.contiguous().numpy()))  # the buffer itself: no copy of the table
        return h.hexdigest()


def check_teacher_outputs(dataset: SeqDataset, outputs: TeacherOutputs, cfg: DistillConfig, source: str = "teacher outputs") -> TeacherTargets:
    """The train top-K, confidences and item embeddings, after checking they belong to ``dataset``."""
    manifest_data = outputs.manifest.get("dataset", {}) if isinstance(outputs.manifest, dict) else {}
    exported_items = manifest_data.get("num_items")
    if exported_items is not None and int(exported_items) != dataset.num_items:
        raise IloraError(f"{source}: exported for {exported_items} items, but {dataset.source or 'the dataset'} has {dataset.num_items}")
    if manifest_data.get("catalog") is not None:
        if manifest_data["catalog"] != dataset.catalog.sha256():
            raise IloraError(f"{source}: exported for a different item catalog than {dataset.source or 'the dataset'}'s")
    train = outputs.split("train")
    samples = dataset.split("train")
    n = len(samples)
    used = len(first_train_samples(dataset, cfg.train_limit).split("train"))  # the students train on the first `used`
    exported = outputs.manifest.get("splits", {}).get("train", {}) if isinstance(outputs.manifest, dict) else {}
    rows, total = exported.get("rows"), exported.get("samples")
    options = outputs.manifest.get("options", {}) if isinstance(outputs.manifest, dict) else {}
    limit = options.get("limit") if isinstance(options, dict) else None
    if limit and (total is None or int(total) < used):
        raise IloraError(
            f"{source}: a partial export (made with --limit {limit}: {total} of {n} train samples); distillation needs a "
            f"row for every train sample it trains on ({used}): pass --train-limit {total} to train the students on the "
            "samples it covers, or export the train split without --limit"
        )
    if rows is not None and total is not None and int(rows) < int(total):
        raise IloraError(
            f"{source}: an unfinished export ({rows} of {total} train samples written); run the same `ilora teacher "
            "export` command again to finish it"
        )
    expected = int(total) if limit and total is not None else n  # a --limit export holds the first `limit` samples
    if expected > n:
        raise IloraError(
            f"{source}: exported for {expected} train samples, but {dataset.source or 'the dataset'} has {n} "
            "(exported from another dataset or another --min-len?)"
        )
    if exported.get("samples_sha256") and exported.get("samples") == expected:
        if exported["samples_sha256"] != samples.subset(slice(0, expected)).sha256():
            first = "" if expected == n else f"first {expected} "
            raise IloraError(
                f"{source}: exported for other train samples than {dataset.source or 'the dataset'}'s {first}(same count, "
                "different histories, targets or order): row i would not be train sample i"
            )
    items = np.asarray(train.topk_items)
    conf = np.asarray(train.topk_confidence)
    if items.ndim != 2 or items.shape[0] != expected:
        raise IloraError(
            f"{source}: train top-K items have shape {items.shape}, expected ({expected}, K) (one row per train sample; "
            "exported from another dataset or another --min-len?)"
        )
    if cfg.top_k > dataset.num_items:
        raise ConfigError(f"top_k={cfg.top_k} is more than the catalog's {dataset.num_items} items")
    if items.shape[1] < cfg.top_k:
        raise IloraError(
            f"{source}: {items.shape[1]} items per train row, but top_k={cfg.top_k}: pass --top-k {items.shape[1]} (or less), "
            f"or export again with --top-k {cfg.top_k}"
        )
    if conf.shape != items.shape:
        raise IloraError(f"{source}: train confidences have shape {conf.shape}, the top-K items {items.shape}")
    items, conf = items[:used, : cfg.top_k], conf[:used, : cfg.top_k]
    bad = np.argwhere((items < 0) | (items >= dataset.num_items))
    if bad.size:
        r, c = map(int, bad[0])
        raise IloraError(f"{source}: train row {r}, position {c}: id {int(items[r, c])} is not an item (0..{dataset.num_items - 1})")
    bad = np.argwhere(~np.isfinite(conf) | (conf < 0))
    if bad.size:
        r, c = map(int, bad[0])
        raise IloraError(f"{source}: train row {r}, position {c}: confidence {conf[r, c]} is not a finite number >= 0")
    return TeacherTargets(
        torch.from_numpy(items.astype(np.int64)),
        torch.from_numpy(conf.astype(np.float32)),
        _checked_embeddings(outputs, dataset, cfg, source),
    )


def first_train_samples(dataset: SeqDataset, limit: int) -> SeqDataset:
    """``dataset`` with its train split cut to the first ``limit`` samples (0: as it is); other splits shared."""
    if not limit:
        return dataset
    train = dataset.split("train")
    if limit > len(train):
        raise ConfigError(f"train_limit={limit}: {dataset.source or 'the dataset'}'s train split has only {len(train)} samples")
    return dataclasses.replace(dataset, splits={**dataset.splits, "train": train.subset(slice(0, limit))})


def _checked_embeddings(outputs: TeacherOutputs, dataset: SeqDataset, cfg: DistillConfig, source: str) -> torch.Tensor | None:
    if cfg.w_ed == 0:
        return None
    emb = outputs.item_embeddings
    if emb is None:
        raise IloraError(f"{source}: no item embeddings (needed for w_ed={cfg.w_ed}; set w_ed=0 to distil the ranking only)")
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] != dataset.num_items or emb.shape[1] < 1:
        raise IloraError(f"{source}: item embeddings have shape {emb.shape}, expected ({dataset.num_items}, H)")
    dim = (outputs.manifest.get("item_embeddings") or {}).get("dim")
    if dim is not None and int(dim) != emb.shape[1]:
        raise IloraError(f"{source}: item embeddings are {emb.shape[1]} wide, the manifest says {dim}")
    if not np.isfinite(emb).all():
        raise IloraError(f"{source}: item embeddings contain NaN or infinite values")
    return torch.from_numpy(emb.astype(np.float32))


class DistillationLoss:
    """The ``extra_loss`` hook of `train_sasrec`: ``lambda_d`` x ranking distillation, plus DRO terms.

    Per batch: ``dro_alpha * mean_b dro(target)`` (when ``dro_alpha > 0``) and, given
    teacher ``targets``, ``lambda_d * (RD + dro_alpha * mean_b sum_k w[b, k] dro(items[b, k]))``
    with RD and the weights ``w`` of `ilora.distill.losses` (computed even for
    ``lambda_d = 0``, which then adds exactly nothing). Draws no random numbers.

    The distillation DRO term is per sample, as written above. DLLM2Rec's code multiplies a
    ``(B, 1)`` weight by a ``(B,)`` DRO loss, which broadcasts to ``(B, B)`` and so computes
    ``sum_k mean_b(w[:, k]) * mean_b(dro_k)`` instead (a sample's weight never meets its own
    DRO loss); we do not reproduce that.
    """

    def __init__(self, targets: TeacherTargets | None, cfg: DistillConfig, propensity: torch.Tensor | None) -> None:
        if cfg.dro_alpha and propensity is None:
            raise IloraError("the DRO term needs the items' propensity scores")
        self.cfg, self.lambda_d = cfg, cfg.lambda_d
        self.targets = targets
        self.propensity = propensity
        self._device: torch.device | None = None

    def _to(self, device: torch.device) -> None:
        if self._device != device:
            if self.targets is not None:
                self.targets = dataclasses.replace(
                    self.targets, items=self.targets.items.to(device), confidence=self.targets.confidence.to(device)
                )
            if self.propensity is not None:
                self.propensity = self.propensity.to(device)
            self._device = device

    def __call__(self, batch: TrainBatch) -> torch.Tensor:
        cfg = self.cfg
        self._to(batch.logits.device)
        total = batch.logits.new_zeros(())
        if cfg.dro_alpha:
            total = total + cfg.dro_alpha * dro_loss(batch.logits, batch.target, self.propensity, cfg.dro_beta).mean()
        if self.targets is not None:
            items = self.targets.items[batch.rows]
            weights = importance_weights(
                items,
                self.targets.confidence[batch.rows],
                batch.logits,
                beta=cfg.beta,
                gamma_position=cfg.gamma_position,
                gamma_confidence=cfg.gamma_confidence,
                gamma_consistency=cfg.gamma_consistency,
            )
            rd = ranking_distillation_loss(batch.logits, items, weights)
            if cfg.dro_alpha:
                dro = dro_loss(batch.logits, items, self.propensity, cfg.dro_beta)
                rd = rd + cfg.dro_alpha * (weights * dro).sum(dim=1).mean()
            total = total + self.lambda_d * rd
        return total


def relative_gain(baseline: dict[str, object], distilled: dict[str, object]) -> dict[str, float | None]:
    """``(distilled - baseline) / baseline`` per metric (keys with ``@``); None where the baseline is 0."""
    gain: dict[str, float | None] = {}
    for key, base in baseline.items():
        if "@" in key and key in distilled:
            b, d = float(base), float(distilled[key])  # type: ignore[arg-type]
            gain[key] = None if b == 0 else (d - b) / b
    return gain


DRO_OPTIONS = ("dro_alpha", "dro_beta")


def student_run_options(cfg: DistillConfig, targets: TeacherTargets | None) -> dict[str, object]:
    """What defines a student's run besides its SASRec options (checked when it resumes): the
    options of its loss hook and, for the distilled student, the fingerprint of the teacher
    targets it reads."""
    rec = {f.name for f in dataclasses.fields(RecTrainConfig)}
    if targets is None:
        return {f"distill.{k}": getattr(cfg, k) for k in DRO_OPTIONS}
    # control_seed is not the distilled student's; train_limit is in the dataset fingerprint train_sasrec records
    options = {f"distill.{k}": v for k, v in to_dict(cfg).items() if k not in rec and k not in ("control_seed", "train_limit")}
    return {**options, "distill.teacher_targets_sha256": targets.sha256()}


def student_ranks(directory: Path, result: dict[str, object]) -> torch.Tensor | None:
    """A student's test ranks (``test_ranks.safetensors``), checked against its ``result.json``:
    the same number of samples and the same full-ranking metrics, so ranks left by another run
    are refused. None when the student finished before runs saved their ranks."""
    path = directory / TEST_RANKS_FILE
    if not path.is_file():
        return None
    ranks = load_ranks(path)
    test: dict = result["test"]  # type: ignore[assignment]
    recomputed = metrics_from_ranks(ranks, FULL_KS)
    if len(ranks) != test["num_samples"] or any(abs(recomputed[k] - float(test[k])) > 1e-9 for k in recomputed):
        raise IloraError(f"{path}: these ranks do not give the metrics of {directory / 'result.json'} (left by another run?)")
    return ranks


def gain_interval(out: Path, students: dict[str, dict[str, object]], seed: int) -> dict[str, object] | None:
    """`paired_gain_intervals` of two students' test ranks, ``students`` being the baseline's
    result and then the other's, by directory name under ``out``; None without a test split,
    and ``{"unavailable": why}`` for students trained before runs saved their ranks."""
    if any("test" not in result for result in students.values()):
        return None
    ranks = [student_ranks(out / name, result) for name, result in students.items()]
    if any(r is None for r in ranks):
        why = "a student finished before runs saved their test ranks; train it again (with --overwrite) for the interval"
        log.warning("no gain interval: %s", why)
        return {"unavailable": why}
    base, other = ranks
    return paired_gain_intervals(base, other, seed=seed)


def control_summary(out: Path, baseline: dict[str, object], control: dict[str, object], cfg: DistillConfig) -> dict[str, object]:
    """The control student (the baseline trained with ``control_seed``): its run, and its gain over
    the baseline with the same paired interval as the distilled student's: what another seed alone moves."""
    return {
        "seed": cfg.control_seed,
        **_run_summary(control),
        "gain": relative_gain(baseline["test"], control["test"]),  # type: ignore[arg-type]
        "gain_interval": gain_interval(out, {"baseline": baseline, "control": control}, cfg.seed),
    }


def _run_summary(result: dict[str, object]) -> dict[str, object]:
    keep = ("best_epoch", "epochs_run", "steps", "selected_by", "skipped_steps", "resumed_from", "out", "val", "test")
    return {k: result[k] for k in keep if k in result}


@claims_out_dir("out_dir")
def distill(
    dataset: SeqDataset, teacher_outputs: TeacherOutputs, cfg: DistillConfig, out_dir: str | Path, *, source: str = "teacher outputs",
    resume: bool = False, overwrite: bool = False,
) -> dict[str, object]:
    """Train the baseline and the distilled student; write and return their test metrics and the gains.

    ``resume`` resumes each student from its own checkpoints (``baseline/checkpoints``,
    ``distilled/checkpoints``, ``control/checkpoints`` with ``control_seed``; a student that had
    finished is not trained again). A resume
    with other options or other teacher targets than the interrupted run's is refused
    (`student_run_options`). Without ``resume``, students an earlier run left in ``out_dir``
    are refused unless ``overwrite`` (then they are trained again from the start).
    """
    cfg.validate()
    if dataset.splits.get("test") is None or len(dataset.split("test")) == 0:
        raise IloraError(f"{dataset.source or 'dataset'}: distillation is evaluated on the test split, which is absent or empty")
    students_data = first_train_samples(dataset, cfg.train_limit)
    targets = check_teacher_outputs(dataset, teacher_outputs, cfg, source)
    dataset = students_data
    check_training_input(dataset, cfg)  # what the students' training would refuse fails before --out is touched
    out = Path(out_dir)
    config_file = out / "distill_config.json"
    if resume and config_file.is_file():  # refuse other options before anything is written
        saved = read_json(config_file, "distill_config.json")  # an earlier version's record lacks the added options
        check_resume_config(without_added_defaults(saved or {}), without_added_defaults(to_dict(cfg)), out)
    if not resume and not overwrite:  # nor start over on an earlier run's students
        for student in ("baseline", "distilled", "control"):
            refuse_earlier_run(out / student, "result.json", (WEIGHTS_FILE,))
    if overwrite and cfg.control_seed is None and (out / "control").is_dir():  # no control in this run: none left beside its result
        shutil.rmtree(out / "control")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_file, json.dumps(to_dict(cfg), indent=2) + "\n")
    propensity = propensity_scores(dataset.split("train").target, dataset.num_items) if cfg.dro_alpha else None
    rec_cfg = cfg.rec_config()

    log.info("training the baseline student (no distillation)")
    base_hook = DistillationLoss(None, cfg, propensity) if cfg.dro_alpha else None
    baseline = train_sasrec(
        dataset, rec_cfg, out / "baseline", extra_loss=base_hook, resume=resume, overwrite=overwrite, run_options=student_run_options(cfg, None)
    )

    log.info("training the distilled student (lambda_d=%s, w_ed=%s)", cfg.lambda_d, cfg.w_ed)
    hook = DistillationLoss(targets, cfg, propensity)
    factory = student_factory(targets.embeddings, w_ed=cfg.w_ed, seed=cfg.seed)
    distilled = train_sasrec(
        dataset, rec_cfg, out / "distilled", extra_loss=hook, model_factory=factory, resume=resume, overwrite=overwrite,
        run_options=student_run_options(cfg, targets),
    )

    control = None
    if cfg.control_seed is not None:
        log.info("training the control student (the baseline with seed %s)", cfg.control_seed)
        control = train_sasrec(  # the baseline's loss hook: it holds no training state
            dataset, dataclasses.replace(rec_cfg, seed=cfg.control_seed), out / "control", extra_loss=base_hook, resume=resume,
            overwrite=overwrite, run_options=student_run_options(cfg, None),
        )

    result: dict[str, object] = {
        "baseline": _run_summary(baseline),
        "distilled": _run_summary(distilled),
        "gain": relative_gain(baseline["test"], distilled["test"]),  # type: ignore[arg-type]
        "gain_interval": gain_interval(out, {"baseline": baseline, "distilled": distilled}, cfg.seed),
        **({"control": control_summary(out, baseline, control, cfg)} if control is not None else {}),
        "teacher": {
            "source": source,
            "top_k_exported": int(np.asarray(teacher_outputs.split("train").topk_items).shape[1]),
            "embedding_dim": None if targets.embeddings is None else int(targets.embeddings.shape[1]),
        },
        "config": to_dict(cfg),
        "out": str(out),
    }
    atomic_write_text(out / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result

"""Teacher training: `train_teacher(dataset, cfg, rec_dir, out_dir)`.

Each optimiser step takes ``batch_size`` samples of a seeded per-epoch permutation (the
global batch; with ``group_by_length``, batches of similar prompt length, `length_grouped`),
split into micro-batches (gradient accumulation). Each micro-batch's prompts are assembled
by the `PromptCollator` as a DataLoader item (`MicroBatches`): in ``workers`` worker
processes, or in the training process with the default ``workers=0``; each sample's hybrid /
text-only flag comes from LLaRA's curriculum, drawn from ``(seed, step)`` only.
Loss: cross-entropy summed over the answer tokens of the global batch and divided by
their number, so a step's loss and gradient do not depend on how the batch is cut into
micro-batches or ranks. Fused AdamW with iLoRA's param groups (gate at 0.3 x lr), linear
warm-up + cosine decay, gradient clipping, bf16 autocast on CUDA.

**Data parallel** (``torchrun``, a `Dist` with ``world_size > 1``): every rank holds the
whole teacher; the trainable tensors (adapters, gate, projector) are wrapped in
``DistributedDataParallel`` (the frozen base is replicated and never synchronised). Rank
r takes the r-th contiguous share of each global batch (`rank_micro_batches`) and
all-reduces the gradient once per step; a rank left without samples by a short last
step runs one sample with weight 0 so that it still joins the all-reduce. Only rank 0
writes logs, checkpoints and the teacher; a checkpoint holds the global position, so a
run resumes with the same or another number of ranks (bit for bit, as described below, only in one
process: ranks other than 0 re-seed their dropout stream from the resumed step).
Validation is split across ranks by batches and gathered (`evaluate_teacher`). LoRA
dropout draws per rank, so with dropout > 0 the masks (not the expected update) differ
from a single-process run.
Validation by the score protocol after every epoch; the best checkpoint by
``select_metric`` on validation only is written to ``out_dir`` (with the last
optimiser/scheduler/RNG state in ``out_dir/trainer_state.*``). Training therefore needs a
val split with samples: an absent or empty val (or train) split is refused with `IloraError`
(`split_with_samples`) before any model is loaded or ``out_dir`` is touched.

A step whose loss or gradient norm is NaN/inf stops the run with `IloraError` naming the
step, after a checkpoint of the state before it; ``skip_nonfinite`` drops the update
instead (the schedule still advances). With ``checkpoint_every = N`` a checkpoint
(`ilora.checkpointing`) is written after every N-th optimiser step (at an epoch's last
step: after its validation): adapter, gate and projector weights, AdamW and schedule
state, the best-so-far weights and metrics, the epoch and the position in it (the
order and curriculum flags are recomputed from ``(seed, epoch)`` and ``(seed, step)``),
every RNG, both CSV logs, and the fingerprints of the SASRec, the dataset and the base
LLM's weights (`base_weights_sample`) read. ``resume=True`` continues from the newest intact
one and ends bit for bit where an uninterrupted run ends (on CPU); it raises `IloraError` if
the options (`check_resume_config`), the SASRec of ``rec_dir``, the dataset or the model at
the base LLM's path differ from the interrupted run's. A base LLM given as a local directory
is recorded by its absolute path (`resolve_llm_path`; a run recorded with the relative path
that resolves to it resumes). A run without ``resume`` refuses an ``out_dir`` holding an
earlier run (summary, checkpoints or a saved teacher), checked on rank 0 before any model is
loaded and raised on every rank, unless ``overwrite``, which starts over and removes older
checkpoints; resuming a finished run returns its summary (after the same checks against its
``train_config.json`` and ``train_summary.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ilora.checkpointing import CheckpointManager, NonFiniteGuard, check_resume_config, earlier_run, earlier_run_error, finished_run_config, open_run, restore_rng_state, restoring, rng_state
from ilora.config import to_dict, torch_threads
from ilora.data.candidates import candidate_sets
from ilora.data.dataset import SeqDataset, Split
from ilora.dir_lock import claims_out_dir
from ilora.distributed import SINGLE, Dist, check_ranks_agree, require_device
from ilora.errors import ConfigError, IloraError
from ilora.metrics_log import MetricsLog, NullLog
from ilora.progress import progress
from ilora.rec.sasrec import check_sasrec_items, load_sasrec
from ilora.state_io import atomic_write_text, read_json, save_state
from ilora.teacher.adapters import adapter_state_dict, enable_gradient_checkpointing
from ilora.teacher.batch import draw_hybrid_flags
from ilora.teacher.build import base_weights_sample, build_teacher, rec_fingerprint, resolve_llm_path, save_teacher
from ilora.teacher.compiled import CompiledLayers, check_can_compile
from ilora.teacher.config import TeacherConfig, check_training_options, template_file_reset, tiny_options_reset, with_added_defaults
from ilora.teacher.evaluate import check_scoring_window, evaluate_teacher
from ilora.teacher.optim import build_scheduler, load_optimizer_state, teacher_optimizer, warmup_length

log = logging.getLogger(__name__)

_PROTECTED_METRICS = ("hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr", "mean_target_logprob")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MicroBatches(torch.utils.data.Dataset):
    """The micro-batches of one epoch: item i is built by the collator from plan[i]."""

    def __init__(self, split: Split, candidates: np.ndarray, plan: list[tuple[np.ndarray, np.ndarray]], collator) -> None:
        self.split, self.candidates, self.plan, self.collator = split, candidates, plan, collator

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int):
        idx, hybrid = self.plan[i]
        s = self.split
        return self.collator.build(s.history[idx], s.length[idx], self.candidates[idx], s.target[idx], hybrid=hybrid)


GROUP_WINDOW = 64  # global batches per length-sorted window (group_by_length)


def length_grouped(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """``order`` rearranged so that each global batch holds prompts of similar length.

    Consecutive windows of ``GROUP_WINDOW`` batches of ``order`` are each sorted by prompt
    length (longest first, stable) and cut into batches; then the full batches are shuffled
    with ``rng`` (a partial last batch stays last). The same samples, in other batches.
    """
    window = GROUP_WINDOW * batch_size
    parts = [w[np.argsort(-lengths[w], kind="stable")] for w in np.split(order, range(window, len(order), window))]
    grouped = np.concatenate(parts) if parts else order
    full = len(order) // batch_size
    batches = grouped[: full * batch_size].reshape(full, batch_size)[rng.permutation(full)]
    return np.concatenate([batches.reshape(-1), grouped[full * batch_size :]])


def prompt_lengths(collator, split: Split, candidates: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Tokens of every training prompt (answer included), from the segment lengths."""
    counts = [
        collator.token_counts(split.history[i : i + chunk], split.length[i : i + chunk], candidates[i : i + chunk], split.target[i : i + chunk])
        for i in range(0, len(split), chunk)
    ]
    return torch.cat(counts).numpy() if counts else np.zeros(0, dtype=np.int64)


def warn_long_prompts(lengths: np.ndarray, config) -> None:
    """A warning when training prompts are longer than the base LLM's ``max_position_embeddings``:
    it was never trained at those positions (rotary models still run; the teacher may not learn)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and len(lengths) and int(lengths.max()) > limit:
        log.warning(
            "%d of %d training prompts are longer than the base LLM's max_position_embeddings %d (longest: %d tokens); "
            "shorten the titles (max_title_tokens) or use a model with a longer context",
            int((lengths > limit).sum()), len(lengths), limit, int(lengths.max()),
        )


def epoch_plan(
    n: int, cfg: TeacherConfig, epoch: int, first_step: int, total_steps: int, lengths: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The global batches of one epoch's optimiser steps: (sample indices, hybrid flags) each.

    With ``lengths`` (``group_by_length``) the epoch's permutation is `length_grouped`.
    """
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
    if lengths is not None:
        order = length_grouped(order, lengths, cfg.batch_size, np.random.default_rng([cfg.seed, epoch, 1]))
    steps = []
    for k, start in enumerate(range(0, n, cfg.batch_size)):
        idx = order[start : start + cfg.batch_size]
        step = first_step + k
        if cfg.curriculum:
            flags = draw_hybrid_flags(len(idx), step, total_steps, seed=cfg.seed).numpy()
        else:
            flags = np.ones(len(idx), dtype=bool)
        steps.append((idx, flags))
    return steps


def rank_micro_batches(idx: np.ndarray, flags: np.ndarray, micro: int, ctx: Dist) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """This rank's micro-batches of one global batch: (indices, hybrid flags, counts) each.

    The rank's share is its contiguous chunk (`Dist.chunk`) cut into ``micro`` samples.
    A rank whose share is empty (a last step with fewer samples than ranks) gets one
    sample of the step with ``counts = False``: it runs forward and backward with weight
    0, so that it takes part in the gradient all-reduce without changing the gradient.
    """
    mine, mine_flags = ctx.chunk(idx), ctx.chunk(flags)
    if len(mine) == 0:
        return [(idx[:1], flags[:1], False)]
    return [(mine[j : j + micro], mine_flags[j : j + micro], True) for j in range(0, len(mine), micro)]


class SummedLoss(torch.nn.Module):
    """The module a training step calls (and DDP wraps): the teacher's summed answer-token loss."""

    def __init__(self, teacher) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, batch) -> torch.Tensor:
        return self.teacher.loss(batch, reduction="sum")


def wrap_for_training(teacher, ctx: Dist) -> torch.nn.Module:
    """`SummedLoss` of the teacher, in ``DistributedDataParallel`` when there are several ranks.

    Only parameters with ``requires_grad`` (adapters, gate, projector) are synchronised:
    rank 0's values are broadcast once here, and gradients are all-reduced every step.
    ``find_unused_parameters``: a micro-batch of text-only prompts does not use the
    projector; a parameter no rank used in a step keeps no gradient, as in one process.
    """
    model = SummedLoss(teacher)
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Only the trainable tensors are sent from rank 0 (not DDP's default of every parameter
    # and buffer: the frozen base is loaded identically on every rank, ~14 GB at 7B).
    ctx.broadcast_tensors([q for q in teacher.parameters() if q.requires_grad])
    return DistributedDataParallel(model, find_unused_parameters=True, broadcast_buffers=False, init_sync=False)


def seed_rank_streams(cfg: TeacherConfig, ctx: Dist, step: int) -> None:
    """Give ranks other than 0 their own torch RNG stream (LoRA dropout), from (seed, rank, step)."""
    if ctx.rank > 0:
        torch.manual_seed(int(np.random.default_rng([cfg.seed, ctx.rank, step]).integers(2**62)))


def split_with_samples(dataset: SeqDataset, name: str, why: str) -> Split:
    """The split ``name``; `IloraError` if it is absent (`SeqDataset.split`) or has no samples.

    The message names the dataset and the split, says what the loader dropped (its
    ``load_info``: rows in the source, rows below ``min_len``, rows without history) and
    ``why`` training needs the split, so that the user can fix the data or ``--min-len``.
    """
    split = dataset.split(name)
    if len(split):
        return split
    counts = (dataset.load_info.get("splits") or {}).get(name) or {}
    seen = []
    if "rows_in_source" in counts:
        seen.append(f"{counts['rows_in_source']} rows in the source")
    if counts.get("dropped_below_min_len"):
        seen.append(f"{counts['dropped_below_min_len']} dropped below min_len={dataset.load_info.get('min_len')}")
    if counts.get("dropped_no_history"):
        seen.append(f"{counts['dropped_no_history']} dropped without history")
    detail = f" ({', '.join(seen)})" if seen else ""
    raise IloraError(
        f"{dataset.source or 'dataset'}: the {name} split has no samples{detail}; {why}: "
        f"give the data a {name} split with samples (or load it with a lower --min-len)"
    )


def val_subset(split: Split, limit: int) -> Split:
    """The validation samples training scores every epoch: the first ``limit`` (0: all)."""
    return split if not limit or limit >= len(split) else split.subset(slice(0, limit))


def trainable_state(teacher, *, copy: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """The trained tensors: LoRA experts (peft keys), gate network, projector (``copy``: CPU clones)."""
    state = {"adapters": adapter_state_dict(teacher.llm), "gate": teacher.gate_net.state_dict(), "projector": teacher.projector.state_dict()}
    if copy:
        state = {part: {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()} for part, tensors in state.items()}
    return state


def load_trainable_state(teacher, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Inverse of `trainable_state`."""
    targets = adapter_state_dict(teacher.llm)
    if set(targets) != set(state["adapters"]):
        raise IloraError("checkpoint: its adapter layers are not this teacher's")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state["adapters"][key])
    teacher.gate_net.load_state_dict(state["gate"])
    teacher.projector.load_state_dict(state["projector"])


def _loader_generator(cfg: TeacherConfig, epoch: int) -> torch.Generator:
    """The DataLoader's own generator, so that starting an epoch (or resuming one) draws nothing from torch's."""
    return torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, epoch, 7]).integers(2**62)))


INPUTS = "another SASRec (--rec), dataset, base LLM (--llm) or prompt template (--domain)"  # what a resume compares besides the options


ADDED_INPUTS = ("llm", "template")  # fingerprints runs recorded only from some version on


def check_same_inputs(saved: dict | None, inputs: dict, where: Path) -> None:
    """`check_resume_config` of the input fingerprints; a run recorded before the base LLM's
    weight sample or the prompt template's fingerprint was (no ``llm`` or ``template`` entry)
    is compared without it."""
    recorded = saved or {}
    current = {k: v for k, v in inputs.items() if k in recorded or k not in ADDED_INPUTS}
    check_resume_config(recorded, current, where, INPUTS)


EARLIER_RUN_FILES = ("teacher_config.json", "train_config.json")  # a run killed after saving its best teacher


def check_same_options(saved: dict | None, cfg: TeacherConfig, where: Path, saved_inputs: dict | None = None) -> None:
    """`check_resume_config` of the options; a run recorded with a relative ``llm`` path that
    resolves to this run's absolute one (`resolve_llm_path`) counts as the same, a record
    from before an option existed reads as that option's default (`with_added_defaults`), and
    ``tiny_*`` options a non-tiny base LLM never used are not compared (`tiny_options_reset`), nor
    is a template file's path where the record's inputs (``saved_inputs``) hold its text's
    fingerprint (`template_file_reset`: `check_same_inputs` compares the text)."""
    saved = with_added_defaults(dict(saved or {})) if saved else {}
    if isinstance(saved.get("llm"), str) and resolve_llm_path(dataclasses.replace(cfg, llm=saved["llm"])).llm == cfg.llm:
        saved["llm"] = cfg.llm
    forms = [tiny_options_reset(c) for c in (saved, to_dict(cfg))]
    if "template" in (saved_inputs or {}):
        forms = [template_file_reset(c) for c in forms]
    check_resume_config(*forms, where)


def _finished_summary(out: Path, cfg: TeacherConfig, inputs: dict) -> dict | None:
    """The summary of a run that already finished in ``out`` with the same options, SASRec and data, if any."""
    config = finished_run_config(out, "train_summary.json")
    if config is None:
        return None
    summary = read_json(out / "train_summary.json")
    check_same_options(read_json(config), cfg, out, summary.get("inputs"))
    check_same_inputs(summary.get("inputs"), inputs, out)
    log.info("%s: training already finished; returning its summary", out)
    return summary


def _open_run(out_dir, cfg: TeacherConfig, inputs: dict, resume: bool, ctx: Dist, overwrite: bool = False):
    """`open_run` on rank 0; every rank gets ``(out, checkpoints, finished summary or None)``.
    A fresh run (no ``resume``) also removes an earlier run's ``teacher_config.json``, so
    until this run saves its first teacher the directory holds none that would load."""
    if ctx.is_main:
        out, checkpoints, finished = open_run(
            out_dir, cfg.checkpoint_every, resume, "train_summary.json", lambda o: _finished_summary(o, cfg, inputs), overwrite,
            others=EARLIER_RUN_FILES,
        )
        if not resume:  # an earlier run's teacher is not this run's: unloadable until the first save
            (out / "teacher_config.json").unlink(missing_ok=True)
            for state in out.glob("trainer_state.*"):  # nor its final optimiser state
                state.unlink()
    else:
        out, checkpoints, finished = Path(out_dir), CheckpointManager(out_dir, cfg.checkpoint_every), None
    return out, checkpoints, ctx.broadcast(finished)


def llm_signature(llm: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of the LLM's config and of each parameter's name, shape and dtype:
    cheap enough for a 7B model (no weight is read), and different for another model or size."""
    h = hashlib.sha256(llm.config.to_json_string(use_diff=False).encode("utf-8"))
    for name, p in llm.named_parameters():
        h.update(f"\x00{name}\x00{tuple(p.shape)}\x00{p.dtype}".encode())
    return h.hexdigest()[:16]


def _load_checkpoint(checkpoints: CheckpointManager, cfg: TeacherConfig, inputs: dict, resume: bool, ctx: Dist) -> tuple[dict | None, int | None]:
    """Rank 0 reads the newest intact checkpoint (when resuming), checks its options and
    input fingerprints against this run's, and sends it to every rank."""
    saved, step = None, None
    if resume and ctx.is_main:
        checkpoint = checkpoints.resume_point()
        if checkpoint is not None:
            saved, step = checkpoint.load(), checkpoint.step
            with restoring(checkpoint.path):
                check_same_options(saved["config"], cfg, checkpoint.path, saved.get("inputs"))
                check_same_inputs(saved.get("inputs"), inputs, checkpoint.path)
            log.info("resuming from %s (step %d)", checkpoint.path, checkpoint.step)
        else:
            log.warning("%s: no intact checkpoint to resume from; training from the start", checkpoints.root.parent)
    return ctx.broadcast((saved, step))


@claims_out_dir("out_dir")
def train_teacher(
    dataset: SeqDataset, cfg: TeacherConfig, rec_dir: str | Path, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
    ctx: Dist = SINGLE,
) -> dict:
    """Train the teacher (module docstring); ``resume`` continues from the newest intact checkpoint in ``out_dir``.

    ``ctx``: this process's rank in a data-parallel run (`ilora.distributed.init_from_env`).
    Runs with ``cfg.threads`` torch threads (`torch_threads`).
    """
    with torch_threads(cfg.threads):
        return _train_teacher(dataset, cfg, rec_dir, out_dir, resume, overwrite, ctx)


def _train_teacher(dataset: SeqDataset, cfg: TeacherConfig, rec_dir, out_dir, resume: bool, overwrite: bool, ctx: Dist) -> dict:
    """`train_teacher`'s work."""
    require_device(cfg.device)
    check_training_options(cfg)
    if cfg.compile:
        check_can_compile(cfg.device)
    # Everything that can reject the input runs before --out is touched.
    cfg = resolve_llm_path(cfg)
    if not resume and not overwrite:  # before minutes of model loading; every rank raises
        earlier = ctx.broadcast(earlier_run(Path(out_dir), "train_summary.json", EARLIER_RUN_FILES) if ctx.is_main else None)
        if earlier:
            raise earlier_run_error(out_dir, earlier)
    seed_everything(cfg.seed)
    train = split_with_samples(dataset, "train", "teacher training needs training samples")
    val = val_subset(split_with_samples(dataset, "val", "teacher training validates every epoch and keeps the best epoch by it"), cfg.val_samples)
    n_items = dataset.num_items
    rec = load_sasrec(rec_dir)
    check_sasrec_items(rec, dataset.num_items, rec_dir, dataset.max_len)  # naming --rec (build_teacher's own check cannot)
    bundle = build_teacher(cfg, dataset.catalog, rec, cfg.device)
    teacher = bundle.teacher
    # what a resume must read again: the same SASRec, dataset and base LLM weights
    inputs = {
        "rec": rec_fingerprint(rec), "dataset": dataset.sha256(), "llm": base_weights_sample(teacher.llm),
        "template": bundle.train_collator.template.sha256(),  # a template file's text, not only its name
    }
    check_ranks_agree(ctx, {**inputs, "train_samples": len(train), "config": to_dict(cfg), "llm_signature": llm_signature(teacher.llm)})
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(teacher.llm, teacher.gate_state)
    compiled = CompiledLayers(teacher.llm) if cfg.compile else None
    train_cands = candidate_sets(train, n_items, count=cfg.num_candidates, seed=cfg.candidate_seed, split_name="train")
    val_cands = candidate_sets(val, n_items, count=cfg.num_candidates, seed=cfg.candidate_seed, split_name="val")
    all_lengths = prompt_lengths(bundle.train_collator, train, train_cands)
    warn_long_prompts(all_lengths, teacher.llm.config)
    check_scoring_window(  # validation scores every epoch: refused now, not after the first epoch's training
        bundle, val, val_cands, cfg.eval_batch_size, batch_option="eval_batch_size (--eval-batch-size)",
        advice="; teacher training validates by the score protocol", name="the val split",
    )
    lengths = all_lengths if cfg.group_by_length else None
    out, checkpoints, finished = _open_run(out_dir, cfg, inputs, resume, ctx, overwrite)
    if finished is not None:
        return finished

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = teacher_optimizer(teacher, cfg)
    scheduler = build_scheduler(optimizer, warmup_length(cfg.warmup_ratio, total_steps), total_steps, cfg.min_lr_ratio)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cfg.device == "cuda" else contextlib.nullcontext()
    )
    # progress: everything besides weights, optimiser and RNGs that a checkpoint restores
    p = {"epoch": 0, "position": 0, "step": 0, "best": -math.inf, "best_metrics": None, "history": [], "skipped": []}
    best_weights = None
    saved, resumed_from = _load_checkpoint(checkpoints, cfg, inputs, resume, ctx)
    if saved is not None:
        where = checkpoints.path_for(resumed_from)
        with restoring(where):
            load_trainable_state(teacher, saved["weights"])
            load_optimizer_state(optimizer, saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            p, best_weights = saved["progress"], saved["best_weights"]
        if best_weights is not None and ctx.is_main:  # the best teacher in out_dir may come from after the checkpoint
            current = trainable_state(teacher, copy=True)
            with restoring(where):
                load_trainable_state(teacher, best_weights)
            save_teacher(bundle, out, dataset.catalog)
            load_trainable_state(teacher, current)
        with restoring(where):
            restore_rng_state(saved["rng"])
    seed_rank_streams(cfg, ctx, p["step"])
    purge = None if resumed_from is None else resumed_from + 1
    if ctx.is_main:
        step_log = MetricsLog(out, "train_steps", purge_step=purge)
        epoch_log = MetricsLog(out, "metrics", writer=step_log.writer, purge_step=purge)
        atomic_write_text(out / "train_config.json", json.dumps(to_dict(cfg), indent=2))
    else:
        step_log, epoch_log = NullLog(), NullLog()
    if saved is not None:
        step_log.restore(saved["train_steps_csv"])
        epoch_log.restore(saved["metrics_csv"])
    model = wrap_for_training(teacher, ctx)

    def state(progress: dict, rng: dict) -> dict:
        return {
            "config": to_dict(cfg), "inputs": inputs, "weights": trainable_state(teacher), "best_weights": best_weights,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "progress": progress, "rng": rng,
            "train_steps_csv": step_log.text(), "metrics_csv": epoch_log.text(),
        }

    def save_checkpoint(step: int, progress: dict, rng: dict) -> Path:
        if ctx.is_main:
            return checkpoints.save(step, state(progress, rng))
        return checkpoints.path_for(step)

    def save_last_good() -> Path:
        """Before a non-finite step stops the run: every rank waits until rank 0 has written it."""
        path = save_checkpoint(p["step"], before["progress"], before["rng"])
        ctx.barrier()
        return path

    before: dict = {}
    guard = NonFiniteGuard(cfg.skip_nonfinite, save_last_good)
    guard.skipped = p["skipped"]
    all_params = [q for g in optimizer.param_groups for q in g["params"]]
    micro = cfg.micro_batch_size or cfg.batch_size
    bar = progress(total=total_steps, initial=p["step"], desc="train teacher", unit="step", show=ctx.is_main)
    for epoch in range(p["epoch"], cfg.epochs):
        p["epoch"] = epoch
        if p["step"] >= total_steps:
            break
        first = p["step"] - p["position"]
        plan = epoch_plan(len(train), cfg, epoch, first, total_steps, lengths)[: total_steps - first]
        mine = [rank_micro_batches(idx, flags, micro, ctx) for idx, flags in plan]
        flat = [(idx, flags) for step_plan in mine[p["position"]:] for idx, flags, _ in step_plan]
        loader = torch.utils.data.DataLoader(
            MicroBatches(train, train_cands, flat, bundle.train_collator),
            batch_size=None,
            shuffle=False,
            num_workers=cfg.workers,
            pin_memory=cfg.device == "cuda",
            generator=_loader_generator(cfg, epoch),
        )
        batches = iter(loader)
        teacher.train()  # the frozen SASRec stays in eval mode (ILoRATeacher.train)
        for k in range(p["position"], len(plan)):
            before = {"progress": json.loads(json.dumps(p)), "rng": rng_state()}
            started = time.perf_counter()
            micro_batches = [(next(batches), counts) for _, _, counts in mine[k]]
            # counted on the CPU, before the copy: no device sync
            targets = sum(b.num_targets for b, counts in micro_batches if counts)  # the loss's tokens, counted at build time
            tokens = sum(int(b.attention_mask.sum()) for b, counts in micro_batches if counts)
            micro_batches = [(b.to(cfg.device, non_blocking=True), counts) for b, counts in micro_batches]
            n_step = len(plan[k][0])
            global_targets, tokens = ctx.sums([targets, tokens])  # one all-reduce for both
            with compiled.active() if compiled else contextlib.nullcontext():
                total_loss = step_forward_backward(model, micro_batches, global_targets, autocast, ctx)
            tokens = int(tokens)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(all_params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
            if guard.ok(p["step"] + 1, total_loss, grad_norm, f" (epoch {epoch + 1})"):
                optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the lr this step used (read before the schedule moves on)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            p["step"], p["position"] = p["step"] + 1, k + 1
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss:.3f}", samples_s=f"{n_step / elapsed:.1f}", refresh=False)
            step_log.log(
                {"step": p["step"], "epoch": epoch + 1, "loss": total_loss, "lr": lr,
                 "grad_norm": grad_norm, "samples_per_s": n_step / elapsed, "tokens_per_s": tokens / elapsed},
                p["step"],
            )
            if p["position"] < len(plan) and checkpoints.due(p["step"]):
                save_checkpoint(p["step"], p, rng_state())
        metrics = evaluate_teacher(
            bundle, val, val_cands, protocol="score", batch_size=cfg.eval_batch_size, device=cfg.device, ctx=ctx
        )
        row = {"epoch": epoch + 1, "step": p["step"], **{f"val_{k}": metrics[k] for k in _PROTECTED_METRICS}}
        epoch_log.log(row, p["step"])
        p["history"].append(row)
        if cfg.select_metric not in metrics:
            raise ConfigError(f"select_metric {cfg.select_metric!r}: not a score-protocol metric ({', '.join(_PROTECTED_METRICS)})")
        if metrics[cfg.select_metric] > p["best"]:
            p["best"], p["best_metrics"] = metrics[cfg.select_metric], metrics
            if ctx.is_main:
                save_teacher(bundle, out, dataset.catalog)
            best_weights = trainable_state(teacher, copy=True)
        if ctx.is_main:
            bar.write(f"epoch {epoch + 1}: val {cfg.select_metric} {metrics[cfg.select_metric]:.4f}", file=sys.stderr)
        if p["step"] < total_steps and epoch + 1 < cfg.epochs and checkpoints.due(p["step"]):
            p["epoch"], p["position"] = epoch + 1, 0
            save_checkpoint(p["step"], p, rng_state())
        p["position"] = 0
    bar.close()
    summary = {
        "steps": p["step"], "best_val": p["best_metrics"], "select_metric": cfg.select_metric, "history": p["history"],
        "skipped_steps": p["skipped"], "resumed_from": resumed_from, "out": str(out), "world_size": ctx.world_size,
        "inputs": inputs,
    }
    if ctx.is_main:
        save_state(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": p["step"], "rng": rng_state()},
            out / "trainer_state",
        )
        step_log.close()
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2))
    ctx.barrier()  # no rank returns before rank 0 has written the teacher and the summary
    return summary


def step_forward_backward(model: torch.nn.Module, micro_batches: list, global_targets: float, autocast, ctx: Dist) -> float:
    """Forward and backward of one optimiser step's micro-batches on this rank.

    ``global_targets``: the answer tokens of the micro-batches that count, summed over all
    ranks (`Dist.sums`). Each
    micro-batch's summed answer-token loss is divided by the answer tokens of the whole
    global batch (all ranks), times the number of ranks (DDP averages the ranks'
    gradients): the gradient is that of the global batch's mean token loss. With DDP the
    gradient all-reduce runs once, in the last micro-batch's backward. Returns the global
    batch's mean token loss.
    """
    if global_targets == 0:
        raise IloraError("a training step has no answer tokens (every label is -100)")
    loss_sum = None
    for j, (batch, counts) in enumerate(micro_batches):
        defer_sync = ctx.enabled and j < len(micro_batches) - 1
        with model.no_sync() if defer_sync else contextlib.nullcontext():
            with autocast:
                summed = model(batch)
            (summed * (ctx.world_size * float(counts) / global_targets)).backward()
        if counts:
            loss_sum = summed.detach().double() if loss_sum is None else loss_sum + summed.detach().double()
    local = 0.0 if loss_sum is None else float(loss_sum)  # None: this rank only ran a weight-0 stand-in
    return ctx.sum(local) / global_targets

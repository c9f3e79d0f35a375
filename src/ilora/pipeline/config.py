"""`RunConfig`: every stage's options in one YAML file (`ilora run CONFIG.yaml key=value ...`).

Sections: ``data``, ``rec`` (`RecTrainConfig`), ``teacher`` (`TeacherConfig`), ``eval``,
``export`` and ``distill``; dotted overrides reach them (``teacher.max_steps=100``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ilora.config import option
from ilora.data.synthetic import SynthConfig
from ilora.distill.train import DistillConfig
from ilora.outputs.export import ExportOptions
from ilora.errors import ConfigError
from ilora.rec.train import RecTrainConfig
from ilora.teacher.config import TeacherConfig


@dataclass
class DataSection:
    path: str = option("", "dataset path (any format `ilora data stats` reads); empty: synthetic data from `synth`")
    format: Literal["auto", "native", "llara", "interactions"] = option("auto", "auto, native, llara or interactions (of data.path)")
    allow_pickle: bool = option(False, "allow legacy .df pickles (restricted unpickler)")
    min_len: int = option(1, "drop samples with fewer history items (the reference loaders use 3)")
    synth: SynthConfig = field(default_factory=SynthConfig, metadata={"help": "synthetic data options (when path is empty)"})

    def __post_init__(self) -> None:
        if self.min_len < 1:
            raise ConfigError(f"data.min_len: must be >= 1, got {self.min_len}")
        if not self.path and self.format != "auto":
            raise ConfigError(f"data.format={self.format}: applies to data.path, which is empty (synthetic data); leave format at auto")


@dataclass
class EvalSection:
    split: Literal["train", "val", "test"] = option("test", "split the teacher is evaluated on")
    candidates: int = option(20, "candidates per sample (target included)")
    seed: int = option(0, "seed of the fixed candidate sets")
    limit: int = option(0, "evaluate the teacher on the first N samples only (0: all)")
    protocols: list[str] = option(["score"], "score and/or generate (a YAML list; comma-separated as key=value); the stage runs on teacher.device")
    gates: list[str] = option(["learned", "uniform", "experts"], "learned, uniform, expert:N, or experts (every expert:N)")
    batch_size: int = option(16, "prompts per batch")
    max_new_tokens: int = option(0, "generate protocol: most tokens decoded (0: the longest title + 8; LLaRA used 64)")

    def __post_init__(self) -> None:
        if self.candidates < 2:
            raise ConfigError(f"eval.candidates: must be >= 2 (the target and at least one other item), got {self.candidates}")
        if self.max_new_tokens < 0:
            raise ConfigError(f"eval.max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size: must be >= 1, got {self.batch_size}")
        if self.limit < 0:
            raise ConfigError(f"eval.limit: must be >= 0 (0: every sample), got {self.limit}")
        for name in ("protocols", "gates"):
            if not getattr(self, name):
                raise ConfigError(f"eval.{name}: empty; the evaluation needs at least one (default {EvalSection.__dataclass_fields__[name].default_factory()})")
        bad = [p for p in self.protocols if p not in ("score", "generate")]
        if bad:
            raise ConfigError(f"eval.protocols: {bad[0]!r} is not score or generate")


@dataclass
class RunConfig:
    out: str = option("runs/run", "run directory; stages whose outputs there match the config are skipped")
    data: DataSection = field(default_factory=DataSection, metadata={"help": "dataset"})
    rec: RecTrainConfig = field(default_factory=RecTrainConfig, metadata={"help": "SASRec (ilora rec train options)"})
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "teacher (ilora teacher train options)"})
    eval: EvalSection = field(default_factory=EvalSection, metadata={"help": "teacher evaluation"})
    export: ExportOptions = field(default_factory=ExportOptions, metadata={"help": "teacher outputs (ilora teacher export options)"})
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={"help": "students (ilora distill options)"})


def check_run_config(cfg: RunConfig) -> None:
    """`ConfigError` before any stage runs for options a later stage would refuse: the SASRec
    and student options (their ``validate``), a train-less export or a partial one that does
    not cover the students' ``train_limit`` samples (distillation reads a teacher row for every
    train sample it trains on) and the evaluation's gates."""
    from ilora.teacher.config import check_training_options
    from ilora.teacher.model import parse_gate_mode

    try:
        check_training_options(cfg.teacher)
    except ConfigError as exc:
        raise ConfigError(f"teacher: {exc}") from None
    for section in ("rec", "distill"):  # devices: `check_devices`, when a stage has work to do
        try:
            getattr(cfg, section).validate(check_device=False)
        except ConfigError as exc:
            raise ConfigError(f"{section}: {exc}") from None
    if cfg.export.limit and not 0 < cfg.distill.train_limit <= cfg.export.limit:
        raise ConfigError(
            f"export.limit={cfg.export.limit} with distill.train_limit={cfg.distill.train_limit}: the students need a teacher "
            f"row for every train sample they train on; set distill.train_limit to at most {cfg.export.limit} (they then "
            "train on that many first train samples), or export.limit=0 to export every sample"
        )
    if cfg.distill.top_k > cfg.export.top_k:
        raise ConfigError(
            f"distill.top_k={cfg.distill.top_k} exceeds export.top_k={cfg.export.top_k}: the students read the first distill.top_k "
            "of each exported row; lower distill.top_k or raise export.top_k"
        )
    if "train" not in cfg.export.splits:
        raise ConfigError(f"export.splits={list(cfg.export.splits)}: the run's distillation reads the train split's outputs; include train")
    for gate in cfg.eval.gates:
        if gate != "experts":
            try:
                parse_gate_mode(gate, cfg.teacher.num_experts)
            except ConfigError as exc:
                raise ConfigError(f"eval.gates: {exc}") from None


DEVICE_SECTIONS = ("rec", "teacher", "export", "distill")


def check_devices(cfg: RunConfig, sections: tuple[str, ...] = DEVICE_SECTIONS) -> None:
    """`ConfigError` for one of ``sections`` on ``cuda`` where torch sees no CUDA device. Checked
    when a stage is about to run, for the sections it and the stages that read it use, so a
    finished run still rebuilds its report on a machine without a GPU, and a section whose
    stages are done is never asked to change (changing it would make them stale)."""
    import torch

    if not torch.cuda.is_available():
        for section in sections:
            if getattr(cfg, section).device == "cuda":
                raise ConfigError(f"{section}.device=cuda but torch sees no CUDA device (set {section}.device=cpu)")


def demo_config(out: str = "demo_out") -> RunConfig:
    """The embedded default of `ilora demo` (which adds a seed control, `with_demo_control`):
    synthetic data, tiny models, CPU, a few minutes."""
    cfg = RunConfig(out=out)
    cfg.rec.epochs = 20
    cfg.teacher.max_steps = 150
    cfg.teacher.batch_size = 16
    cfg.teacher.lr = 2e-3
    cfg.teacher.val_samples = 100
    cfg.eval.limit = 200
    cfg.eval.batch_size = 32
    cfg.export = replace(cfg.export, batch_size=32)
    cfg.distill.epochs = 20
    return cfg


def with_demo_control(cfg: RunConfig, overrides: dict) -> RunConfig:
    """The demo's ``cfg`` with a seed control for its distillation (`DistillConfig.control_seed`):
    ``distill.seed + 1``, unless the user's ``overrides`` set ``distill.control_seed`` (to none, say)."""
    if "control_seed" not in (overrides.get("distill") or {}):
        cfg.distill.control_seed = cfg.distill.seed + 1
    return cfg

"""`TeacherConfig`: every option of `ilora teacher train`, flat so each one is a CLI flag.

Every option is checked when the config is built (`TeacherConfig.__post_init__`), before
any data, model or output directory is touched: counts and sizes in range, finite
positive learning rate, ``batch_size`` a multiple of ``micro_batch_size``, a known
``select_metric``, an existing prompt template, tiny-LLM sizes that make a model. What
needs the model itself (``target_modules`` naming layers it has) is checked when the
teacher is built, before training.

There is no total-rank option: the rank is given per expert (``rank_per_expert``) and
the stacked LoRA's rank is ``num_experts * rank_per_expert``, so it is always divisible
by the number of experts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from ilora.config import option, without_added_defaults as drop_added_defaults
from ilora.errors import ConfigError
from ilora.teacher.adapters import MoELoraConfig
from ilora.teacher.gate import GateConfig

# Options added after runs were already being recorded, with the fixed values every run had
# before they existed. A record missing one of them reads as that value (`with_added_defaults`;
# `ilora run`'s stage records: `without_added_defaults`). Pinned here, not read from the
# current defaults: a later change of a default must not make old records match it.
ADDED_OPTIONS: dict[str, object] = {"gate_blocks": 2, "gate_pool": 8, "gate_temperature": 1.0, "share_adapter_inputs": False, "threads": None}

# Metrics of the score protocol that can select the best checkpoint (``select_metric``).
SELECT_METRICS = ("hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr", "mean_target_logprob")


@dataclass
class TeacherConfig:
    # -- model -----------------------------------------------------------------------------------
    llm: str = option("tiny", "base LLM: 'tiny' (a small Llama or Qwen2, tiny_arch, built offline from a config) or any AutoModelForCausalLM path / hub id")
    trust_remote_code: bool = option(False, "allow the model repository's own Python code (off: never trusted by default)")
    domain: str = option("music", "prompt template: music, movie, game, or a path to a template file")
    max_title_tokens: int = option(24, "titles are truncated to this many tokens")
    tiny_arch: Literal["llama", "qwen2"] = option("llama", "tiny LLM architecture (and tokenizer style): llama or qwen2")
    tiny_hidden: int = option(64, "tiny LLM: hidden size")
    tiny_layers: int = option(2, "tiny LLM: decoder layers")
    tiny_heads: int = option(4, "tiny LLM: attention heads")
    tiny_vocab: int = option(2000, "tiny LLM: tokenizer vocabulary size (BPE trained on the titles and prompt words)")
    # -- adapters and gate --------------------------------------------------------------------------
    num_experts: int = option(4, "number of LoRA experts E (iLoRA: 4)")
    rank_per_expert: int = option(2, "rank of each expert; total rank = E x rank (iLoRA: 4 x 2 = 8)")
    alpha: float = option(32.0, "LoRA alpha (iLoRA: 32)")
    scaling_convention: Literal["per_expert", "total"] = option(
        "per_expert", "per_expert: scaling = alpha / rank_per_expert (iLoRA's: 16); total: alpha / (E x rank) (peft's usual: 4)"
    )
    lora_dropout: float = option(
        0.1, "dropout on the adapter input (iLoRA/LLaRA: 0.1); costs 5.8 % of a compiled 7B step and 14.7 GiB at micro-batch 32, 3.5 % and 6.8 GiB with share_adapter_inputs (H100, bench/RESULTS.md)"
    )
    share_adapter_inputs: bool = option(
        False,
        "adapters of layers that read one input (q/k/v, gate/up) draw one dropout mask and run one A product per input "
        "(as LoRA on a fused qkv projection) instead of one per layer; the same results without dropout (teacher/shared_input.py)",
    )
    target_modules: list[str] = option([], "linear layers to adapt (comma-separated names); empty = q,k,v,o,gate,up,down_proj")
    gate: Literal["mlp", "resnet"] = option("mlp", "gate network on SASRec's user representation: mlp or resnet (a small 1-D conv router like iLoRA's)")
    gate_hidden: int = option(32, "gate network width")
    gate_blocks: int = option(2, "resnet gate: residual conv blocks")
    gate_pool: int = option(8, "resnet gate: positions kept by the adaptive average pool before its last Linear")
    gate_temperature: float = option(1.0, "softmax temperature of the gate (below 1: sharper expert choice)")
    # -- training ---------------------------------------------------------------------------------
    epochs: int = option(1, "training epochs")
    max_steps: int = option(0, "stop after this many optimiser steps (0: no limit; for smoke runs)")
    batch_size: int = option(8, "global batch size (samples per optimiser step, all ranks together)")
    group_by_length: bool = option(False, "batches of similar prompt length (windows of 64 batches sorted by length, batch order shuffled): less padding")
    micro_batch_size: int = option(0, "samples per forward/backward on one rank; batch_size must be a multiple (0: = batch_size)")
    lr: float = option(7e-4, "learning rate of the adapters and the projector (iLoRA: 7e-4)")
    router_lr_scale: float = option(0.3, "the gate network's lr is this times lr (iLoRA: 0.3)")
    weight_decay: float = option(0.0, "AdamW (decoupled) weight decay on every trainable group (iLoRA: 1e-5 as L2 in Adam, projector and gate only)")
    warmup_ratio: float = option(0.05, "linear warm-up over this fraction of the optimiser steps")
    min_lr_ratio: float = option(0.1, "cosine decay ends at this fraction of lr")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)")
    curriculum: bool = option(True, "LLaRA's curriculum: the probability of the hybrid prompt rises 0 -> 1 over training; text-only [PH] prompts otherwise")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (non-reentrant; the gate is restored during recomputation)")
    compile: bool = option(
        False,
        "torch.compile the decoder layers for the training steps (validation and export stay eager); "
        "a 7B step 1.43x faster in `ilora bench step --compile` on an H200 (bench/RESULTS.md); not with gradient_checkpointing",
    )
    num_candidates: int = option(20, "candidates per prompt (the target plus items not in the history)")
    candidate_seed: int = option(0, "seed of the fixed candidate sets")
    eval_batch_size: int = option(16, "prompts per batch in validation")
    val_samples: int = option(0, "validate on at most this many val samples (0: all)")
    select_metric: str = option("mrr", f"validation metric (score protocol) that picks the best checkpoint: {', '.join(SELECT_METRICS)}")
    workers: int = option(0, "DataLoader workers building the prompt batches")
    seed: int = option(0, "random seed")
    checkpoint_every: int = option(0, "write a resumable checkpoint every N optimiser steps into checkpoints/ in the teacher's output folder (in a run: teacher/model/; 0: off)")
    skip_nonfinite: bool = option(False, "skip a step whose loss or gradient is NaN/inf instead of stopping the run")
    device: Literal["cpu", "cuda"] = option("cpu", "cpu or cuda (bf16 autocast and a bf16 base on cuda)")
    threads: int | None = option(None, "CPU threads for torch while training (ilora run: also its eval and export stages; none: torch's default, every core)")

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "num_candidates", "eval_batch_size", "max_title_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads: must be >= 1 (or none: torch's default), got {self.threads}")
        if self.num_candidates < 2:
            raise ConfigError(f"num_candidates: must be >= 2 (the target and at least one other item), got {self.num_candidates}")
        for name in ("max_steps", "micro_batch_size", "val_samples", "workers", "candidate_seed", "seed", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.compile and self.gradient_checkpointing:
            raise ConfigError("compile and gradient_checkpointing cannot be combined: checkpointing wraps the layer calls that compile traces")
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise ConfigError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {micro}")
        self._check_numbers()
        if self.select_metric not in SELECT_METRICS:
            raise ConfigError(f"select_metric: {self.select_metric!r} is not one of {', '.join(SELECT_METRICS)}")
        if self.llm == "tiny":
            self._check_tiny()
        # the adapter's and the gate's own checks, their messages naming this config's options
        _named_as_options(self.adapter_config, ADAPTER_OPTION_NAMES)
        _named_as_options(self.gate_config, GATE_OPTION_NAMES)
        if self.share_adapter_inputs and self.target_modules:
            from ilora.teacher.shared_input import SHARED_INPUT_NAMES, names_share_an_input

            if not names_share_an_input(self.target_modules):
                raise ConfigError(
                    f"share_adapter_inputs: target_modules {', '.join(self.target_modules)} adapt no two layers that read one input "
                    f"({'; '.join('/'.join(entry) for entry in SHARED_INPUT_NAMES)}); turn the option off or adapt them"
                )
        default = GateConfig()
        if self.gate == "mlp" and (self.gate_blocks, self.gate_pool) != (default.blocks, default.pool):
            raise ConfigError(
                f"gate_blocks ({self.gate_blocks}) and gate_pool ({self.gate_pool}) apply to the resnet gate only; this config has gate: mlp"
            )

    def _check_numbers(self) -> None:
        """Learning-rate schedule and regularisation options: finite and in range."""
        ranges = {
            "lr": (0.0, math.inf, False),
            "router_lr_scale": (0.0, math.inf, True),
            "weight_decay": (0.0, math.inf, True),
            "grad_clip": (0.0, math.inf, True),
            "warmup_ratio": (0.0, 1.0, True),
            "min_lr_ratio": (0.0, 1.0, True),
        }
        for name, (low, high, low_ok) in ranges.items():
            value = getattr(self, name)
            if not math.isfinite(value) or value > high or value < low or (value == low and not low_ok):
                bound = f"{'>=' if low_ok else '>'} {low}" + ("" if high == math.inf else f" and <= {high}")
                raise ConfigError(f"{name}: must be a finite number {bound}, got {value}")

    def _check_tiny(self) -> None:
        """Sizes of the tiny LLM: positive, and heads dividing the hidden size into an even head size (RoPE)."""
        for name in ("tiny_hidden", "tiny_layers", "tiny_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.tiny_hidden % self.tiny_heads or (self.tiny_hidden // self.tiny_heads) % 2:
            raise ConfigError(
                f"tiny_hidden {self.tiny_hidden} / tiny_heads {self.tiny_heads}: the head size must be a whole, even number"
            )
        if self.tiny_vocab < 1:
            raise ConfigError(f"tiny_vocab: must be >= 1, got {self.tiny_vocab}")

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)

    def adapter_config(self) -> MoELoraConfig:
        return MoELoraConfig(
            num_experts=self.num_experts,
            rank_per_expert=self.rank_per_expert,
            alpha=self.alpha,
            scaling_convention=self.scaling_convention,
            dropout=self.lora_dropout,
            target_modules=list(self.target_modules),
        )

    def gate_config(self) -> GateConfig:
        return GateConfig(
            kind=self.gate, hidden=self.gate_hidden, blocks=self.gate_blocks, pool=self.gate_pool, temperature=self.gate_temperature
        )


# What `MoELoraConfig`'s and `GateConfig`'s error messages call an option -> its `TeacherConfig` name.
ADAPTER_OPTION_NAMES = {"dropout": "lora_dropout"}
GATE_OPTION_NAMES = {"gate kind": "gate", "gate hidden": "gate_hidden", "gate blocks": "gate_blocks", "gate pool": "gate_pool", "gate temperature": "gate_temperature"}


def _named_as_options(build, names: dict[str, str]) -> None:
    """Run ``build``; a `ConfigError` whose message starts with a key of ``names`` is raised
    again starting with its value: the name of the flag and key the user set."""
    try:
        build()
    except ConfigError as exc:
        text = str(exc)
        for inner, outer in names.items():
            if text.startswith(inner + ":"):
                raise ConfigError(outer + text[len(inner) :]) from None
        raise


def with_added_defaults(saved: dict) -> dict:
    """``saved`` (a recorded ``TeacherConfig``) with each `ADDED_OPTIONS` entry it lacks set to
    the value runs had before the option existed."""
    return {**ADDED_OPTIONS, **saved}


def without_added_defaults(config: dict) -> dict:
    """``config`` (a ``TeacherConfig`` as a dict) as a version before `ADDED_OPTIONS` recorded
    it: those entries dropped where they hold their old fixed values (kept where they do not)."""
    return drop_added_defaults(config, ADDED_OPTIONS)


def _tiny_defaults() -> dict[str, object]:
    """The ``tiny_*`` options (they build ``--llm tiny`` only) with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(TeacherConfig) if f.name.startswith("tiny_")}


def tiny_options_reset(config: dict) -> dict:
    """``config`` (a ``TeacherConfig`` as a dict) with its ``tiny_*`` options at their defaults
    where the base LLM is not the tiny one: they build nothing then, so records that differ only
    in them stand for the same teacher (training refuses them now; runs recorded before did not)."""
    if config.get("llm", "tiny") == "tiny":
        return config
    return {**config, **{k: v for k, v in _tiny_defaults().items() if k in config}}


TEMPLATE_FILE = "<a template file>"


def template_file_reset(config: dict) -> dict:
    """``config`` with the path of a template file (a ``domain`` that is no packaged domain) left
    out: where its text is compared by fingerprint (a teacher's resume inputs, ``ilora run``'s
    teacher stage record), ``./mine.txt``, ``mine.txt`` or a copy stand for the same template."""
    from ilora.teacher.prompts import DOMAINS

    if isinstance(config.get("domain"), str) and config["domain"] not in DOMAINS:
        return {**config, "domain": TEMPLATE_FILE}
    return config


def same_teacher_form(config: dict) -> dict:
    """What two teacher records must agree on to stand for the same training: `without_added_defaults`
    of `tiny_options_reset`, with a template file's path left out where the record holds its text's
    fingerprint (``ilora run``'s teacher stage compares records in this form; one recorded before
    that fingerprint is compared by the path)."""
    form = without_added_defaults(tiny_options_reset(config))
    return template_file_reset(form) if "domain_template_sha256" in form else form


def check_training_options(cfg: TeacherConfig) -> None:
    """`ConfigError` for options only training refuses: a teacher saved with them still loads,
    evaluates and exports (its ``select_metric`` is no longer used then, and its prompt template
    is the one recorded in it, not ``domain``'s file)."""
    from ilora.teacher.prompts import load_template

    load_template(cfg.domain)  # an unknown domain or a missing template file fails now
    if cfg.llm != "tiny":  # the tiny model's options would otherwise be recorded and silently unused
        given = [f"{name}={getattr(cfg, name)}" for name, default in _tiny_defaults().items() if getattr(cfg, name) != default]
        if given:
            raise ConfigError(f"{', '.join(given)}: the tiny_* options build --llm tiny only, and the base LLM is {cfg.llm!r}; leave them out")
    if cfg.select_metric == "hr@5" and cfg.num_candidates <= 5:
        raise ConfigError(
            f"select_metric hr@5 is 1.0 for every epoch with num_candidates {cfg.num_candidates} (the target is always "
            "among the first 5), so it would keep the first epoch; pick another metric or more candidates"
        )

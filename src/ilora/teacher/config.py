"""`TeacherConfig`: every option of `ilora teacher train`, flat so each one is a CLI flag."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ilora.config import option
from ilora.errors import ConfigError
from ilora.teacher.adapters import MoELoraConfig
from ilora.teacher.gate import GateConfig


@dataclass
class TeacherConfig:
    # -- model -----------------------------------------------------------------------------------
    llm: str = option("tiny", "base LLM: 'tiny' (a small Llama built offline from a config) or any AutoModelForCausalLM path / hub id")
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
    lora_dropout: float = option(0.05, "dropout on the adapter input")
    target_modules: list[str] = option([], "linear layers to adapt (comma-separated names); empty = q,k,v,o,gate,up,down_proj")
    gate: Literal["mlp", "resnet"] = option("mlp", "gate network on SASRec's user representation: mlp or resnet (iLoRA's 1-D conv router)")
    gate_hidden: int = option(32, "gate network width")
    # -- training ---------------------------------------------------------------------------------
    epochs: int = option(1, "training epochs")
    max_steps: int = option(0, "stop after this many optimiser steps (0: no limit; for smoke runs)")
    batch_size: int = option(8, "global batch size (samples per optimiser step)")
    micro_batch_size: int = option(0, "samples per forward/backward; batch_size must be a multiple (0: = batch_size)")
    lr: float = option(7e-4, "learning rate of the adapters and the projector (iLoRA: 7e-4)")
    router_lr_scale: float = option(0.3, "the gate network's lr is this times lr (iLoRA: 0.3)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.05, "linear warm-up over this fraction of the optimiser steps")
    min_lr_ratio: float = option(0.1, "cosine decay ends at this fraction of lr")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)")
    curriculum: bool = option(True, "LLaRA's curriculum: the probability of the hybrid prompt rises 0 -> 1 over training; text-only [PH] prompts otherwise")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (non-reentrant; the gate is restored during recomputation)")
    num_candidates: int = option(20, "candidates per prompt (the target plus items not in the history)")
    candidate_seed: int = option(0, "seed of the fixed candidate sets")
    eval_batch_size: int = option(16, "prompts per batch in validation")
    val_samples: int = option(0, "validate on at most this many val samples (0: all)")
    select_metric: str = option("mrr", "validation metric (score protocol) that picks the best checkpoint")
    workers: int = option(0, "DataLoader workers building the prompt batches")
    seed: int = option(0, "random seed")
    device: Literal["cpu", "cuda"] = option("cpu", "cpu or cuda (bf16 autocast and a bf16 base on cuda)")

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "num_candidates", "eval_batch_size", "max_title_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        micro = self.micro_batch_size or self.batch_size
        if micro < 1 or self.batch_size % micro:
            raise ConfigError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {micro}")
        self.adapter_config()  # validates the adapter options
        self.gate_config()

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
        return GateConfig(kind=self.gate, hidden=self.gate_hidden)

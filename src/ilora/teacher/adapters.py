"""Instance-wise gated LoRA experts (iLoRA) on a frozen causal LM's linear layers.

iLoRA puts ``E`` LoRA experts of rank ``r`` on every adapted linear layer. A gate network
reads the sample's user representation (SASRec's 64-d vector) and gives softmax weights
``g[b, :]`` over the experts, once per sample; every adapted layer uses the same weights.
For sample ``b`` an adapted layer computes::

    W x + scaling * sum_e g[b, e] * B_e A_e x

Stacking the experts gives one LoRA of rank ``E * r`` with a per-sample diagonal scale
between ``A`` and ``B``: ``A`` is ``(E*r, in)`` (expert ``e`` owns rows ``e*r:(e+1)*r``),
``B`` is ``(out, E*r)`` (expert ``e`` owns the same columns) and::

    W x + B (scaling * g_expanded[b] * (A x))

where ``g_expanded`` repeats each ``g[b, e]`` ``r`` times. `GatedLoraLinear` computes exactly
that; no ``(batch, tokens, E, out)`` tensor is ever made.

The gate reaches the layers through a `GateState` shared by all adapted layers of one
model: ``with state.use(gates): model(...)``. A layer that runs with no gate set raises;
it never falls back to plain LoRA. Gradient checkpointing must go through
`enable_gradient_checkpointing`, which hands torch's non-reentrant checkpoint a
``context_fn`` that restores the forward's gate when the layer is recomputed in backward.

Files: `save_adapters` writes peft's LoRA format (``adapter_model.safetensors`` with
peft's keys, ``adapter_config.json`` with peft's LoRA fields), so peft reads the experts
as one plain LoRA of rank ``E*r`` that equals our model under the uniform gate, plus
``ilora_adapter.json`` with the expert layout. The gate network is NOT in these files:
the teacher checkpoint saves it, and a teacher must be loaded through the one function
that restores both (the teacher's ``load_teacher``); `load_adapters` alone gives experts
without a gate, which refuse to run until a gate is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Literal

import torch
from torch import nn

from ilora.config import from_dict, option
from ilora.state_io import load_tensors, read_json, save_tensors
from ilora.errors import ConfigError, IloraError

# Linear layers adapted by default (iLoRA / LLaRA adapt attention and MLP projections).
LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEFT_PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
ILORA_CONFIG_FILE = "ilora_adapter.json"
ILORA_FORMAT = "ilora-gated-lora"
ILORA_FORMAT_VERSION = 1


@dataclass
class MoELoraConfig:
    """The LoRA experts: how many, their rank, scaling, dropout and which layers get them.

    iLoRA's setting is a total LoRA rank of 8 split into 4 experts of rank 2, ``alpha``
    32 and scaling ``alpha / rank_per_expert`` = 16 (``scaling_convention="per_expert"``).
    """

    num_experts: int = option(4, "number of LoRA experts E (iLoRA: 4)")
    rank_per_expert: int = option(2, "rank r of each expert; total LoRA rank is E*r (iLoRA: total rank 8 = 4 experts of rank 2)")
    alpha: float = option(32.0, "LoRA alpha; the scaling is alpha / rank_per_expert or alpha / (E*r), see scaling_convention")
    scaling_convention: Literal["per_expert", "total"] = option(
        "per_expert", "per_expert: scaling = alpha / rank_per_expert (iLoRA's); total: alpha / (E*r) (peft's usual for rank E*r)"
    )
    dropout: float = option(0.1, "dropout on the adapter input (as peft's lora_dropout; iLoRA/LLaRA: 0.1)")
    target_modules: list[str] = option(
        [], "linear layers to adapt, by name or dotted path suffix; empty = auto (q,k,v,o,gate,up,down_proj)"
    )
    init: Literal["zeros", "random"] = option(
        "zeros", "zeros: B = 0 so training starts from the base model (peft's default); random: B kaiming-uniform too. A is always kaiming-uniform as in peft"
    )

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"num_experts: must be >= 1, got {self.num_experts}")
        if self.rank_per_expert < 1:
            raise ConfigError(f"rank_per_expert: must be >= 1, got {self.rank_per_expert}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha: must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.scaling_convention not in ("per_expert", "total"):
            raise ConfigError(f"scaling_convention: {self.scaling_convention!r} is not one of per_expert, total")
        if self.init not in ("zeros", "random"):
            raise ConfigError(f"init: {self.init!r} is not one of zeros, random")

    @property
    def total_rank(self) -> int:
        """Rank of the stacked LoRA: ``num_experts * rank_per_expert``."""
        return self.num_experts * self.rank_per_expert

    @property
    def scaling(self) -> float:
        """The factor on the adapter's output."""
        if self.scaling_convention == "per_expert":
            return self.alpha / self.rank_per_expert
        return self.alpha / self.total_rank


# -- the gate, shared by all adapted layers of one model ----------------------------------------


class GateNotSetError(RuntimeError):
    """A gated LoRA layer ran with no gate in scope."""


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (e.g. a checkpoint recomputes).

    Always False while torch.compile traces: Dynamo cannot trace
    ``torch._C._current_graph_task_id`` (it would break the graph at every adapted layer),
    so a compiled layer skips the check. Checkpointing plus compile is unsupported (see
    `enable_gradient_checkpointing`; ``ilora bench step`` refuses the pair), so a compiled
    layer is never recomputed in backward by our code.
    """
    if torch.compiler.is_compiling():
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a LoRA adapter of ``dtype`` reads it: cast to ``dtype`` outside autocast;
    unchanged under autocast, which runs the products in its own dtype anyway (a copy in
    ``dtype`` would be made only to be cast back)."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


class LoraDropout(nn.Dropout):
    """``nn.Dropout`` whose backward keeps a bool mask on the CPU too.

    torch's CUDA dropout saves a 1-byte keep-mask for backward; its CPU kernel multiplies by
    a noise tensor of the input's dtype and saves that (4 bytes an element in float32, as much
    as the dropped input LoRA's ``A`` product saves anyway). On the CPU this draws ``rand >= p`` and selects,
    so backward keeps only the bool mask; it is also faster there (``ilora bench adapter``).
    Same distribution and scale as ``nn.Dropout``, different draws for a given seed. Other
    devices use torch's kernel. Gradient checkpointing restores the RNG state, so a
    recompute draws the forward's mask.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), 0.0)


def scale_and_expand(gates: torch.Tensor, rank_per_expert: int, scaling: float) -> torch.Tensor:
    """``scaling * gates`` with each expert's weight repeated ``rank_per_expert`` times:
    ``(B, E) -> (B, E*r)``, ``(B, T, E) -> (B, T, E*r)``; the rank-space scale of `GatedLoraLinear`."""
    return (gates * scaling).repeat_interleave(rank_per_expert, dim=-1)


class _RestoreGate:
    """Recompute context of one checkpointed call: sets the gate (and its expansions) captured at forward time."""

    def __init__(self, state: GateState, gate: torch.Tensor | None, scaled: dict[tuple[int, float], torch.Tensor]) -> None:
        self.state = state
        self.gate = gate
        self.scaled = scaled
        self._previous: list[tuple[torch.Tensor | None, dict[tuple[int, float], torch.Tensor]]] = []

    def __enter__(self) -> None:
        self._previous.append((self.state._gate, self.state._scaled))
        self.state._gate, self.state._scaled = self.gate, self.scaled
        self.state._restoring += 1

    def __exit__(self, *exc: object) -> bool:
        self.state._gate, self.state._scaled = self._previous.pop()
        self.state._restoring -= 1
        return False


class GateState:
    """The current per-sample gate of one model, read by each of its gated LoRA layers.

    Held by every `GatedLoraLinear` of the model and by whoever owns the model; there is
    no global state. ``with state.use(gates):`` sets a ``(B, E)`` gate (or a per-token
    ``(B, T, E)`` gate) for one forward and clears it on exit.

    Each layer registers its ``(rank_per_expert, scaling)`` when built; `use` computes the
    rank-space scale (`scale_and_expand`) once per registered pair, so the layers of a
    model (which normally share one pair) read one precomputed tensor instead of each
    expanding the gate again, forward and backward.
    """

    def __init__(self, num_experts: int) -> None:
        if num_experts < 1:
            raise ConfigError(f"num_experts: must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self._gate: torch.Tensor | None = None
        self._scales: set[tuple[int, float]] = set()
        self._scaled: dict[tuple[int, float], torch.Tensor] = {}
        self._restoring = 0

    def register(self, rank_per_expert: int, scaling: float) -> None:
        """Precompute the gate's expansion for layers of this rank and scaling in every `use`."""
        self._scales.add((int(rank_per_expert), float(scaling)))

    @property
    def is_set(self) -> bool:
        return self._gate is not None

    @contextlib.contextmanager
    def use(self, gates: torch.Tensor) -> Iterator[torch.Tensor]:
        """Set ``gates`` (``(B, E)`` or ``(B, T, E)``) for the duration of the block."""
        if not isinstance(gates, torch.Tensor) or gates.dim() not in (2, 3) or gates.shape[-1] != self.num_experts:
            shape = tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__
            raise ValueError(f"gates must be a (batch, {self.num_experts}) or (batch, tokens, {self.num_experts}) tensor, got {shape}")
        if not gates.is_floating_point():
            raise ValueError(f"gates must be floating point, got {gates.dtype}")
        if self._gate is not None:
            raise RuntimeError("a gate is already in use for this model: GateState.use scopes cannot be nested")
        scaled = {key: scale_and_expand(gates, *key) for key in self._scales}  # may raise: nothing set yet
        self._gate, self._scaled = gates, scaled
        try:
            yield gates
        finally:
            self._gate = None
            self._scaled = {}

    def gate_for(self, x: torch.Tensor) -> torch.Tensor:
        """The gate for input ``x`` of shape ``(B, ..., in)``; raises unless it fits ``x``.
        Inputs are batch-first (a model that ran its linear layers on ``(T, B, in)`` would pass
        this check whenever T == B and mix samples up: transformers' decoders are batch-first).

        Outside torch.compile it also raises when called during backward outside a
        checkpoint recompute context (checkpointing not set up by
        `enable_gradient_checkpointing`); see `_in_backward` for why compiled code skips that.
        """
        if not torch.compiler.is_compiling() and self._restoring == 0 and _in_backward():
            raise RuntimeError(
                "a gated LoRA layer is being recomputed during backward without its gate: gradient "
                "checkpointing must be enabled with ilora.teacher.adapters.enable_gradient_checkpointing "
                "(non-reentrant, with the GateState's context_fn)"
            )
        gate = self._gate
        if gate is None:
            raise GateNotSetError(
                "gated LoRA layer called with no gate set: run the model inside `with gate_state.use(gates):` "
                "(use uniform_gate for a plain-LoRA-equivalent model)"
            )
        if x.dim() < 2:
            raise ValueError(f"gated LoRA input must have a batch dimension, got shape {tuple(x.shape)}")
        if gate.shape[0] != x.shape[0]:  # batch-first inputs, as every transformers decoder passes them
            raise RuntimeError(
                f"gate batch size {gate.shape[0]} does not match the layer input's batch size {x.shape[0]} "
                f"(input shape {tuple(x.shape)}): the gate belongs to another batch"
            )
        if gate.dim() == 3 and (x.dim() != 3 or gate.shape[1] != x.shape[1]):
            raise RuntimeError(
                f"per-token gate of shape {tuple(gate.shape)} needs a (batch, {gate.shape[1]}, in) input, got {tuple(x.shape)}"
            )
        return gate

    def scaled_gate_for(self, x: torch.Tensor, rank_per_expert: int, scaling: float) -> torch.Tensor:
        """`scale_and_expand` of the gate for input ``x`` (checked as `gate_for`), precomputed
        by `use` for registered layers: ``(B, E*r)``, or ``(B, T, E*r)`` for a per-token gate."""
        gate = self.gate_for(x)
        scaled = self._scaled.get((rank_per_expert, scaling))
        return scale_and_expand(gate, rank_per_expert, scaling) if scaled is None else scaled

    def checkpoint_context_fn(self) -> Callable[[], tuple[ContextManager[Any], ContextManager[Any]]]:
        """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``.

        torch calls it when a checkpointed forward starts: it captures the gate in scope
        then and returns a recompute context that restores that gate while backward
        recomputes the layer, whatever gate (or none) is in scope by then.
        """

        def context_fn() -> tuple[ContextManager[Any], ContextManager[Any]]:
            return contextlib.nullcontext(), _RestoreGate(self, self._gate, self._scaled)

        return context_fn


# -- the adapted layer ---------------------------------------------------------------------------


class GatedLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``E`` gated LoRA experts stacked as one rank ``E*r`` LoRA.

    ``forward(x) = base_layer(x) + lora_B(lora_A(dropout(x)) * gate_x)`` with ``gate_x`` the
    sample's gate, each expert weight repeated ``r`` times and multiplied by ``scaling``
    (the same product as peft's ``lora_B(...) * scaling``, on a ``(B, E*r)`` vector instead
    of the ``(B, T, out)`` output; computed once per forward by the `GateState`). Outside
    autocast the adapter runs in ``lora_A``'s dtype (the input is cast to it); under
    autocast the input keeps its dtype, since autocast runs the products in its own dtype
    anyway (a float32 copy of the input would be made only to be cast back). The output is
    cast back to the base output's dtype. Layers that read one input (q/k/v, gate/up) can
    compute their ``A`` products together under one dropout mask (`ilora.teacher.shared_input`).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        cfg: MoELoraConfig,
        gate_state: GateState,
        *,
        adapter_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"GatedLoraLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        if gate_state.num_experts != cfg.num_experts:
            raise ConfigError(f"GateState has {gate_state.num_experts} experts but the LoRA config has {cfg.num_experts}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.num_experts = cfg.num_experts
        self.rank_per_expert = cfg.rank_per_expert
        self.scaling = cfg.scaling
        self.gate_state = gate_state
        gate_state.register(self.rank_per_expert, self.scaling)
        factory = {"device": base_layer.weight.device, "dtype": adapter_dtype or base_layer.weight.dtype}
        self.lora_dropout: nn.Module = LoraDropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, cfg.total_rank, bias=False, **factory)
        self.lora_B = nn.Linear(cfg.total_rank, base_layer.out_features, bias=False, **factory)
        # (group, position) when this layer's A product is computed with its siblings' (shared_input.py)
        self.shared_input: tuple[Any, int] | None = None
        self.reset_lora_parameters(cfg.init)

    def reset_lora_parameters(self, init: str = "zeros") -> None:
        """A kaiming-uniform (as peft); B zeros (``"zeros"``) or kaiming-uniform (``"random"``)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init == "zeros":
            nn.init.zeros_(self.lora_B.weight)
        elif init == "random":
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        else:
            raise ConfigError(f"init: {init!r} is not one of zeros, random")

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (some model code reads ``proj.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_x = self.gate_state.scaled_gate_for(x, self.rank_per_expert, self.scaling)
        result = self.base_layer(x)
        if self.shared_input is None or (not torch.compiler.is_compiling() and x.is_inference()):
            h = self.lora_hidden(x)  # an inference tensor has no version counter for the group to check
        else:
            group, position = self.shared_input
            h = group.lora_hidden(position, x)
        if gate_x.dim() == 2:  # per sample: (B, E*r) -> (B, 1, ..., 1, E*r)
            gate_x = gate_x.view(gate_x.shape[0], *([1] * (h.dim() - 2)), gate_x.shape[-1])
        delta = self.lora_B(h * gate_x.to(device=h.device, dtype=h.dtype))
        return result + delta.to(result.dtype)

    def lora_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's own ``lora_A(dropout(x))``, rank ``E*r`` (before the gate)."""
        return self.lora_A(self.lora_dropout(adapter_input(x, self.lora_A.weight.dtype)))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, rank_per_expert={self.rank_per_expert}, scaling={self.scaling:g}"


# -- choosing and replacing layers ---------------------------------------------------------------


def gated_lora_modules(model: nn.Module) -> dict[str, GatedLoraLinear]:
    """Every gated LoRA layer of ``model``, by module path, in model order."""
    return {path: m for path, m in model.named_modules() if isinstance(m, GatedLoraLinear)}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA expert weights (``lora_A`` and ``lora_B`` of every gated layer)."""
    params: list[nn.Parameter] = []
    for layer in gated_lora_modules(model).values():
        params += [layer.lora_A.weight, layer.lora_B.weight]
    return params


def _embedding_module_ids(model: nn.Module) -> set[int]:
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        if isinstance(module, nn.Module):
            ids.add(id(module))
    return ids


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers that may be adapted: not lm_head, not embeddings, not inside a gated layer."""
    excluded = _embedding_module_ids(model)
    gated = list(gated_lora_modules(model))
    found = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in excluded or path.rsplit(".", 1)[-1] == "lm_head":
            continue
        if any(path.startswith(g + ".") for g in gated):
            continue
        found[path] = module
    return found


def _leaf_names(paths: Iterator[str] | list[str]) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", type(model).__name__))


def find_target_modules(model: nn.Module) -> list[str]:
    """The layer names to adapt by default: Llama-style q/k/v/o/gate/up/down projections.

    Works for any model whose linear layers carry those names (Llama, Mistral, Qwen2/3,
    Gemma, ...). Other architectures (GPT-2, Phi-3, ...) raise `ConfigError` listing
    their linear layer names; name the targets explicitly there.
    """
    names = set(_leaf_names(list(linear_modules(model))))
    if all(t in names for t in LLAMA_STYLE_TARGETS):
        return list(LLAMA_STYLE_TARGETS)
    raise ConfigError(
        f"cannot auto-detect LoRA target modules for model type {_model_type(model)!r}: it lacks "
        f"{', '.join(t for t in LLAMA_STYLE_TARGETS if t not in names)}; its linear layers are named "
        f"{', '.join(sorted(names)) or '(none)'}; set target_modules explicitly"
    )


def _matches(path: str, name: str) -> bool:
    """peft's rule for a list of target names: the path equals the name or ends with ``.name``."""
    return path == name or path.endswith("." + name)


def resolve_target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Module paths of the linear layers that ``names`` select, in model order.

    Every name must select at least one adaptable linear layer and nothing else.
    """
    if not names:
        raise ConfigError("target_modules is empty")
    eligible = linear_modules(model)
    modules = dict(model.named_modules())
    selected: set[str] = set()
    for name in names:
        hits = [p for p in modules if _matches(p, name)]
        bad = [p for p in hits if p not in eligible]
        if bad:
            raise ConfigError(
                f"target module {name!r} selects {bad[0]} ({type(modules[bad[0]]).__name__}), which cannot be adapted: "
                f"only nn.Linear layers, never embeddings or lm_head (linear layers: {', '.join(_leaf_names(list(eligible)))})"
            )
        if not hits:
            raise ConfigError(
                f"target module {name!r} matches no layer of this {_model_type(model)} model; its linear layers are named "
                f"{', '.join(_leaf_names(list(eligible))) or '(none)'}"
            )
        selected.update(hits)
    return [p for p in eligible if p in selected]


def inject_gated_lora(
    model: nn.Module,
    cfg: MoELoraConfig,
    state: GateState,
    *,
    adapter_dtype: torch.dtype | None = torch.float32,
) -> list[str]:
    """Replace the target ``nn.Linear`` layers of ``model`` in place by `GatedLoraLinear`.

    Freezes every parameter of ``model`` first, so only the LoRA experts are trainable.
    ``adapter_dtype`` is the experts' dtype (float32 by default, as peft does for a bf16
    base; ``None`` = the base layer's dtype). Returns the adapted module paths.
    """
    if gated_lora_modules(model):
        raise ConfigError("the model already has gated LoRA layers")
    if state.num_experts != cfg.num_experts:
        raise ConfigError(f"GateState has {state.num_experts} experts but the LoRA config has {cfg.num_experts}")
    names = list(cfg.target_modules) or find_target_modules(model)
    paths = resolve_target_modules(model, names)
    model.requires_grad_(False)
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, GatedLoraLinear(getattr(parent, leaf), cfg, state, adapter_dtype=adapter_dtype))
    return paths


# -- gradient checkpointing ----------------------------------------------------------------------


def enable_gradient_checkpointing(model: nn.Module, state: GateState, **checkpoint_kwargs: Any) -> None:
    """Turn on HF gradient checkpointing so that recomputed layers see their forward's gate.

    Calls ``model.activation_checkpointing_enable`` (transformers >= 5.x; older versions:
    ``gradient_checkpointing_enable``) with ``{"use_reentrant": False, "context_fn":
    state.checkpoint_context_fn(), **checkpoint_kwargs}``; transformers hands these to
    ``torch.utils.checkpoint.checkpoint`` for every decoder layer. Reentrant checkpointing
    is refused: it would backpropagate through the gate network's graph once per layer.
    (torch.compile of a checkpointed layer would need the contexts to be dispatch modes;
    not supported.)
    """
    if checkpoint_kwargs.get("use_reentrant", False):
        raise ConfigError(
            "reentrant gradient checkpointing is not supported with gated LoRA (the gate enters every layer "
            "from outside the checkpointed inputs); use the default use_reentrant=False"
        )
    if "context_fn" in checkpoint_kwargs:
        raise ConfigError("context_fn is set by enable_gradient_checkpointing; do not pass one")
    layers = gated_lora_modules(model)
    if not layers:
        raise ConfigError("the model has no gated LoRA layers: inject them before enabling gradient checkpointing")
    if any(layer.gate_state is not state for layer in layers.values()):
        raise ConfigError("the model's gated LoRA layers hold another GateState than the one given")
    kwargs = {**checkpoint_kwargs, "use_reentrant": False, "context_fn": state.checkpoint_context_fn()}
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ConfigError(f"{type(model).__name__} has no gradient checkpointing support (not a transformers model?)")
    enable(kwargs)
    # transformers also makes the embedding output require grad, which only reentrant
    # checkpointing needs: it would cost a (B, T, H) gradient per step and a copy in
    # `substitute_placeholders`
    disable = getattr(model, "disable_input_require_grads", None)
    if callable(disable) and getattr(model, "_require_grads_hook", None) is not None:
        disable()


# -- files -----------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The experts' weights under peft's LoRA keys: ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``."""
    layers = gated_lora_modules(model)
    if not layers:
        raise ConfigError("the model has no gated LoRA layers")
    state: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
    return state


def _peft_target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """Names that make peft adapt exactly ``paths``: their leaf names if that is exact, else the paths."""
    leaves = _leaf_names(paths)
    candidates = list(linear_modules(model)) + list(paths)
    would_adapt = {p for p in candidates if any(_matches(p, leaf) for leaf in leaves)}
    return leaves if would_adapt == set(paths) else list(paths)


def _check_layers_match(model: nn.Module, cfg: MoELoraConfig) -> dict[str, GatedLoraLinear]:
    layers = gated_lora_modules(model)
    if not layers:
        raise ConfigError("the model has no gated LoRA layers")
    for path, layer in layers.items():
        if (layer.num_experts, layer.rank_per_expert) != (cfg.num_experts, cfg.rank_per_expert) or not math.isclose(
            layer.scaling, cfg.scaling
        ):
            raise ConfigError(
                f"{path}: layer has {layer.num_experts} experts of rank {layer.rank_per_expert}, scaling {layer.scaling:g}; "
                f"the config says {cfg.num_experts} of rank {cfg.rank_per_expert}, scaling {cfg.scaling:g}"
            )
    return layers


def save_adapters(
    model: nn.Module,
    cfg: MoELoraConfig,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the experts in peft's LoRA format plus ``ilora_adapter.json``; returns ``out_dir``.

    ``adapter_config.json`` says ``r = E*r`` and ``lora_alpha = scaling * E*r / E`` so that
    peft, reading the file as a plain LoRA (scaling ``lora_alpha / r``), builds the model
    with the uniform gate. The gate network is not saved here (see the module docstring).
    """
    layers = _check_layers_match(model, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = list(layers)
    if base_model_name_or_path is None:
        config = getattr(model, "config", None)
        base_model_name_or_path = getattr(config, "_name_or_path", None) or None
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.total_rank,
        "lora_alpha": cfg.scaling * cfg.total_rank / cfg.num_experts,
        "lora_dropout": cfg.dropout,
        "target_modules": _peft_target_modules(model, paths),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    ilora_config = {
        "format": ILORA_FORMAT,
        "format_version": ILORA_FORMAT_VERSION,
        "num_experts": cfg.num_experts,
        "rank_per_expert": cfg.rank_per_expert,
        "alpha": cfg.alpha,
        "scaling_convention": cfg.scaling_convention,
        "scaling": cfg.scaling,
        "dropout": cfg.dropout,
        "init": cfg.init,
        "target_modules": list(cfg.target_modules),
        "adapted_modules": paths,
        "expert_layout": "lora_A rows and lora_B columns e*r:(e+1)*r belong to expert e",
        "gate_network": "not in this directory: saved with the teacher checkpoint",
    }
    save_tensors(adapter_state_dict(model), out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
    (out / ILORA_CONFIG_FILE).write_text(json.dumps(ilora_config, indent=2) + "\n", encoding="utf-8")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, "file")


def read_adapter_config(adapter_dir: str | Path) -> tuple[MoELoraConfig, list[str]]:
    """The `MoELoraConfig` and adapted module paths saved in ``adapter_dir``, cross-checked with peft's file."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ILORA_CONFIG_FILE
    data = _read_json(path)
    if data.get("format") != ILORA_FORMAT:
        raise IloraError(f"{path}: format is {data.get('format')!r}, expected {ILORA_FORMAT!r}")
    if data.get("format_version") != ILORA_FORMAT_VERSION:
        raise IloraError(f"{path}: format_version {data.get('format_version')!r} is not supported (expected {ILORA_FORMAT_VERSION})")
    fields = {f.name for f in dataclasses.fields(MoELoraConfig)}
    try:
        cfg = from_dict(MoELoraConfig, {k: v for k, v in data.items() if k in fields})
    except ConfigError as exc:
        raise IloraError(f"{path}: {exc}") from None
    adapted = data.get("adapted_modules")
    if not isinstance(adapted, list) or not adapted or not all(isinstance(p, str) for p in adapted):
        raise IloraError(f"{path}: adapted_modules must be a non-empty list of module paths")
    peft_path = adapter_dir / PEFT_CONFIG_FILE
    peft = _read_json(peft_path)
    expected_alpha = cfg.scaling * cfg.total_rank / cfg.num_experts
    alpha = peft.get("lora_alpha")
    alpha_ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isclose(float(alpha), expected_alpha)
    if peft.get("peft_type") != "LORA" or peft.get("r") != cfg.total_rank or not alpha_ok:
        raise IloraError(
            f"{peft_path}: peft_type {peft.get('peft_type')!r}, r {peft.get('r')!r}, lora_alpha {peft.get('lora_alpha')!r} "
            f"disagree with {ILORA_CONFIG_FILE} (expected LORA, {cfg.total_rank}, {expected_alpha:g})"
        )
    return cfg, adapted


def load_adapter_weights(model: nn.Module, adapter_dir: str | Path) -> None:
    """Copy the saved expert weights into the model's gated layers, checking every key and shape."""
    path = Path(adapter_dir) / WEIGHTS_FILE
    saved = load_tensors(path, "the LoRA experts' weights")
    expected = adapter_state_dict(model)
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing:
        raise IloraError(f"{path}: missing key {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        raise IloraError(
            f"{path}: unexpected key {unexpected[0]}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
            + " (no such gated LoRA layer in this model)"
        )
    for key, target in expected.items():
        if saved[key].shape != target.shape:
            raise IloraError(f"{path}: {key} has shape {tuple(saved[key].shape)}, the model expects {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(saved[key])


def load_adapters(
    model: nn.Module,
    adapter_dir: str | Path,
    state: GateState,
    *,
    adapter_dtype: torch.dtype | None = torch.float32,
) -> MoELoraConfig:
    """Inject gated LoRA layers as saved in ``adapter_dir`` and load their weights; returns the config.

    The layers must land on exactly the saved module paths, and those must be every layer
    the saved ``target_modules`` select in ``model``: an adapter saved on another (e.g.
    deeper) base model is refused instead of leaving layers unadapted. The gate network is
    not loaded here: use the teacher's loader, which restores experts and gate together.
    """
    cfg, adapted = read_adapter_config(adapter_dir)
    config_path = Path(adapter_dir) / ILORA_CONFIG_FILE
    if state.num_experts != cfg.num_experts:
        raise ConfigError(f"{config_path}: the saved adapter has {cfg.num_experts} experts, the gate {state.num_experts}")
    modules = dict(model.named_modules())
    for path in adapted:
        if not isinstance(modules.get(path), nn.Linear):
            raise IloraError(f"{config_path}: adapted module {path} is not a linear layer of this model")
    try:
        selected = resolve_target_modules(model, list(cfg.target_modules) or find_target_modules(model))
    except ConfigError as exc:
        raise IloraError(f"{config_path}: {exc}") from None
    uncovered = [path for path in selected if path not in set(adapted)]
    if uncovered:
        raise IloraError(
            f"{config_path}: this model has {len(uncovered)} layer(s) its target_modules select that the saved adapter "
            f"does not cover (first: {uncovered[0]}): it was saved on another base model"
        )
    inject_gated_lora(model, dataclasses.replace(cfg, target_modules=list(adapted)), state, adapter_dtype=adapter_dtype)
    load_adapter_weights(model, adapter_dir)
    return cfg

"""Gated LoRA layers that read the same input: one dropout mask and one A product for the group.

In a Llama-style decoder layer, ``q_proj``, ``k_proj`` and ``v_proj`` read the same tensor
(the attention's normalised input), and so do ``gate_proj`` and ``up_proj``. On its own,
each `GatedLoraLinear` draws a dropout mask on that tensor, keeps the dropped copy for
backward and runs its rank ``E*r`` ``A`` product on it, and backward runs one weight-gradient
and one input-gradient product per layer: per decoder layer, 7 masks, 7 dropped copies and
21 ``A``-side products. A `SharedInput` groups such sibling layers. The first member called
with an input computes ``dropout(x) @ [A_1; A_2; ...]^T`` once, with one mask, and every
member called with that same tensor takes its columns of the result; the ``B`` products and
the gate stay per layer. Per decoder layer that leaves 4 masks, 4 dropped copies and 12
``A``-side products.

Without dropout the outputs and gradients equal the ungrouped layers' (up to the order of
floating-point sums). With dropout the members share one mask per input, as LoRA on a model
with one fused ``qkv_proj`` does, instead of one mask per layer (peft, iLoRA, LLaRA): a
different draw of the same regularisation, hence an option (``share_adapter_inputs``), off
by default.

A member takes the group's result only for the very tensor it was computed from (the same
object and, outside torch.compile, the same version: not modified in place since); called
with any other tensor it computes the whole group's product afresh for that one, so a model
that feeds the members different inputs still gets each layer's own product, at the cost of
the group's full product per such call instead of the layer's own (and the other members'
columns of it are held until the group's next call). The result is dropped once every
member has taken its columns. Under ``torch.inference_mode`` (tensors without a version
counter) each member computes its own (`GatedLoraLinear.forward`).

A group holds its members' ``lora_A`` and dropout modules, not the members: a member points
to its group, so a group pointing back would make a reference cycle that keeps a dropped
model's grouped layers, frozen weights included, alive until the cyclic garbage collector
runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ilora.errors import ConfigError
from ilora.teacher.adapters import GatedLoraLinear, adapter_input, gated_lora_modules

# Sibling layers that read one input tensor in Llama-style models (Llama, Mistral, Qwen2, Gemma).
SHARED_INPUT_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _dropout_p(layer: GatedLoraLinear) -> float:
    return layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


class SharedInput:
    """Gated LoRA layers reading one input tensor: their ``A`` products as one, under one dropout mask.

    Sets each member's ``shared_input`` to ``(self, position)``; `GatedLoraLinear.forward`
    then asks `lora_hidden` for its ``A`` product instead of computing it. Holds the members'
    ``lora_A`` and dropout modules only (see the module docstring): a member whose ``lora_A``
    or dropout module is replaced afterwards must be grouped again.
    """

    def __init__(self, members: list[GatedLoraLinear]) -> None:
        if len(members) < 2:
            raise ConfigError(f"a shared input needs at least 2 gated LoRA layers, got {len(members)}")
        first = members[0]
        for layer in members:
            if layer.shared_input is not None:
                raise ConfigError("a gated LoRA layer already belongs to a shared input group")
            if layer.in_features != first.in_features:
                raise ConfigError(f"layers reading one input must have one input size, got {first.in_features} and {layer.in_features}")
            if (layer.lora_A.weight.dtype, layer.lora_A.weight.device) != (first.lora_A.weight.dtype, first.lora_A.weight.device):
                raise ConfigError("layers sharing an input must keep their LoRA A weights in one dtype on one device")
            if _dropout_p(layer) != _dropout_p(first):
                raise ConfigError(f"layers sharing an input must have one dropout, got {_dropout_p(first)} and {_dropout_p(layer)}")
        # plain lists, not the members: the modules stay their layers' submodules, and no cycle forms
        self.lora_A = [layer.lora_A for layer in members]
        self.dropout = [layer.lora_dropout for layer in members]
        self.ranks = [layer.lora_A.out_features for layer in members]
        self._input: torch.Tensor | None = None
        self._version = -1
        self._hidden: list[torch.Tensor | None] = []
        for position, layer in enumerate(members):
            layer.shared_input = (self, position)

    def _holds(self, x: torch.Tensor, position: int) -> bool:
        """True when the held result was computed from ``x`` (unchanged since) and ``position`` has not taken its columns."""
        if self._input is not x or self._hidden[position] is None:
            return False
        return torch.compiler.is_compiling() or x._version == self._version

    def lora_hidden(self, position: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``position``'s ``lora_A(dropout(x))``, computed for the whole group on first use.

        Not for an inference tensor (made under ``torch.inference_mode``): it has no version
        counter to tell an in-place change, so the member computes its own product.
        """
        if not self._holds(x, position):
            weight = torch.cat([lora_A.weight for lora_A in self.lora_A])
            dropped = self.dropout[position](adapter_input(x, weight.dtype))
            hidden = list(F.linear(dropped, weight).split(self.ranks, dim=-1))
            # held only once computed: a product that raised leaves nothing that claims to be x's
            self._input, self._version, self._hidden = x, x._version, hidden
        hidden = self._hidden[position]
        self._hidden[position] = None
        if all(h is None for h in self._hidden):
            self.clear()
        return hidden

    def clear(self) -> None:
        """Drop the held input and result."""
        self._input, self._version, self._hidden = None, -1, []


def share_adapter_inputs(model: nn.Module, names: tuple[tuple[str, ...], ...] = SHARED_INPUT_NAMES) -> list[SharedInput]:
    """Group, under every module of ``model``, its gated LoRA children named in one entry of ``names``.

    Returns the groups. All or nothing: `ConfigError`, with no layer grouped, when there is no
    group to make (no two sibling layers of an entry are adapted) or a layer is grouped already.
    """
    found = []
    for parent in model.modules():
        for entry in names:
            members = [child for name in entry if isinstance(child := getattr(parent, name, None), GatedLoraLinear)]
            if len(members) >= 2:
                found.append(members)
    if not found:
        raise ConfigError(
            "share_adapter_inputs: no two sibling gated LoRA layers read one input here (looked for "
            + "; ".join("/".join(entry) for entry in names)
            + "); adapt at least two of them, or turn the option off"
        )
    groups: list[SharedInput] = []
    try:
        for members in found:
            groups.append(SharedInput(members))
    except ConfigError:
        unshare_adapter_inputs(model, groups)
        raise
    return groups


def _one_module_can_end_with_both(a: str, b: str) -> bool:
    """Whether some module path can end with both dotted suffixes ``a`` and ``b`` ("" ends every path)."""
    return not a or not b or a == b or a.endswith("." + b) or b.endswith("." + a)


def names_share_an_input(target_modules: list[str], names: tuple[tuple[str, ...], ...] = SHARED_INPUT_NAMES) -> bool:
    """Whether ``target_modules`` (layer names or dotted path suffixes, matched as peft does) can
    adapt two sibling layers of one entry of ``names``: two targets with different names of the
    entry whose parent paths one module can have (``q_proj`` and ``layers.0.self_attn.k_proj``
    can; ``layers.0.self_attn.q_proj`` and ``layers.1.self_attn.k_proj`` cannot). Whether the
    model has such a module is known only when it is built (`share_adapter_inputs`)."""
    targets = [target.rpartition(".")[::2] for target in target_modules]  # (parent path, layer name)
    for entry in names:
        hits = [(parent, leaf) for parent, leaf in targets if leaf in entry]
        for i, (parent, leaf) in enumerate(hits):
            if any(leaf != other and _one_module_can_end_with_both(parent, up) for up, other in hits[i + 1 :]):
                return True
    return False


def unshare_adapter_inputs(model: nn.Module, groups: list[SharedInput] | None = None) -> None:
    """The gated LoRA layers of ``model`` in ``groups`` (default: in any group) compute their own
    ``A`` products again."""
    for layer in gated_lora_modules(model).values():
        if layer.shared_input is None:
            continue
        group = layer.shared_input[0]
        if groups is None or any(group is g for g in groups):
            group.clear()
            layer.shared_input = None


@contextlib.contextmanager
def shared_adapter_inputs(model: nn.Module) -> Iterator[list[SharedInput]]:
    """`share_adapter_inputs` for the block, undone after it (the step benchmark's ``ours_shared``).
    Only the block's own groups are undone; groups made before it stay."""
    groups = share_adapter_inputs(model)
    try:
        yield groups
    finally:
        unshare_adapter_inputs(model, groups)

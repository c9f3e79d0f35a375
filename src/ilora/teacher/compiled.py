"""`torch.compile` of an LLM's decoder layers, switched on for training steps only.

`CompiledLayers` compiles each decoder layer's ``forward`` once (the layers share one
code object, so Dynamo traces one graph per input shape for all of them) and
`CompiledLayers.active` installs the compiled forwards for a block: the trainer wraps
each optimiser step's forward and backward in it. Outside the block the layers run their
own eager ``forward``, so validation, scoring with a KV cache, generation and export are
untouched by compilation.

The gated LoRA layers inside read the gate in scope at each call (``GateState``) and
trace without graph breaks (tests/teacher/test_adapters.py). Compilation cannot be
combined with gradient checkpointing (`enable_gradient_checkpointing` wraps the same
layer calls); `TeacherConfig` refuses the pair.

Measured (bench/RESULTS.md, NVIDIA H200, Llama-2-7B shape, batch 16, ``ilora bench step
--compile`` with ``nn.Module.compile`` of each layer before the bench moved to this class):
a training step 1.43x faster than eager (224.7 vs 320.7 ms, 42 % vs 29.5 % MFU); with fused
AdamW, a length-grouped batch and no syncs between the step's parts, 204.5-205.5 ms (46 % MFU); on an
H100, 222.1 ms at batch 16 (42.7 %) and 421.2 ms at batch 32 (45.0 %).
The trainer's own loop (micro-batches of varying length) has not been timed on a GPU.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import torch
from torch import nn

_UNSET = object()
CXX = ("c++", "g++", "clang++")
# Graphs per decoder layer function a training run may compile. Measured on a 12-layer Llama (CPU):
# 4 per kind of first-layer input (static, dynamic length, dynamic batch, batch 1), and the kind
# changes when a text-only batch (curriculum) feeds the layers no projector output; torch's own
# default (8) would leave no room, and past it torch runs the layers eager for good, silently.
TRAINING_RECOMPILE_LIMIT = 64


def check_can_compile(device: str) -> None:
    """`ConfigError` before any work when compiling cannot succeed here: on a CPU, inductor
    builds C++ and needs a compiler on the PATH (on CUDA it generates Triton kernels)."""
    from ilora.errors import ConfigError

    if device == "cpu" and not any(shutil.which(name) for name in CXX):
        raise ConfigError(f"compile on the CPU needs a C++ compiler ({', '.join(CXX)}) on the PATH; none was found (set compile=false)")


@contextlib.contextmanager
def recompile_limit(limit: int, advice: str) -> Iterator[None]:
    """Within the block torch.compile compiles a function at most ``limit`` times, and one more is
    an `IloraError` (ending in ``advice``) instead of torch's warning: past its limit torch runs
    the function eager for the rest of the process, slower and without saying so again."""
    import torch._dynamo

    from ilora.errors import IloraError

    with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
        try:
            yield
        except torch._dynamo.exc.FailOnRecompileLimitHit as error:
            raise IloraError(
                f"torch.compile compiled a decoder layer more than {limit} times; past that torch would run the layers "
                f"eager from then on. {advice} (TORCH_LOGS=recompiles says why it recompiled)"
            ) from error


class CompiledLayers:
    """Compiled ``forward`` of every decoder layer of ``llm``, installed by `active`.

    ``mode`` is torch.compile's (None: its default; the trainer uses the default; ``ilora
    bench step --compile-mode`` measures the others). ``max_recompiles``: `active` runs under
    `recompile_limit` with it (None: under whatever limit the caller set)."""

    def __init__(
        self, llm: nn.Module, backend: str = "inductor", mode: str | None = None, max_recompiles: int | None = TRAINING_RECOMPILE_LIMIT
    ) -> None:
        self.layers = list(llm.get_decoder().layers)
        self.compiled = [torch.compile(layer.forward, backend=backend, mode=mode) for layer in self.layers]
        self.max_recompiles = max_recompiles

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block each layer runs its compiled forward; its own forward after."""
        previous = [layer.__dict__.get("forward", _UNSET) for layer in self.layers]
        for layer, forward in zip(self.layers, self.compiled):
            layer.forward = forward
        try:
            if self.max_recompiles is None:
                yield
            else:
                with recompile_limit(self.max_recompiles, "Train with compile=false, or report the batch shapes that caused it"):
                    yield
        finally:
            for layer, forward in zip(self.layers, previous):
                if forward is _UNSET:
                    del layer.forward
                else:
                    layer.forward = forward

"""Benchmarks (`ilora bench NAME`): each times our fast path against a reference variant
that reproduces the research code's slow formulation, after checking both do the same work.

* ``inputs`` (`ilora.bench.inputs`): batch assembly + placeholder substitution, forward and backward.
* ``adapter`` (`ilora.bench.adapter`): one gated LoRA linear layer vs iLoRA's einsum and plain LoRA.
* ``step`` (`ilora.bench.step`): a full teacher training step on a random-weight Llama.
* ``eval`` (`ilora.bench.evaluation`): candidate scoring vs generation-based evaluation.
* ``export`` (`ilora.bench.export`): teacher-output export throughput and RSS per shard
  over a 1M-sample synthetic export (no reference variant; ``ratio`` is an RSS ratio).
* ``grouping`` (`ilora.bench.grouping`): length-grouped batches vs the plain order: padded
  tokens per epoch and the time of the same samples' forward + backward.

Each ``run_bench(device, quick=...)`` returns one JSON-ready dict with ``name``, ``machine``,
``sizes``, per-variant median times, memory figures and the headline ``ratio``;
``markdown_table(result)`` renders it for ``bench/RESULTS.md``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BENCHMARKS = {"inputs": "ilora.bench.inputs", "adapter": "ilora.bench.adapter", "step": "ilora.bench.step", "eval": "ilora.bench.evaluation", "export": "ilora.bench.export",
              "grouping": "ilora.bench.grouping"}


def benchmark_module(name: str) -> ModuleType:
    """The module of benchmark ``name`` (one of `BENCHMARKS`)."""
    return importlib.import_module(BENCHMARKS[name])

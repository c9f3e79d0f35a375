"""What every benchmark shares: the machine, interleaved timing, memory, titles, results.

* `machine_info`: CPU model (``/proc/cpuinfo``), cores, load, torch version, GPU name.
* `interleave`: runs the variants of one benchmark in turn (A, B, A, B, ... with the
  order rotated every round), after warm-up rounds, and keeps every time; medians are
  what the benchmarks report. On CUDA every measurement starts and ends with a
  ``torch.cuda.synchronize()``. A variant's set-up context (a module swap, say) is
  entered and left outside its timed call.
* `Parts`: per-part times inside one variant (tokenise, substitute, backward, ...).
* `saved_activation_bytes` (CPU and CUDA) and `cuda_peak` (CUDA): the memory figures.
* `load_titles`: the real LastFM artist names, or synthetic titles with a note.
* `record_markdown`: appends a benchmark's JSON as a section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

import torch

from ilora.errors import ConfigError

# Dense bf16 peak FLOP/s by GPU name fragments, most specific first (NVIDIA datasheets; the H200
# has the H100 SXM's compute). A card matching none of them gets no MFU rather than a wrong one.
PEAK_BF16_FLOPS = (
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100", "HBM3"), 989e12),  # the SXM part: "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 989e12),
    (("H200", "NVL"), 835e12),
    (("GH200",), 989e12),
    (("H200",), 989e12),
)

SHARED_TITLES = Path("datasets") / "lastfm" / "id2name.txt"


# -- the machine -----------------------------------------------------------------------------


def cpu_model() -> str:
    """The ``model name`` line of ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def check_device(device: str) -> torch.device:
    """``cpu`` or ``cuda``; raises `ConfigError` if CUDA is asked for and absent."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(device)


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, load average, torch, GPU (on CUDA)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device.type,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU from `PEAK_BF16_FLOPS`; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    """`PEAK_BF16_FLOPS` of the first entry whose fragments all occur in the GPU ``name``; None
    for a MIG slice (a fraction of the card's peak, which the name does not give)."""
    if "MIG" in name:
        return None
    return next((flops for fragments, flops in PEAK_BF16_FLOPS if all(f in name for f in fragments)), None)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing ----------------------------------------------------------------------------------


class Parts:
    """Per-part wall times of one run of a variant: ``with parts("substitute"): ...``.

    Synchronises the device around each part, so the parts of a CUDA run add up to
    its total (minus the Python in between). With ``timed=False`` it neither syncs nor
    records: the run then overlaps host and device work across its parts, as training
    does, and only its total is measured.
    """

    def __init__(self, device: torch.device, timed: bool = True) -> None:
        self.device = device
        self.timed = timed
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.timed:
            yield
            return
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


@dataclass
class VariantTimes:
    """Every measured run of one variant: total seconds and per-part seconds."""

    totals: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.totals)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "median_s": self.median,
            "min_s": min(self.totals),
            "max_s": max(self.totals),
            "repeats": len(self.totals),
        }
        if self.parts:
            out["parts_median_s"] = {name: statistics.median(ts) for name, ts in self.parts.items()}
        return out


Variant = Callable[[Parts], None]


def interleave(
    variants: dict[str, Variant],
    device: torch.device,
    *,
    warmup: int = 1,
    repeats: int = 5,
    min_repeats: int = 3,
    budget_s: float | None = None,
    contexts: dict[str, Callable[[], ContextManager[Any]]] | None = None,
    part_times: bool = True,
    stop_every: int = 1,
) -> dict[str, VariantTimes]:
    """Time ``variants`` interleaved: round ``i`` runs each once, the order rotated by ``i``.

    ``warmup`` rounds are run and discarded. After ``min_repeats`` measured rounds,
    no new round starts once ``budget_s`` seconds have been spent measuring (so a
    very slow reference on a small CPU ends in bounded time); the medians are over
    the rounds run. ``contexts[name]()``, when given, is entered before and left after
    each timed call of variant ``name`` (outside the timer): set-up such as swapping
    modules that the variant needs but that is not part of what is measured.
    ``part_times=False`` hands the variants `Parts` that neither sync nor record.
    ``stop_every``: the budget ends the run only after a multiple of this many measured rounds
    (variants cycling through that many batches then time each batch equally often).
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(variants)
    unknown = set(contexts or {}) - set(names)
    if unknown:
        raise ConfigError(f"contexts for unknown variants: {', '.join(sorted(unknown))}")
    results = {name: VariantTimes() for name in names}
    started = time.perf_counter()
    for round_ in range(warmup + repeats):
        measured = round_ - warmup
        if (
            measured >= min(min_repeats, repeats)
            and measured % stop_every == 0
            and budget_s is not None
            and time.perf_counter() - started > budget_s
        ):
            break
        if round_ == warmup:
            started = time.perf_counter()
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            parts = Parts(device, timed=part_times)
            context = contexts[name]() if contexts and name in contexts else contextlib.nullcontext()
            with context:
                sync(device)
                t0 = time.perf_counter()
                variants[name](parts)
                sync(device)
                elapsed = time.perf_counter() - t0
            if round_ >= warmup:
                results[name].totals.append(elapsed)
                for part, seconds in parts.times.items():
                    results[name].parts.setdefault(part, []).append(seconds)
    return results


# -- memory ----------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def saved_activation_bytes(forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, torch.Tensor]:
    """Bytes of the tensors autograd saves for backward while ``forward()`` runs.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``: every saved tensor's
    storage once (views of one storage count once); storages of ``exclude`` (the
    model's parameters and buffers: weights saved for backward are not activations)
    are not counted. Returns ``(bytes, forward's output)``; run backward on the output
    afterwards to free the graph.
    """
    excluded = {_storage_key(t) for t in exclude}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded and key[0] != 0:
            seen[key] = key[1]
        # a detached alias, not ``t`` itself: a hook that returns an output its own grad_fn
        # saves makes a tensor -> grad_fn -> tensor cycle that gc cannot see, and the whole
        # graph would outlive ``del out`` (on CUDA the peak of the next step counted it)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(seen.values()), out


@contextlib.contextmanager
def cuda_peak(device: torch.device) -> Iterator[dict[str, int]]:
    """On CUDA: ``{"peak_bytes", "start_bytes", "peak_minus_start_bytes"}`` of the block.

    Resets the peak statistics after a synchronize at entry; reads
    ``torch.cuda.max_memory_allocated`` after a synchronize at exit. On CPU the dict
    stays empty.
    """
    stats: dict[str, int] = {}
    if device.type != "cuda":
        yield stats
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    try:
        yield stats
    finally:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        stats.update(peak_bytes=peak, start_bytes=start, peak_minus_start_bytes=peak - start)


# -- inputs: titles --------------------------------------------------------------------------


def shared_dir() -> Path | None:
    """``$ILORA_SHARED`` or ``<repo>/../shared`` (next to a source checkout) or ``./../shared``."""
    candidates = []
    if os.environ.get("ILORA_SHARED"):
        candidates.append(Path(os.environ["ILORA_SHARED"]))
    candidates += [Path(__file__).resolve().parents[3] / ".." / "shared", Path.cwd() / ".." / "shared"]
    for path in candidates:
        if (path / SHARED_TITLES).is_file():
            return path
    return None


def synthetic_titles(n: int = 4606, seed: int = 0) -> list[str]:
    """``n`` distinct artist-like names of 1-3 made-up words (a stand-in for LastFM's)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ra", "the", "sun", "tor", "vel", "an", "dre", "os", "ix", "bel", "mor", "chi", "ba"]
    titles: list[str] = []
    seen: set[str] = set()
    while len(titles) < n:
        words = [("".join(rng.choices(syllables, k=rng.randint(1, 4)))).capitalize() for _ in range(rng.choice((1, 1, 2, 2, 3)))]
        name = " ".join(words)
        if name not in seen:
            seen.add(name)
            titles.append(name)
    return titles


def load_titles() -> tuple[list[str], str]:
    """(titles, source): LastFM's ``id2name.txt`` if found, else synthetic titles (source says so)."""
    from ilora.data.legacy import read_id2name

    root = shared_dir()
    if root is None:
        return synthetic_titles(), "synthetic (LastFM id2name.txt not found; set ILORA_SHARED to the shared/ directory)"
    path = (root / SHARED_TITLES).resolve()
    return list(read_id2name(path).titles), f"LastFM {path}"


def random_samples(num_items: int, batch: int, history: int, candidates: int, seed: int) -> dict[str, torch.Tensor]:
    """``batch`` samples with full histories of ``history`` distinct items, ``candidates``
    distinct candidates (the target among them, none in the history) and the target."""
    gen = torch.Generator().manual_seed(seed)
    need = history + candidates
    rows = torch.stack([torch.randperm(num_items, generator=gen)[:need] for _ in range(batch)])
    hist, cands = rows[:, :history], rows[:, history:]
    target_col = torch.randint(0, candidates, (batch,), generator=gen)
    target = cands[torch.arange(batch), target_col]
    return {
        "history": hist,
        "length": torch.full((batch,), history, dtype=torch.long),
        "candidates": cands,
        "target": target,
        "target_col": target_col,
    }


# -- results ---------------------------------------------------------------------------------


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def machine_line(info: dict[str, Any]) -> str:
    text = f"{info['cpu']}, {info['cpu_cores_usable']}/{info['cpu_cores']} cores, load {info.get('load_average_1m')}"
    if info.get("gpu"):
        text = f"{info['gpu']} ({info.get('gpu_memory_gib')} GiB, CUDA {info.get('cuda')}); host {text}"
    return f"{text}; torch {info['torch']}, device {info['device']}"


def headline(result: dict[str, Any]) -> str:
    """The result's headline ratio as a Markdown line (a benchmark run without its reference has none)."""
    if result["ratio"] is None:
        return f"No headline `ratio`: {result.get('ratio_means', 'not measured')}."
    return f"Headline `ratio` = **{result['ratio']:.2f}** ({result.get('ratio_means', '')})."


def record_markdown(result: dict[str, Any], table: list[str], path: str | Path) -> Path:
    """Append ``result`` as a section of ``path``: heading, machine, ``table``, the JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    note = ["", f"*Note:* {result['note']}"] if result.get("note") else []
    quick = " (--quick)" if result.get("quick") else ""
    section = [
        "",
        f"### `{result['name']}`{quick}, {result['machine']['device']}, {result['time']}",
        "",
        f"Machine: {machine_line(result['machine'])}.",
        *note,
        "",
        *table,
        "",
        headline(result),
        "",
        "<details><summary>JSON</summary>",
        "",
        "```json",
        json.dumps(result, default=str),
        "```",
        "",
        "</details>",
        "",
    ]
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n".join(section))
    return path

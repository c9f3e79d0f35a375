"""`ilora bench export`: teacher-output export throughput and memory at 1M samples.

What runs: the real `ilora.outputs.export.export_teacher_outputs` (the code behind
``ilora teacher export``) on the train split of a synthetic dataset of N samples
(default 1,000,000; 20,000 with ``--quick``), with a tiny random teacher saved to a
temporary directory and loaded back as ``ilora teacher export`` loads it. The outputs go
to a temporary directory that is deleted at the end.

* **Data**: `ilora.data.make_synthetic` (the project's generator: genres, successors,
  user tastes) with 1,000 items and as many users as it takes, then the first N train
  samples (histories of up to 10 items). Built in memory, fixed seed, no pickles.
* **Teacher**: a SASRec (hidden 16, one block) and a tiny Llama (hidden 32, 1 layer,
  2 heads, vocabulary 300, titles cut at 8 tokens), 4 LoRA experts of rank 2, random
  weights. Sizes are small so that a 1M-sample export fits on a shared CPU; the export's
  memory behaviour does not depend on them.
* **Export**: top-3 of a pool of 5 fixed candidates + SASRec's top-5 unseen items,
  batches of 64, shards of 8,192 rows (1,024 with ``--quick``), so there are many shards.

**Memory.** The claim: the export's memory does not grow with the number of samples
exported (rows are written shard by shard and never accumulated). The current RSS of the
process (``/proc/self/statm``) is sampled before the export starts (dataset and teacher
already loaded), after every committed shard (the export's ``on_shard`` callback) and at
the end; the peak is ``ru_maxrss`` (the whole process's lifetime). ``growth`` is the
median RSS over the shards of the last quarter of the rows minus the median RSS over the
shards from a quarter to half of the rows (the first quarter is warm-up: allocator
pools, lazily built kernels; medians ignore a transient spike at one shard boundary).
The verdict ``flat`` holds when that growth is below a quarter of what keeping every row
between the two windows would add (136 bytes per row in memory, ``row_bytes_in_memory``:
34 bytes per sample); it is None (inconclusive) when that allowance is under
`FLAT_THRESHOLD_MIB` of RSS noise, as in a ``--quick`` run. At 1M samples the windows are
~504k samples apart: an allowance of ~16.3 MiB.

**Throughput.** ``samples_per_s`` is the export's own figure (rows / seconds spent
exporting the split: prompt building, SASRec pool, scoring, Parquet writing);
``export_wall_s`` also counts the item embeddings and the DLLM2Rec text files.

There is no reference variant: the research code has no streaming export to compare
with. ``ratio`` is RSS at the last shard / RSS after the first shard (1.0 = no growth).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ilora.bench.common import cuda_peak, machine_info, now_utc
from ilora.config import torch_threads
from ilora.errors import ConfigError, IloraError

DEFAULT_SAMPLES = 1_000_000
QUICK_SAMPLES = 20_000
SHARD_ROWS = 8192
QUICK_SHARD_ROWS = 1024
BATCH = 64
ITEMS = 1000
MAX_LEN = 10
SEED = 0
TEACHER = dict(
    tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_vocab=300, max_title_tokens=8,
    num_experts=4, rank_per_expert=2, lora_dropout=0.0, num_candidates=5,
)  # fmt: skip
SASREC_HIDDEN = 16
POOL = dict(top_k=3, pool_sasrec=5, pool_candidates=5)
FLAT_THRESHOLD_MIB = 16.0  # RSS noise: growth allowances below this cannot be judged
MIB = 2**20


# -- memory probes ---------------------------------------------------------------------------


def current_rss() -> tuple[int, str]:
    """(bytes, source): the resident set size now from ``/proc/self/statm``; where that file
    is absent, the peak RSS (``ru_maxrss``) stands in and the source says so."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE"), "/proc/self/statm"
    except (OSError, ValueError, IndexError):
        return peak_rss(), "ru_maxrss (peak; /proc/self/statm unavailable)"


def peak_rss() -> int:
    """The process's peak RSS in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class RssProbe:
    """The export's ``on_shard`` callback: records (rows exported so far, RSS) per shard."""

    total: int
    shard_rows: int
    rows: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    source: str = ""

    def __call__(self, split: str, number: int) -> None:
        self.rows.append(min((number + 1) * self.shard_rows, self.total))
        value, self.source = current_rss()
        self.rss.append(value)


def memory_summary(start: int, rows: list[int], rss: list[int], end: int, peak: int, total: int, row_bytes: int) -> dict[str, Any]:
    """RSS figures of one export (bytes in, MiB out) and the ``flat`` verdict.

    ``flat``: True when the growth is below a quarter of what keeping every exported row
    (``row_bytes`` each) over the span would add; None (inconclusive) when that allowance
    is below `FLAT_THRESHOLD_MIB`, i.e. within RSS noise (a span too short to tell).

    ``rows[i]`` / ``rss[i]``: rows exported and RSS after shard ``i``. The quarter shard
    is the first with ``rows >= total / 4`` (the shards before it are warm-up: allocator
    pools, lazily built kernels). Growth = the median RSS of the shards in the last
    quarter of the rows - the median RSS of the shards from the quarter shard to half way
    (medians, so that one transient spike at a shard boundary is not taken for growth);
    with too few shards for both windows, the last shard - the quarter shard.
    """
    if not rss or len(rows) != len(rss):
        raise IloraError(f"export bench: {len(rss)} RSS samples for {len(rows)} shards (expected one per shard, at least one)")
    quarter = next(i for i, r in enumerate(rows) if r >= total / 4)
    early = [i for i in range(quarter, len(rows)) if rows[i] < total / 2] or [quarter]
    late = [i for i in range(len(rows)) if rows[i] > 3 * total / 4 and i > early[-1]] or [len(rows) - 1]
    growth = statistics.median(rss[i] for i in late) - statistics.median(rss[i] for i in early)
    span = statistics.median(rows[i] for i in late) - statistics.median(rows[i] for i in early)
    allowed = span * row_bytes / 4
    return {
        "rss_start_mib": start / MIB,
        "rss_first_shard_mib": rss[0] / MIB,
        "rss_quarter_shard_mib": rss[quarter] / MIB,
        "quarter_shard": quarter,
        "rss_last_shard_mib": rss[-1] / MIB,
        "rss_max_over_shards_mib": max(rss) / MIB,
        "rss_end_mib": end / MIB,
        "peak_rss_mib": peak / MIB,
        "export_over_start_mib": (max(rss) - start) / MIB,
        "growth_mib": growth / MIB,
        "growth_span_samples": span,
        "growth_mib_per_100k_samples": growth / MIB / span * 1e5 if span else None,
        "retained_bytes_per_sample": growth / span if span else None,
        "allowed_growth_mib": allowed / MIB,
        "noise_floor_mib": FLAT_THRESHOLD_MIB,
        "flat": None if allowed < FLAT_THRESHOLD_MIB * MIB else bool(growth < allowed),
        "rss_by_shard_mib": [round(v / MIB, 1) for v in rss],
    }


def row_bytes() -> int:
    """Bytes one exported row takes as arrays: index, top-K items/scores/confidences, gate, user embedding."""
    return 8 + POOL["top_k"] * (8 + 4 + 4) + TEACHER["num_experts"] * 4 + SASREC_HIDDEN * 4


def directory_bytes(root: Path) -> dict[str, int]:
    """Bytes on disk under ``root``: the Parquet shards, the DLLM2Rec files, everything."""
    sizes = {"total": 0, "shards": 0, "dllm2rec": 0}
    for path in root.rglob("*"):
        if path.is_file():
            size = path.stat().st_size
            sizes["total"] += size
            if path.suffix == ".parquet":
                sizes["shards"] += size
            elif path.parent.name == "dllm2rec":
                sizes["dllm2rec"] += size
    return sizes


# -- inputs ----------------------------------------------------------------------------------


def synthetic_dataset(samples: int, seed: int = SEED):
    """A `SeqDataset` with a train split of exactly ``samples`` samples from `make_synthetic`.

    Users are added (x1.5 per try) until the generator yields enough train samples; the
    first ``samples`` are kept, the val/test splits dropped.
    """
    from ilora.data import SeqDataset, make_synthetic

    users = max(16, math.ceil(samples / 12))
    while True:
        full = make_synthetic(users=users, items=ITEMS, seed=seed, max_len=MAX_LEN)
        if len(full.split("train")) >= samples:
            break
        users = math.ceil(users * 1.5)
    train = full.split("train").subset(slice(0, samples))
    dataset = SeqDataset(full.catalog, {"train": train}, source=f"{full.source}, first {samples} train samples")
    dataset.validate()
    return dataset


def save_random_teacher(dataset, directory: Path, device: torch.device) -> None:
    """Build the tiny random teacher (`TEACHER`, SASRec hidden `SASREC_HIDDEN`) and save it."""
    from ilora.rec.sasrec import SASRec, SASRecConfig
    from ilora.teacher.build import build_teacher, save_teacher
    from ilora.teacher.config import TeacherConfig

    torch.manual_seed(SEED)
    rec = SASRec(SASRecConfig(num_items=dataset.num_items, max_len=dataset.max_len, hidden=SASREC_HIDDEN, dropout=0.0)).eval()
    bundle = build_teacher(TeacherConfig(device=device.type, **TEACHER), dataset.catalog, rec, device.type)
    save_teacher(bundle, directory, dataset.catalog)


# -- the benchmark ---------------------------------------------------------------------------


def run_export(dataset, work: Path, device: torch.device, shard_rows: int, batch_size: int) -> tuple[dict, dict, dict]:
    """Save and load the teacher, export; return (export result, memory, extra timings)."""
    from ilora.outputs.export import ExportOptions, export_teacher_outputs
    from ilora.teacher.build import load_teacher

    t0 = time.perf_counter()
    save_random_teacher(dataset, work / "teacher", device)
    bundle = load_teacher(work / "teacher", dataset.catalog, device=device.type)
    teacher_s = time.perf_counter() - t0
    n = len(dataset.split("train"))
    opts = ExportOptions(splits=("train",), shard_rows=shard_rows, batch_size=batch_size, device=device.type, **POOL)
    probe = RssProbe(total=n, shard_rows=shard_rows)
    gc.collect()
    start, source = current_rss()
    t0 = time.perf_counter()
    with cuda_peak(device) as gpu:
        result = export_teacher_outputs(bundle, dataset, work / "out", opts, teacher_dir=work / "teacher", on_shard=probe)
    wall = time.perf_counter() - t0
    end, _ = current_rss()
    memory = memory_summary(start, probe.rows, probe.rss, end, peak_rss(), n, row_bytes())
    memory["rss_source"] = source
    if gpu:
        memory["cuda_peak_mib"] = gpu["peak_bytes"] / MIB
    return result.to_dict(), memory, {"teacher_build_load_s": teacher_s, "export_wall_s": wall, "shards_sampled": len(probe.rss)}


def run_bench(
    device: torch.device,
    *,
    quick: bool = False,
    samples: int | None = None,
    shard_rows: int | None = None,
    batch_size: int = BATCH,
    threads: int | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Export ``samples`` synthetic samples with a tiny random teacher; measure speed and RSS.

    ``threads`` sets torch's intra-op threads for the run (restored after). ``out_dir``
    keeps the teacher (``teacher/``) and the outputs (``out/``) there instead of in a
    temporary directory deleted at the end.
    """
    samples = samples if samples is not None else (QUICK_SAMPLES if quick else DEFAULT_SAMPLES)
    shard_rows = shard_rows or (QUICK_SHARD_ROWS if quick else SHARD_ROWS)
    if samples < 1 or shard_rows < 1 or batch_size < 1 or (threads is not None and threads < 1):
        raise ConfigError(f"export bench: samples, shard rows, batch size and threads must be >= 1 (got {samples}, {shard_rows}, {batch_size}, {threads})")
    with torch_threads(threads):
        t0 = time.perf_counter()
        dataset = synthetic_dataset(samples)
        data_s = time.perf_counter() - t0
        keep = contextlib.nullcontext(out_dir) if out_dir is not None else tempfile.TemporaryDirectory(prefix="ilora-bench-export-")
        with keep as root:
            work = Path(root)
            work.mkdir(parents=True, exist_ok=True)
            export, memory, timings = run_export(dataset, work, device, shard_rows, batch_size)
            disk = directory_bytes(work / "out")
        info = machine_info(device)
    if export["written"] != samples:
        raise IloraError(f"export bench: {export['written']} rows exported, expected {samples}")
    e, d = TEACHER["num_experts"], SASREC_HIDDEN
    return {
        "name": "export",
        "time": now_utc(),
        "quick": quick,
        "machine": info,
        "sizes": {
            "samples": samples,
            "split": "train",
            "items": dataset.num_items,
            "max_history": MAX_LEN,
            "data": f"make_synthetic(items={ITEMS}, seed={SEED}), the first {samples} train samples",
            "shard_rows": shard_rows,
            "shards": math.ceil(samples / shard_rows),
            "batch": batch_size,
            **POOL,
            "llm": f"tiny random Llama: hidden {TEACHER['tiny_hidden']}, {TEACHER['tiny_layers']} layer, {TEACHER['tiny_heads']} heads, "
            f"vocab {TEACHER['tiny_vocab']}, titles <= {TEACHER['max_title_tokens']} tokens, {e} experts x rank {TEACHER['rank_per_expert']}",
            "sasrec": f"hidden {d}, 1 block",
            "row_bytes_in_memory": row_bytes(),
        },
        "export": export,
        "samples_per_s": export["samples_per_s"],
        "timings_s": {"dataset": data_s, **timings},
        "memory": memory,
        "output_bytes": disk,
        "ratio": memory["rss_last_shard_mib"] / memory["rss_first_shard_mib"],
        "ratio_means": "RSS after the last shard / RSS after the first shard (1.00 = no growth; memory.flat: median-window "
        "growth below a quarter of what keeping the rows would add; null when that is under the RSS noise floor)",
    }


def markdown_table(result: dict[str, Any]) -> list[str]:
    m, s, t = result["memory"], result["sizes"], result["timings_s"]
    per_100k = m["growth_mib_per_100k_samples"]
    disk = result["output_bytes"]
    lines = [
        "| samples | shards | samples/s | export wall s | RSS MiB start / first shard / quarter / last / max / end | peak RSS MiB | growth MiB (per 100k samples) | flat | output MiB (shards / DLLM2Rec) |",
        "|---:|---:|---:|---:|---|---:|---|---|---|",
        f"| {s['samples']:,} | {s['shards']} | {result['samples_per_s']:.0f} | {t['export_wall_s']:.1f} | "
        f"{m['rss_start_mib']:.1f} / {m['rss_first_shard_mib']:.1f} / {m['rss_quarter_shard_mib']:.1f} / {m['rss_last_shard_mib']:.1f} / "
        f"{m['rss_max_over_shards_mib']:.1f} / {m['rss_end_mib']:.1f} | {m['peak_rss_mib']:.1f} | "
        f"{m['growth_mib']:+.2f} ({'-' if per_100k is None else f'{per_100k:+.3f}'}) | {'inconclusive' if m['flat'] is None else 'yes' if m['flat'] else 'NO'} | "
        f"{disk['total'] / MIB:.1f} ({disk['shards'] / MIB:.1f} / {disk['dllm2rec'] / MIB:.1f}) |",
        "",
        f"Teacher: {s['llm']}; SASRec {s['sasrec']}. Pool: {s['pool_candidates']} fixed candidates + SASRec top-{s['pool_sasrec']}, "
        f"top-{s['top_k']}, batches of {s['batch']}. Growth = median RSS over the last quarter's shards - median RSS "
        f"over the shards from a quarter (shard {m['quarter_shard']}) to half of the rows; flat when below {m['allowed_growth_mib']:.1f} MiB "
        f"(a quarter of the rows' {s['row_bytes_in_memory']} B each over the span; inconclusive under {m['noise_floor_mib']:g} MiB).",
    ]
    return lines

"""`ilora bench export`: the memory bookkeeping against hand computations, and a small real
export whose outputs are checked on disk. No timing is asserted (the CPU is shared)."""

from __future__ import annotations

import json
import math
import mmap
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ilora.bench import export as export_bench
from ilora.cli.main import main
from ilora.errors import IloraError
from ilora.outputs import read_teacher_outputs
from ilora.outputs.format import file_sha256, read_manifest

CPU = torch.device("cpu")
MIB = 2**20


# -- memory bookkeeping ------------------------------------------------------------------------


def test_memory_summary_uses_median_windows_and_the_row_allowance():
    # 10 shards of 100 rows (1,000 samples): the quarter shard is the 3rd (300 rows >= 250)
    rows = [100 * (i + 1) for i in range(10)]
    flat = [500 * MIB, 520 * MIB, 530 * MIB, 528 * MIB, 531 * MIB, 529 * MIB, 530 * MIB, 532 * MIB, 530 * MIB, 534 * MIB]
    m = export_bench.memory_summary(400 * MIB, rows, flat, 536 * MIB, 600 * MIB, 1000, 136)
    assert m["quarter_shard"] == 2
    assert m["rss_start_mib"] == 400 and m["rss_first_shard_mib"] == 500 and m["rss_quarter_shard_mib"] == 530
    assert m["rss_last_shard_mib"] == 534 and m["rss_max_over_shards_mib"] == 534 and m["rss_end_mib"] == 536
    assert m["peak_rss_mib"] == 600 and m["export_over_start_mib"] == 134
    # early window: shards 3-4 (300, 400 rows: 530, 528 -> 529); late: shards 8-10 (> 750 rows: 532, 530, 534 -> 532)
    assert m["growth_mib"] == 3 and m["growth_span_samples"] == 900 - 350
    assert m["growth_mib_per_100k_samples"] == pytest.approx(3 / 550 * 1e5)
    assert m["retained_bytes_per_sample"] == pytest.approx(3 * MIB / 550)
    assert m["rss_by_shard_mib"] == [v / MIB for v in flat]
    # 550 samples x 136 B / 4 is far below the RSS noise floor: no verdict
    assert m["allowed_growth_mib"] == pytest.approx(550 * 136 / 4 / MIB) and m["flat"] is None
    # 1M samples in 8,192-row shards: a leak of 136 bytes per sample (every row kept) fails ...
    n, shard = 1_000_000, 8192
    rows = [min((i + 1) * shard, n) for i in range(math.ceil(n / shard))]
    leak = [450 * MIB + 136 * r for r in rows]
    m = export_bench.memory_summary(450 * MIB, rows, leak, leak[-1], leak[-1], n, 136)
    assert rows[m["quarter_shard"]] >= n / 4 > rows[m["quarter_shard"] - 1]
    assert m["flat"] is False and m["retained_bytes_per_sample"] == pytest.approx(136, rel=0.01)
    # ... and so does 40 B per sample (over a quarter of a row); noise of a few MiB and one spike at the last shard pass
    quarter_leak = [450 * MIB + 40 * r for r in rows]
    assert export_bench.memory_summary(450 * MIB, rows, quarter_leak, 0, 0, n, 136)["flat"] is False
    noisy = [450 * MIB + (i % 3) * 2 * MIB for i in range(len(rows) - 1)] + [480 * MIB]
    assert export_bench.memory_summary(450 * MIB, rows, noisy, 0, 0, n, 136)["flat"] is True


def test_memory_summary_refuses_missing_samples():
    with pytest.raises(IloraError, match="RSS samples"):
        export_bench.memory_summary(1, [], [], 1, 1, 10, 136)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_current_rss_agrees_with_proc_status_and_sees_an_allocation():
    def vm_rss() -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    before, source = export_bench.current_rss()
    assert source == "/proc/self/statm" and abs(before - vm_rss()) < 8 * MIB
    # a fresh anonymous mapping, every page written: new resident memory (a NumPy array could
    # reuse pages an earlier test freed but the allocator kept, and RSS would not move)
    block = mmap.mmap(-1, 64 * MIB)
    for offset in range(0, 64 * MIB, mmap.PAGESIZE):
        block[offset] = 1
    after, _ = export_bench.current_rss()
    assert after - before >= 56 * MIB and abs(after - vm_rss()) < 8 * MIB
    assert export_bench.peak_rss() >= after - 8 * MIB
    block.close()


# -- a small real export ---------------------------------------------------------------------


def test_export_bench_small_instance(tmp_path):
    threads = torch.get_num_threads()
    r = export_bench.run_bench(CPU, samples=2000, shard_rows=256, threads=1, out_dir=tmp_path)
    assert torch.get_num_threads() == threads  # restored
    assert r["name"] == "export" and r["quick"] is False and r["machine"]["torch_threads"] == 1
    assert set(r) >= {"name", "time", "quick", "machine", "sizes", "export", "memory", "output_bytes", "ratio", "ratio_means"}
    assert r["sizes"]["samples"] == 2000 and r["sizes"]["shards"] == 8 == math.ceil(2000 / 256)
    assert r["export"]["written"] == r["export"]["rows"] == 2000 and r["export"]["dllm2rec"] is True
    assert r["samples_per_s"] > 0 and r["timings_s"]["export_wall_s"] > 0

    m = r["memory"]
    assert m["rss_source"] == "/proc/self/statm" or sys.platform != "linux"
    assert len(m["rss_by_shard_mib"]) == r["timings_s"]["shards_sampled"] == 8
    assert all(v > 0 for v in m["rss_by_shard_mib"]) and m["rss_start_mib"] > 0 and m["rss_end_mib"] > 0
    assert m["peak_rss_mib"] >= m["rss_max_over_shards_mib"] - 1
    assert m["quarter_shard"] == 1  # 512 rows >= 500
    assert r["ratio"] == pytest.approx(m["rss_last_shard_mib"] / m["rss_first_shard_mib"])

    # the outputs on disk: a complete manifest, 8 shards of 256 rows (the last 208), every row once
    out = tmp_path / "out"
    manifest = read_manifest(out)
    info = manifest["splits"]["train"]
    assert info["complete"] is True and info["rows"] == 2000 and info["samples"] == 2000
    assert [s["rows"] for s in info["shards"]] == [256] * 7 + [208]
    assert [s["first_index"] for s in info["shards"]] == [256 * i for i in range(8)]
    for shard in info["shards"]:
        assert file_sha256(out / shard["file"]) == shard["sha256"]
    outputs = read_teacher_outputs(out, ("train",))  # checks order and checksums again
    train = outputs.split("train")
    k = r["sizes"]["top_k"]
    assert train.topk_items.shape == (2000, k) and np.isfinite(train.topk_scores).all()
    assert ((train.topk_items >= 0) & (train.topk_items < r["sizes"]["items"])).all()
    assert (np.diff(train.topk_scores, axis=1) <= 0).all()  # best first
    np.testing.assert_allclose(train.gate.sum(1), 1.0, atol=1e-5)
    assert len((out / "dllm2rec" / "myrank_train.txt").read_text().splitlines()) == 2000
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert r["output_bytes"]["total"] == on_disk
    assert r["output_bytes"]["shards"] == sum((out / s["file"]).stat().st_size for s in info["shards"])


def test_export_bench_dataset_has_exactly_the_samples_asked():
    ds = export_bench.synthetic_dataset(1234)
    train = ds.split("train")
    assert len(train) == 1234 and set(ds.splits) == {"train"} and ds.num_items == export_bench.ITEMS
    assert train.max_len == export_bench.MAX_LEN and (train.length >= 1).all()


@pytest.mark.slow
def test_bench_export_cli_prints_one_json_object(capsys):
    assert main(["bench", "export", "--quick", "--samples", "1500", "--threads", "1", "--json", "--no-record"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    r = json.loads(out)
    assert r["name"] == "export" and r["quick"] is True and r["machine"]["device"] == "cpu"
    assert r["export"]["written"] == 1500 and r["sizes"]["shard_rows"] == export_bench.QUICK_SHARD_ROWS
    assert len(r["memory"]["rss_by_shard_mib"]) == 2 and r["ratio"] > 0
    assert not Path(r["export"]["out"]).exists()  # the temporary directory is gone


def test_bench_export_rejects_round_options(capsys):
    assert main(["bench", "export", "--quick", "--repeats", "2", "--no-record"]) == 2
    assert "does not apply" in capsys.readouterr().err

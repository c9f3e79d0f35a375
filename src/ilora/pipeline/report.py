"""The run report: ``report.md`` plus PNG plots in the run directory.

Plots (each only when its inputs exist):
* ``curves.png``: SASRec training loss and validation NDCG@10 per epoch; teacher
  training loss per step; the baseline and distilled students' validation NDCG@10 per
  epoch when distillation ran;
* ``gate.png``: the learned gate's mean weight per expert (with the spread across
  samples) and its mean entropy against the uniform gate's;
* ``students.png``: baseline vs distilled student, full-ranking metrics on test.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ilora.distill.significance import gain_text, interval_text, metric_intervals  # noqa: E402
from ilora.state_io import strict_json  # noqa: E402

FULL_KEYS = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20")


def _read_csv(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def plot_curves(run: Path, out: Path) -> bool:
    rec = _read_csv(run / "sasrec" / "model" / "metrics.csv")
    teacher = _read_csv(run / "teacher" / "model" / "train_steps.csv")
    students = {name: _read_csv(run / "distill" / name / "metrics.csv") for name in ("baseline", "distilled")}
    panels = [p for p in (rec, teacher) if p] + ([1] if any(students.values()) else [])
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    i = 0
    if rec:
        ax = axes[0][i]
        ax.plot([r["epoch"] for r in rec], [r["train_loss"] for r in rec], label="train loss")
        ax.set_xlabel("epoch")
        ax.set_title("SASRec")
        twin = ax.twinx()
        twin.plot([r["epoch"] for r in rec], [r.get("val_ndcg@10", float("nan")) for r in rec], color="C1", label="val ndcg@10")
        ax.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
        i += 1
    if teacher:
        ax = axes[0][i]
        ax.plot([r["step"] for r in teacher], [r["loss"] for r in teacher], lw=0.8)
        ax.set_xlabel("optimiser step")
        ax.set_title("teacher training loss (answer tokens)")
        i += 1
    if any(students.values()):
        ax = axes[0][i]
        for name, rows in students.items():
            if rows:
                ax.plot([r["epoch"] for r in rows], [r.get("val_ndcg@10", float("nan")) for r in rows], label=name)
        ax.set_xlabel("epoch")
        ax.set_title("students: val ndcg@10")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_gate(stats: dict, uniform_entropy: float, out: Path, where: str = "") -> None:
    """The learned gate's ``stats`` (`gate_statistics`); ``uniform_entropy`` = ln E; ``where``:
    the protocol, split and samples they come from, for the title."""
    mean, std = stats["mean_weight"], stats["weight_std"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].bar(range(len(mean)), mean, yerr=std, capsize=4)
    axes[0].axhline(1 / len(mean), color="grey", ls="--", lw=1, label="uniform")
    axes[0].set_xticks(range(len(mean)))
    axes[0].set_xlabel("expert")
    axes[0].set_title("learned gate: mean weight (± std over samples)")
    axes[0].legend(fontsize=8)
    axes[1].bar(["learned", "uniform"], [stats["mean_entropy"], uniform_entropy], color=["C0", "grey"])
    axes[1].set_title("mean gate entropy (nats)")
    if where:
        fig.suptitle(where, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_students(baseline: dict, distilled: dict, out: Path) -> None:
    keys = [k for k in FULL_KEYS if k in baseline and k in distilled]
    x = range(len(keys))
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.bar([i - 0.2 for i in x], [baseline[k] for k in keys], width=0.4, label="baseline")
    ax.bar([i + 0.2 for i in x], [distilled[k] for k in keys], width=0.4, label="distilled")
    ax.set_xticks(list(x))
    ax.set_xticklabels(keys)
    ax.set_title("student SASRec on test (full ranking)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _cell(value: float | None, spec: str = ".4f", width: int = 10) -> str:
    """A right-aligned number for the printed summary, or "-" for a metric the row does not have
    (generation has no ndcg or mrr): "nan" would read as a value that came out undefined."""
    return f"{'-' if value is None else format(value, spec):>{width}}"


def weak_teacher_note(summary: dict) -> str | None:
    """A sentence for reports whose teacher ranks the fixed candidates worse than SASRec does
    (hr@1, learned gate, score protocol): distillation then passes on a worse ranking, and a
    student below its baseline is what to expect, not a fault. None otherwise."""
    ev = summary.get("eval") or {}
    learned = (ev.get("teacher") or {}).get("score/learned")
    sasrec = (ev.get("sasrec_same_candidates") or {}).get("cand_hr@1")
    if not learned or sasrec is None or learned["hr@1"] >= sasrec:
        return None
    return (
        f"The teacher ranks the fixed candidates worse than SASRec (hr@1 {learned['hr@1']:.4f} vs {sasrec:.4f}), "
        "so its outputs carry a worse ranking than the student's own data: distillation from it is expected to lower "
        "the student's metrics (a stronger teacher is what DLLM2Rec-style distillation needs)."
    )


def _section(summary: dict, name: str) -> dict:
    """A section of the run's config in ``summary`` (empty for a summary written before it held one)."""
    return (summary.get("config") or {}).get(name) or {}


def write_report(run: Path, summary: dict) -> Path:
    lines = ["# ilora run report", "", f"Run directory: `{run}`", ""]
    data = summary.get("data", {})
    lines += ["## Data", "", "| " + " | ".join(data) + " |", "|" + "---|" * len(data), "| " + " | ".join(_fmt(v) for v in data.values()) + " |", ""]
    rec = summary.get("sasrec", {})
    ev_cfg = _section(summary, "eval")
    split, count = ev_cfg.get("split", "the evaluation split"), ev_cfg.get("candidates", "the")
    if rec:
        masked = _section(summary, "rec").get("mask_history")
        lines += [f"## SASRec on {split} (full ranking{', history items masked' if masked else ''}; cand_hr@1 over {count} fixed candidates)", "",
                  "| model | " + " | ".join((*FULL_KEYS, "cand_hr@1")) + " |", "|---" * (len(FULL_KEYS) + 2) + "|"]
        for name in ("popularity", "sasrec"):
            lines.append(f"| {name} | " + " | ".join(_fmt(rec[name].get(k)) for k in (*FULL_KEYS, "cand_hr@1")) + " |")
        lines.append("")
    ev = summary.get("eval", {})
    if ev:
        decoded = f"; generate decodes up to {ev_cfg['max_new_tokens']} tokens" if ev_cfg.get("max_new_tokens") else ""
        lines += [f"## Teacher on {ev['split']} ({ev['samples']} samples, {count} fixed candidates{decoded})", "",
                  "hr@1 is correct / valid answers (the iLoRA/LLaRA definition; NaN with none valid), hr@1_all correct / all "
                  "(generate protocol); the score protocol ranks every candidate (valid_ratio 1).", "",
                  "| protocol/gate | hr@1 | ndcg@5 | ndcg@10 | mrr | valid_ratio | hr@1_all | gate entropy |", "|---" * 8 + "|"]
        for name, m in ev["teacher"].items():
            lines.append(
                f"| {name} | " + " | ".join(_fmt(m.get(k, "")) for k in ("hr@1", "ndcg@5", "ndcg@10", "mrr", "valid_ratio", "hr@1_all"))
                + f" | {m['gate_stats']['mean_entropy']:.3f} |"
            )
        lines += [f"| SASRec, same candidates | {_fmt(ev['sasrec_same_candidates']['cand_hr@1'])} | | | | | | |", ""]
        learned = next(((name, m) for name, m in ev["teacher"].items() if name.endswith("/learned")), None)
        if learned is not None:  # the plot is the learned gate's: none when only fixed gates were evaluated
            stats = learned[1]["gate_stats"]
            where = f"{learned[0].split('/')[0]} protocol, {ev['split']}, {ev['samples']} samples"
            plot_gate(stats, stats["max_entropy"], run / "gate.png", where)
            lines += ["![gate](gate.png)", ""]
        else:
            (run / "gate.png").unlink(missing_ok=True)  # an earlier run's plot would describe another evaluation
    distill = summary.get("distill")
    if distill:
        base, dist, gain = distill["baseline"], distill["distilled"], distill.get("gain", {})
        paired = metric_intervals(distill.get("gain_interval"))
        control = distill.get("control")
        seeds = metric_intervals(control.get("gain_interval")) if control else {}
        extra = f" control (seed {control['seed']}): gain, interval |" if control else ""
        lines += [
            "## Students: baseline vs distilled (test, full ranking)", "",
            "| metric | baseline | distilled | gain | 95 % interval (paired bootstrap) | samples better / worse |" + extra,
            "|---|---|---|---|---|---|" + ("---|" if control else ""),
        ]
        for k in FULL_KEYS:
            if k in base:
                p = paired.get(k, {})
                moved = f"{p['better']} / {p['worse']}" if p else "n/a"
                row = f"| {k} | {base[k]:.4f} | {dist[k]:.4f} | {gain_text(gain.get(k))} | {interval_text(p.get('interval'))} | {moved} |"
                if control:
                    row += f" {gain_text(control['gain'].get(k))}, {interval_text(seeds.get(k, {}).get('interval'))} |"
                lines.append(row)
        if paired:
            lines += ["", f"The interval resamples the {distill['gain_interval']['samples']} test samples (both students on the same ones); "
                      "one that contains 0 means the gain could be noise. It leaves out training randomness: "
                      + ("the control column is the baseline trained again with another seed, what the seed alone moves."
                         if control else "a baseline trained with another seed (`distill.control_seed`) shows how far the seed alone moves the metrics.")]
        if distill.get("train_samples"):
            used = distill["train_samples"]
            lines += ["", f"The students trained on the first {used['used']:,} of the {used['of']:,} train samples (`distill.train_limit`): "
                      "a trial, not the gain over the whole train split."]
        plot_students(base, dist, run / "students.png")
        note = weak_teacher_note(summary)
        lines += ["", *([note, ""] if note else []), "![students](students.png)", ""]
    if plot_curves(run, run / "curves.png"):
        lines += ["## Training curves", "", "![curves](curves.png)", ""]
    stage_names = {"sasrec_train": "sasrec", "sasrec": "sasrec_eval"}  # the summary's keys -> the stages' names
    stages = {stage_names.get(k, k): v.get("seconds") for k, v in summary.items() if isinstance(v, dict) and "seconds" in v}
    lines += ["## Stage times (s)", "", "| " + " | ".join(stages) + " |", "|" + "---|" * len(stages), "| " + " | ".join(_fmt(v) for v in stages.values()) + " |", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    (run / "summary.json").write_text(strict_json(summary, indent=2), encoding="utf-8")
    return path


def summary_table(summary: dict) -> str:
    """The final table printed by `ilora run` / `ilora demo`."""
    lines = []
    rec = summary.get("sasrec", {})
    keys = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@10", "cand_hr@1")
    if rec:
        split = _section(summary, "eval").get("split", "test")
        lines.append(f"{f'model ({split}, full ranking)':<30}" + "".join(f"{k:>10}" for k in keys))
        for name in ("popularity", "sasrec"):
            lines.append(f"{name:<30}" + "".join(f"{rec[name][k]:>10.4f}" for k in keys))
    distill = summary.get("distill")
    if distill:
        for name in ("baseline", "distilled"):
            lines.append(f"{'student ' + name:<30}" + "".join(_cell(distill[name].get(k)) for k in keys))
        for label, part in (("distillation gain (ndcg@10)", distill), ("seed control gain (ndcg@10)", distill.get("control"))):
            gain = (part or {}).get("gain", {}).get("ndcg@10")
            if gain is not None:
                interval = metric_intervals(part.get("gain_interval")).get("ndcg@10", {}).get("interval")
                lines.append(f"{label:<30}{100 * gain:>+9.1f}%" + (f"   95 % interval {interval_text(interval)}" if interval else ""))
    ev = summary.get("eval")
    if ev:
        lines += ["", f"teacher on {ev['samples']} {ev['split']} samples, fixed candidates:",
                  f"{'protocol/gate':<30}{'hr@1':>10}{'ndcg@5':>10}{'mrr':>10}{'valid':>10}{'entropy':>10}"]
        for name, m in ev["teacher"].items():
            lines.append(
                f"{name:<30}{_cell(m['hr@1'])}{_cell(m.get('ndcg@5'))}{_cell(m.get('mrr'))}"
                f"{_cell(m['valid_ratio'])}{_cell(m['gate_stats']['mean_entropy'], '.3f')}"
            )
        lines.append(f"{'SASRec cand_hr@1, same cands':<30}{ev['sasrec_same_candidates']['cand_hr@1']:>10.4f}")
    note = weak_teacher_note(summary) if summary.get("distill") else None
    if note:
        lines += ["", note]
    lines += ["", f"report: {summary['out']}/report.md"]
    return "\n".join(lines)

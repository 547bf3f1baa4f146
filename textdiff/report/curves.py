"""Label-efficiency curves: test Dice and AJI, and the per-nucleus AJI and PQ where the runs have
them, against the number of labelled training images.

The runs are ordinary DVC experiments (`benchmarks/label_grid.py` queues the grid); this module
reads `dvc exp show --json`, names each run's method from its params (never from the experiment's
name, so a renamed run is still placed right), and reduces the seeds of one (method, N) to mean and
standard deviation. Runs trained by epochs are left out: with 1 label an epoch is one step, so only
runs with a fixed `train.steps` budget are comparable across N (and only runs of one budget).
Cellpose trains by its own loop: its runs are on the curves when they draw a fixed number of crops
per epoch (`baseline.cellpose_crops_per_epoch` > 0, as the grid queues them), its analogue.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from textdiff.report.ablation import finished_runs

METHODS = {  # key -> label, in the order of the table and the legend
    "textdiff": "TextDiff (teacher + report)",
    "image_only": "teacher features, no text (fusion: none)",
    "rgb": "raw-RGB control (same classifier)",
    "unet": "U-Net from scratch (MONAI)",
    "cellpose": "Cellpose 3 from scratch (its own loop)",
    "classic": "hematoxylin + Otsu (no labels)",
}
# What a curve shows: Dice and AJI of the 256² masks against the binary truth (every run), then the
# separated nuclei at the source size against the per-nucleus truth (runs on a cache with instances).
CURVE_METRICS = ("dice", "aji", "aji_instance", "pq_instance")
METRIC_LABELS = {"dice": "Dice", "aji": "AJI (binary truth)", "aji_instance": "nuclei AJI", "pq_instance": "nuclei PQ"}


def method_of(params: dict) -> str | None:
    """Which curve a run belongs to (None: a variant that is on none of them)."""
    section = params.get("baseline") or {}
    baseline = section.get("kind", "none")
    if baseline in ("classic", "unet"):
        return baseline
    if baseline == "cellpose":  # its own loop: comparable across N only with a fixed crop budget per epoch
        return "cellpose" if section.get("cellpose_crops_per_epoch", 0) > 0 else None
    if baseline != "none":
        return None
    train, teacher = params.get("train") or {}, params.get("teacher") or {}
    fusion = train.get("fusion", "cross_attention")
    if teacher.get("kind", "adm") == "rgb":
        return "rgb" if fusion == "cross_attention" else None
    return {"cross_attention": "textdiff", "none": "image_only"}.get(fusion)


def runs_from_exp_show(exp_show: Any, params_file: str = "params.yaml") -> list[dict]:
    """One row per finished run: method, N (labelled images), seed, steps and the `CURVE_METRICS`
    (fractions; NaN where a run has none, e.g. no per-nucleus truth)."""
    rows = []
    for record in finished_runs(exp_show):
        data = record["data"]
        params = ((data.get("params") or {}).get(params_file) or {}).get("data") or {}
        metrics = data.get("metrics") or {}
        test = (metrics.get("metrics/test.json") or {}).get("data") or {}
        train_metrics = (metrics.get("metrics/train.json") or {}).get("data") or {}
        method = method_of(params)
        if method is None or "dice" not in test:
            continue
        train = params.get("train") or {}
        if method != "classic" and not train.get("steps"):
            continue  # trained by epochs: not comparable across N
        n = int(train_metrics.get("num_train") or train.get("num_labeled") or 0)
        rows.append({"name": record["name"] or str(record["rev"])[:7], "method": method, "n": n,
                     "seed": int(train.get("seed", 0)), "steps": int(train.get("steps", 0)),
                     **{m: float(test.get(m, float("nan"))) for m in CURVE_METRICS}})
    return _dedupe(rows)


def _dedupe(rows: list[dict]) -> list[dict]:
    """The same (method, N, seed, steps) twice (e.g. re-queued): keep the last one listed."""
    out: dict[tuple, dict] = {}
    for row in rows:
        out[(row["method"], row["n"], row["seed"], row["steps"])] = row
    return list(out.values())


def aggregate(rows: list[dict], label_counts: list[int] | None = None) -> list[dict]:
    """Mean and standard deviation over seeds per (method, N). The classic baseline uses no labels:
    its one run is drawn at every N of the other curves."""
    counts = sorted({r["n"] for r in rows if r["method"] != "classic"}) if label_counts is None else label_counts
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] == "classic":
            for n in counts:
                groups[("classic", n)].append(r)
        else:
            groups[(r["method"], r["n"])].append(r)
    out = []
    for method in METHODS:
        for n in sorted({n for m, n in groups if m == method}):
            sel = groups[(method, n)]
            summary = {"method": method, "n": n, "runs": len(sel)}
            for metric in CURVE_METRICS:
                values = np.array([r.get(metric, np.nan) for r in sel], dtype=float)
                values = values[np.isfinite(values)]
                summary[metric] = float(values.mean()) if len(values) else float("nan")
                summary[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            out.append(summary)
    return out


def _shown(summary: list[dict]) -> list[str]:
    """The metrics some (method, N) has a value of: per-nucleus ones only where the runs scored them."""
    return [m for m in CURVE_METRICS if any(np.isfinite(s.get(m, np.nan)) for s in summary)]


def markdown(summary: list[dict]) -> str:
    """Methods as rows, N as columns, mean ± std over seeds (runs): Dice / AJI in %, then, where the
    runs scored separated nuclei, a second table of nuclei AJI / PQ."""
    counts = sorted({s["n"] for s in summary})
    lookup = {(s["method"], s["n"]): s for s in summary}

    def value(s: dict, metric: str) -> str:
        if not np.isfinite(s[metric]):
            return "–"
        return f"{100 * s[metric]:.2f}" + (f" ± {100 * s[f'{metric}_std']:.2f}" if s["runs"] > 1 else "")

    def table(pair: tuple[str, str]) -> str:
        lines = ["| method | " + " | ".join(f"N = {n}" for n in counts) + " |",
                 "|---|" + "---:|" * len(counts)]
        for method, label in METHODS.items():
            if not any(m == method for m, _ in lookup):
                continue
            cells = []
            for n in counts:
                s = lookup.get((method, n))
                cells.append("" if s is None else f"{value(s, pair[0])} / {value(s, pair[1])} ({s['runs']})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    text = ("Test Dice / AJI (%), mean ± std over seeds (runs), 256², by the number N of labelled "
            "training images.\n\n" + table(("dice", "aji")))
    if "aji_instance" in _shown(summary):
        text += ("\nSeparated nuclei: test AJI / PQ (%) at the source size against the per-nucleus truth, "
                 "mean ± std over seeds (runs).\n\n" + table(("aji_instance", "pq_instance")))
    return text


def write_csvs(summary: list[dict], folder: Path) -> list[Path]:
    """One CSV per method (n, dice, dice_std, aji, aji_std in %): what `dvc plots` draws as lines."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for method in METHODS:
        sel = [s for s in summary if s["method"] == method]
        if not sel:
            continue
        buffer = io.StringIO()
        columns = [k for m in CURVE_METRICS for k in (m, f"{m}_std")]
        writer = csv.DictWriter(buffer, fieldnames=["n", *columns, "runs"])
        writer.writeheader()
        for s in sel:
            writer.writerow({"n": s["n"], "runs": s["runs"],
                             **{k: round(100 * s[k], 3) if np.isfinite(s[k]) else "" for k in columns}})
        path = folder / f"{method}.csv"
        path.write_text(buffer.getvalue())
        written.append(path)
    return written


def plot(summary: list[dict], path: Path) -> None:
    """Each shown metric against N (log scale), one panel each, one line per method, error bars =
    std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = _shown(summary) or ["dice"]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4.2), squeeze=False)
    axes = axes[0]
    for metric, ax in zip(shown, axes):
        for method, label in METHODS.items():
            sel = [s for s in summary if s["method"] == method and np.isfinite(s[metric])]
            if not sel:
                continue
            ax.errorbar([s["n"] for s in sel], [100 * s[metric] for s in sel],
                        yerr=[100 * s[f"{metric}_std"] for s in sel], marker="o", capsize=3, label=label,
                        ls="--" if method == "classic" else "-")
        ax.set_xscale("log", base=2)
        counts = sorted({s["n"] for s in summary})
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.set_xlabel("labelled training images (N)")
        ax.set_ylabel(f"test {METRIC_LABELS[metric]} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Label efficiency on MoNuSeg (test split, 256², mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


__all__ = ["CURVE_METRICS", "METHODS", "aggregate", "markdown", "method_of", "plot", "runs_from_exp_show", "write_csvs"]

"""Label-efficiency curves: test Dice and AJI against the number of labelled training images.

The runs are ordinary DVC experiments (`benchmarks/label_grid.py` queues the grid); this module
reads `dvc exp show --json`, names each run's method from its params (never from the experiment's
name, so a renamed run is still placed right), and reduces the seeds of one (method, N) to mean and
standard deviation. Runs trained by epochs are left out: with 1 label an epoch is one step, so only
runs with a fixed `train.steps` budget are comparable across N (and only runs of one budget).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from textdiff.report.ablation import _walk

METHODS = {  # key -> label, in the order of the table and the legend
    "textdiff": "TextDiff (teacher + report)",
    "image_only": "teacher features, no text (fusion: none)",
    "rgb": "raw-RGB control (same classifier)",
    "unet": "U-Net from scratch (MONAI)",
    "classic": "hematoxylin + Otsu (no labels)",
}


def method_of(params: dict) -> str | None:
    """Which curve a run belongs to (None: a variant that is on none of them)."""
    baseline = (params.get("baseline") or {}).get("kind", "none")
    if baseline in ("classic", "unet"):
        return baseline
    if baseline != "none":  # cellpose: its own loop and epochs, no `train.steps` budget to compare across N (yet)
        return None
    train, teacher = params.get("train") or {}, params.get("teacher") or {}
    fusion = train.get("fusion", "cross_attention")
    if teacher.get("kind", "adm") == "rgb":
        return "rgb" if fusion == "cross_attention" else None
    return {"cross_attention": "textdiff", "none": "image_only"}.get(fusion)


def runs_from_exp_show(exp_show: Any, params_file: str = "params.yaml") -> list[dict]:
    """One row per finished run: method, N (labelled images), seed, steps, dice, aji (fractions)."""
    rows = []
    for record in _walk(exp_show):
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
                     "dice": float(test["dice"]), "aji": float(test.get("aji", float("nan")))})
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
            dice, aji = np.array([r["dice"] for r in sel]), np.array([r["aji"] for r in sel])
            out.append({"method": method, "n": n, "runs": len(sel), "dice": float(dice.mean()),
                        "dice_std": float(dice.std(ddof=1)) if len(sel) > 1 else 0.0,
                        "aji": float(aji.mean()), "aji_std": float(aji.std(ddof=1)) if len(sel) > 1 else 0.0})
    return out


def markdown(summary: list[dict]) -> str:
    """Methods as rows, N as columns: Dice and AJI in %, mean ± std over seeds (runs)."""
    counts = sorted({s["n"] for s in summary})
    lookup = {(s["method"], s["n"]): s for s in summary}
    lines = ["| method | " + " | ".join(f"N = {n}" for n in counts) + " |",
             "|---|" + "---:|" * len(counts)]
    for method, label in METHODS.items():
        if not any(m == method for m, _ in lookup):
            continue
        cells = []
        for n in counts:
            s = lookup.get((method, n))
            if s is None:
                cells.append("")
                continue
            spread = f" ± {100 * s['dice_std']:.2f}" if s["runs"] > 1 else ""
            aspread = f" ± {100 * s['aji_std']:.2f}" if s["runs"] > 1 else ""
            cells.append(f"{100 * s['dice']:.2f}{spread} / {100 * s['aji']:.2f}{aspread} ({s['runs']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return ("Test Dice / AJI (%), mean ± std over seeds (runs), 256², by the number N of labelled "
            "training images.\n\n" + "\n".join(lines) + "\n")


def write_csvs(summary: list[dict], folder: Path) -> list[Path]:
    """One CSV per method (n, dice, dice_std, aji, aji_std in %): what `dvc plots` draws as lines."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for method in METHODS:
        sel = [s for s in summary if s["method"] == method]
        if not sel:
            continue
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["n", "dice", "dice_std", "aji", "aji_std", "runs"])
        writer.writeheader()
        for s in sel:
            writer.writerow({"n": s["n"], "runs": s["runs"],
                             **{k: round(100 * s[k], 3) for k in ("dice", "dice_std", "aji", "aji_std")}})
        path = folder / f"{method}.csv"
        path.write_text(buffer.getvalue())
        written.append(path)
    return written


def plot(summary: list[dict], path: Path) -> None:
    """Dice and AJI against N (log scale), one line per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for metric, ax in zip(("dice", "aji"), axes):
        for method, label in METHODS.items():
            sel = [s for s in summary if s["method"] == method]
            if not sel:
                continue
            ax.errorbar([s["n"] for s in sel], [100 * s[metric] for s in sel],
                        yerr=[100 * s[f"{metric}_std"] for s in sel], marker="o", capsize=3, label=label,
                        ls="--" if method == "classic" else "-")
        ax.set_xscale("log", base=2)
        counts = sorted({s["n"] for s in summary})
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.set_xlabel("labelled training images (N)")
        ax.set_ylabel(f"test {metric.upper() if metric == 'aji' else 'Dice'} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Label efficiency on MoNuSeg (test split, 256², mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


__all__ = ["METHODS", "aggregate", "markdown", "method_of", "plot", "runs_from_exp_show", "write_csvs"]

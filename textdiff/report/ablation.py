"""The ablation table: DVC experiments' params and test metrics -> markdown and CSV.

Rows follow the paper's ablation layout (variation, description, Dice, IoU, AJI), plus the Dice
against the released code's dilated ground truth (the paper's scoring) and the per-nucleus scores;
a row's variation is named from its params, so the table stays right whatever the experiments were
called. One seed per variation says little when variations differ by tenths: runs of one variation
with different `train.seed` are kept apart (one CSV row each) and the markdown shows their mean ±
standard deviation.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

from textdiff.params import TrainParams

DESCRIPTIONS = {
    "none": ("ζ1", "image only: diffusion features, no text"),
    "concat": ("ζ2", "pooled report embedding concatenated to every pixel, no attention"),
    "cross_attention": ("TextDiff", "pixels cross-attend to the report tokens (one block shared by all scales)"),
    "hierarchical": ("Ext. 1", "hierarchical: an independent cross-attention block per scale"),
}


KEYS = {"none": "zeta1", "concat": "zeta2", "cross_attention": "textdiff", "hierarchical": "ext1"}
METRICS = ("dice", "dice_release", "iou", "aji", "pq", "dice_native", "aji_instance", "pq_instance")
CSV_COLUMNS = ("variation", "label", "seed", "dice", "iou", "aji", "pq", "dice_native", "aji_instance", "pq_instance",
               "dice_release", "experiment")

UNFINISHED = ("queued", "running", "failed")  # an executor state whose record shows its parent's metrics


def _walk(node: Any) -> Iterator[dict]:
    """Every finished record with params+metrics in `dvc exp show --json` output (baseline and
    experiments). A queued, running or failed experiment is listed with its own params but its
    parent commit's metrics files, so it would pose as a finished run of its params: left out. An
    experiment is its first rev; the revs after it are commits of its history (one may hold the
    experiment's params beside the parent's metrics), not runs."""
    if isinstance(node, list):
        for item in node:
            yield from _walk(item)
    elif isinstance(node, dict):
        if (node.get("executor") or {}).get("state") in UNFINISHED:
            return
        data = node.get("data")
        if isinstance(data, dict) and "params" in data and not node.get("error"):
            yield {"rev": node.get("rev"), "name": node.get("name") or data.get("name"), "data": data}
        if node.get("experiments"):
            yield from _walk(node["experiments"])
        if node.get("revs"):
            yield from _walk(node["revs"][0])


def finished_runs(exp_show: Any) -> Iterator[dict]:
    """The runs in `dvc exp show --json` output: the workspace, branch tips, and every experiment
    of any commit listed. With `--all-commits` every past commit is listed too, with the params and
    metrics files it happened to hold: history, not runs (a commit made while an experiment's
    params were in the workspace would pose as a run of them with the default's metrics)."""
    for entry in exp_show if isinstance(exp_show, list) else [exp_show]:
        if not isinstance(entry, dict):
            continue
        if entry.get("rev") == "workspace" or entry.get("name"):
            yield from _walk(entry)
        else:
            yield from _walk(entry.get("experiments") or [])


def rows_from_exp_show(exp_show: Any, params_file: str = "params.yaml",
                       metrics_file: str = "metrics/test.json") -> list[dict]:
    rows: list[dict] = []
    seen: dict[tuple, dict] = {}
    for record in finished_runs(exp_show):
        data = record["data"]
        params = ((data.get("params") or {}).get(params_file) or {}).get("data") or {}
        metrics = ((data.get("metrics") or {}).get(metrics_file) or {}).get("data") or {}
        if not metrics or "dice" not in metrics:
            continue
        train = params.get("train") or {}
        if train.get("steps"):
            continue  # a label-efficiency run (a fixed step budget at every N): `textdiff report --curves`
        teacher = params.get("teacher") or {}
        pretrain = params.get("pretrain") or {}
        data_params = params.get("data") or {}
        row = {
            "name": record["name"] or str(record["rev"])[:7],
            "timestamp": str(data.get("timestamp") or ""),
            "fusion": train.get("fusion", "cross_attention"),
            "contrastive_weight": float(train.get("contrastive_weight", 0.0) or 0.0),
            "num_labeled": train.get("num_labeled", 0),
            "teacher_kind": teacher.get("kind", "adm"),
            "random_teacher": teacher.get("kind", "adm") == "adm" and not teacher.get("checkpoint")
            and pretrain.get("steps") == 0,
            "protocol": data_params.get("protocol", "project"),
            "classifier": train.get("classifier", "project"),
            "baseline": (params.get("baseline") or {}).get("kind", "none"),
            "seed": int(train.get("seed", TrainParams.seed)),
            **{m: metrics.get(m) for m in METRICS},
        }
        key = (variation(row), row["seed"])
        if key in seen:  # the same variation and seed twice (e.g. across commits): keep the newest run
            old = seen[key]
            if row["timestamp"] > old["timestamp"]:
                rows[rows.index(old)] = row
                seen[key] = row
            continue
        seen[key] = row
        rows.append(row)
    return rows


BASELINES = {"classic": "hematoxylin + Otsu, no learning", "unet": "MONAI U-Net from scratch on the pixels",
             "cellpose": "Cellpose 3 from scratch"}


def variation(row: dict) -> tuple[str, str]:
    if row.get("baseline", "none") != "none":
        return f"Baseline: {row['baseline']}", BASELINES.get(row["baseline"], row["baseline"])
    if row.get("teacher_kind") == "rgb":
        label, text = "Control (c)", f"raw RGB pixels instead of teacher features; classifier: {row['fusion']}"
        return label, text
    label, text = DESCRIPTIONS.get(row["fusion"], (row["fusion"], row["fusion"]))
    if row.get("random_teacher"):
        label, text = f"Control (b), {label}", f"randomly initialised teacher (pretrain.steps = 0); {text}"
    if row["contrastive_weight"] > 0:
        label = "Ext. 2" if row["fusion"] == "cross_attention" else f"{label} + Ext. 2"
        text = f"{text}; + contrastive image-text loss, λ = {row['contrastive_weight']:g}"
    if row.get("classifier", "project") == "release":
        label, text = f"{label}, release classifier", f"{text}; the released classifier and loss"
    if row.get("protocol", "project") == "release":
        label, text = f"{label}, release data", f"{text}; the released BGR/bilinear images and dilated masks"
    return label, text


def variation_key(row: dict) -> str:
    """The variation's short name for the CSV: zeta1, zeta2, textdiff, ext1, ext2 (the paper's
    ablation), with a prefix or suffix for the controls and the release switches."""
    if row.get("baseline", "none") != "none":
        return f"baseline_{row['baseline']}"
    key = KEYS.get(row["fusion"], row["fusion"])
    if row["contrastive_weight"] > 0:
        key = "ext2" if row["fusion"] == "cross_attention" else f"{key}+ext2"
    if row.get("teacher_kind") == "rgb":
        key = f"control_rgb_{key}"
    elif row.get("random_teacher"):
        key = f"control_random_teacher_{key}"
    if row.get("classifier", "project") == "release":
        key += "_release_classifier"
    if row.get("protocol", "project") == "release":
        key += "_release_data"
    return key


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.2f}"


def _mean_std(values: list) -> str:
    """A cell: the value (one seed), or mean ± sample standard deviation over the seeds, in %."""
    known = [100 * float(v) for v in values if v is not None]
    if not known:
        return "–"
    if len(known) == 1:
        return f"{known[0]:.2f}"
    return f"{statistics.fmean(known):.2f} ± {statistics.stdev(known):.2f}"


def _rank(r: dict) -> tuple:
    order = {"none": 0, "concat": 1, "cross_attention": 2, "hierarchical": 3}
    control = r.get("teacher_kind") == "rgb" or r.get("random_teacher", False) or r.get("baseline", "none") != "none"
    release = (r.get("protocol", "project") == "release", r.get("classifier", "project") == "release")
    return (control, release, r["contrastive_weight"] > 0, order.get(r["fusion"], 9), r["name"])


def _paired(group: list[dict], reference: dict[int, dict], metric: str) -> str:
    """A cell: the variation minus TextDiff at the same `train.seed`, in points, mean ± std over
    the seeds both ran. Pairing by seed takes out what a seed does to every variation alike (the
    classifier's initialisation and batch order), so a difference smaller than either row's spread
    can still be read; "–" without a shared seed, and on TextDiff's own row."""
    if variation_key(group[0]) == "textdiff":
        return "–"
    diffs = [float(r[metric]) - float(reference[r["seed"]][metric]) for r in group
             if r["seed"] in reference and r.get(metric) is not None and reference[r["seed"]].get(metric) is not None]
    if not diffs:
        return "–"
    cell = _mean_std(diffs)
    return cell if cell.startswith("-") else f"+{cell}"


def markdown_table(rows: list[dict]) -> str:
    """One line per variation; where several seeds ran, each score is their mean ± std, and the
    last score columns are the paired difference from TextDiff (`_paired`)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in sorted(rows, key=_rank):
        groups.setdefault(variation(row), []).append(row)
    reference = {r["seed"]: r for r in rows if variation_key(r) == "textdiff"}
    lines = [
        "| Variation | Description | Dice (%) | Dice vs release GT (%) | IoU (%) | AJI (%) | AJI nuclei (%) "
        "| PQ nuclei (%) | Δ Dice vs TextDiff, same seed | Δ AJI nuclei vs TextDiff, same seed | Seeds | Experiment |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (label, text), group in groups.items():
        group = sorted(group, key=lambda r: r["seed"])
        cells = " | ".join(_mean_std([r.get(m) for r in group])
                           for m in ("dice", "dice_release", "iou", "aji", "aji_instance", "pq_instance"))
        deltas = " | ".join(_paired(group, reference, m) for m in ("dice", "aji_instance"))
        seeds = ", ".join(str(r["seed"]) for r in group)
        lines.append(f"| {label} | {text} | {cells} | {deltas} | {seeds} | {', '.join(r['name'] for r in group)} |")
    return "\n".join(lines) + "\n"


def csv_rows(rows: list[dict]) -> list[dict]:
    """metrics/ablation.csv: one row per run (variation and seed), the scores as fractions."""
    out = []
    for row in sorted(rows, key=lambda r: (_rank(r), r["seed"])):
        out.append({"variation": variation_key(row), "label": variation(row)[0], "seed": row["seed"],
                    **{m: "" if row.get(m) is None else round(float(row[m]), 6) for m in METRICS},
                    "experiment": row["name"]})
    return [{k: r[k] for k in CSV_COLUMNS} for r in out]

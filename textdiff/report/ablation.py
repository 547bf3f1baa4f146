"""The ablation table: DVC experiments' params and test metrics -> markdown.

Rows follow the paper's ablation layout (variation, description, Dice, IoU, AJI), plus the Dice
against the released code's dilated ground truth (the paper's scoring); a row's variation is named
from its params, so the table stays right whatever the experiments were called.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

DESCRIPTIONS = {
    "none": ("ζ1", "image only: diffusion features, no text"),
    "concat": ("ζ2", "pooled report embedding concatenated to every pixel, no attention"),
    "cross_attention": ("TextDiff", "pixels cross-attend to the report tokens (one block shared by all scales)"),
    "hierarchical": ("Ext. 1", "hierarchical: an independent cross-attention block per scale"),
}


UNFINISHED = ("queued", "running", "failed")  # an executor state whose record shows its parent's metrics


def _walk(node: Any) -> Iterator[dict]:
    """Every finished record with params+metrics in `dvc exp show --json` output (baseline and
    experiments). A queued, running or failed experiment is listed with its own params but its
    parent commit's metrics files, so it would pose as a finished run of its params: left out."""
    if isinstance(node, list):
        for item in node:
            yield from _walk(item)
    elif isinstance(node, dict):
        if (node.get("executor") or {}).get("state") in UNFINISHED:
            return
        data = node.get("data")
        if isinstance(data, dict) and "params" in data and not node.get("error"):
            yield {"rev": node.get("rev"), "name": node.get("name") or data.get("name"), "data": data}
        for key in ("experiments", "revs"):
            if node.get(key):
                yield from _walk(node[key])


def rows_from_exp_show(exp_show: Any, params_file: str = "params.yaml",
                       metrics_file: str = "metrics/test.json") -> list[dict]:
    rows: list[dict] = []
    seen: dict[tuple, dict] = {}
    for record in _walk(exp_show):
        data = record["data"]
        params = ((data.get("params") or {}).get(params_file) or {}).get("data") or {}
        metrics = ((data.get("metrics") or {}).get(metrics_file) or {}).get("data") or {}
        if not metrics or "dice" not in metrics:
            continue
        train = params.get("train") or {}
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
            "dice": metrics.get("dice"),
            "dice_release": metrics.get("dice_release"),
            "iou": metrics.get("iou"),
            "aji": metrics.get("aji"),
        }
        key = variation(row)
        if key in seen:  # the same variation twice (e.g. across commits): keep the newest run
            old = seen[key]
            if row["timestamp"] > old["timestamp"]:
                rows[rows.index(old)] = row
                seen[key] = row
            continue
        seen[key] = row
        rows.append(row)
    return rows


def variation(row: dict) -> tuple[str, str]:
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


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.2f}"


def markdown_table(rows: list[dict]) -> str:
    order = {"none": 0, "concat": 1, "cross_attention": 2, "hierarchical": 3}

    def rank(r: dict) -> tuple:
        control = r.get("teacher_kind") == "rgb" or r.get("random_teacher", False)
        release = (r.get("protocol", "project") == "release", r.get("classifier", "project") == "release")
        return (control, release, r["contrastive_weight"] > 0, order.get(r["fusion"], 9), r["name"])

    rows = sorted(rows, key=rank)
    lines = [
        "| Variation | Description | Dice (%) | Dice vs release GT (%) | IoU (%) | AJI (%) | Experiment |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        label, text = variation(row)
        lines.append(f"| {label} | {text} | {_pct(row['dice'])} | {_pct(row.get('dice_release'))} | {_pct(row['iou'])} "
                     f"| {_pct(row['aji'])} | {row['name']} |")
    return "\n".join(lines) + "\n"

"""The stain-shift benchmark's measurement: test images re-stained in HED space, segmented, scored.

Conditions are seeded and the same for every method, so two models (or a model and the classic
baseline) meet exactly the same re-stained pixels. Random conditions draw one shift per image at
a strength sigma (Tellez et al. 2019: 0.05 "HED-light", 0.2 "HED-strong", which their 9-laboratory
data motivated; 0.3 goes beyond it); directed ones apply one named shift to every image (`pale`:
both stains 40 % weaker, the complaint of a user whose slides came out over-segmented).

Scores are at the source resolution, as `textdiff predict` would deliver them: Dice and AJI
against the full-size masks, and the predicted / true foreground ratio (1 = the right amount of
nucleus; the blobby failure shows as > 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from textdiff.data.stain import IDENTITY, StainShift, apply_shift, draw_shift
from textdiff.evaluation.metrics import aji, iou_dice_textdiff

RANDOM_STRENGTHS = (0.05, 0.1, 0.2, 0.3)
DIRECTED = {
    "pale": StainShift((-0.4, -0.4, 0.0), (0.0, 0.0, 0.0)),
    "pinker": StainShift((-0.2, 0.3, 0.0), (0.0, 0.05, 0.0)),
    "bluer": StainShift((0.3, -0.2, 0.0), (0.05, 0.0, 0.0)),
}


@dataclass(frozen=True)
class Condition:
    """One way of re-staining the test set: a shift per image."""

    name: str
    shifts: tuple[StainShift, ...]

    def apply(self, k: int, image: np.ndarray) -> np.ndarray:
        return apply_shift(image, self.shifts[k])


def conditions(n_images: int, strengths: Sequence[float] = RANDOM_STRENGTHS, directed: bool = True,
               seed: int = 0) -> list[Condition]:
    """`none`, one random condition per strength (its own seeded draw per image), the directed ones."""
    out = [Condition("none", (IDENTITY,) * n_images)]
    for j, sigma in enumerate(strengths):
        draws = tuple(draw_shift(np.random.default_rng([seed, j, k]), sigma) for k in range(n_images))
        out.append(Condition(f"HED ±{sigma:g}", draws))
    if directed:
        out.extend(Condition(name, (shift,) * n_images) for name, shift in DIRECTED.items())
    return out


def scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    dice, _ = iou_dice_textdiff(pred, gt)
    true = float(gt.astype(bool).sum())
    return {"dice": dice, "aji": aji(pred, gt),
            "foreground_ratio": float(pred.astype(bool).sum()) / true if true else float("nan")}


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A binary mask brought to (height, width) by nearest neighbour."""
    if mask.shape == size:
        return mask.astype(np.uint8)
    resized = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize(size[::-1], Image.Resampling.NEAREST)
    return np.asarray(resized) // 255


def measure(segment: Callable[[np.ndarray, str], np.ndarray], images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
            texts: Sequence[str], conds: Sequence[Condition], label: str = "") -> list[dict]:
    """Per condition and image: the scores of `segment(image, text) -> binary mask` (source size)."""
    rows = []
    with tqdm(total=len(conds) * len(images), desc=f"stain shift {label}".strip(), unit="img", leave=False) as bar:
        for cond in conds:
            for k, (image, mask, text) in enumerate(zip(images, masks, texts)):
                pred = segment(cond.apply(k, image), text)
                rows.append({"method": label, "condition": cond.name, "image": k, **scores(pred, mask)})
                bar.update(1)
    return rows


def summarize_rows(rows: Sequence[dict], metrics: Sequence[str] = ("dice", "aji", "foreground_ratio")) -> list[dict]:
    """Mean and standard deviation of each of `metrics` over images, per method and condition, in
    first-seen order."""
    keys: list[tuple[str, str]] = []
    for r in rows:
        if (r["method"], r["condition"]) not in keys:
            keys.append((r["method"], r["condition"]))
    out = []
    for method, cond in keys:
        sel = [r for r in rows if r["method"] == method and r["condition"] == cond]
        entry = {"method": method, "condition": cond, "images": len(sel)}
        for metric in metrics:
            values = np.array([r[metric] for r in sel], float)
            entry[metric], entry[f"{metric}_std"] = float(np.nanmean(values)), float(np.nanstd(values))
        out.append(entry)
    return out


def markdown_table(summary: Sequence[dict]) -> str:
    """Conditions as rows; per method Dice / AJI (%) and the foreground ratio."""
    methods = list(dict.fromkeys(s["method"] for s in summary))
    conds = list(dict.fromkeys(s["condition"] for s in summary))
    lookup = {(s["method"], s["condition"]): s for s in summary}
    head = "| condition | " + " | ".join(f"{m}: Dice / AJI (%), fg ratio" for m in methods) + " |"
    lines = [head, "|---|" + "---:|" * len(methods)]
    for c in conds:
        cells = []
        for m in methods:
            s = lookup.get((m, c))
            cells.append("" if s is None else f"{100 * s['dice']:.2f} / {100 * s['aji']:.2f}, "
                                              f"{s['foreground_ratio']:.2f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["Condition", "DIRECTED", "RANDOM_STRENGTHS", "conditions", "markdown_table", "measure", "scores",
           "summarize_rows", "upsample_mask"]

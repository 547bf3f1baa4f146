"""Generalisation benchmark, part one: the test images degraded as other labs' images are.

    python benchmarks/generalise.py                                  # models/classifier + the anchor
    python benchmarks/generalise.py --model textdiff=models/classifier --model rgb=/path/to/rgb/classifier
    python benchmarks/generalise.py --images 2 --conditions none jpeg50 scale0.5  # quick look

Every condition changes the 14 MoNuSeg test images the way a slide from another lab, scanner or
magnification differs from TCGA's (stain: `benchmarks/robustness.py`'s HED shifts):

- `crop256`, `crop512`: the central 256² / 512² pixels only (the tile size of many public sets; at
  the default working resolution a 256² crop at 40x is a 65² image, smaller than one window);
- `scale0.5 .. scale2`: the image resampled to that fraction of its true magnification (0.5 = a
  20x scan of a 40x slide) and given to predict with its correct mpp (0.25 / factor µm/px);
  `scale0.5-wrong-mpp`, `scale2-wrong-mpp`: the same pixels told the training source's 0.25 µm/px
  (a user who does not know the magnification);
- `jpeg50/70/90`: JPEG-compressed at that quality (slide scanners store JPEG tiles);
- `blur1`, `blur2`: Gaussian blur of sigma 1, 2 source pixels (defocus);
- `noise8`, `noise16`: additive Gaussian noise of sigma 8, 16 grey levels (a noisy camera);
- `HED ±0.2`, `pale`: re-stained in HED optical-density space.

Each method segments every degraded image through `textdiff predict`'s code path (`Segmenter.maps`
and the model's own nucleus rule), and is scored at the degraded image's size against the truth
brought there by nearest neighbour: Dice (binary), instance AJI and PQ against the per-nucleus maps,
and nucleus detection F1 (predicted and true centroids paired one to one within 3 µm). The
no-learning anchor (hematoxylin + Otsu at the model's working resolution, then the mask's distance
transform watershed, its marker and size limit chosen on the val images like any rule) meets
exactly the same pixels. Writes <out>/generalise.{md,json}; prints the table, the time and device.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustness import DIRECTED, summarize_rows  # noqa: E402

from textdiff.baselines.classic import hematoxylin_otsu  # noqa: E402
from textdiff.data.dataset import Sample, read_split  # noqa: E402
from textdiff.data.resize import to_working_size  # noqa: E402
from textdiff.data.stain import apply_shift, draw_shift  # noqa: E402
from textdiff.evaluation.metrics import instance_scores, iou_dice_textdiff  # noqa: E402
from textdiff.model.nuclei import NucleusRule, choose_rule, separate  # noqa: E402
from textdiff.params import load_params  # noqa: E402
from textdiff.paths import CLASSIFIER_DIR, resolve_data_root  # noqa: E402
from textdiff.predict.images import build_segmenter  # noqa: E402
from textdiff.runtime.device import device_name, resolve_device  # noqa: E402

DETECTION_RADIUS_UM = 3.0
ANCHOR = "anchor (H + Otsu + watershed)"


@dataclass(frozen=True)
class Degradation:
    """How one condition changes an image: its pixels, the factor its size changes by, and whether
    predict is told the true resulting mpp."""

    name: str
    transform: Callable[[np.ndarray, int], np.ndarray]  # (image, image index) -> degraded image
    factor: float = 1.0
    told_true_mpp: bool = True
    crop: int = 0  # > 0: image and truth are first cut to their central crop x crop pixels


def _rescale(image: np.ndarray, factor: float, resample=Image.Resampling.LANCZOS) -> np.ndarray:
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(image).resize(size, resample))


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return np.clip(gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0)) + 0.5, 0, 255).astype(np.uint8)


def _noise(image: np.ndarray, sigma: float, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7, k])
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def degradations(seed: int = 0) -> list[Degradation]:
    out = [Degradation("none", lambda im, k: im)]
    for c in (256, 512):
        out.append(Degradation(f"crop{c}", lambda im, k: im, crop=c))
    for f in (0.5, 0.7, 1.4, 2.0):
        out.append(Degradation(f"scale{f:g}", lambda im, k, f=f: _rescale(im, f), f))
    for f in (0.5, 2.0):
        out.append(Degradation(f"scale{f:g}-wrong-mpp", lambda im, k, f=f: _rescale(im, f), f, told_true_mpp=False))
    for q in (50, 70, 90):
        out.append(Degradation(f"jpeg{q}", lambda im, k, q=q: _jpeg(im, q)))
    for s in (1.0, 2.0):
        out.append(Degradation(f"blur{s:g}", lambda im, k, s=s: _blur(im, s)))
    for s in (8.0, 16.0):
        out.append(Degradation(f"noise{s:g}", lambda im, k, s=s: _noise(im, s, k, seed)))
    out.append(Degradation("HED ±0.2", lambda im, k: apply_shift(im, draw_shift(np.random.default_rng([seed, 2, k]),
                                                                                 0.2))))
    out.append(Degradation("pale", lambda im, k: apply_shift(im, DIRECTED["pale"])))
    return out


def central_crop(array: np.ndarray, size: int) -> np.ndarray:
    if size <= 0:
        return array
    h, w = array.shape[:2]
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return array[y : y + size, x : x + size]


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A label map brought to (height, width) by nearest neighbour (labels stay labels)."""
    if labels.shape == shape:
        return labels
    return np.asarray(Image.fromarray(labels.astype(np.int32)).resize(shape[::-1], Image.Resampling.NEAREST))


def centroids(labels: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    present = np.unique(labels)
    present = present[present > 0]  # a cropped truth keeps the labels it had: not 1..n
    if len(present) == 0:
        return np.zeros((0, 2))
    return np.array(ndimage.center_of_mass(np.ones_like(labels), labels, present))


def detection_f1(pred: np.ndarray, truth: np.ndarray, radius_px: float) -> float:
    """F1 of nucleus detection: predicted and true centroids paired one to one (Hungarian, on
    distance) where closer than `radius_px`."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    p, t = centroids(pred), centroids(truth)
    if len(p) == 0 and len(t) == 0:
        return 1.0
    if len(p) == 0 or len(t) == 0:
        return 0.0
    d = cdist(p, t)
    rows, cols = linear_sum_assignment(np.where(d < radius_px, d, 1e6))
    tp = int((d[rows, cols] < radius_px).sum())
    return 2 * tp / (len(p) + len(t))


def scores(labels: np.ndarray, truth: np.ndarray, mpp: float) -> dict[str, float]:
    dice, _ = iou_dice_textdiff((labels > 0).astype(np.uint8), (truth > 0).astype(np.uint8))
    inst = instance_scores(labels, truth)
    return {"dice": dice, "aji": inst["aji_instance"], "pq": inst["pq_instance"],
            "f1": detection_f1(labels, truth, DETECTION_RADIUS_UM / mpp), "nuclei": _count(labels),
            "nuclei_true": _count(truth)}


def _count(labels: np.ndarray) -> int:
    return int(np.count_nonzero(np.unique(labels)))


def anchor_mask(image: np.ndarray, mpp: float, working_mpp: float) -> np.ndarray:
    """Hematoxylin + Otsu at the model's working resolution, back at the image's size."""
    h, w = image.shape[:2]
    f = mpp / working_mpp
    small = to_working_size(image, (max(1, round(h * f)), max(1, round(w * f))))
    mask = hematoxylin_otsu(small)
    return np.asarray(Image.fromarray(mask * 255).resize((w, h), Image.Resampling.BILINEAR)) > 127


def anchor_rule(val: list[Sample], mpp: float, working_mpp: float) -> NucleusRule:
    scored = [s for s in val if s.instances is not None and not s.approximate]  # true maps only
    probs = [anchor_mask(s.image, mpp, working_mpp).astype(np.float32) for s in scored]
    return choose_rule(probs, [None] * len(probs), [s.instances for s in scored], mpp).rule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="LABEL=DIR of a trained classifier (repeatable)")
    ap.add_argument("--no-anchor", action="store_true", help="leave out the no-learning anchor")
    ap.add_argument("--conditions", nargs="*", default=None, help="names of the conditions to run (default: all)")
    ap.add_argument("--images", type=int, default=0, help="first N test images (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="docs/generalise")
    args = ap.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    params = load_params(args.params)
    root, instances = resolve_data_root(params.data.root), Path(params.data.instances)
    if not instances.is_dir():
        raise SystemExit(f"error: {instances}: no per-nucleus ground truth (data.instances); this benchmark scores "
                         "instances")
    test = read_split(root, "test", instances=instances)
    test = test[: args.images] if args.images else test
    source_mpp = params.data.mpp
    conds = degradations(args.seed)
    if args.conditions:
        known = {c.name for c in conds}
        unknown = [c for c in args.conditions if c not in known]
        if unknown:
            raise SystemExit(f"error: unknown condition {unknown[0]!r}; known: {', '.join(sorted(known))}")
        conds = [c for c in conds if c.name in args.conditions]

    methods: list[tuple[str, Callable[[np.ndarray, str, float], np.ndarray]]] = []
    working = 0.0
    for value in args.model or [f"model={CLASSIFIER_DIR}"]:
        label, _, folder = value.partition("=") if "=" in value else (Path(value).name, "", value)
        segmenter, _ = build_segmenter(Path(folder), device, None, None)
        working = working or segmenter.working_mpp

        def segment(image: np.ndarray, text: str, mpp: float, s=segmenter) -> np.ndarray:
            prob, distance = s.maps(image, text, mpp)
            return separate(prob, distance, s.rule, mpp)

        methods.append((label, segment))
    if not args.no_anchor:
        if working <= 0:
            raise SystemExit("error: the model records no working resolution (trained before data.mpp existed); "
                             "the anchor works at the model's, retrain it or pass --no-anchor")
        val = read_split(root, "val", instances=instances)
        rule = anchor_rule(val, source_mpp, working)
        print(f"anchor: rule chosen on val: seeds {rule.seeds}, marker {rule.marker}, min area {rule.min_area_um2} um2")

        def anchor(image: np.ndarray, text: str, mpp: float) -> np.ndarray:
            return separate(anchor_mask(image, mpp, working).astype(np.float32), None, rule, mpp)

        methods.append((ANCHOR, anchor))

    rows, seconds = [], {label: 0.0 for label, _ in methods}
    with tqdm(total=len(conds) * len(test) * len(methods), desc="generalise", unit="img") as bar:
        for cond in conds:
            for k, sample in enumerate(test):
                image, truth = central_crop(sample.image, cond.crop), central_crop(sample.instances, cond.crop)
                image = cond.transform(image, k)
                true_mpp = source_mpp / cond.factor
                told = true_mpp if cond.told_true_mpp else source_mpp
                truth = resize_labels(truth, image.shape[:2])
                for label, segment in methods:
                    started = time.perf_counter()
                    labels = segment(image, sample.text, told)
                    seconds[label] += time.perf_counter() - started
                    rows.append({"method": label, "condition": cond.name, "image": sample.id,
                                 **scores(labels, truth, true_mpp)})
                    bar.update(1)

    summary = summarize(rows)
    table = markdown_table(summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generalise.md").write_text(table)
    (out / "generalise.json").write_text(json.dumps({"summary": summary, "per_image": rows, "seconds": seconds,
                                                     "device": device_name(device), "images": len(test),
                                                     "seed": args.seed}, indent=1) + "\n")
    print(table)
    n = len(conds) * len(test)
    for label, s in seconds.items():
        print(f"{label}: {n} segmentations in {s:.0f} s ({s / n:.2f} s each) on {device_name(device)}")
    print(f"wrote {out}/generalise.md and .json")


METRICS = ("dice", "aji", "pq", "f1")


def summarize(rows: list[dict]) -> list[dict]:
    """robustness.summarize_rows over METRICS, plus the nuclei found and true per method and condition."""
    out = summarize_rows(rows, METRICS)
    for entry in out:
        sel = [r for r in rows if r["method"] == entry["method"] and r["condition"] == entry["condition"]]
        entry["nuclei"] = int(sum(r["nuclei"] for r in sel))
        entry["nuclei_true"] = int(sum(r["nuclei_true"] for r in sel))
    return out


def markdown_table(summary: list[dict]) -> str:
    """Conditions as rows; per method Dice / AJI / PQ / detection F1 (%)."""
    methods = list(dict.fromkeys(s["method"] for s in summary))
    conds = list(dict.fromkeys(s["condition"] for s in summary))
    lookup = {(s["method"], s["condition"]): s for s in summary}
    lines = ["| condition | " + " | ".join(f"{m}: Dice / AJI / PQ / F1 (%)" for m in methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for c in conds:
        cells = []
        for m in methods:
            s = lookup.get((m, c))
            cells.append("" if s is None else " / ".join(f"{100 * s[k]:.1f}" for k in METRICS))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

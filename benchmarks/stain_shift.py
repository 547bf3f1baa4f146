"""Stain-shift benchmark: how much a paler, pinker, bluer or randomly re-stained slide costs.

    python benchmarks/stain_shift.py                                   # models/classifier + the classic baseline
    python benchmarks/stain_shift.py --model none=models/classifier --model macenko=/path/to/other/classifier
    python benchmarks/stain_shift.py --images 4 --strengths 0.2        # quick look

The MoNuSeg test images are re-stained in HED optical-density space (`textdiff/stain.py`; per
image a seeded draw of scale and bias in [-sigma, sigma] for each of H, E, DAB at sigma = 0.05
(Tellez et al. 2019 "HED-light"), 0.1, 0.2 ("HED-strong", spanning their 9 laboratories) and 0.3
(beyond), plus the directed shifts `pale`, `pinker`, `bluer`), segmented by each trained model
through `textdiff predict`'s code path (its own stain normalisation included), and scored at the
source resolution: Dice, AJI and the predicted / true foreground ratio. The no-learning baseline
(hematoxylin + Otsu at the working size, `textdiff/baselines.py`) meets the same pixels.

Writes <out>/stain_shift.{md,json,png} and stain_examples.png; prints the table and the timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage.segmentation import find_boundaries

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustness import RANDOM_STRENGTHS, conditions, markdown_table, measure, summarize_rows, upsample_mask  # noqa: E402

from textdiff.baselines.classic import hematoxylin_otsu  # noqa: E402
from textdiff.data.dataset import read_split
from textdiff.data.resize import to_working_size  # noqa: E402
from textdiff.params import load_params  # noqa: E402
from textdiff.paths import CLASSIFIER_DIR, resolve_data_root  # noqa: E402
from textdiff.predict.images import build_segmenter  # noqa: E402
from textdiff.runtime.device import device_name, resolve_device  # noqa: E402


def parse_models(values: list[str]) -> list[tuple[str, Path]]:
    out = []
    for v in values:
        label, _, path = v.partition("=") if "=" in v else (Path(v).name, "", v)
        out.append((label, Path(path)))
    return out


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(dict.fromkeys(s["condition"] for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(len(conds))
    for metric, ax, title in zip(("dice", "aji", "foreground_ratio"), axes,
                                 ("Dice (%)", "AJI (%)", "predicted / true foreground")):
        scale = 1 if metric == "foreground_ratio" else 100
        for m in methods:
            rows = {s["condition"]: s for s in summary if s["method"] == m}
            y = [scale * rows[c][metric] if c in rows else np.nan for c in conds]
            ax.plot(x, y, marker="o", label=m)
        if metric == "foreground_ratio":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, conds, rotation=35, ha="right")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("MoNuSeg test images re-stained in HED space (scored at 1000², mean over images)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def examples(image: np.ndarray, conds, segment, text: str, path: Path, crop: int = 320) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[:2]
    y, x = (h - crop) // 2, (w - crop) // 2
    fig, axes = plt.subplots(2, len(conds), figsize=(2.2 * len(conds), 4.6))
    for j, cond in enumerate(conds):
        shifted = cond.apply(0, image)
        pred = segment(shifted, text)
        axes[0, j].imshow(shifted[y : y + crop, x : x + crop])
        outlined = shifted.copy()  # green, thick: magenta (the panels' colour) vanishes on hematoxylin
        outlined[find_boundaries(pred.astype(bool), mode="thick")] = (0, 255, 0)
        axes[1, j].imshow(outlined[y : y + crop, x : x + crop])
        axes[0, j].set_title(cond.name, fontsize=9)
        for ax in axes[:, j]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="LABEL=DIR of a trained classifier (repeatable)")
    ap.add_argument("--no-classic", action="store_true", help="leave out the hematoxylin + Otsu baseline")
    ap.add_argument("--classic-size", type=int, default=256, help="working size of the classic baseline")
    ap.add_argument("--strengths", type=float, nargs="*", default=list(RANDOM_STRENGTHS))
    ap.add_argument("--no-directed", action="store_true", help="leave out the pale / pinker / bluer shifts")
    ap.add_argument("--images", type=int, default=0, help="first N test images (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="docs/stain_shift")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a previous run's stain_shift.json: its methods are taken from it, not measured again "
                         "(same images, conditions and seed required)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    samples = read_split(resolve_data_root(load_params(args.params).data.root), "test")
    samples = samples[: args.images] if args.images else samples
    images, masks, texts = [s.image for s in samples], [s.mask for s in samples], [s.text for s in samples]
    conds = conditions(len(images), args.strengths, not args.no_directed, args.seed)
    models = parse_models(args.model) if args.model else [("model", CLASSIFIER_DIR)]

    rows, seconds, first_segment = [], {}, None
    if args.reuse is not None:
        try:
            old = json.loads(args.reuse.read_text())
            old["images"], old["seed"], old["per_image"], old["seconds"]  # noqa: B018 - present?
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"error: {args.reuse}: not a stain_shift.json this benchmark wrote ({err})") from None
        if old["images"] != len(images) or old["seed"] != args.seed:
            raise SystemExit(f"error: {args.reuse}: measured on {old['images']} images with seed {old['seed']}, "
                             f"not {len(images)} with seed {args.seed}")
        rows, seconds = list(old["per_image"]), dict(old["seconds"])
    for label, folder in models:
        if label in seconds:
            continue
        segmenter, _ = build_segmenter(folder, device, None, None)

        def segment(image: np.ndarray, text: str, s=segmenter) -> np.ndarray:
            return (s.probabilities(image, text) > 0.5).astype(np.uint8)

        first_segment = first_segment or segment
        started = time.perf_counter()
        rows += measure(segment, images, masks, texts, conds, label)
        seconds[label] = time.perf_counter() - started
    if not args.no_classic and "classic (H + Otsu)" not in seconds:
        def classic(image: np.ndarray, text: str) -> np.ndarray:
            small = to_working_size(image, (args.classic_size, args.classic_size))
            return upsample_mask(hematoxylin_otsu(small), image.shape[:2])

        started = time.perf_counter()
        rows += measure(classic, images, masks, texts, conds, "classic (H + Otsu)")
        seconds["classic (H + Otsu)"] = time.perf_counter() - started

    summary = summarize_rows(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summary)
    (out / "stain_shift.md").write_text(table)
    (out / "stain_shift.json").write_text(json.dumps({"summary": summary, "per_image": rows, "seconds": seconds,
                                                      "device": device_name(device), "images": len(images),
                                                      "seed": args.seed}, indent=1) + "\n")
    plot(summary, out / "stain_shift.png")
    if first_segment is not None or args.reuse is None:
        examples(images[0], conds, first_segment or classic, texts[0], out / "stain_examples.png")
    print(table)
    n = len(images) * len(conds)
    for label, s in seconds.items():
        print(f"{label}: {n} segmentations in {s:.0f} s ({s / n:.2f} s each) on {device_name(device)}")
    print(f"wrote {out}/stain_shift.md, .json, .png and stain_examples.png")


if __name__ == "__main__":
    main()

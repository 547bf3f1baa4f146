"""Where the out-of-depth warning of `textdiff predict` should start: the nucleus-size ratio and stain
angle (`textdiff/model/depth.py`) of the test images under the conditions of `generalise.py`.

    python3 benchmarks/out_of_depth.py                       # 14 test images, the default conditions
    python3 benchmarks/out_of_depth.py --images 4 --conditions none scale0.5-wrong-mpp

For each condition, the spread (min / median / max over images) of the ratio of the median nucleus
area the model separates (µm², at the mpp predict is told) to the training nuclei's median, and of
the stain angle to the model's Macenko reference; and how many images the current limits flag.
Conditions with the true mpp should not warn; a wrong mpp should. The stain angles of every source
image of the dataset (train, val and test, no degradation) are printed first: the limit must
clear the training images themselves. Writes docs/generalise/out_of_depth.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generalise import central_crop, degradations  # noqa: E402

from textdiff.cache.store import FeatureCache  # noqa: E402
from textdiff.data.dataset import read_split  # noqa: E402
from textdiff.model.depth import SIZE_RATIO_LIMITS, STAIN_ANGLE_LIMIT, Familiarity, assess, stain_angle  # noqa: E402
from textdiff.model.nuclei import separate  # noqa: E402
from textdiff.params import load_params  # noqa: E402
from textdiff.paths import CACHE_PATH, CLASSIFIER_DIR, resolve_data_root  # noqa: E402
from textdiff.predict.images import build_segmenter  # noqa: E402
from textdiff.runtime.device import device_name, resolve_device  # noqa: E402
from textdiff.train.nuclei_rule import training_nucleus_area  # noqa: E402

DEFAULT_CONDITIONS = ["none", "scale0.5", "scale2", "scale0.5-wrong-mpp", "scale2-wrong-mpp", "HED ±0.2", "pale",
                      "jpeg50", "blur2", "noise16", "crop256"]


def spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{min(values):.2f} / {float(np.median(values)):.2f} / {max(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=CLASSIFIER_DIR)
    ap.add_argument("--conditions", nargs="*", default=DEFAULT_CONDITIONS)
    ap.add_argument("--images", type=int, default=0, help="first N test images (0 = all)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=Path("docs/generalise/out_of_depth.json"))
    ap.add_argument("--table-from", type=Path, default=None,
                    help="re-tabulate a written JSON under the current limits (the ratios and angles do not "
                         "depend on them) instead of measuring again")
    args = ap.parse_args()
    if args.table_from is not None:
        saved = json.loads(args.table_from.read_text())
        for row in saved["rows"]:
            row["warns"] = Familiarity(row["size_ratio"], row["stain_angle"]).warning("x", 0.25, False) is not None
        report(saved["rows"], list(dict.fromkeys(r["condition"] for r in saved["rows"])), saved["device"],
               saved["training_area_um2"], saved["source_angles"], args.out)
        return

    device = resolve_device("auto")
    torch.manual_seed(0)
    params = load_params(args.params)
    root, instances = resolve_data_root(params.data.root), Path(params.data.instances)
    segmenter, card = build_segmenter(args.model, device, None, None)
    source_mpp = params.data.mpp
    training_area = card.nucleus_area_um2 or training_nucleus_area(FeatureCache(CACHE_PATH), source_mpp)
    where = "model.json" if card.nucleus_area_um2 else "the training maps in the cache, as train computes it"
    print(f"training nuclei: median area {training_area:.1f} µm² ({where}); limits: size ratio {SIZE_RATIO_LIMITS}, "
          f"stain angle {STAIN_ANGLE_LIMIT}°")

    source_angles = {}
    for split in ("train", "val", "test"):
        for sample in read_split(root, split):
            source_angles[f"{split}/{sample.id}"] = stain_angle(sample.image, segmenter.stain)
    print(f"stain angle of the {len(source_angles)} source images (min / median / max): "
          f"{spread(list(source_angles.values()))}°")

    test = read_split(root, "test", instances=instances)
    test = test[: args.images] if args.images else test
    conds = {c.name: c for c in degradations(0)}
    unknown = [c for c in args.conditions if c not in conds]
    if unknown:
        raise SystemExit(f"error: unknown condition {unknown[0]!r}; known: {', '.join(sorted(conds))}")
    rows = []
    for name in tqdm(args.conditions, desc="conditions"):
        cond = conds[name]
        for k, sample in enumerate(test):
            image = cond.transform(central_crop(sample.image, cond.crop), k)
            told = source_mpp / cond.factor if cond.told_true_mpp else source_mpp
            prob, distance = segmenter.maps(image, sample.text, told)
            labels = separate(prob, distance, segmenter.rule, told)
            fam = assess(image, labels, told, training_area, segmenter.stain)
            rows.append({"condition": name, "image": sample.id, **fam.to_json(),
                         "warns": fam.warning(sample.id, told, False) is not None})

    report(rows, args.conditions, device_name(device), training_area, source_angles, args.out)


def report(rows: list[dict], conditions: list[str], device: str, training_area: float, source_angles: dict,
           out: Path) -> None:
    print(f"limits: size ratio {SIZE_RATIO_LIMITS}, stain angle {STAIN_ANGLE_LIMIT}°")
    print("\n| condition | size ratio (min / median / max) | stain angle ° (min / median / max) | warned |")
    print("|---|---|---|---:|")
    for name in conditions:
        mine = [r for r in rows if r["condition"] == name]
        print(f"| {name} | {spread([r['size_ratio'] for r in mine])} | {spread([r['stain_angle'] for r in mine])} | "
              f"{sum(r['warns'] for r in mine)} of {len(mine)} |")
    print(f"\ndevice: {device}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"training_area_um2": training_area, "limits": {
        "size_ratio": SIZE_RATIO_LIMITS, "stain_angle": STAIN_ANGLE_LIMIT}, "source_angles": source_angles,
        "rows": rows, "device": device}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

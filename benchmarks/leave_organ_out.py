"""Generalisation benchmark, part two: leave one organ out, train on the rest, score the organ.

    python benchmarks/leave_organ_out.py                       # every organ; resumes a cut-short run
    python benchmarks/leave_organ_out.py --organs colon lung   # some
    python benchmarks/leave_organ_out.py --table-from docs/generalise/leave_organ_out.json

MoNuSeg's 44 images come from 8 organs (`data/monuseg_organs.csv`, the organ of each image's TCGA
study by its tissue-source-site code). For each organ that the training or val split holds, the
default classifier (params.yaml's `train` section, the committed cache) is trained again on the
train images of every *other* organ, its epoch and nucleus rule chosen on the val images of the
other organs, and scored on every image of the held-out organ, whichever split it is in: Dice at the
working size, and at the source resolution against the per-nucleus truth AJI, PQ (approximate maps
are not scored, see data/README.md). Beside it on the same images:

- the **anchor**: hematoxylin + Otsu and the mask-distance watershed, its rule chosen on the same
  val images (no learning: what thresholding gets);
- the **default model** (models/classifier, trained on all 24) on the organ's *test* images, the only
  ones it did not train on: what holding the organ out costs.

Brain is in the test split only, so the default model is already its held-out model. Each organ's
result is written to <out>/leave_organ_out.json as soon as it is measured; a re-run skips organs
already there (for the same model and cache). Prints the table, the device and the time.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textdiff.atomic import write_json  # noqa: E402
from textdiff.cache.samples import SampleStore  # noqa: E402
from textdiff.cache.selection import SelectedCache  # noqa: E402
from textdiff.cache.store import FeatureCache  # noqa: E402
from textdiff.evaluation.scoring import evaluate_baseline, score_test  # noqa: E402
from textdiff.model.card import TEXTDIFF, load_classifier, load_trained, nuclei_rule, read_model_dir  # noqa: E402
from textdiff.model.inference import predict_split  # noqa: E402
from textdiff.params import load_params, section_dict  # noqa: E402
from textdiff.paths import CACHE_PATH, CLASSIFIER_DIR  # noqa: E402
from textdiff.runtime.device import device_name, resolve_device  # noqa: E402
from textdiff.train.nuclei_rule import choose_nuclei_rule  # noqa: E402
from textdiff.train.training import train_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ORGANS_CSV = ROOT / "data" / "monuseg_organs.csv"
METRICS = ("dice", "aji_instance", "pq_instance")


def organ_table(path: Path = ORGANS_CSV) -> dict[str, tuple[str, str]]:
    """image id -> (split, organ)."""
    with open(path, newline="") as f:
        return {row["id"]: (row["split"], row["organ"]) for row in csv.DictReader(f)}


def regroup(cache: FeatureCache, organs: dict[str, tuple[str, str]], held_out: str,
            scored_splits: tuple[str, ...]) -> SelectedCache:
    """train / val: the other organs' images of those splits; test: the held-out organ's images of
    `scored_splits`. Every cached image must be in the organ table."""
    members: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for split in ("train", "val", "test"):
        for image_id in cache.split(split).ids:
            if image_id not in organs:
                raise SystemExit(f"{ORGANS_CSV}: no organ for {image_id}")
            organ = organs[image_id][1]
            if organ == held_out and split in scored_splits:
                members["test"].append((split, image_id))
            elif organ != held_out and split != "test":
                members[split].append((split, image_id))
    return SelectedCache(cache, members)


def summary(metrics: dict) -> dict:
    return {"images": metrics["num_images"], "instance_images": metrics.get("num_instance_images", 0),
            **{k: round(float(metrics[k]), 5) for k in METRICS if k in metrics}}


def score_model(model, selected: SelectedCache, device: torch.device, rule, mpp: float) -> dict:
    distances: list = []
    preds, gts, probs = predict_split(model, SampleStore(selected.split("test")), device, keep_probs=True,
                                      distances=distances)
    return summary(score_test(selected, preds, gts, probs, 0, rule, distances, mpp).metrics)


def score_anchor(selected: SelectedCache, device: torch.device, mpp: float, choice) -> dict:
    result = evaluate_baseline("classic", None, selected.spec, selected, device, 0,
                               choice.rule if choice else None, mpp)
    return summary(result.metrics)


def run_organ(organ: str, cache: FeatureCache, organs: dict, params, device: torch.device,
              default_model, default_rule) -> dict:
    mpp = params.data.mpp
    # Without the refinement by the image (`refine_um`): a regrouped split mixes images of every
    # split, which the manifest's source lookup does not, and the table's rows predate it.
    default_rule = dataclasses.replace(default_rule, refine_um=0.0)
    started = time.perf_counter()
    held = regroup(cache, organs, organ, ("train", "val", "test"))
    # The organ's test-split images, where it has any (stomach's two images are both training images).
    in_test = any(organs[i][0] == "test" for i in held.split("test").ids)
    test_only = regroup(cache, organs, organ, ("test",)) if in_test else None
    row: dict = {"organ": organ, "ids": held.split("test").ids,
                 "train_images": len(held.split("train")), "val_images": len(held.split("val"))}
    trained_on_it = any(organs[i][0] != "test" for i in row["ids"])
    if trained_on_it:
        result = train_classifier(held, params.train, device, progress=False)
        model = load_classifier(result.state, result.config, device)
        choice = choose_nuclei_rule(TEXTDIFF, model, held, device, mpp)
        row["held_out_model"] = score_model(model, held, device, choice.rule if choice else None, mpp)
        if test_only is not None:  # the same images as the default model's row below
            row["held_out_test"] = score_model(model, test_only, device, choice.rule if choice else None, mpp)
        row["best_epoch"], row["val_dice"] = result.best_epoch, round(result.best_val_dice, 5)
        row["autocast"] = result.config.autocast
        row["rule"] = choice.rule.to_json() if choice else None
    else:  # never in train or val: the default model is this organ's held-out model
        row["held_out_model"] = score_model(default_model, held, device, default_rule, mpp)
        row["rule"] = default_rule.to_json()
    anchor_rule = choose_nuclei_rule("classic", None, held, device, mpp)  # val is the same for both rows
    row["anchor"] = score_anchor(held, device, mpp, anchor_rule)
    if test_only is not None:
        row["default_model_test"] = score_model(default_model, test_only, device, default_rule, mpp)
        row["anchor_test"] = score_anchor(test_only, device, mpp, anchor_rule)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def fmt(m: dict | None) -> str:
    if not m:
        return "–"
    return " / ".join(f"{100 * m[k]:.1f}" if k in m else "–" for k in METRICS)


def table(rows: list[dict]) -> str:
    lines = ["| held-out organ | images (AJI-scored) | trained on | held-out model: Dice / AJI / PQ | "
             "anchor: Dice / AJI / PQ | its test images: held-out model | default model | anchor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["held_out_model"]
        own = r.get("held_out_test") or (r.get("default_model_test") if r["train_images"] == 24 else None)
        lines.append(f"| {r['organ']} | {m['images']} ({m['instance_images']}) | {r['train_images']} | {fmt(m)} | "
                     f"{fmt(r['anchor'])} | {fmt(own)} | {fmt(r.get('default_model_test'))} | "
                     f"{fmt(r.get('anchor_test'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organs", nargs="*", default=None, help="default: every organ in the table")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--cache", type=Path, default=ROOT / CACHE_PATH)
    ap.add_argument("--model", type=Path, default=ROOT / CLASSIFIER_DIR, help="the default model (all organs)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "generalise")
    ap.add_argument("--table-from", type=Path, default=None, help="print the table of a results JSON and stop")
    args = ap.parse_args()
    if args.table_from:
        print(table(json.loads(args.table_from.read_text())["organs"]))
        return
    params = load_params(args.params)
    device = resolve_device(params.train.device)
    cache = FeatureCache(args.cache)
    organs = organ_table()
    default_model, card = load_trained(args.model, device)
    default_rule = nuclei_rule(read_model_dir(args.model))
    # Every model here is scored on one view of each image (view 0, the image itself): the cache's
    # test-time views (`extract.eval_views`) change nothing it measures, so they are not its identity
    # and rows measured before the cache held them stay valid.
    spec = {k: v for k, v in cache.spec.to_json().items() if k != "eval_views"}
    identity = {"cache": spec, "model_train": card.train, "train": section_dict(params.train)}
    out = args.out / "leave_organ_out.json"
    done = json.loads(out.read_text()) if out.exists() else {}
    rows = done.get("organs", []) if done.get("identity") == identity else []
    for row in rows:  # rows of a run before rows named their machine: the file's, which made them all
        row.setdefault("device", done.get("device"))
    wanted = args.organs or sorted({organ for _, organ in organs.values()})
    started = time.perf_counter()
    for organ in wanted:
        if any(r["organ"] == organ for r in rows):
            print(f"{organ}: already measured ({out})")
            continue
        row = run_organ(organ, cache, organs, params, device, default_model, default_rule)
        row["device"] = device_name(device)
        rows = [*rows, row]
        write_json(out, {"identity": identity, "device": device_name(device), "torch": torch.__version__,
                         "organs": rows})
        print(f"{organ}: held-out {fmt(row['held_out_model'])}, anchor {fmt(row['anchor'])} "
              f"({row['seconds']:.0f}s)", flush=True)
    print(table([r for r in rows if r["organ"] in wanted]))
    print(f"{device_name(device)}, torch {torch.__version__}, {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()

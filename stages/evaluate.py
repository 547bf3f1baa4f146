"""Stage `evaluate`: test-split metrics, error panels, the summary plot's data and probability maps
(DVC stage two, second half)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np

from textdiff.atomic import atomic_dir, atomic_file, write_json
from textdiff.baselines.cellpose import load_cellpose
from textdiff.baselines.unet import load_baseline
from textdiff.cache.store import FeatureCache
from textdiff.errors import TextDiffError
from textdiff.evaluation.panels import panel, panel_caption, save_png
from textdiff.evaluation.scoring import evaluate_baseline, evaluate_cellpose, evaluate_test, summary_rows
from textdiff.locks import hold
from textdiff.model.card import TEXTDIFF, load_trained, nuclei_rule, read_model_dir
from textdiff.params import load_params
from textdiff.paths import (
    CACHE_PATH,
    CLASSIFIER_DIR,
    EVALUATE_LOCK,
    INSTANCES_H5,
    METRICS_DIR,
    PANEL_DIR,
    PREDICTIONS_H5,
    PREPARED_DIR,
    SUMMARY_CSV,
)
from textdiff.runtime.device import resolve_device


def run(params_path: Path, cache_path: Path = CACHE_PATH, model_dir: Path = CLASSIFIER_DIR,
        prepared_dir: Path = PREPARED_DIR) -> dict:
    with hold(EVALUATE_LOCK, f"the test metrics in {METRICS_DIR}"):
        return _run(params_path, cache_path, model_dir, prepared_dir)


def _run(params_path: Path, cache_path: Path, model_dir: Path, prepared_dir: Path) -> dict:
    params = load_params(params_path)
    device = resolve_device(params.evaluate.device)
    cache = FeatureCache(cache_path)
    files = read_model_dir(model_dir)
    kind, rule = files.kind, nuclei_rule(files)
    rule_json = rule.to_json()
    try:
        if kind == TEXTDIFF:
            model, card = load_trained(model_dir, device)
            result = evaluate_test(model, card, cache, device, params.evaluate.panels, rule, prepared_dir)
            attrs = {"fusion": card.classifier.fusion, "best_epoch": card.best_epoch, "params": json.dumps(card.train),
                     "views": result.metrics.get("views", 1)}
        elif kind == "cellpose":  # its own nuclei, from the source images
            model, cellpose_rule, spec = load_cellpose(model_dir, device)
            result = evaluate_cellpose(model, cellpose_rule, spec, cache, prepared_dir, device, params.evaluate.panels)
            attrs, rule_json = {"baseline": kind}, cellpose_rule.to_json()
        else:
            kind, baseline, spec = load_baseline(model_dir, device)
            result = evaluate_baseline(kind, baseline, spec, cache, device, params.evaluate.panels, rule,
                                       params.data.mpp, prepared_dir)
            attrs = {"baseline": kind}
    except TextDiffError as err:
        raise TextDiffError(f"{model_dir}/model.json: {err}") from None
    attrs["nuclei_rule"] = json.dumps(rule_json)
    attrs["cache_fingerprint"] = json.dumps(cache.spec.to_json())
    with atomic_file(PREDICTIONS_H5) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update(attrs)
            for image_id, prob in zip(result.ids, result.probs):
                ds = h5.create_dataset(image_id, data=prob.astype(np.float32), compression="gzip")
                ds.attrs["description"] = result.probs_are
    with atomic_file(INSTANCES_H5) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update(attrs)
            for image_id, labels in zip(result.ids, result.nuclei or []):
                dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
                ds = h5.create_dataset(image_id, data=labels.astype(dtype), compression="gzip")
                ds.attrs["description"] = "separated nuclei at the source size: 0 = background, 1..n one nucleus"
    with atomic_dir(PANEL_DIR) as tmp:
        for k, image in enumerate(result.images):
            nuclei = result.nuclei[k] if result.nuclei else None
            truth = result.truths[k] if result.truths else None
            save_png(tmp / f"{result.ids[k]}.png",
                     panel(image, result.gts[k], result.preds[k], panel_caption(result.ids[k], result.per_image[k]),
                           gt_labels=truth, pred_labels=nuclei))
    with atomic_file(SUMMARY_CSV) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "metric", "value"])
        writer.writeheader()
        writer.writerows(summary_rows(result.per_image))
    write_json(METRICS_DIR / "test_per_image.json", {"images": result.per_image})
    write_json(METRICS_DIR / "test.json", result.metrics)
    m = result.metrics
    views = f", maps averaged over {m['views']} views" if m.get("views", 1) > 1 else ""
    print(f"test ({m['num_images']} images{views}): dice {m['dice']:.4f}  iou {m['iou']:.4f}  "
          f"dice_pixel {m['dice_pixel']:.4f}  aji {m['aji']:.4f}  pq {m['pq']:.4f}  "
          f"| release scoring: dice {m['dice_release']:.4f}  iou {m['iou_release']:.4f}")
    if "aji_instance" in m:
        print(f"nuclei ({m['num_instance_images']} images, native size, {m['nuclei']} found / {m['nuclei_true']} "
              f"true): aji {m['aji_instance']:.4f}  aji+ {m['aji_plus_instance']:.4f}  pq {m['pq_instance']:.4f}  "
              f"dq {m['dq_instance']:.4f}  sq {m['sq_instance']:.4f}")
    return m

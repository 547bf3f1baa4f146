"""A small ensemble: the maps of classifiers trained on the same cache with different `train.seed`s,
averaged, against each one alone (issue 30's lever 4; a candidate for issue 34's nuclei).

    python benchmarks/ensemble.py --models models/classifier ../seed41/models/classifier ../seed42/models/classifier

Each model directory is what `textdiff train` writes (e.g. in a git work tree whose params.yaml
differs only in `train.seed`, its cache a link to this one). Every model's foreground probabilities
and distance maps of the val and test splits are computed as evaluate computes them
(`predict_split`, averaged over the cache's test-time views); the ensemble's are the mean over its
members (`mean_of_views`, the same averaging the views go through). For each single model and each
ensemble, the nucleus rule is chosen on val (`choose_val_rule`, as `textdiff train` chooses it; its
val AJI and PQ are the search's own) and the test split is scored by evaluate's own `score_test`, so
a single model's row is its `metrics/test.json`. Prints the table (mean ± std over the single models
beside it) and the device; writes <out>/ensemble.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textdiff.cache.samples import SampleStore  # noqa: E402
from textdiff.cache.store import FeatureCache  # noqa: E402
from textdiff.data.views import mean_of_views  # noqa: E402
from textdiff.evaluation.instances import choose_val_rule  # noqa: E402
from textdiff.evaluation.metrics import iou_dice_textdiff  # noqa: E402
from textdiff.evaluation.scoring import score_test  # noqa: E402
from textdiff.model.card import load_trained  # noqa: E402
from textdiff.model.inference import predict_split  # noqa: E402
from textdiff.paths import CACHE_PATH  # noqa: E402
from textdiff.runtime.device import device_name, resolve_device  # noqa: E402

TEST_KEYS = ("dice", "dice_native", "aji_instance", "pq_instance", "dq_instance", "sq_instance")


def split_maps(model_dir: Path, cache: FeatureCache, device: torch.device) -> dict:
    """{split: (probabilities, distances)} of one trained classifier, as evaluate computes them."""
    model, card = load_trained(model_dir, device)
    if card.spec != cache.spec:
        raise SystemExit(f"{model_dir}: trained on another cache than {CACHE_PATH}")
    out = {}
    for split in ("val", "test"):
        data = cache.split(split)
        distances: list = []
        _, _, probs = predict_split(model, SampleStore(data), device, keep_probs=True, distances=distances,
                                    views=data.scored_views)
        out[split] = (probs, distances)
    return {"maps": out, "seed": int(card.train["seed"]), "mpp": card.source_mpp}


def averaged(members: list[dict], split: str) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    n = len(members[0]["maps"][split][0])
    probs, distances = [], []
    for k in range(n):
        p, d = mean_of_views((torch.from_numpy(np.asarray(m["maps"][split][0][k])),
                              None if m["maps"][split][1][k] is None else torch.from_numpy(m["maps"][split][1][k]))
                             for m in members)
        probs.append(p.numpy())
        distances.append(None if d is None else d.numpy())
    return probs, distances


def val_dice(cache: FeatureCache, probs: list[np.ndarray]) -> float:
    """Mean val Dice at the working size (the rule search already holds val AJI and PQ)."""
    val = cache.split("val")
    return float(np.mean([iou_dice_textdiff((p > 0.5).astype(np.uint8), val.mask(k, 0).numpy().astype(np.uint8))[0]
                          for k, p in enumerate(probs)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=CACHE_PATH)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("docs/ensemble"))
    args = ap.parse_args()

    device = resolve_device(args.device)
    cache = FeatureCache(args.cache)
    members, seconds = [], []
    for model_dir in args.models:
        started = time.perf_counter()
        members.append(split_maps(model_dir, cache, device))
        seconds.append(time.perf_counter() - started)
        print(f"{model_dir}: seed {members[-1]['seed']}, maps in {seconds[-1]:.0f} s", flush=True)
    mpp = members[0]["mpp"]
    test = cache.split("test")
    gts = [test.mask(k, 0).numpy().astype(np.uint8) for k in range(len(test))]
    rows = []
    groups = [c for r in range(1, len(members) + 1) for c in itertools.combinations(range(len(members)), r)]
    for group in groups:
        chosen = [members[i] for i in group]
        val_p, val_d = averaged(chosen, "val")
        choice = choose_val_rule(cache.split("val"), val_p, val_d, mpp)
        if choice is None:
            raise SystemExit(f"{args.cache}: its val split holds no true per-nucleus maps to choose a nucleus rule on")
        test_p, test_d = averaged(chosen, "test")
        preds = [(p > 0.5).astype(np.uint8) for p in test_p]
        result = score_test(cache, preds, gts, test_p, 0, choice.rule, test_d, mpp)
        row = {"seeds": [m["seed"] for m in chosen], "rule": choice.rule.to_json(),
               "val": {"dice": val_dice(cache, val_p), "aji_instance": choice.score, "pq_instance": choice.pq},
               "test": {k: result.metrics[k] for k in (*TEST_KEYS, "nuclei")}}
        rows.append(row)
        print(f"seeds {row['seeds']}: val AJI {100 * row['val']['aji_instance']:.2f}, test AJI "
              f"{100 * row['test']['aji_instance']:.2f} PQ {100 * row['test']['pq_instance']:.2f} Dice "
              f"{100 * row['test']['dice']:.2f}", flush=True)

    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    lines = ["| models (train.seed) | val Dice | val AJI | val PQ | test Dice 256² | native | nuclei AJI | PQ | DQ "
             "| SQ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        v, t = row["val"], row["test"]
        lines.append(f"| {' + '.join(map(str, row['seeds']))} | {pct(v['dice'])} | {pct(v['aji_instance'])} | "
                     f"{pct(v['pq_instance'])} | " + " | ".join(pct(t[k]) for k in TEST_KEYS) + " |")
    singles = [r for r in rows if len(r["seeds"]) == 1]
    if len(singles) > 1:
        spread = {k: (float(np.mean([r["test"][k] for r in singles])), float(np.std([r["test"][k] for r in singles],
                                                                                     ddof=1)))
                  for k in TEST_KEYS}
        lines.append("| single models, mean ± std | | | | " + " | ".join(
            f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in spread.values()) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ensemble.json").write_text(json.dumps(
        {"rows": rows, "models": [str(m) for m in args.models], "seconds_of_maps_per_model": seconds,
         "device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__},
        indent=1) + "\n")
    print("\n".join(lines))
    print(f"maps: median {np.median(seconds):.0f} s per model (val + test, {test.scored_views} views) "
          f"on {device_name(device)}; wrote {args.out}/ensemble.json")


if __name__ == "__main__":
    main()

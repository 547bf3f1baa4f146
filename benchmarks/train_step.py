"""The pixel classifier's cost per training step and per inference, by `train.autocast`.

    python benchmarks/train_step.py --steps 8

Runs the default classifier (the params' width, target and decoder, on the real cache's shapes) on
the first few cached training images, one optimisation step per image as `textdiff train` takes
them (batch 1, CE + Dice + the distance head's error), once in float32 and once under bfloat16
autocast, interleaved so that machine load hits both alike. Prints medians, the ratio, the CPU's
capability and the loss of each, so the arithmetic change is visible beside the time. The metric
change of a whole run is in docs/benchmarks.md (two `dvc repro` runs). Needs cache/features.zarr.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textdiff.cache.samples import SampleStore, batch_of, distance_batch  # noqa: E402
from textdiff.cache.store import FeatureCache  # noqa: E402
from textdiff.model.classifier import AUTOCASTS, PixelClassifier  # noqa: E402
from textdiff.model.losses import total_loss  # noqa: E402
from textdiff.params import load_params  # noqa: E402
from textdiff.paths import CACHE_PATH  # noqa: E402
from textdiff.train.training import classifier_config  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per dtype and round (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both dtypes")
    args = ap.parse_args()

    params = load_params("params.yaml")
    cache = FeatureCache(CACHE_PATH)
    data = SampleStore(cache.split("train"), list(range(min(4, len(cache.split("train"))))))
    samples = [data.get_view(p, 0) for p in range(len(data))]
    device = torch.device("cpu")
    base = classifier_config(cache, params.train, device)
    models, optimizers = {}, {}
    for dtype in AUTOCASTS:
        torch.manual_seed(0)
        models[dtype] = PixelClassifier(dataclasses.replace(base, autocast=dtype))
        optimizers[dtype] = torch.optim.Adam(models[dtype].parameters(), lr=params.train.lr)
    steps: dict[str, list[float]] = {d: [] for d in AUTOCASTS}
    infer: dict[str, list[float]] = {d: [] for d in AUTOCASTS}
    losses: dict[str, float] = {}

    def batch(i: int):
        s = samples[i % len(samples)]
        feats, mask, tokens, text_mask, pooled = batch_of([s], [0], [i % 8], device)
        return feats, mask, tokens, text_mask, pooled, distance_batch([s], [0], [i % 8], device)

    for _ in range(args.rounds):
        for dtype in AUTOCASTS:
            model, opt = models[dtype], optimizers[dtype]
            model.train()
            for i in range(args.steps + 1):
                feats, mask, tokens, text_mask, pooled, dist = batch(i)
                t0 = time.perf_counter()
                out = model(feats, tokens, text_mask, pooled)
                loss, parts = total_loss(out, mask, params.train.dice_weight, distance=dist,
                                         distance_weight=params.train.distance_weight if dist is not None else 0.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i:
                    steps[dtype].append(time.perf_counter() - t0)
                losses[dtype] = parts["total"]
            model.eval()
            with torch.no_grad():
                for i in range(4):
                    feats, _, tokens, text_mask, pooled, _ = batch(i)
                    t0 = time.perf_counter()
                    model(feats, tokens, text_mask, pooled)
                    if i:
                        infer[dtype].append(time.perf_counter() - t0)

    caps = [name for name, ok in (("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                  ("AMX", torch.cpu._is_amx_tile_supported())) if ok]
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}{' + ' + ', '.join(caps) if caps else ''}")
    print(f"classifier: d_model {base.d_model}, out {base.out_size[0]}x{base.out_size[1]}, distance head "
          f"{base.distance_head} ({base.distance_decoder}); {len(steps['float32'])} steps per dtype")
    med = {d: (statistics.median(steps[d]), statistics.median(infer[d])) for d in AUTOCASTS}
    for d in AUTOCASTS:
        print(f"{d:9s} train step median {med[d][0]:.3f} s   inference median {med[d][1]:.3f} s   "
              f"last loss {losses[d]:.4f}")
    print(f"float32 / bfloat16: train step {med['float32'][0] / med['bfloat16'][0]:.2f}x, "
          f"inference {med['float32'][1] / med['bfloat16'][1]:.2f}x")


if __name__ == "__main__":
    main()

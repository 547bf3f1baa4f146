"""Stage one's costs: bytes on disk per image, images/s, peak RSS, and resume vs full run.

    python benchmarks/extract.py --config paper --images 2          # the 256 ADM, fp16: bytes/image
    python benchmarks/extract.py --config pipeline --images 8       # the params.yaml teacher: speed, resume
    python benchmarks/extract.py --config paper --device cuda --autocast bfloat16 --batch-size 16 --images 128 \
        --no-resume --throughput                                     # stage vs bare forward vs compute limit

Reads the images of data/prepared/train.npz (run `textdiff prepare` first) and writes a throw-away
cache in a temp folder. Random teacher weights (speed and sizes do not depend on them; compression
does a little: trained features compress somewhat better than random ones). Prints measured numbers.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textdiff.cache.spec import CacheSpec, SplitLayout
from textdiff.cache.store import from_storage, open_for_writing  # noqa: E402
from textdiff.data.prepared import load_prepared  # noqa: E402
from textdiff.encoders.image import images_to_model_range  # noqa: E402
from textdiff.extract.extraction import extract_split  # noqa: E402
from textdiff.params import load_params  # noqa: E402
from textdiff.runtime.device import device_name  # noqa: E402
from textdiff.teacher import Diffusion, FeatureExtractor, build_adm, normalize_config  # noqa: E402

PAPER = dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
             attention_resolutions="32,16,8", num_heads=4, num_head_channels=64, use_scale_shift_norm=True,
             resblock_updown=True)


class Killed(Exception):
    pass


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(model: torch.nn.Module, images, batch: int, autocast: str,
                 device: torch.device, repeats: int = 5) -> tuple[float, float]:
    """(images/s of the full UNet forward at `batch`, FLOPs of one image's forward): the ceiling
    the stage is measured against. The stage stops after its deepest tapped block, so with few
    late blocks skipped it can run above 100 % of this (the issue's ratio is against the full forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = images_to_model_range(images[:1]).to(device).repeat(batch, 1, 1, 1)
    t = torch.full((batch,), 50, device=device)
    cast = torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast != "float32" else nullcontext()
    with torch.inference_mode(), cast:
        model(x, t)  # warm-up
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x, t)
            sync(device)
            times.append(time.perf_counter() - t0)
        with FlopCounterMode(display=False) as counter:
            model(x[:1], t[:1])
    return batch / statistics.median(times), float(counter.get_total_flops())


def teacher_alone(extractor: FeatureExtractor, images, batch: int, device: torch.device) -> float:
    """Images/s of the extractor's part of the stage (forward, cast, host copy), without zarr: tells
    a slow stage's teacher from its writes."""
    x = images_to_model_range(images[:batch])
    extractor.submit(x).release()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    pending = None
    for start in range(0, len(images), batch):
        nxt = extractor.submit(images_to_model_range(images[start : start + batch]))
        if pending is not None:
            pending.wait()
            pending.release()
        pending = nxt
    pending.wait()
    pending.release()
    sync(device)
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["paper", "pipeline"], default="pipeline")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--no-resume", action="store_true", help="skip the kill-and-resume measurement")
    ap.add_argument("--autocast", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--fuse-steps", default="auto", choices=["auto", "yes", "no"], help="auto: on CUDA only")
    ap.add_argument("--compile", action="store_true", help="torch.compile the truncated decoder")
    ap.add_argument("--warm-up", action="store_true", help="run one batch untimed first (always on CUDA or with "
                                                           "--compile)")
    ap.add_argument("--throughput", action="store_true",
                    help="also time the bare UNet forward at batch x steps and count its FLOPs")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="the device's dense peak at --autocast (e.g. H100 SXM bf16: 989) for the compute-limit ratio")
    args = ap.parse_args()

    params = load_params("params.yaml")
    config = PAPER if args.config == "paper" else dict(params.pretrain.config)
    size, steps, blocks = params.data.image_size, list(params.teacher.steps), list(params.teacher.blocks)
    prepared = load_prepared("data/prepared", "train")
    n = args.images  # more than the split holds: its images again, so a GPU is timed over many batches
    cycle = np.arange(n) % len(prepared)
    images, masks = prepared.images[cycle], prepared.masks[cycle]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_adm(config).to(device)
    fuse = None if args.fuse_steps == "auto" else args.fuse_steps == "yes"
    extractor = FeatureExtractor(model, Diffusion(), steps=steps, blocks=blocks, device=device,
                                 autocast_dtype=args.autocast, out_dtype=getattr(torch, args.dtype),
                                 fuse_steps=fuse, compile=args.compile)
    spec = CacheSpec(teacher_kind="adm", steps=steps, blocks=blocks, image_size=size, views=1, dtype=args.dtype,
                     text_encoder="bench", text_hidden_size=384, text_max_length=10, data={},
                     teacher_config=normalize_config(config))
    layout = SplitLayout(ids=[f"{prepared.ids[c]}#{i}" for i, c in enumerate(cycle)],
                         texts=[prepared.texts[c] for c in cycle])
    shapes = spec.block_shapes()
    raw = sum(c * h * w for c, h, w in shapes.values()) * len(steps) * (4 if args.dtype == "float32" else 2)
    print(f"teacher {args.config}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
          f"{size}px, blocks {blocks} {list(shapes.values())}, steps {steps}, {args.dtype}, device {device}")
    print(f"uncompressed features per image and view: {raw / 1e6:.1f} MB")

    work = Path(tempfile.mkdtemp(prefix="textdiff-bench-"))
    try:
        path = work / "features.zarr"

        def fresh():
            shutil.rmtree(path, ignore_errors=True)
            return open_for_writing(path, spec, {"train": layout}, {})["train"]

        if args.compile or args.warm_up or device.type == "cuda":  # compile, autotune, pinned pool: untimed
            k = min(args.batch_size, n)
            warm = open_for_writing(work / "warm-up.zarr", spec,
                                    {"train": SplitLayout(ids=layout.ids[:k], texts=layout.texts[:k])}, {})["train"]
            extract_split(warm, spec, images[:k], masks[:k], extractor, args.batch_size, device, desc="warm-up")
            shutil.rmtree(work / "warm-up.zarr", ignore_errors=True)
        group = fresh()
        sync(device)
        t0 = time.perf_counter()
        extract_split(group, spec, images, masks, extractor, args.batch_size, device, desc="full run")
        sync(device)
        full = time.perf_counter() - t0
        # The cache holds what the teacher gives: the first batch read back against a fresh forward.
        fresh_feats = extractor(images_to_model_range(images[: args.batch_size]))
        worst = max(float((from_storage(group[f"block_{b}"][i], args.dtype)[0].float() - f[i].float()).abs().max())
                    for b, f in fresh_feats.items() for i in range(min(args.batch_size, n)))
        print(f"read back: the first batch's cached features differ from a fresh forward by at most {worst:.3g}")
        per_image = (dir_bytes(path / "train") - 0) / n
        print(f"full run: {n} images in {full:.1f} s = {n / full:.3f} img/s ({full / n / len(steps):.2f} s per "
              "image-timestep)")
        print(f"bytes on disk per image: {per_image / 1e6:.1f} MB (zstd; {per_image / raw:.0%} of uncompressed)")
        print(f"peak RSS so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        stage_rate = n * len(steps) / full
        print(f"stage: {stage_rate:.2f} image-timesteps/s "
              f"(fuse_steps={extractor.fuse_steps}, autocast {args.autocast}, "
              f"compile {args.compile}, batch {args.batch_size}, device {device_name(device)})")
        if args.throughput:
            teacher_rate = teacher_alone(extractor, images, args.batch_size, device) * len(steps)
            print(f"teacher alone (features to pinned host memory, no cache writes): {teacher_rate:.2f} "
                  f"image-timesteps/s; stage / teacher alone = {stage_rate / teacher_rate:.0%}")
            bare_rate, flops = bare_forward(model, images, args.batch_size * len(steps), args.autocast, device)
            print(f"bare UNet forward at batch {args.batch_size * len(steps)}: {bare_rate:.2f} images/s; "
                  f"stage / bare = {stage_rate / bare_rate:.0%}")
            print(f"{flops / 1e12:.3f} TFLOP per forward (torch FlopCounterMode)"
                  f" -> {bare_rate * flops / 1e12:.3g} TFLOP/s"
                  + (f" = {bare_rate * flops / 1e12 / args.peak_tflops:.0%} of {args.peak_tflops:g}" if args.peak_tflops
                     else " (give --peak-tflops for the compute-limit ratio)"))

        if not args.no_resume:
            group = fresh()
            half, seen = n // 2, {"n": 0}

            def dying(x):
                if seen["n"] >= half:
                    raise Killed
                seen["n"] += x.shape[0]
                return extractor(x)

            t0 = time.perf_counter()
            try:
                extract_split(group, spec, images, masks, dying, 1, device, desc="killed at 50%")
            except Killed:
                pass
            before_kill = time.perf_counter() - t0
            group = open_for_writing(path, spec, {"train": layout}, {})["train"]
            t0 = time.perf_counter()
            stats = extract_split(group, spec, images, masks, extractor, args.batch_size, device, desc="resume")
            resume = time.perf_counter() - t0
            print(f"kill at {half}/{n} after {before_kill:.1f} s; resume redid {stats['done']} images, skipped "
                  f"{stats['skipped']}, in {resume:.1f} s = {resume / full:.2f} x the full run")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

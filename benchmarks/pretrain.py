"""Throughput of teacher pretraining: the project's loop against the model's bare forward + backward.

    python benchmarks/pretrain.py                                  # the default CPU config
    python benchmarks/pretrain.py --config gpu64 --batch 32 --crop 128 --device cuda
    python benchmarks/pretrain.py --config gpu64 --batch 32 --crop 128 --device cuda --compile

The loop is `textdiff.pretrain.loop.pretrain` exactly as the stage runs it (crops, views, noise and
timesteps drawn on the device, AdamW, gradient clipping, EMA, loss read back every `--log-every`
steps). The bare figure is the same model's forward + backward on one batch already on the device,
the ceiling the loop can approach. Images: data/prepared train+val when present, else random
pixels (the speed does not depend on them). Prints samples/s of both, their ratio and the device;
no assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textdiff.params import COMPACT_ADM  # noqa: E402
from textdiff.pretrain.crops import CropSampler  # noqa: E402
from textdiff.pretrain.loop import new_state, pretrain, unlabeled_images  # noqa: E402
from textdiff.runtime.device import device_name, resolve_device  # noqa: E402
from textdiff.teacher import Diffusion  # noqa: E402

CONFIGS = {
    "compact": dict(COMPACT_ADM),  # what `dvc repro` pretrains by default (64 px crops)
    # The GPU teacher of issue 11 (22.8 M parameters; 128 px crops).
    "gpu64": dict(image_size=128, num_channels=64, num_res_blocks=2, channel_mult="1,1,2,2,3,3",
                  attention_resolutions="16,8", num_head_channels=32, learn_sigma=True,
                  use_scale_shift_norm=True, resblock_updown=True, dropout=0.0),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_for(crop: int) -> np.ndarray:
    try:
        images = unlabeled_images()
        if min(images.shape[1:3]) >= crop:
            return images
    except Exception:  # noqa: BLE001 - no prepared data here: random pixels time the same
        pass
    return np.random.default_rng(0).integers(0, 256, (30, max(256, crop), max(256, crop), 3), dtype=np.uint8)


def bare(config: dict, batch: int, device: torch.device, steps: int, warmup: int, compile: bool) -> float:
    """Samples/s of forward + backward alone, one batch resident on the device."""
    state = new_state(config, 2e-4, 0.0, 0, device)
    model = torch.compile(state.model) if compile else state.model
    diffusion = Diffusion()
    size = config["image_size"]
    x0 = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    t = torch.randint(1000, (batch,), device=device)
    noise = torch.randn_like(x0)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = diffusion.training_losses(model, x0, t, noise)["loss"].mean()
        loss.backward()

    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


def loop(config: dict, batch: int, device: torch.device, steps: int, warmup: int, compile: bool,
         log_every: int, images: np.ndarray) -> float:
    """Samples/s of the stage's training loop (warm-up steps not counted)."""
    state = new_state(config, 2e-4, 0.0, 0, device)
    sampler = CropSampler(images, config["image_size"], 0, device=device)
    diffusion = Diffusion()
    kwargs = dict(batch_size=batch, lr=2e-4, warmup=100, ema_decay=0.999, grad_clip=1.0, device=device,
                  log_every=log_every, compile=compile, progress=False)
    pretrain(state, diffusion, sampler, warmup, **kwargs)
    pretrain(state, diffusion, sampler, warmup + steps, **kwargs)
    return state.trained_steps * batch / state.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="compact")
    parser.add_argument("--crop", type=int, default=None, help="crop size (default: the config's image_size)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the loop sets it: both figures with autotuned convolutions
    config = dict(CONFIGS[args.config])
    if args.crop:
        config["image_size"] = args.crop
    images = images_for(config["image_size"])
    params = sum(p.numel() for p in new_state(config, 2e-4, 0.0, 0, torch.device("cpu")).model.parameters())
    print(f"device: {device_name(device)}; torch {torch.__version__}; config {args.config} "
          f"({params / 1e6:.1f} M parameters), {config['image_size']} px crops, batch {args.batch}, "
          f"{'torch.compile' if args.compile else 'eager'}, {args.repeats} repeats x {args.steps} steps")
    bare_rates = [bare(config, args.batch, device, args.steps, args.warmup, args.compile) for _ in range(args.repeats)]
    loop_rates = [loop(config, args.batch, device, args.steps, args.warmup, args.compile, args.log_every, images)
                  for _ in range(args.repeats)]
    b, lp = statistics.median(bare_rates), statistics.median(loop_rates)
    print(f"bare forward+backward: {b:8.1f} samples/s (median; all: {', '.join(f'{r:.1f}' for r in bare_rates)})")
    print(f"training loop:         {lp:8.1f} samples/s (median; all: {', '.join(f'{r:.1f}' for r in loop_rates)})")
    print(f"loop / bare:           {lp / b:8.2f}")


if __name__ == "__main__":
    main()

"""Forward cost of the ADM teacher (random weights, batch 1): what one image x timestep costs.

    python benchmarks/teacher.py --config compact --repeats 5
    python benchmarks/teacher.py --config 256 --device cuda --dtype bfloat16

Prints the parameter count and the median / min wall time of a full UNet forward (and of a
FeatureExtractor call for the default taps, which stops after the deepest tapped block).
No assertions: this is a measuring tool.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textdiff.teacher import Diffusion, FeatureExtractor, build_adm  # noqa: E402

CONFIGS = {
    # OpenAI's 256x256_diffusion_uncond.pt.
    "256": dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
                attention_resolutions="32,16,8", num_heads=4, num_head_channels=64, use_scale_shift_norm=True,
                resblock_updown=True),
    # A compact in-domain teacher of the same family (what pretraining trains from scratch).
    "compact": dict(image_size=256, num_channels=64, num_res_blocks=2, channel_mult="", learn_sigma=True,
                    attention_resolutions="32,16,8", num_head_channels=64, use_scale_shift_norm=True,
                    resblock_updown=True),
    # The parity-fixture model; seconds on any CPU.
    "small": dict(image_size=64, num_channels=32, num_res_blocks=2, channel_mult="1,1,2,2", learn_sigma=True,
                  attention_resolutions="16,8", num_heads=4, num_head_channels=16, use_scale_shift_norm=True,
                  resblock_updown=True),
}
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="compact")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--no-extract", action="store_true", help="time only the full forward")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    config = CONFIGS[args.config]
    torch.manual_seed(0)
    model = build_adm(config).eval()
    for p in model.parameters():  # random, non-zero weights so no branch is trivially zero
        p.data.normal_(0, 0.02)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    size = config["image_size"]
    x = torch.rand(1, 3, size, size, device=device) * 2 - 1
    t = torch.tensor([150], device=device)
    dtype = DTYPES[args.dtype]

    def forward() -> None:
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            model(x, t)

    print(f"config={args.config} device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}")
    print(f"parameters: {n_params:,}  image: 1x3x{size}x{size}")
    times = _time(forward, device, args.repeats, args.warmup)
    print(f"full forward per image-timestep: median {statistics.median(times):.3f} s  min {min(times):.3f} s  "
          f"(n={len(times)})")

    if not args.no_extract:
        blocks = (6, 8, 12, 16) if len(model.output_blocks) > 16 else (len(model.output_blocks) - 1,)
        extractor = FeatureExtractor(model, Diffusion(), steps=(150,), blocks=blocks, device=device,
                                     autocast_dtype=dtype)
        images = x.cpu()
        times = _time(lambda: extractor(images), device, args.repeats, args.warmup)
        print(f"feature taps {list(blocks)} per image-timestep (early stop, incl. CPU copy): "
              f"median {statistics.median(times):.3f} s  min {min(times):.3f} s  (n={len(times)})")


if __name__ == "__main__":
    main()

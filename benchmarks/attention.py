"""ADM attention: the einsum form (explicit T x T logits) vs F.scaled_dot_product_attention.

    python benchmarks/attention.py                      # the shipped teacher, 256x256, CPU
    python benchmarks/attention.py --repeats 9 --device cuda

Two measurements, each as the median of --repeats timed runs after a warm-up, the two
implementations interleaved (A B A B ...) so that load from other processes hits both alike:

1. the attention op alone, at the shape of the shipped teacher's largest attention on
   --image-size inputs (read off the loaded model: tokens, channels, heads, head order);
2. a whole teacher forward (batch 1, one timestep) of the shipped teacher loaded with
   `load_teacher`, switching implementations by replacing the module-level
   `textdiff.teacher.adm.qkv_attention`, which every AttentionBlock looks up at call time.

Prints measured numbers only (and, on CUDA, peak allocated memory); no assertions on time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import textdiff.teacher.adm as adm  # noqa: E402
from textdiff.teacher import load_teacher  # noqa: E402
from textdiff.teacher.adm import attention_token_counts  # noqa: E402

SDPA = adm.qkv_attention


# The einsum implementation SDPA replaced lives in the tests as their reference; time that one.
sys.path.insert(0, str(ROOT / "tests"))
from test_adm import _einsum_qkv_attention as einsum_qkv_attention  # noqa: E402

IMPLEMENTATIONS: dict[str, Callable[[torch.Tensor, int, bool], torch.Tensor]] = {
    "einsum": einsum_qkv_attention,
    "sdpa": SDPA,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Seconds per call for each fn, one warm-up call each, then `repeats` rounds A B A B."""
    for fn in fns.values():
        fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _report(title: str, times: dict[str, list[float]], peaks: dict[str, float | None]) -> None:
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(title)
    for name, ts in times.items():
        peak = "" if peaks[name] is None else f"  peak +{peaks[name]:.0f} MiB"
        print(f"  {name:6s} median {med[name]:9.1f} ms  min {min(ts) * 1e3:9.1f} ms  (n={len(ts)}){peak}")
    print(f"  einsum / sdpa = {med['einsum'] / med['sdpa']:.2f}x")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _largest_attention(model: torch.nn.Module, image_size: int, device: torch.device) -> tuple[int, int, int, bool]:
    """(tokens, channels, heads, legacy) of the AttentionBlock with the most tokens."""
    found: list[tuple[int, int, int, bool]] = []
    handles = [
        m.register_forward_hook(
            lambda mod, inp, _out: found.append(
                (inp[0].shape[-2] * inp[0].shape[-1], mod.channels, mod.num_heads, mod.legacy)
            )
        )
        for m in model.modules()
        if isinstance(m, adm.AttentionBlock)
    ]
    with torch.inference_mode():
        x = torch.zeros(1, 3, image_size, image_size, device=device)
        model(x, torch.zeros(1, dtype=torch.long, device=device))
    for h in handles:
        h.remove()
    return max(found)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "teacher" / "monuseg-adm32.safetensors")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per implementation (median)")
    parser.add_argument("--op-repeats", type=int, default=15, help="timed runs of the attention op alone")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = load_teacher(args.checkpoint).to(device)
    size = args.image_size
    print(f"device={device} ({_device_name(device)}) torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"teacher: {args.checkpoint.name}, trained at {model.config['image_size']}, run at {size}x{size}; "
          f"attends at (side, tokens) {attention_token_counts(model.config, size)}")

    # 1. The op alone, at the largest attention's shape.
    tokens, channels, heads, legacy = _largest_attention(model, size, device)
    torch.manual_seed(0)
    qkv = torch.randn(1, 3 * channels, tokens, device=device)
    with torch.inference_mode():
        diff = (einsum_qkv_attention(qkv, heads, legacy) - SDPA(qkv, heads, legacy)).abs().max().item()
        op = {name: (lambda fn=fn: fn(qkv, heads, legacy)) for name, fn in IMPLEMENTATIONS.items()}
        peaks = {name: _peak_mib(fn, device) for name, fn in op.items()}
        times = _interleaved(op, device, args.op_repeats)
    _report(f"attention op: qkv [1, {3 * channels}, {tokens}], {heads} heads x {channels // heads} ch, "
            f"{'legacy' if legacy else 'new'} order; max |einsum - sdpa| {diff:.1e}", times, peaks)

    # 2. The whole forward, switching the module-level function the blocks call.
    x = torch.rand(1, 3, size, size, device=device) * 2 - 1
    t = torch.tensor([150], device=device)

    def forward_with(fn: Callable[[torch.Tensor, int, bool], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            adm.qkv_attention = fn
            try:
                with torch.inference_mode():
                    return model(x, t)
            finally:
                adm.qkv_attention = SDPA

        return run

    fwd = {name: forward_with(fn) for name, fn in IMPLEMENTATIONS.items()}
    diff = (fwd["einsum"]() - fwd["sdpa"]()).abs().max().item()
    peaks = {name: _peak_mib(fn, device) for name, fn in fwd.items()}
    times = _interleaved(fwd, device, args.repeats)
    _report(f"teacher forward: 1x3x{size}x{size}, t=150; max |einsum - sdpa| {diff:.1e}", times, peaks)


if __name__ == "__main__":
    main()

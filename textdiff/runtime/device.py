"""The machine a stage runs on: which device, and which library versions made an artefact."""

from __future__ import annotations

import os
import platform

import torch

from textdiff.errors import TextDiffError


def usable_cpus(limit: int = 8) -> int:
    """The cores this process may run on (its affinity, as taskset and SLURM set it), at most `limit`:
    the thread count of the CPU-side pools (cache chunk writes, watersheds)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(limit, cpus))


def resolve_device(name: str) -> torch.device:
    """`auto` = the GPU when there is one; asking for `cuda` without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise TextDiffError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TextDiffError(f"device '{name}' was asked for but no CUDA GPU is available (use auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TextDiffError(f"device '{name}' was asked for but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def native_bfloat16(device: torch.device) -> bool:
    """Whether this device computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX. Elsewhere PyTorch emulates it, and the classifier's training step took 13x
    float32's time (30.0 s against 2.3 s on an AVX2-only AMD EPYC, benchmarks/train_step.py)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's feature probes
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_autocast(requested: str, device: torch.device) -> str:
    """A compute dtype as run here: `auto` = bfloat16 where the device computes it in hardware, else
    float32; a named dtype is kept (a user who asks for bfloat16 gets it, fast or not)."""
    if requested == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return requested


def device_name(device: torch.device) -> str:
    """The device in words, for records a person reads (which GPU; which CPU and how many cores)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def provenance() -> dict:
    """Versions recorded beside every artefact, so a number can be traced to what made it.
    A package that is not installed (a bare GPU box may lack zarr) is recorded as such."""
    from importlib.metadata import PackageNotFoundError, version

    import textdiff

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "textdiff": textdiff.__version__,
        "torch": torch.__version__,
        "transformers": installed("transformers"),
        "zarr": installed("zarr"),
        "numpy": installed("numpy"),
        "python": platform.python_version(),
    }

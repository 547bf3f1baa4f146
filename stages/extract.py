"""Stage `extract`: teacher features + report embeddings -> cache/features.zarr (DVC stage one)."""

from __future__ import annotations

from pathlib import Path

from textdiff.extraction import extract_cache, verify_cache
from textdiff.params import load_params
from textdiff.paths import CACHE_PATH


def run(params_path: Path, rebuild: bool = True, cache_path: Path = CACHE_PATH) -> None:
    plan = extract_cache(load_params(params_path), cache_path, rebuild=rebuild)
    size = sum(f.stat().st_size for f in Path(cache_path).rglob("*") if f.is_file())
    n = sum(layout.n for layout in plan.layouts.values())
    print(f"{cache_path}: {n} images, {size / 2**20:.1f} MiB on disk ({size / n / 2**20:.2f} MiB per image)")


def verify(params_path: Path, cache_path: Path = CACHE_PATH) -> list[str]:
    problems, notes = verify_cache(load_params(params_path), cache_path)
    for line in notes:
        print(line)
    return problems

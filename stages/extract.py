"""Stage `extract`: teacher features + report embeddings -> cache/features.zarr (DVC stage one)."""

from __future__ import annotations

import os
from pathlib import Path

from textdiff.extract.extraction import extract_cache, verify_cache
from textdiff.locks import hold, lock_path
from textdiff.params import Params, load_params
from textdiff.paths import CACHE_PATH
from textdiff.runtime.launch import relaunch_under_torchrun
from textdiff.teacher.adm import config_problem


def checked(params: Params) -> Params:
    """The teacher's own rule for teacher.config, before any model is built."""
    params.refuse(config_problem("teacher.config", params.teacher.config))
    return params


def run(params_path: Path, rebuild: bool = True, cache_path: Path = CACHE_PATH) -> None:
    params = checked(load_params(params_path))
    with hold(lock_path(cache_path), f"the feature cache {cache_path}"):
        _run(params, params_path, rebuild, cache_path)


def _run(params, params_path: Path, rebuild: bool, cache_path: Path) -> None:
    if params.extract.nproc > 1 and "WORLD_SIZE" not in os.environ:
        relaunch_under_torchrun(params.extract.nproc, ["extract", "--params", str(params_path),
                                                       "--rebuild" if rebuild else "--no-rebuild"])
        return
    plan = extract_cache(params, cache_path, rebuild=rebuild)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 reports for the job
    size = sum(f.stat().st_size for f in Path(cache_path).rglob("*") if f.is_file())
    n = sum(layout.n for layout in plan.layouts.values())
    print(f"{cache_path}: {n} images, {size / 2**20:.1f} MiB on disk ({size / n / 2**20:.2f} MiB per image)")


def verify(params_path: Path, cache_path: Path = CACHE_PATH) -> list[str]:
    problems, notes = verify_cache(checked(load_params(params_path)), cache_path)
    for line in notes:
        print(line)
    return problems

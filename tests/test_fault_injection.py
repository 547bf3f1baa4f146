"""SIGKILL anywhere, then run again: every output equals an uninterrupted run's.

`dvc repro` of a tiny project (synthetic images, a teacher pretrained for a few steps) is killed
once inside each of its five stages, at a seeded fraction of that stage's uninterrupted duration,
the whole process tree at once as a scheduler or the OOM killer ends a job; each next run goes on
from what the last one left. `textdiff predict` over a folder and a small pyramidal slide is killed
at seeded points the same way. The last run of each must finish and produce what an uninterrupted
run produced, byte for byte where the bytes are deterministic and value for value elsewhere, with
`dvc status` and `textdiff cache verify` clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO_ROOT,
    TINY_TEACHER,
    assert_same_predict_outputs,
    cache_arrays,
    checkout_project,
    kill_tree,
    predict_outputs,
    write_slide,
)
from PIL import Image
from safetensors.torch import load_file

STAGES = ("prepare", "pretrain", "extract", "train", "evaluate")
SEED = 20261204


def _tiny_sections(data_root: Path) -> dict[str, dict]:
    return {
        "data": {"root": str(data_root), "instances": f"{data_root}-instances", "image_size": 32, "stain": "none"},
        "pretrain": {"config": TINY_TEACHER, "steps": 6, "batch_size": 2, "checkpoint_every": 2, "samples": 1,
                     "sample_steps": 2},
        "teacher": {"kind": "adm", "checkpoint": "", "config": {}, "steps": [10, 100], "blocks": [0, 3]},
        "text": {"max_length": 8},
        "extract": {"views": 1, "batch_size": 2},
        "train": {"epochs": 3, "d_model": 16, "heads": 2, "batch_size": 2},
        "evaluate": {"panels": 2},
    }


def _repro(work: Path, env: dict, kill_in: str | None = None, after: float = 0.0) -> tuple[str, dict[str, float]]:
    """`dvc repro`; with `kill_in`, SIGKILLed `after` seconds into that stage. Returns its output and
    the seconds each stage it ran took (to the next stage's start, or the end)."""
    process = subprocess.Popen(["dvc", "repro"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, start_new_session=True)
    lines, starts = [], {}
    deadline: float | None = None
    os.set_blocking(process.stdout.fileno(), False)
    while True:
        line = process.stdout.readline()
        if line:
            lines.append(line)
            for stage in STAGES:
                if f"Running stage '{stage}'" in line:
                    starts[stage] = time.perf_counter()
                    if stage == kill_in:
                        deadline = starts[stage] + after
            continue
        if deadline is not None and time.perf_counter() >= deadline:
            kill_tree(process)
            break
        if process.poll() is not None:
            lines.extend(process.stdout.readlines())
            break
        time.sleep(0.02)
    end = time.perf_counter()
    order = sorted(starts, key=starts.get)
    seconds = {s: (starts[order[i + 1]] if i + 1 < len(order) else end) - starts[s] for i, s in enumerate(order)}
    output = "".join(lines)
    if kill_in is None:
        assert process.returncode == 0, output[-4000:]
    return output, seconds


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


def _numbers(data, timed=("seconds", "time", "started", "finished", "date", "rate", "per_s", "rss")):
    """A metrics JSON without its clock and memory readings."""
    if isinstance(data, dict):
        return {k: _numbers(v) for k, v in data.items() if not any(t in k for t in timed)}
    if isinstance(data, list):
        return [_numbers(v) for v in data]
    return data


def test_dvc_repro_killed_in_every_stage_finishes_as_an_uninterrupted_run(tmp_path, tiny_monuseg):
    data = tiny_monuseg(counts={"train": 4, "val": 2, "test": 2}, size=40)
    reference, env = checkout_project(tmp_path / "reference", _tiny_sections(data))
    _, seconds = _repro(reference, env)
    assert set(seconds) == set(STAGES), seconds

    hurt, _ = checkout_project(tmp_path / "hurt", _tiny_sections(data))
    rng = np.random.default_rng(SEED)
    killed = []
    for stage in STAGES:
        after = float(rng.uniform(0.15, 0.85)) * seconds[stage]
        output, _ = _repro(hurt, env, kill_in=stage, after=after)
        killed.append(f"{stage} at {after:.1f}s of {seconds[stage]:.1f}s")
        assert f"Running stage '{stage}'" in output, output[-3000:]
    final, _ = _repro(hurt, env)

    status = subprocess.run(["dvc", "status", "--json"], cwd=hurt, env=env, capture_output=True, text=True)
    assert json.loads(status.stdout.strip().splitlines()[-1]) == {}, (killed, status.stdout)
    verify = subprocess.run([sys.executable, "-m", "stages.cli", "cache", "verify"], cwd=hurt, env=env,
                            capture_output=True, text=True)
    assert verify.returncode == 0, (killed, verify.stdout + verify.stderr)

    for name in ("train.npz", "val.npz", "test.npz"):
        with np.load(reference / "data/prepared" / name) as a, np.load(hurt / "data/prepared" / name) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                assert np.array_equal(a[key], b[key]), (killed, name, key)
    _assert_same_tensors(_tensors(reference / "models/pretrain/teacher.safetensors"),
                         _tensors(hurt / "models/pretrain/teacher.safetensors"), "teacher")
    a, b = cache_arrays(reference / "cache/features.zarr"), cache_arrays(hurt / "cache/features.zarr")
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), (killed, key)
    _assert_same_tensors(_tensors(reference / "models/classifier/model.pt"),
                         _tensors(hurt / "models/classifier/model.pt"), "classifier")
    for name in ("metrics/test.json", "metrics/test_per_image.json", "metrics/train.json"):
        expected, got = (_numbers(json.loads((root / name).read_text())) for root in (reference, hurt))
        assert expected == got, (killed, name)
    ours = [p for p in hurt.rglob("*.lock") if p.name != "dvc.lock" and ".dvc" not in p.relative_to(hurt).parts]
    assert not list(hurt.rglob("*.tmp-*")) and not ours, (killed, ours)


# --- predict -----------------------------------------------------------------------------------------


def _predict(trained_root: Path, inputs: list[Path], out: Path, kill_after: float | None = None) -> float:
    command = [sys.executable, "-m", "stages.cli", "predict", *map(str, inputs), "--out", str(out), "--text",
               "Many nuclei.", "--mpp", "0.25"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=trained_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    if kill_after is None:
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output[-4000:]
    else:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            kill_tree(process)
    return time.perf_counter() - started


def test_predict_killed_at_seeded_points_finishes_as_an_uninterrupted_run(trained, tmp_path):
    from textdiff.data.dataset import read_split

    folder = tmp_path / "images"
    folder.mkdir()
    images = [s.image for s in read_split(trained.data_root, "train")]
    for k in range(4):
        Image.fromarray(images[k % len(images)]).save(folder / f"tile_{k}.png")
    tissue = np.concatenate([np.concatenate([images[(r + c) % len(images)] for c in range(4)], axis=1)
                             for r in range(4)], axis=0)
    slide = write_slide(tmp_path / "slide.tif", tissue)
    inputs = [folder, slide]

    reference = tmp_path / "reference"
    duration = _predict(trained.root, inputs, reference)
    expected = predict_outputs(reference)
    assert {"predictions.h5", "nuclei.csv", "slide.geojson"} <= set(expected), sorted(expected)

    hurt = tmp_path / "hurt"
    rng = np.random.default_rng(SEED)
    points = sorted(float(x) for x in rng.uniform(0.2, 0.9, size=3) * duration)
    for point in points:
        _predict(trained.root, inputs, hurt, kill_after=point)
    _predict(trained.root, inputs, hurt)
    assert_same_predict_outputs(expected, predict_outputs(hurt), points)
    assert not [p for p in hurt.rglob("*") if ".tmp-" in p.name or p.name.endswith(".lock")], points


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

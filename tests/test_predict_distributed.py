"""`textdiff predict` under torchrun: the processes deal the images and a slide's tiles, each writes its own,
rank 0 writes predictions.h5, nuclei.csv and the summary, and the outputs are exactly those of one
process with the same threads per process (torchrun gives each OMP_NUM_THREADS=1)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from conftest import REPO_ROOT, assert_same_predict_outputs, predict_outputs, write_slide
from PIL import Image

from textdiff.predict.run import deal_inputs
from textdiff.runtime.distributed import Ranks


def test_inputs_are_dealt_largest_first_to_the_least_loaded_rank(tmp_path):
    paths = []
    for name, size in (("a", 10), ("b", 100), ("c", 40), ("d", 50), ("e", 5)):
        (tmp_path / name).write_bytes(b"x" * size)
        paths.append(tmp_path / name)
    deals = [deal_inputs(paths, Ranks(r, 2)) for r in range(2)]
    assert deals == [[1, 4], [0, 2, 3]]  # b (100) + e (5) against d, c, a (100)
    assert sorted(deals[0] + deals[1]) == list(range(5))
    assert deal_inputs(paths, Ranks()) == list(range(5))


def test_two_processes_write_exactly_what_one_process_writes(trained, tmp_path):
    from textdiff.data.dataset import read_split

    folder = tmp_path / "images"
    folder.mkdir()
    images = [s.image for s in read_split(trained.data_root, "train")]
    for k in range(6):
        Image.fromarray(np.roll(images[k % len(images)], 3 * k, axis=1)).save(folder / f"tile_{k}.png")
    tissue = np.concatenate([np.concatenate([images[(r + c) % len(images)] for c in range(6)], axis=1)
                             for r in range(4)], axis=0)  # 160 x 240: 2 x 3 tiles of 64 working pixels
    slide = write_slide(tmp_path / "slide.tif", tissue)
    args = ["predict", str(folder), str(slide), "--text", "Many nuclei.", "--mpp", "0.25", "--slide-tile", "64"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")

    one = subprocess.run([sys.executable, "-m", "stages.cli", *args, "--out", str(tmp_path / "one")],
                         cwd=trained.root, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
                sys.executable, "-m", "stages.cli", *args, "--out", str(tmp_path / "two")]
    two = subprocess.run(torchrun, cwd=trained.root, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "7 of 7 images segmented" in two.stdout and "by 2 processes" in two.stdout
    import zarr

    done = zarr.open_group(str(tmp_path / "two" / "slide.zarr"), mode="r")["done"]
    assert done.shape[0] * done.shape[1] >= 4 and np.asarray(done[:]).all()

    expected, got = predict_outputs(tmp_path / "one"), predict_outputs(tmp_path / "two")
    assert {"predictions.h5", "nuclei.csv", "slide.geojson"} <= set(got)
    assert_same_predict_outputs(expected, got)
    again = subprocess.run(torchrun, cwd=trained.root, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "7 of 7 inputs were already segmented" in again.stdout  # a re-run (or a killed job's) skips them
    assert predict_outputs(tmp_path / "two").keys() == expected.keys()

"""The folder layout for a lab's own tiles: images/ + masks/ (binary or instance labels),
optional reports.csv and split.csv, a seeded split otherwise; every bad input one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from textdiff.data.folder import is_folder_layout, read_folder, seeded_split
from textdiff.errors import TextDiffError


def make_folder(root: Path, n: int = 8, size: int = 48, instances: bool = False, reports: bool = False,
                split: dict[str, str] | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"t{i}.png")
        labels = np.zeros((size, size), np.uint16)
        labels[4:12, 4:12], labels[20:30, 20:28] = 1, 2
        mask = labels if instances else (labels > 0).astype(np.uint8) * 255
        Image.fromarray(mask).save(root / "masks" / f"t{i}.png")
    if reports:
        rows = "\n".join(f"t{i}.png,a sentence about tile {i}" for i in range(n))
        (root / "reports.csv").write_text("image,report\n" + rows + "\n")
    if split:
        (root / "split.csv").write_text("image,split\n" + "\n".join(f"{k},{v}" for k, v in split.items()) + "\n")
    return root


def test_binary_masks_without_reports_or_split_file_get_a_seeded_split(tmp_path):
    root = make_folder(tmp_path / "d", n=10)
    assert is_folder_layout(root)
    splits = read_folder(root, split_seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "val": 2, "test": 2}
    sample = splits["train"][0]
    assert sample.instances is None and sample.text == "" and set(np.unique(sample.mask)) == {0, 1}
    again = read_folder(root, split_seed=3)
    assert [s.id for s in again["val"]] == [s.id for s in splits["val"]]  # seeded: the same every time
    other = read_folder(root, split_seed=4)
    assert [s.id for s in other["val"]] != [s.id for s in splits["val"]]


def test_instance_label_maps_and_reports_and_a_split_file_are_used(tmp_path):
    split = {f"t{i}": s for i, s in enumerate(["train"] * 4 + ["val", "val", "test", "test"])}
    root = make_folder(tmp_path / "d", instances=True, reports=True, split=split)
    splits = read_folder(root)
    assert [s.id for s in splits["test"]] == ["t6", "t7"]
    s = splits["val"][0]
    assert s.instances is not None and int(s.instances.max()) == 2
    assert np.array_equal(s.mask, (s.instances > 0).astype(np.uint8))
    assert s.text == "a sentence about tile 4" and not s.approximate


@pytest.mark.parametrize("breakage, words", [
    ("no_mask", ["t3.png", "no mask"]),
    ("size", ["masks/t2.png", "mask is 40x40", "48x48"]),
    ("missing_report", ["reports.csv", "no row for image 't5'"]),
    ("bad_split", ["split.csv", "'t1'", "'training'"]),
    ("mixed_masks", ["binary mask", "instance label map"]),
    ("mixed_sizes", ["t0.png", "64x64", "one size"]),
    ("colour_mask", ["masks/t0.png", "channels"]),
    ("too_few", ["2 images cannot be split"]),
])
def test_bad_folders_are_one_line_naming_the_file(tmp_path, breakage, words):
    root = make_folder(tmp_path / "d", n=2 if breakage == "too_few" else 8, reports=breakage == "missing_report",
                       instances=breakage == "mixed_masks",
                       split={f"t{i}": ("training" if i == 1 else "train") for i in range(8)}
                       if breakage == "bad_split" else None)
    if breakage == "no_mask":
        (root / "masks" / "t3.png").unlink()
    elif breakage == "size":
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "masks" / "t2.png")
    elif breakage == "missing_report":
        lines = (root / "reports.csv").read_text().splitlines()
        (root / "reports.csv").write_text("\n".join(line for line in lines if not line.startswith("t5")) + "\n")
    elif breakage == "mixed_masks":
        Image.fromarray(np.full((48, 48), 255, np.uint8)).save(root / "masks" / "t0.png")
    elif breakage == "mixed_sizes":
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "images" / "t0.png")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "masks" / "t0.png")
    elif breakage == "colour_mask":
        Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(root / "masks" / "t0.png")
    with pytest.raises(TextDiffError) as err:
        read_folder(root)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_the_seeded_split_keeps_one_image_per_split_and_refuses_too_few():
    split = seeded_split([f"x{i}" for i in range(3)], 0, 0.15, 0.15)
    assert sorted(split.values()) == ["test", "train", "val"]
    with pytest.raises(TextDiffError, match="cannot be split"):
        seeded_split(["a", "b"], 0, 0.15, 0.15)


def test_a_folder_of_instance_tiles_without_reports_runs_prepare_to_evaluate(tiny_project, tmp_path):
    """The whole pipeline on a lab's folder: instance labels become the distance target and the
    instance metrics; without reports a text fusion is refused in one line, `none` trains."""
    import json

    from conftest import _synthetic_triple
    from typer.testing import CliRunner

    from stages.cli import app

    root = tmp_path / "lab"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        image, _, labels = _synthetic_triple(rng, 40)
        Image.fromarray(image).save(root / "images" / f"tile{i}.png")
        Image.fromarray(labels).save(root / "masks" / f"tile{i}.png")
    runner = CliRunner()
    tiny_project.write_params(data={"root": str(root), "image_size": 32, "stain": "none"})
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 0, result.output
    assert "folder layout" in result.output
    assert runner.invoke(app, ["extract"]).exit_code == 0
    refused = runner.invoke(app, ["train"])
    assert refused.exit_code != 0 and "train.fusion=cross_attention reads each image's report" in refused.output
    assert "Traceback" not in refused.output
    tiny_project.write_params(data={"root": str(root), "image_size": 32, "stain": "none"},
                              train={"epochs": 1, "d_model": 16, "heads": 2, "fusion": "none"})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tiny_project.root / "metrics" / "test.json").read_text())
    assert metrics["num_images"] == 1 and metrics["num_instance_images"] == 1  # 15 % of 8 tiles: one test tile
    assert 0.0 <= metrics["aji_instance"] <= 1.0

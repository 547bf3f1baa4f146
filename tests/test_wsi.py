"""Whole slides through `textdiff predict`: a pyramidal tiled TIFF built here (tifffile, with
resolution tags), read by OpenSlide; tissue only, resumable, GeoJSON + CSV + overlay + zarr pyramid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from conftest import write_slide
from typer.testing import CliRunner

from stages.cli import app
from textdiff.predict import slides as wsi

runner = CliRunner()
MPP = 0.25


@pytest.fixture
def slide_image(tiny_project) -> np.ndarray:
    """Tissue (the tiny dataset's images, tiled) on the left two thirds, glass on the right third."""
    from textdiff.data.dataset import read_split

    images = [s.image for s in read_split(tiny_project.data_root, "train")]
    tissue = np.concatenate([np.concatenate([images[(r + c) % len(images)] for c in range(4)], axis=1)
                             for r in range(4)], axis=0)  # 160 x 160
    glass = np.full((160, 80, 3), 242, np.uint8)
    return np.concatenate([tissue, glass], axis=1)  # 160 x 240


def _probability(out: Path, stem: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out / f"{stem}.zarr"), mode="r")["probability/0"][:])


def test_a_slide_is_segmented_tile_by_tile_like_the_same_pixels_as_an_image(
        trained, slide_image, tmp_path, monkeypatch
):
    monkeypatch.setattr(wsi, "CORE", 64)
    monkeypatch.setattr(wsi, "MARGIN", 16)
    slide = write_slide(tmp_path / "slide.tif", slide_image)
    assert wsi.is_slide(slide) and not wsi.is_slide(next((trained.data_root / "Test_Folder" / "img").iterdir()))
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(slide), "--out", str(out), "--text", "Many nuclei."])
    assert result.exit_code == 0, result.output
    assert "slide: " in result.output and "tiles with tissue" in result.output

    # 1. the same pixels as a plain image: the tile seams stay within the blend's tolerance
    from textdiff.predict.images import build_segmenter

    segmenter, card = build_segmenter(Path("models/classifier"), torch.device("cpu"), None, None)
    # at the image's size (level 0); unrefined, as slides keep their maps at the working resolution
    whole = segmenter.maps(slide_image, "Many nuclei.", MPP, refine=False)[0]
    factor = MPP / card.working_mpp
    prob = _probability(out, "slide").astype(np.float32) / 255
    assert prob.shape == (round(160 * factor), round(240 * factor))
    from textdiff.model.inference import resize_probability

    expected = resize_probability(whole, prob.shape)
    tissue_cols = slice(0, round(160 * factor) - 8)
    difference = np.abs(prob[:, tissue_cols] - expected[:, tissue_cols])
    assert difference.mean() < 0.03, difference.mean()

    # 2. glass is skipped: its tiles are done but hold probability 0
    glass = prob[:, round(176 * factor):]
    assert glass.size and glass.max() == 0

    # 3. GeoJSON that QuPath imports: polygons in level-0 pixels, one per CSV row
    collection = json.loads((out / "slide.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    rows = list(csv.DictReader(open(out / "slide_nuclei.csv")))
    assert len(collection["features"]) == len(rows) > 0
    for feature in collection["features"]:
        assert feature["properties"]["objectType"] == "detection"
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) >= 4
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert 0 <= min(xs) and max(xs) <= 240 and 0 <= min(ys) and max(ys) <= 160
    assert all(float(r["area_um2"]) == pytest.approx(float(r["area"]) * MPP**2, rel=0.05, abs=0.1) for r in rows)
    assert (out / "slide_overlay.png").stat().st_size > 0
    levels = sorted(zarr.open_group(str(out / "slide.zarr"), mode="r")["probability"].array_keys())
    assert len(levels) >= 2  # a pyramid


def test_a_killed_slide_run_resumes_where_it_stopped(trained, slide_image, tmp_path, monkeypatch):
    monkeypatch.setattr(wsi, "CORE", 64)
    monkeypatch.setattr(wsi, "MARGIN", 16)
    slide = write_slide(tmp_path / "s.tif", slide_image)
    out = tmp_path / "out"
    real = wsi.segment_slide
    segmented = []

    def killed_after_two(*args, **kwargs):
        def on_tile(k):
            segmented.append(k)
            if len(segmented) == 2:
                raise KeyboardInterrupt  # a kill half-way
        return real(*args, **kwargs, on_tile=on_tile)

    monkeypatch.setattr("textdiff.predict.run.segment_slide", killed_after_two)
    killed = runner.invoke(app, ["predict", str(slide), "--out", str(out), "--text", "x"])
    assert killed.exit_code == 130 and "interrupted" in killed.output
    done = np.asarray(zarr.open_group(str(out / "s.zarr"), mode="r")["done"][:])
    assert done.sum() == 2 and not (out / "s.geojson").exists()

    counted = []
    monkeypatch.setattr("textdiff.predict.run.segment_slide", lambda *a, **k: real(*a, **k, on_tile=counted.append))
    result = runner.invoke(app, ["predict", str(slide), "--out", str(out), "--text", "x"])
    assert result.exit_code == 0, result.output
    assert len(counted) == done.size - 2  # only the tiles not yet done
    fresh = tmp_path / "fresh"
    monkeypatch.setattr("textdiff.predict.run.segment_slide", real)
    assert runner.invoke(app, ["predict", str(slide), "--out", str(fresh), "--text", "x"]).exit_code == 0
    assert np.array_equal(_probability(out, "s"), _probability(fresh, "s"))
    assert (out / "s.geojson").read_text() == (fresh / "s.geojson").read_text()

    # a finished slide is skipped whole; --overwrite redoes every tile
    counted.clear()
    monkeypatch.setattr("textdiff.predict.run.segment_slide", lambda *a, **k: real(*a, **k, on_tile=counted.append))
    again = runner.invoke(app, ["predict", str(slide), "--out", str(out), "--text", "x"])
    assert again.exit_code == 0 and "s: already segmented by this model" in again.output and not counted
    assert "1 of 1 inputs were already segmented" in again.output
    redo = runner.invoke(app, ["predict", str(slide), "--out", str(out), "--text", "x", "--overwrite"])
    assert redo.exit_code == 0 and len(counted) == done.size
    assert (out / "s.geojson").read_text() == (fresh / "s.geojson").read_text()


def test_a_corrupt_slide_is_one_line_and_the_others_are_processed(trained, slide_image, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    write_slide(folder / "good.tif", slide_image[:, :160])
    data = (folder / "good.tif").read_bytes()
    (folder / "broken.svs").write_bytes(data[: len(data) // 3])  # truncated
    result = runner.invoke(app, ["predict", str(folder), "--out", str(tmp_path / "out"), "--text", "x"])
    assert result.exit_code == 1
    assert "broken.svs" in result.output and "Traceback" not in result.output
    assert (tmp_path / "out" / "good.geojson").is_file()


def test_a_damaged_tile_is_one_line_and_a_slide_without_resolution_gets_a_notice(trained, slide_image, tmp_path):
    """OpenSlide opens a slide with garbled tile data and fails only when reading it: that is one
    line for that slide, and the next slide is still segmented."""
    folder = tmp_path / "slides"
    folder.mkdir()
    damaged = write_slide(folder / "a_damaged.tif", slide_image)
    with tifffile.TiffFile(damaged) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    with open(damaged, "r+b") as f:
        for i in range(len(counts)):  # every level-0 tile: whichever the reader picks fails
            f.seek(offsets[i] + 2)
            f.write(b"\xde\xad\xbe\xef" * max(1, (counts[i] - 4) // 4))
    with tifffile.TiffWriter(folder / "b_untagged.tif") as tif:  # no resolution tags at all
        for k in range(3):
            tif.write(np.ascontiguousarray(slide_image[:: 2**k, :: 2**k]), tile=(64, 64), photometric="rgb",
                      compression="zlib", subfiletype=0 if k == 0 else 1)
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(folder), "--out", str(out), "--text", "x"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert ("a_damaged.tif: cannot read the region of tile" in result.output
            or "a_damaged.tif: cannot read its thumbnail" in result.output), result.output
    assert (out / "b_untagged.geojson").is_file() and not (out / "a_damaged.geojson").exists()
    assert "no usable resolution tags (first: b_untagged.tif)" in result.output


def test_touching_nuclei_are_separate_polygons_and_a_nucleus_on_a_core_border_is_counted_once():
    """Slides: each tile separates its whole region (margin included) and keeps the nuclei whose
    centroid lies in its core, so two touching nuclei are two polygons and a nucleus cut by the
    border between two cores is counted by exactly one of them."""
    from textdiff.model.nuclei import NucleusRule
    from textdiff.predict.slides import nuclei_of

    yy, xx = np.mgrid[:60, :120]
    prob = np.zeros((60, 120), np.float32)
    for cx in (20, 36):  # two discs overlapping by 2 px: one blob in the mask
        prob[(yy - 30) ** 2 + (xx - cx) ** 2 <= 81] = 1
    prob[(yy - 30) ** 2 + (xx - 60) ** 2 <= 81] = 1  # a third, centred on the cores' border (x = 60)
    region = (0, 0, 60, 120)
    rule = NucleusRule("edt", 0.5)
    left = nuclei_of(prob, region, (0, 0, 60, 60), 1.0, 0.25, rule=rule)
    right = nuclei_of(prob, region, (0, 60, 60, 120), 1.0, 0.25, rule=rule)
    assert len(left) == 2 and len(right) == 1  # the touching pair split; the border nucleus once
    assert right[0]["centroid_x"] == pytest.approx(60, abs=0.5)
    for row in left + right:
        assert row["polygon"][0] == row["polygon"][-1] and row["area_um2"] > 0

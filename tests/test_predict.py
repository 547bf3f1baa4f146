"""`textdiff predict`: any image size, bad files skipped, CSV/HDF5 contents, exact stitching."""

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from textdiff.data.tiles import blend_tiles, gaussian_window, tile_grid, window_starts
from textdiff.errors import TextDiffError
from textdiff.predict.images import nucleus_table, sliding_window

runner = CliRunner()


def test_window_starts_cover_the_image():
    assert window_starts(256, 256, 192) == [0]
    assert window_starts(100, 256, 192) == [0]
    assert window_starts(1000, 256, 192) == [0, 192, 384, 576, 744]
    for length in (257, 500, 1000, 1023):
        starts = window_starts(length, 256, 192)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + 256] = True
        assert covered.all() and starts[-1] + 256 == length


def test_stitching_a_pixelwise_model_is_exact():
    """For a model whose output at a pixel depends only on that pixel, any tiling must give the
    whole-image answer: the Gaussian blend is a normalised weighted mean of identical values."""
    torch.manual_seed(0)
    image = torch.rand(3, 70, 90) * 2 - 1

    def pixelwise(x):
        return torch.sigmoid(3 * x[0, 0] - 2 * x[0, 1] + x[0, 2])

    def windows(f):  # the per-window model applied to each window of a batch
        return lambda x: [f(x[k : k + 1]) for k in range(len(x))]

    whole = pixelwise(image[None])
    tiled = sliding_window(image, tile=32, stride=20, predict_windows=windows(pixelwise))
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
    batched = sliding_window(image, tile=32, stride=20, predict_windows=windows(pixelwise), batch_size=4)
    assert torch.equal(batched, tiled)  # batching changes which windows go together, not the blend
    with pytest.raises(TextDiffError, match="at least 1, got 0"):
        sliding_window(image, tile=32, stride=20, predict_windows=windows(pixelwise), batch_size=0)
    small = sliding_window(image[:, :20, :25], tile=32, stride=20, predict_windows=windows(pixelwise))  # padded
    torch.testing.assert_close(small, whole[:20, :25], atol=1e-6, rtol=0)

    def two_maps(x):  # a probability and a distance map, as a model with the distance head gives
        return torch.stack([pixelwise(x), torch.sigmoid(x[0, 1])])

    tiny = sliding_window(image[:, :5, :7], tile=32, stride=20, predict_windows=windows(pixelwise))  # mirrored 6x
    torch.testing.assert_close(tiny, whole[:5, :7], atol=1e-6, rtol=0)
    both = sliding_window(image[:, :20, :25], tile=32, stride=20, predict_windows=windows(two_maps))  # padded
    assert both.shape == (2, 20, 25)
    torch.testing.assert_close(both[0], whole[:20, :25], atol=1e-6, rtol=0)
    torch.testing.assert_close(both[1], torch.sigmoid(image[1, :20, :25]), atol=1e-6, rtol=0)
    w = gaussian_window(32)
    assert w.max() == 1 and w.min() > 0 and w[16, 16] > w[0, 0]


def test_nucleus_table_has_one_row_per_separated_nucleus():
    nuclei = np.zeros((20, 20), np.int32)
    nuclei[2:5, 2:5] = 1  # 9 px
    nuclei[10:12, 10:13] = 2  # two touching nuclei: one blob in a mask, two rows here
    nuclei[10:12, 13:16] = 3
    rows = nucleus_table("img", nuclei, mpp=0.5)
    assert [r["area"] for r in rows] == [9, 6, 6]
    assert [r["area_um2"] for r in rows] == [2.25, 1.5, 1.5]
    assert rows[0]["centroid_y"] == 3.0 and rows[0]["centroid_x"] == 3.0
    assert (rows[1]["centroid_y"], rows[1]["centroid_x"]) == (10.5, 11.0)
    assert rows[0]["eccentricity"] == 0  # a square is round to its moments
    assert nucleus_table("img", nuclei)[0]["area_um2"] == ""  # unknown resolution: no micrometres


def test_predict_folder_with_a_corrupt_file(trained, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    src = trained.data_root / "Test_Folder" / "img"
    for f in sorted(src.iterdir()):
        shutil.copy(f, folder / f.name)
    big = np.asarray(Image.open(sorted(src.iterdir())[0]).convert("RGB").resize((57, 45)))
    Image.fromarray(big).save(folder / "odd_size.png")  # any size, not square
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(folder), "--out", str(out), "--text", "Many nuclei."])
    assert result.exit_code == 1, result.output
    assert "broken.png" in result.output and "Traceback" not in result.output
    ids = ["img_test_0", "img_test_1", "odd_size"]
    for image_id in ids:
        mask = np.asarray(Image.open(out / f"{image_id}_mask.png"))
        assert set(np.unique(mask)) <= {0, 255}
        assert (out / f"{image_id}_overlay.png").is_file()
    assert np.asarray(Image.open(out / "odd_size_mask.png")).shape == (45, 57)
    with h5py.File(out / "predictions.h5") as h5:
        assert sorted(h5) == ids
        assert h5["odd_size"].shape == (45, 57)
        assert h5["img_test_0"].attrs["text"] == "Many nuclei."
        assert h5["img_test_0"].attrs["source"].endswith("img_test_0.tif")
        assert "fusion" in h5.attrs["classifier"]
        probs = {k: h5[k][:] for k in h5}
    with open(out / "nuclei.csv") as f:
        rows = list(csv.DictReader(f))
    for image_id in ids:
        mask = np.asarray(Image.open(out / f"{image_id}_mask.png")) > 0
        assert np.array_equal(mask, probs[image_id] > 0.5)
        nuclei = np.asarray(Image.open(out / f"{image_id}_instances.png"))
        assert nuclei.dtype == np.uint16 and nuclei.shape == mask.shape
        assert not (nuclei > 0)[~mask].any()  # the nuclei lie inside the mask (small ones may be dropped)
        mine = [r for r in rows if r["image"] == image_id]
        assert len(mine) == nuclei.max() == len(np.unique(nuclei)) - (nuclei.min() == 0)
        assert sum(int(r["area"]) for r in mine) == int((nuclei > 0).sum())
    assert "img_test_0:" in result.output and "nuclei" in result.output


def test_tiled_prediction_equals_single_pass_where_it_fits(trained):
    """A 32 px image with 32 px windows: the sliding-window path gives the single-pass answer."""
    from textdiff.predict.images import build_segmenter

    segmenter, _ = build_segmenter(Path("models/classifier"), torch.device("cpu"), None, None)
    segmenter.rule = dataclasses.replace(segmenter.rule, refine_um=0.0)  # the maps as the windows give them
    image = np.asarray(
        Image.open(trained.data_root / "Train_Folder/img/img_train_0.png").convert("RGB").resize((32, 32)))
    single = segmenter.probabilities(image, "Few nuclei.", mpp=segmenter.working_mpp)  # at the working resolution
    segmenter.mode, segmenter.tile, segmenter.stride = "tiles", 32, 16
    tiled = segmenter.probabilities(image, "Few nuclei.", mpp=segmenter.working_mpp)
    np.testing.assert_allclose(tiled, single, atol=1e-6)
    segmenter.mode, segmenter.scale = "resize", 1.0  # scale 1: slide 32 px windows over a 32 px image
    np.testing.assert_allclose(segmenter.probabilities(image, "Few nuclei."), single, atol=1e-6)


def test_predict_needs_text_for_a_text_model(trained, tmp_path):
    img = trained.data_root / "Test_Folder" / "img" / "img_test_0.tif"
    result = runner.invoke(app, ["predict", str(img), "--out", str(tmp_path / "p")])
    assert result.exit_code == 1 and "--text" in result.output


def test_predict_reports_workbook_missing_row(trained, tmp_path, xlsx_writer):
    book = xlsx_writer(tmp_path / "r.xlsx", [("img_test_0.png", "Dense nuclei.")])
    folder = trained.data_root / "Test_Folder" / "img"
    result = runner.invoke(app, ["predict", str(folder), "--out", str(tmp_path / "p"), "--reports", str(book)])
    assert result.exit_code == 1
    assert "img_test_1" in result.output and "no report row" in result.output
    with h5py.File(tmp_path / "p" / "predictions.h5") as h5:
        assert list(h5) == ["img_test_0"] and h5["img_test_0"].attrs["text"] == "Dense nuclei."


def test_blend_tiles_needs_full_coverage_and_keeps_constants():
    origins = tile_grid(50, 40, 32, 24)
    probs = [torch.full((32, 32), 0.25) for _ in origins]
    torch.testing.assert_close(blend_tiles(probs, origins, 50, 40), torch.full((50, 40), 0.25))
    with pytest.raises(ValueError, match="cover"):
        blend_tiles(probs[:1], origins[:1], 50, 40)


def test_glass_windows_are_not_segmented_and_carry_no_weight():
    origins = tile_grid(50, 40, 32, 24)
    probs = [None if i % 2 else torch.full((32, 32), 0.75) for i in range(len(origins))]
    blended = blend_tiles(probs, origins, 50, 40)
    only_glass = torch.ones(50, 40, dtype=torch.bool)
    for prob, (y, x) in zip(probs, origins):
        if prob is not None:
            only_glass[y : y + 32, x : x + 32] = False
    # not diluted by glass
    torch.testing.assert_close(blended[~only_glass], torch.full_like(blended[~only_glass], 0.75))
    assert torch.all(blended[only_glass] == 0) and only_glass.any()
    with pytest.raises(ValueError, match="cover"):
        blend_tiles([None], origins[:1], 50, 40, tile=32)


def test_glass_gets_no_nuclei_however_the_classifier_reacts_to_it(trained):
    """Per-image normalisation stretches a blank window's noise; glass windows must not reach the
    classifier (the shipped model marked 13.6 % of plain glass as nuclei before this guard)."""
    from textdiff.predict.images import build_segmenter, is_glass

    segmenter, _ = build_segmenter(Path("models/classifier"), torch.device("cpu"), None, None)
    rng = np.random.default_rng(0)
    tissue = np.asarray(
        Image.open(trained.data_root / "Train_Folder/img/img_train_0.png").convert("RGB").resize((64, 64)))
    glass = np.clip(242 + rng.integers(-3, 4, (64, 64, 3)), 0, 255).astype(np.uint8)
    both = np.concatenate([tissue, glass], axis=1)  # 64 x 128 at the working resolution
    segmenter.mode, segmenter.tile, segmenter.stride = "tiles", 32, 32
    segmenter.stain = {}  # whole-image stain normalisation would see two different images; the guard is per window
    segmenter.rule = dataclasses.replace(segmenter.rule, refine_um=4 * segmenter.working_mpp)  # 4 px
    prob = segmenter.probabilities(both, "Few nuclei.", mpp=segmenter.working_mpp)
    assert prob[:, 64:].max() == 0.0  # the refinement by the image does not spread the tissue onto glass
    raw = segmenter.maps(both, "Few nuclei.", mpp=segmenter.working_mpp, refine=False)[0]
    assert raw[:, 64:].max() == 0.0 and not np.allclose(raw, prob, atol=1e-4)
    np.testing.assert_allclose(raw[:, :64], segmenter.maps(tissue, "Few nuclei.", mpp=segmenter.working_mpp,
                                                           refine=False)[0], atol=1e-6)
    model_range = lambda im: torch.from_numpy(im).permute(2, 0, 1)[None].float() / 127.5 - 1  # noqa: E731
    assert is_glass(model_range(glass)) and not is_glass(model_range(tissue))


def test_tiles_mode_end_to_end(tiny_project, tmp_path):
    """Native resolution: 40 px images cut into 32 px windows (stride 16 -> 2x2 windows each);
    evaluation scores the stitched full-size masks; predict slides the same windows."""
    import json

    # float32: the comparison below is fp16 cache vs fp32 live features at 1e-3; bfloat16 would add its own rounding
    tiny_project.write_params(data={"mode": "tiles", "tile": 32, "stride": 16},
                              train={**tiny_project.base["train"], "autocast": "float32"})
    assert runner.invoke(app, ["prepare"]).exit_code == 0
    result = runner.invoke(app, ["extract"])
    assert result.exit_code == 0, result.output
    from textdiff.cache.store import FeatureCache

    cache = FeatureCache("cache/features.zarr")
    assert cache.spec.mode == "tiles" and cache.spec.full_size == 40
    test = cache.split("test")
    assert len(test) == 2 * 4 and test.ids[1] == "img_test_0@0,8"
    image_ids, index, origins = test.tile_layout()
    assert image_ids == ["img_test_0", "img_test_1"] and index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert runner.invoke(app, ["train"]).exit_code == 0
    evaluated = runner.invoke(app, ["evaluate"])
    assert evaluated.exit_code == 0, evaluated.output
    with h5py.File("metrics/predictions.h5") as h5:
        assert sorted(h5) == ["img_test_0", "img_test_1"] and h5["img_test_0"].shape == (40, 40)
        stitched = h5["img_test_0"][:]
    panel = np.asarray(Image.open("metrics/panels/img_test_0.png"))
    assert panel.shape[0] > 2 * 80 and panel.shape[1] > 2 * 80  # a 2x2 grid of the 40 px image, x2
    assert json.loads(Path("metrics/test.json").read_text())["num_images"] == 2

    out = tmp_path / "pred"
    img = tiny_project.data_root / "Test_Folder" / "img" / "img_test_0.tif"
    predicted = runner.invoke(app, ["predict", str(img), "--out", str(out), "--text", "The nuclei are evenly "
                                                                                      "distributed."])
    assert predicted.exit_code == 0, predicted.output
    with h5py.File(out / "predictions.h5") as h5:
        np.testing.assert_allclose(h5["img_test_0"][:], stitched, atol=1e-3)  # fp16 cache vs fp32 live


def test_predict_bad_inputs_are_one_line_and_keep_earlier_results(trained, tmp_path, xlsx_writer):
    """Every refusal is one line with no traceback; a run where every image fails leaves the
    previous predictions.h5 / nuclei.csv as they were, and a partial failure is recorded in the file."""
    good = trained.data_root / "Test_Folder" / "img" / "img_test_0.tif"
    out = tmp_path / "pred"

    def predict(*args: str):
        result = runner.invoke(app, ["predict", *args])
        assert "Traceback" not in result.output
        return result

    assert predict(str(good), "--out", str(out), "--text", "Many nuclei.").exit_code == 0
    before = {name: (out / name).read_bytes() for name in ("predictions.h5", "nuclei.csv")}
    with h5py.File(out / "predictions.h5") as h5:
        assert list(h5) == ["img_test_0"] and h5.attrs["failed"] == "[]"

    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:200])
    result = predict(str(broken), "--out", str(out), "--text", "Many nuclei.")
    assert result.exit_code == 1 and "broken.png" in result.output and "were not written" in result.output
    assert {name: (out / name).read_bytes() for name in before} == before

    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(good, folder / good.name)
    shutil.copy(broken, folder / broken.name)
    assert predict(str(folder), "--out", str(out), "--text", "Many nuclei.").exit_code == 1
    with h5py.File(out / "predictions.h5") as h5:
        assert list(h5) == ["img_test_0"]
        failed = json.loads(h5.attrs["failed"])
        assert len(failed) == 1 and "broken.png" in failed[0]

    no_truth = tmp_path / "no_truth"
    no_truth.mkdir()
    result = predict(str(good), "--out", str(tmp_path / "p1"), "--text", "Many nuclei.", "--masks", str(no_truth))
    assert result.exit_code == 0 and "1 image(s) have no ground truth <id>.png" in result.output
    assert not (tmp_path / "p1" / "img_test_0_panel.png").exists()

    result = predict(str(good), "--out", str(tmp_path / "p2"), "--text", "   ")
    assert result.exit_code == 1 and "--text is empty" in result.output
    book = xlsx_writer(tmp_path / "r.xlsx", [("img_test_0.tif", "")])
    result = predict(str(good), "--out", str(tmp_path / "p3"), "--reports", str(book))
    assert result.exit_code == 1 and "img_test_0" in result.output and "is empty" in result.output
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    result = predict(str(good), "--out", str(a_file), "--text", "Many nuclei.")
    assert result.exit_code == 1 and "must be a folder" in result.output
    result = predict(str(good), "--out", str(tmp_path / "p4"), "--text", "Many nuclei.", "--device", "gpu0")
    assert result.exit_code == 1 and "unknown device 'gpu0'" in result.output

    model = tmp_path / "model"
    shutil.copytree(Path("models/classifier"), model)
    (model / "model.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    result = predict(str(good), "--out", str(tmp_path / "p5"), "--text", "x", "--model", str(model))
    assert result.exit_code == 1 and "model.pt: not a loadable weights-only PyTorch file" in result.output
    torch.save(torch.zeros(3), model / "model.pt")
    result = predict(str(good), "--out", str(tmp_path / "p6"), "--text", "x", "--model", str(model))
    assert result.exit_code == 1 and "holds a Tensor" in result.output
    assert not (tmp_path / "p5" / "predictions.h5").exists() and not (tmp_path / "p6" / "predictions.h5").exists()


def test_more_nuclei_than_a_label_image_holds_is_one_line(trained, tmp_path, monkeypatch):
    """`<id>_instances.png` is uint16: an image whose nuclei do not fit is refused in one line that
    points to slides, and none of its files is written (the run's other images are unaffected)."""
    import textdiff.predict.run as run

    good = trained.data_root / "Test_Folder" / "img" / "img_test_0.tif"
    monkeypatch.setattr(run, "separate", lambda prob, *a: np.full(prob.shape, 70_000, np.int32))
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(good), "--out", str(out), "--text", "Many nuclei."])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "70000 nuclei do not fit a 16-bit label image" in result.output.replace("\n", " ")
    assert "as a slide" in result.output
    assert not list(out.glob("img_test_0_*.png"))


def test_a_small_image_is_mirrored_out_to_the_window_not_smeared():
    from textdiff.predict.images import mirror_pad

    image = torch.arange(12.0).reshape(1, 3, 4)
    padded = mirror_pad(image, 10)
    assert padded.shape == (1, 10, 10)
    torch.testing.assert_close(padded[:, :3, :4], image)
    torch.testing.assert_close(padded[:, :3, 4:7], image[:, :, :3].flip(-1))  # reflection, border not repeated
    rows = {tuple(padded[0, r].tolist()) for r in range(10)}
    assert rows <= {tuple(padded[0, r].tolist()) for r in range(3)}  # every row is one of the image's
    assert mirror_pad(image, 3) is image


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise runs."""


def _predict_outputs(out: Path) -> dict:
    """Everything a user reads from --out, as comparable values."""
    with h5py.File(out / "predictions.h5", "r") as h5:
        maps = {k: np.asarray(h5[k]) for k in h5}
        texts = {k: h5[k].attrs["text"] for k in h5}
    pictures = {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}
    return {"maps": maps, "texts": texts, "csv": (out / "nuclei.csv").read_text(), "pictures": pictures}


def _assert_same(a: dict, b: dict) -> None:
    assert a["maps"].keys() == b["maps"].keys() and a["texts"] == b["texts"] and a["csv"] == b["csv"]
    assert all(np.array_equal(a["maps"][k], b["maps"][k]) for k in a["maps"])
    assert a["pictures"].keys() == b["pictures"].keys()
    assert all(np.array_equal(a["pictures"][k], b["pictures"][k]) for k in a["pictures"])


def test_a_killed_prediction_resumes_and_a_finished_one_is_skipped(trained, tmp_path, monkeypatch):
    import textdiff.predict.run as run

    images = tmp_path / "images"
    images.mkdir()
    for k, src in enumerate(sorted((trained.data_root / "Test_Folder" / "img").iterdir()) * 2):
        shutil.copy(src, images / f"im{k}{src.suffix}")  # 4 images
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    args = ["predict", str(images), "--text", "Many nuclei."]
    assert runner.invoke(app, [*args, "--out", str(fresh)]).exit_code == 0
    reference = _predict_outputs(fresh)
    assert not list((fresh / ".textdiff-predict").glob("*.npz"))  # the maps live in predictions.h5 only

    real, seen = run.segment_image, []

    def dies_at_the_third(*a, **k):
        seen.append(a[1].stem)
        if len(seen) == 3:
            raise _Killed
        return real(*a, **k)

    monkeypatch.setattr(run, "segment_image", dies_at_the_third)
    with pytest.raises(_Killed):
        runner.invoke(app, [*args, "--out", str(out)], catch_exceptions=False)
    assert not (out / "predictions.h5").exists() and not (out / "nuclei.csv").exists()  # never half-written

    seen.clear()
    monkeypatch.setattr(run, "segment_image", lambda *a, **k: (seen.append(a[1].stem), real(*a, **k))[1])
    resumed = runner.invoke(app, [*args, "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert seen == ["im2", "im3"] and "2 of 4 inputs were already segmented" in resumed.output
    _assert_same(_predict_outputs(out), reference)

    seen.clear()
    again = runner.invoke(app, [*args, "--out", str(out)])  # maps now read back from predictions.h5
    assert again.exit_code == 0 and not seen and "4 of 4 inputs were already segmented" in again.output
    _assert_same(_predict_outputs(out), reference)

    changed = next(images.glob("im1.*"))
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))  # the file was edited
    edited = runner.invoke(app, [*args, "--out", str(out)])
    assert edited.exit_code == 0 and seen == ["im1"]
    seen.clear()
    other_text = runner.invoke(app, ["predict", str(images), "--text", "Few nuclei.", "--out", str(out)])
    assert other_text.exit_code == 0 and len(seen) == 4  # another report: every image again
    seen.clear()
    redo = runner.invoke(app, ["predict", str(images), "--text", "Few nuclei.", "--out", str(out), "--overwrite"])
    assert redo.exit_code == 0 and len(seen) == 4 and "already segmented" not in redo.output


def test_batched_windows_give_the_maps_of_one_window_at_a_time(trained):
    """--batch-size: a window's maps do not depend on its batch-mates (shared teacher noise, per-image
    normalisation), so batches of 3 (not a divisor of the window count) give the same maps, glass
    windows included."""
    from textdiff.predict.images import build_segmenter

    rng = np.random.default_rng(3)
    image = rng.integers(40, 200, (150, 130, 3), dtype=np.uint8)
    image[:45, :] = 255  # a band of glass: its windows are skipped in every batching
    one, _ = build_segmenter(Path("models/classifier"), torch.device("cpu"), None, None)
    three, _ = build_segmenter(Path("models/classifier"), torch.device("cpu"), None, None, batch_size=3)
    text = "The nuclei density is high."
    (p1, d1), (p3, d3) = one.maps(image, text), three.maps(image, text)
    assert p1.shape == image.shape[:2] and d1 is not None
    np.testing.assert_allclose(p3, p1, atol=1e-5, rtol=0)
    np.testing.assert_allclose(d3, d1, atol=1e-5, rtol=0)
    assert (p1[:20] == 0).all()  # rows only the glass band's windows cover were not segmented


def test_undo_view_inverts_every_dihedral_view():
    from textdiff.data.views import apply_view, undo_view

    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(2, 5, 7)
    for k in range(8):
        assert torch.equal(undo_view(apply_view(x, k), k), x), k


def test_averaging_the_eight_views_makes_the_maps_turn_with_the_image(trained):
    """views=8: the teacher sees every dihedral view and the maps are averaged, so the result no
    longer depends on the image's orientation (one window, no resize: exact up to float sums),
    which one view's maps do."""
    from textdiff.predict.images import build_segmenter

    segmenter, _ = build_segmenter(Path("models/classifier"), torch.device("cpu"), None, 1.0)
    rng = np.random.default_rng(5)
    image = rng.integers(40, 200, (32, 32, 3), dtype=np.uint8)
    turned = np.ascontiguousarray(np.rot90(image))
    text = "The nuclei density is high."
    one, one_turned = segmenter.maps(image, text)[0], segmenter.maps(turned, text)[0]
    assert np.abs(np.rot90(one) - one_turned).max() > 1e-4  # the teacher is not equivariant
    segmenter.views = 8
    (eight, d8), (eight_turned, d8_turned) = segmenter.maps(image, text), segmenter.maps(turned, text)
    np.testing.assert_allclose(np.rot90(eight), eight_turned, atol=1e-5)
    np.testing.assert_allclose(np.rot90(d8), d8_turned, atol=1e-5)
    assert not np.allclose(eight, one, atol=1e-4)
    with pytest.raises(TextDiffError, match="views must be 1, 2, 4 or 8"):
        dataclasses.replace(segmenter, views=3)


def test_predict_views_averages_the_teachers_views_and_is_its_own_record(trained, tmp_path):
    """--views 4: other maps than one view's (recorded in predictions.h5), so a later run with
    another --views redoes the image instead of skipping it; an unsupported count is one line."""
    folder = trained.data_root / "Test_Folder" / "img"
    out = tmp_path / "pred"
    args = ["predict", str(folder), "--out", str(out), "--text", "Many nuclei."]
    assert runner.invoke(app, args).exit_code == 0
    with h5py.File(out / "predictions.h5") as h5:
        one = {k: h5[k][:] for k in h5}
        assert h5.attrs["views"] == 1
    result = runner.invoke(app, [*args, "--views", "4"])
    assert result.exit_code == 0, result.output
    assert "skipped" not in result.output.lower()
    with h5py.File(out / "predictions.h5") as h5:
        assert h5.attrs["views"] == 4 and sorted(h5) == sorted(one)
        assert all(not np.array_equal(h5[k][:], one[k]) for k in one)
    bad = runner.invoke(app, [*args, "--views", "3"])
    assert bad.exit_code != 0 and "views must be 1, 2, 4 or 8" in bad.output and "Traceback" not in bad.output


def test_predict_refines_the_foreground_by_the_image_as_its_rule_says(trained):
    """A rule with `refine_um` (chosen on val) refines the probability by the image it was given,
    the very function evaluate applies to the source image; slides ask for the raw maps."""
    from textdiff.model.nuclei import NucleusRule
    from textdiff.model.refine import refine_probability
    from textdiff.predict.images import build_segmenter

    segmenter, _ = build_segmenter(Path("models/classifier"), torch.device("cpu"), None, None)
    segmenter.rule = NucleusRule("edt", 0.5, refine_um=1.0)
    image = np.asarray(
        Image.open(trained.data_root / "Train_Folder/img/img_train_0.png").convert("RGB").resize((48, 48)))
    raw, distance = segmenter.maps(image, "Few nuclei.", mpp=0.25, refine=False)
    refined, same_distance = segmenter.maps(image, "Few nuclei.", mpp=0.25)
    np.testing.assert_array_equal(refined, refine_probability(raw, image, 1.0, 0.25))
    assert not np.allclose(refined, raw, atol=1e-4)
    assert (distance is None and same_distance is None) or np.array_equal(distance, same_distance)

"""baseline.kind: cellpose: Cellpose 3 from scratch through the same train/evaluate stages, its own
nuclei scored as they are, its thresholds chosen on val, and one line for every input it cannot use."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stages import prepare
from stages.cli import app
from textdiff.cache.store import FeatureCache
from textdiff.errors import TextDiffError
from textdiff.evaluation.metrics import instance_scores
from textdiff.evaluation.scoring import score_test, working_coverage
from textdiff.paths import CACHE_PATH, PREPARED_DIR
from textdiff.train.cellpose import CELLPROB_THRESHOLDS, FLOW_THRESHOLDS, training_diameter
from textdiff.train.training import labeled_subset

runner = CliRunner()
RGB = {"teacher": {"kind": "rgb", "checkpoint": ""}}  # no teacher to run: the cache holds pixels and labels
TINY_CELLPOSE = {"kind": "cellpose", "cellpose_epochs": 2, "cellpose_batch_size": 2}  # ~4 s of training


def _one_line_failure(result) -> str:
    """The CLI's answer to bad input: a non-zero exit and one line, no traceback."""
    assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def _cut_largest(truth: np.ndarray, n: int = 1) -> np.ndarray:
    """The truth with its `n` largest nuclei cut in two: a watershed of the foreground would join them."""
    labels = truth.astype(np.int32)
    for nucleus in np.argsort(-np.bincount(labels.ravel())[1:], kind="stable")[:n] + 1:
        ys, xs = np.nonzero(labels == nucleus)
        lower = ys > np.median(ys)
        labels[ys[lower], xs[lower]] = labels.max() + 1
    return labels


def test_the_training_diameter_is_the_median_equivalent_diameter_of_all_nuclei():
    a = np.zeros((20, 20), np.uint16)
    a[:2, :2] = 1  # area 4
    a[5:9, 5:9] = 2  # area 16
    b = np.zeros((10, 10), np.uint16)
    b[:3, :3] = 7  # area 9 (ids need not be consecutive)
    assert training_diameter([a, b]) == pytest.approx(np.sqrt(4 * 9 / np.pi))
    with pytest.raises(TextDiffError, match="hold no nucleus"):
        training_diameter([np.zeros((4, 4), np.uint16)])


def test_the_thresholds_are_those_of_best_mean_val_aji(monkeypatch):
    """Coordinate search on the validation images by mean AJI; the network runs once per image."""
    from textdiff.baselines.cellpose import CellposeRule
    from textdiff.train import cellpose as training

    truths = [np.kron(np.arange(1, 5, dtype=np.int32).reshape(2, 2), np.ones((6, 6), np.int32)) for _ in range(2)]
    right = CellposeRule(9.0, 0.5, 0.6)
    calls = []
    monkeypatch.setattr(training, "flows", lambda model, image, diameter: calls.append(diameter) or image)
    cuts = {right: 0, CellposeRule(9.0, 0.5, 0.4): 1}  # the best pair, reached from the best cellprob at flow 0.4
    monkeypatch.setattr(training, "nuclei", lambda maps, rule, device: _cut_largest(maps, cuts.get(rule, 2)))
    choice = training.choose_thresholds(None, truths, truths, 9.0, torch.device("cpu"))
    assert choice.rule == right and choice.aji == 1.0 and calls == [9.0, 9.0]
    searched = [(c, f) for c, f, _, _ in choice.tried]
    assert searched == [(c, 0.4) for c in CELLPROB_THRESHOLDS] + [(0.5, f) for f in FLOW_THRESHOLDS[1:]]
    # ties go to cellpose's defaults
    monkeypatch.setattr(training, "nuclei", lambda maps, rule, device: maps)
    assert training.choose_thresholds(None, truths, truths, 9.0, torch.device("cpu")).rule == CellposeRule(9.0)


def test_cellpose_cannot_download_anything():
    """The environment has no network: a request for pretrained weights must fail at once, in one line."""
    pytest.importorskip("cellpose")
    from cellpose import models, utils

    from textdiff.baselines.cellpose import offline

    saved = utils.download_url_to_file
    with offline(), pytest.raises(TextDiffError, match="cellpose tried to download .*cyto3"):
        utils.download_url_to_file(f"{models._MODEL_URL}/cyto3", "/nonexistent/cyto3")
    assert utils.download_url_to_file is saved


def test_cellpose_is_evaluated_on_its_own_nuclei(tiny_project):
    """Its nuclei are scored as they are, never separated by our watershed: scoring given label maps
    gives exactly their per-image instance scores, and their foreground is the binary prediction."""
    tiny_project.write_params(**RGB)
    assert runner.invoke(app, ["extract"]).exit_code == 0
    cache = FeatureCache(CACHE_PATH)
    test = cache.split("test")
    truths = [test.full_instances(k) for k in range(len(test))]
    own = [_cut_largest(t) for t in truths]
    probs = working_coverage(test, own)
    preds = [(p > 0.5).astype(np.uint8) for p in probs]
    gts = [test.mask(k, 0).numpy().astype(np.uint8) for k in range(len(test))]
    result = score_test(cache, preds, gts, probs, panels=0, instances=own)
    expected = [instance_scores(labels, t) for labels, t in zip(own, truths)]
    assert result.metrics["aji_instance"] == pytest.approx(np.mean([e["aji_instance"] for e in expected]))
    assert result.metrics["aji_instance"] < 1.0  # the cut nucleus costs what it should
    assert all(np.array_equal(n, labels) for n, labels in zip(result.nuclei, own))
    # native binary metrics from exactly their foreground (which equals the truth's: Dice 1)
    assert result.metrics["dice_native"] == pytest.approx(1.0)
    assert result.metrics["nuclei"] == sum(int(labels.max()) for labels in own)


def test_cellpose_trains_from_scratch_and_is_evaluated(tiny_project, monkeypatch):
    """Two epochs on 40-px images: the plumbing, not the quality (its nuclei are usually none yet,
    so the last part hands evaluate known nuclei to check that they are what it writes and scores)."""
    pytest.importorskip("cellpose")
    from textdiff.baselines.cellpose import load_cellpose, predict_nuclei
    from textdiff.data.sources import source_images

    tiny_project.write_params(**RGB)
    assert runner.invoke(app, ["extract"]).exit_code == 0
    tiny_project.write_params(**RGB, baseline={**TINY_CELLPOSE, "cellpose_crops_per_epoch": 3},
                              train={"num_labeled": 2, "seed": 3})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    card = json.loads(Path("models/classifier/model.json").read_text())
    cache = FeatureCache(CACHE_PATH)
    train = cache.split("train")
    assert card["kind"] == "cellpose" and card["cellpose"]["diam_mean"] == 30.0
    assert card["train_ids"] == [train.ids[i] for i in labeled_subset(len(train), 2, 3)]
    rule = card["cellpose_rule"]
    labelled = [train.full_instances(train.ids.index(i)) for i in card["train_ids"]]
    assert rule["diameter"] == pytest.approx(training_diameter(labelled))
    assert len(card["thresholds_tried"]) == len(CELLPROB_THRESHOLDS) + len(FLOW_THRESHOLDS) - 1
    best = max(card["thresholds_tried"], key=lambda t: t["aji_instance"])  # chosen on val, by mean AJI
    assert (rule["cellprob_threshold"], rule["flow_threshold"]) == (best["cellprob_threshold"], best["flow_threshold"])
    assert card["val_aji_instance"] == best["aji_instance"]
    stats = json.loads(Path("metrics/train.json").read_text())
    assert stats["baseline"] == "cellpose" and stats["num_train"] == 2 and stats["epochs"] == 2
    assert stats["crops_per_epoch"] == 3  # more crops than labelled images: the label grid's fixed budget

    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("metrics/test.json").read_text())
    test = cache.split("test")
    assert metrics["num_images"] == len(test) and "aji_instance" in metrics and "pq_instance" in metrics
    with h5py.File("metrics/instances.h5") as h5:
        saved = {k: np.asarray(h5[k]) for k in h5}
        assert json.loads(h5.attrs["nuclei_rule"]) == rule
    assert list(saved) == test.ids
    for labels in saved.values():
        assert labels.shape == (cache.spec.full_size, cache.spec.full_size) and labels.dtype == np.uint16
    # the labels scored are Cellpose's own, predicted again here from the source images
    model, cp_rule, _ = load_cellpose(Path("models/classifier"), torch.device("cpu"))
    again = predict_nuclei(model, source_images(PREPARED_DIR, "test", test.ids), cp_rule, model.device)
    assert all(np.array_equal(saved[i], a) for i, a in zip(test.ids, again))
    per_image = json.loads(Path("metrics/test_per_image.json").read_text())["images"]
    for k, row in enumerate(per_image):
        expected = instance_scores(saved[row["id"]], test.full_instances(k))
        assert row["aji_instance"] == pytest.approx(expected["aji_instance"])
    with h5py.File("metrics/predictions.h5") as h5:
        assert h5[test.ids[0]].shape == (cache.spec.image_size,) * 2
        assert "covered by the model's own nuclei" in h5[test.ids[0]].attrs["description"]
    # evaluate writes and scores Cellpose's nuclei as they are, whatever they are
    known = [_cut_largest(test.full_instances(k)) for k in range(len(test))]
    monkeypatch.setattr("textdiff.evaluation.scoring.predict_nuclei", lambda *args, **kwargs: known)
    assert runner.invoke(app, ["evaluate"]).exit_code == 0
    metrics = json.loads(Path("metrics/test.json").read_text())
    expected = [instance_scores(labels, test.full_instances(k)) for k, labels in enumerate(known)]
    assert metrics["aji_instance"] == pytest.approx(np.mean([e["aji_instance"] for e in expected]))
    assert 0 < metrics["aji_instance"] < 1 and metrics["dice_native"] == pytest.approx(1.0)
    with h5py.File("metrics/instances.h5") as h5:
        assert all(np.array_equal(h5[i], labels) for i, labels in zip(test.ids, known))
    # predict refuses it in one line, as every baseline
    result = runner.invoke(app, ["predict", str(tiny_project.data_root / "Test_Folder" / "img"), "--out", "out"])
    assert result.exit_code != 0 and "cellpose baseline" in result.output and "Traceback" not in result.output


def test_the_source_images_are_those_prepare_read(tiny_project):
    """Native pixels come from the files the manifest names, stain-normalised as prepare did; a file
    edited since prepare is refused in one line rather than mixed with the cache of the old one."""
    from PIL import Image

    from textdiff.data.prepared import load_prepared
    from textdiff.data.sources import source_images

    prepared = load_prepared(PREPARED_DIR, "train")
    images = source_images(PREPARED_DIR, "train", prepared.ids)
    assert [im.shape for im in images] == [(40, 40, 3)] * len(prepared)
    source = tiny_project.data_root / "Train_Folder" / "img" / f"{prepared.ids[0]}.png"
    assert np.array_equal(images[0], np.asarray(Image.open(source).convert("RGB")))  # data.stain: none here
    Image.fromarray(255 - images[0]).save(source)
    with pytest.raises(TextDiffError, match=r"img_train_0.png: changed since `textdiff prepare` read it"):
        source_images(PREPARED_DIR, "train", prepared.ids)
    with pytest.raises(TextDiffError, match="no image 'elsewhere' in split 'train'"):
        source_images(PREPARED_DIR, "train", ["elsewhere"])


def test_a_cache_without_instances_is_refused_before_any_work(tiny_project):
    tiny_project.write_params(**RGB, data={**tiny_project.base["data"], "instances": ""})
    prepare.run(tiny_project.params_path)
    assert runner.invoke(app, ["extract"]).exit_code == 0
    tiny_project.write_params(**RGB, data={**tiny_project.base["data"], "instances": ""}, baseline={"kind": "cellpose"})
    line = _one_line_failure(runner.invoke(app, ["train"]))
    assert "baseline.kind=cellpose trains on per-nucleus labels" in line and "data.instances" in line
    assert not Path("models/classifier").exists() and not Path("metrics/train.json").exists()


def test_without_the_package_one_line_says_how_to_install_it(tiny_project, monkeypatch):
    tiny_project.write_params(**RGB)
    assert runner.invoke(app, ["extract"]).exit_code == 0
    tiny_project.write_params(**RGB, baseline={"kind": "cellpose"})

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr("textdiff.baselines.cellpose.metadata.version", missing)
    line = _one_line_failure(runner.invoke(app, ["train"]))
    assert 'pip install --no-deps "cellpose>=3.1,<4"' in line
    assert not Path("models/classifier").exists()
    monkeypatch.setattr("textdiff.baselines.cellpose.metadata.version", lambda name: "4.0.1")
    line = _one_line_failure(runner.invoke(app, ["train"]))
    assert "version 4.0.1" in line and 'pip install --no-deps "cellpose>=3.1,<4"' in line

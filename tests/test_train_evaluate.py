"""Stage two end to end on a tiny cache: train reads only the cache, evaluate writes metrics."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from stages.cli import app
from textdiff.cache.store import FeatureCache
from textdiff.evaluation.metrics import instance_scores, iou_dice_textdiff
from textdiff.train.training import labeled_subset

runner = CliRunner()


@pytest.fixture
def extracted(tiny_project):
    result = runner.invoke(app, ["extract"])
    assert result.exit_code == 0, result.output
    return tiny_project


def test_train_then_evaluate(extracted, monkeypatch):
    # The teacher must never run in stage two.
    import textdiff.teacher.features as features

    monkeypatch.setattr(features.FeatureExtractor, "__call__", lambda *a: pytest.fail("teacher ran in stage two"))
    trained = runner.invoke(app, ["train"])
    assert trained.exit_code == 0, trained.output
    assert Path("models/classifier/model.pt").is_file()
    meta = json.loads(Path("models/classifier/model.json").read_text())
    assert meta["classifier"]["fusion"] == "cross_attention" and 1 <= meta["best_epoch"] <= 2
    train_metrics = json.loads(Path("metrics/train.json").read_text())
    logged = np.loadtxt("dvclive/train/plots/metrics/val/dice.tsv", skiprows=1, usecols=-1, ndmin=1)
    assert len(logged) == 2  # one validation Dice per epoch
    assert train_metrics["val_dice"] == pytest.approx(logged.max()) == pytest.approx(meta["best_val_dice"])
    assert meta["best_epoch"] == int(np.argmax(logged)) + 1  # the kept weights are the best epoch's

    evaluated = runner.invoke(app, ["evaluate"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(Path("metrics/test.json").read_text())
    per_image = json.loads(Path("metrics/test_per_image.json").read_text())["images"]
    assert metrics["num_images"] == 2 and [r["id"] for r in per_image] == ["img_test_0", "img_test_1"]
    for key in ("dice", "iou", "aji", "pq"):  # the summary is the mean of the per-image scores
        assert metrics[key] == pytest.approx(np.mean([r[key] for r in per_image])), key
    test = FeatureCache("cache/features.zarr").split("test")
    with h5py.File("metrics/predictions.h5") as h5:
        assert sorted(h5) == ["img_test_0", "img_test_1"]
        assert h5.attrs["fusion"] == "cross_attention"
        for k, row in enumerate(per_image):  # the stored probabilities are what was scored
            prob = h5[row["id"]][:]
            assert prob.shape == (32, 32)
            dice, iou = iou_dice_textdiff((prob > 0.5).astype(np.uint8), test.mask(k, 0).numpy())
            assert dice == pytest.approx(row["dice"]) and iou == pytest.approx(row["iou"])
    assert sorted(p.name for p in Path("metrics/panels").iterdir()) == ["img_test_0.png", "img_test_1.png"]

    # separated nuclei: scored against the per-nucleus truth at the source size, and stored so that
    # scoring metrics/instances.h5 independently gives the same numbers
    assert meta["classifier"]["distance_head"] and meta["nuclei"]["seeds"] in ("distance", "edt")
    assert 0 <= train_metrics["val_aji_instance"] <= 1
    for key in ("aji_instance", "aji_plus_instance", "pq_instance", "dq_instance", "sq_instance"):
        assert metrics[key] == pytest.approx(np.mean([r[key] for r in per_image])), key
    with h5py.File("metrics/instances.h5") as h5:
        assert sorted(h5) == ["img_test_0", "img_test_1"]
        for k, row in enumerate(per_image):
            labels = h5[row["id"]][:]
            assert labels.shape == (40, 40) and labels.dtype.kind == "u"
            again = instance_scores(labels, test.full_instances(k))
            assert again["aji_instance"] == pytest.approx(row["aji_instance"])
            assert again["pq_instance"] == pytest.approx(row["pq_instance"])
            assert row["nuclei"] == len(np.unique(labels)) - 1


@pytest.mark.parametrize("fusion", ["none", "concat", "hierarchical"])
def test_each_fusion_trains(extracted, fusion):
    extracted.write_params(train={"epochs": 1, "d_model": 16, "heads": 2, "fusion": fusion, "num_labeled": 2,
                                  "contrastive_weight": 0.0 if fusion == "none" else 0.5})
    trained = runner.invoke(app, ["train"])
    assert trained.exit_code == 0, trained.output
    meta = json.loads(Path("models/classifier/model.json").read_text())
    assert meta["classifier"]["fusion"] == fusion and len(meta["train_ids"]) == 2


def test_evaluate_without_a_classifier_is_one_line(extracted):
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 1
    assert "models/classifier/model.json: trained classifier not found" in result.output
    assert "Traceback" not in result.output


def test_contrastive_with_fusion_none_is_refused(extracted):
    extracted.write_params(train={"fusion": "none", "contrastive_weight": 0.1})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1 and "train.contrastive_weight" in result.output
    assert not Path("models/classifier").exists()


def test_labeled_subsets_are_nested_and_seeded():
    a, b = labeled_subset(24, 6, 40), labeled_subset(24, 12, 40)
    assert set(a) <= set(b) and len(a) == 6 and len(b) == 12
    assert labeled_subset(24, 6, 40) == a and labeled_subset(24, 6, 41) != a
    assert labeled_subset(24, 0, 40) == list(range(24))


def test_a_dataset_of_masks_alone_trains_binary_and_an_explicit_distance_target_is_refused(tiny_project, capsys):
    """Without instance maps: prepare says so once, `auto` trains the binary target and evaluate
    writes no instance metrics; `train.target: distance` is one line before any work."""
    from stages import prepare

    tiny_project.write_params(data={"instances": str(tiny_project.root / "no-such-folder")})
    prepare.run(tiny_project.params_path)
    assert "instance targets and metrics are off" in capsys.readouterr().out
    assert runner.invoke(app, ["extract"]).exit_code == 0
    tiny_project.write_params(data={"instances": str(tiny_project.root / "no-such-folder")},
                              train={"target": "distance"})
    refused = runner.invoke(app, ["train"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "train.target=distance needs per-nucleus ground truth" in refused.output.replace("\n", " ")
    assert not Path("models/classifier").exists()
    tiny_project.write_params(data={"instances": str(tiny_project.root / "no-such-folder")},
                              train={"epochs": 1, "target": "auto"})
    assert runner.invoke(app, ["train"]).exit_code == 0
    assert not json.loads(Path("models/classifier/model.json").read_text())["classifier"]["distance_head"]
    assert runner.invoke(app, ["evaluate"]).exit_code == 0
    metrics = json.loads(Path("metrics/test.json").read_text())
    assert "aji_instance" not in metrics and metrics["nuclei"] > 0  # separated, just not scored

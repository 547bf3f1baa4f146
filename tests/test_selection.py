"""A cache regrouped into other splits (`textdiff.cache.selection`) reads exactly the source items,
trains and scores like the cache itself; the leave-organ-out benchmark's regrouping and organ table."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from leave_organ_out import ORGANS_CSV, organ_table, regroup  # noqa: E402

from textdiff.cache.samples import SampleStore  # noqa: E402
from textdiff.cache.selection import SelectedCache  # noqa: E402
from textdiff.cache.store import FeatureCache  # noqa: E402
from textdiff.errors import TextDiffError  # noqa: E402
from textdiff.evaluation.scoring import score_test  # noqa: E402
from textdiff.model.card import load_trained, nuclei_rule, read_model_dir  # noqa: E402
from textdiff.model.inference import predict_split  # noqa: E402
from textdiff.params import load_params  # noqa: E402
from textdiff.paths import CACHE_PATH, CLASSIFIER_DIR, PREPARED_DIR  # noqa: E402
from textdiff.train.training import train_classifier  # noqa: E402


def test_a_selection_reads_the_items_it_names_in_its_order(trained):
    cache = FeatureCache(CACHE_PATH)
    picks = [("val", 1), ("train", 2), ("test", 0), ("train", 0)]
    ids = [(s, cache.split(s).ids[i]) for s, i in picks]
    selected = SelectedCache(cache, {"train": ids}).split("train")
    assert selected.ids == [i for _, i in ids] and len(selected) == 4
    assert selected.texts == [cache.split(s).texts[i] for s, i in picks]
    approximate = selected.approximate()
    for k, (s, i) in enumerate(picks):
        source = cache.split(s)
        for a, b in zip(selected.features(k), source.features(i)):
            assert torch.equal(a, b)
        assert torch.equal(selected.features(k, 0)[0], source.features(i, 0)[0])
        assert torch.equal(selected.mask(k), source.mask(i))
        assert torch.equal(selected.distance(k, 0), source.distance(i, 0))
        assert np.array_equal(selected.full_instances(k), source.full_instances(i))
        assert all(torch.equal(a, b) for a, b in zip(selected.text(k), source.text(i)))
        assert approximate[k] == source.approximate()[i]
    assert selected.feature_bytes() == cache.split("train").feature_bytes()


def test_a_selection_refuses_what_the_cache_does_not_hold(trained):
    cache = FeatureCache(CACHE_PATH)
    with pytest.raises(TextDiffError, match="no image img_train_9 in its 'train' split"):
        SelectedCache(cache, {"train": [("train", "img_train_9")]})
    with pytest.raises(TextDiffError, match="at least one image"):
        SelectedCache(cache, {"val": []})
    with pytest.raises(TextDiffError, match="has no 'test' split"):
        SelectedCache(cache, {"train": [("train", "img_train_0")]}).split("test")


def test_the_whole_test_split_as_a_selection_scores_what_evaluate_wrote(trained):
    from typer.testing import CliRunner

    from stages.cli import app

    assert CliRunner().invoke(app, ["evaluate"]).exit_code == 0
    expected = json.loads(Path("metrics/test.json").read_text())
    assert expected.pop("views") == 1  # a selection scores view 0, as this cache's evaluate did
    cache = FeatureCache(CACHE_PATH)
    selected = SelectedCache(cache, {"test": [("test", i) for i in cache.split("test").ids]})
    model, card = load_trained(CLASSIFIER_DIR, torch.device("cpu"))
    distances: list = []
    preds, gts, probs = predict_split(model, SampleStore(selected.split("test")), torch.device("cpu"),
                                      keep_probs=True, distances=distances)
    got = score_test(selected, preds, gts, probs, 0, nuclei_rule(read_model_dir(CLASSIFIER_DIR)), distances,
                     card.source_mpp, prepared_dir=PREPARED_DIR).metrics
    assert got == pytest.approx(expected)


def test_training_on_a_regrouped_cache_uses_only_its_images(trained):
    cache = FeatureCache(CACHE_PATH)
    organs = {"img_train_0": ("train", "a"), "img_train_1": ("train", "b"), "img_train_2": ("train", "a"),
              "img_val_0": ("val", "b"), "img_val_1": ("val", "a"), "img_test_0": ("test", "b"),
              "img_test_1": ("test", "a")}
    held = regroup(cache, organs, "b", ("train", "val", "test"))
    assert held.split("train").ids == ["img_train_0", "img_train_2"]
    assert held.split("val").ids == ["img_val_1"]
    assert held.split("test").ids == ["img_train_1", "img_val_0", "img_test_0"]
    assert regroup(cache, organs, "b", ("test",)).split("test").ids == ["img_test_0"]
    result = train_classifier(held, load_params(Path("params.yaml")).train, torch.device("cpu"), progress=False)
    assert result.train_ids == ["img_train_0", "img_train_2"] and result.num_train == 2


def test_the_organ_table_covers_monuseg_with_one_organ_per_tcga_study(monuseg_root):
    organs = organ_table()
    manifest = monuseg_root.parent / "MoNuSeg-instances" / "manifest.csv"
    with open(manifest, newline="") as f:
        shipped = {row["id"]: row["split"].lower() for row in csv.DictReader(f)}
    assert {i: s for i, (s, _) in organs.items()} == shipped
    with open(ORGANS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    by_site: dict[str, set[str]] = {}
    for row in rows:
        assert row["id"].split("-")[1] == row["tss"]
        by_site.setdefault(row["tss"], set()).add(row["organ"])
    assert all(len(v) == 1 for v in by_site.values())
    assert {o for _, o in organs.values()} == {"bladder", "brain", "breast", "colon", "kidney", "lung", "prostate",
                                               "stomach"}
    assert {i for i, (s, o) in organs.items() if o == "brain"} == {i for i, (s, o) in organs.items()
                                                                   if o == "brain" and s == "test"}


def test_one_organ_of_the_benchmark_end_to_end(trained):
    """run_organ on the tiny project: a held-out model trained on the other organ, the anchor and
    the default model scored on the held-out organ's images, every number a fraction."""
    from leave_organ_out import run_organ, table

    cache = FeatureCache(CACHE_PATH)
    organs = {"img_train_0": ("train", "a"), "img_train_1": ("train", "b"), "img_train_2": ("train", "a"),
              "img_val_0": ("val", "b"), "img_val_1": ("val", "a"), "img_test_0": ("test", "b"),
              "img_test_1": ("test", "a")}
    params = load_params(Path("params.yaml"))
    model, _ = load_trained(CLASSIFIER_DIR, torch.device("cpu"))
    rule = nuclei_rule(read_model_dir(CLASSIFIER_DIR))
    row = run_organ("b", cache, organs, params, torch.device("cpu"), model, rule)
    assert row["ids"] == ["img_train_1", "img_val_0", "img_test_0"] and row["train_images"] == 2
    for key in ("held_out_model", "held_out_test", "anchor", "default_model_test", "anchor_test"):
        assert 0.0 <= row[key]["dice"] <= 1.0 and 0.0 <= row[key]["aji_instance"] <= 1.0, key
    assert row["held_out_model"]["images"] == 3 and row["default_model_test"]["images"] == 1
    assert row["held_out_test"]["images"] == 1 and row["anchor_test"]["images"] == 1
    assert "| b | 3 (3) | 2 |" in table([row])

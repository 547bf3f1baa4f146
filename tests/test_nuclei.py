"""Separating touching nuclei: the watershed rules and the choice of their knobs on validation."""

from __future__ import annotations

import numpy as np
import pytest

from textdiff.data.instances import nucleus_distance
from textdiff.errors import TextDiffError
from textdiff.evaluation.metrics import instance_scores
from textdiff.model.nuclei import MIN_AREAS_UM2, NucleusRule, choose_rule, separate


def _two_touching_discs(size=60):
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.uint16)
    labels[(yy - 30) ** 2 + (xx - 20) ** 2 <= 100] = 1
    labels[(yy - 30) ** 2 + (xx - 38) ** 2 <= 100] = 2  # overlapping: one blob in the mask
    return labels


def test_edt_watershed_splits_two_touching_discs_that_a_mask_merges():
    labels = _two_touching_discs()
    prob = (labels > 0).astype(np.float32)
    from skimage.measure import label

    assert label(prob > 0.5).max() == 1  # the binary output: one blob
    out = separate(prob, None, NucleusRule("edt", 0.5), mpp=0.25)
    assert out.max() == 2
    assert instance_scores(out, labels)["pq_instance"] > 0.8
    assert np.array_equal(out > 0, prob > 0.5)  # the nuclei cover the mask exactly


def test_distance_seeds_split_where_the_head_has_two_peaks():
    labels = _two_touching_discs()
    prob = (labels > 0).astype(np.float32)
    out = separate(prob, nucleus_distance(labels), NucleusRule("distance", 0.05), mpp=0.25)
    assert out.max() == 2 and instance_scores(out, labels)["aji_instance"] > 0.9
    # a saddle higher than a threshold would allow still separates: the peaks count, not the level
    lifted = np.where(labels > 0, 0.5 + 0.5 * nucleus_distance(labels), 0).astype(np.float32)
    assert separate(prob, lifted, NucleusRule("distance", 0.05), mpp=0.25).max() == 2
    # peaks lower than the marker: one nucleus, and a flat head keeps the blob whole, never dropped
    assert separate(prob, 0.02 * nucleus_distance(labels), NucleusRule("distance", 0.05), mpp=0.25).max() == 1
    flat = separate(prob, np.full(prob.shape, 0.1, np.float32), NucleusRule("distance", 0.05), mpp=0.25)
    assert flat.max() == 1 and np.array_equal(flat > 0, prob > 0.5)


def test_small_nuclei_are_dropped_by_micrometres_not_pixels():
    prob = np.zeros((40, 40), np.float32)
    prob[2:4, 2:4] = 1  # 4 px
    prob[20:30, 20:30] = 1  # 100 px
    rule = NucleusRule("edt", 0.5, min_area_um2=2.0)
    assert separate(prob, None, rule, mpp=0.25).max() == 1  # 4 px = 0.25 um2 < 2
    assert separate(prob, None, rule, mpp=1.0).max() == 2  # 4 px = 4 um2 at 1 um/px


def test_choose_rule_prefers_what_scores_best_on_validation():
    labels = _two_touching_discs()
    prob = (labels > 0).astype(np.float32)
    choice = choose_rule([prob], [nucleus_distance(labels)], [labels], mpp=0.25)
    assert choice.score > 0.9
    assert {r.seeds for r, _, _ in choice.tried} == {"distance", "edt"}
    markers = [t for t in choice.tried if t[0].min_area_um2 == 0.0][:-1]  # the last is the floor search's 0
    floors = choice.tried[len(markers):]
    assert len(floors) == len(MIN_AREAS_UM2) and {r.marker for r, _, _ in floors} == {choice.rule.marker}
    assert max(a for _, a, _ in markers) == next(a for r, a, _ in markers if r.seeds == choice.rule.seeds
                                                  and r.marker == choice.rule.marker)  # markers by AJI
    assert choice.pq == max(q for _, _, q in floors)  # the size limit by PQ
    only_edt = choose_rule([prob], [None], [labels], mpp=0.25)
    assert only_edt.rule.seeds == "edt"


def test_bad_rules_and_inputs_are_refused():
    with pytest.raises(TextDiffError, match="unknown nucleus seeds"):
        NucleusRule("flows")
    with pytest.raises(TextDiffError, match="unknown nucleus rule key"):
        NucleusRule.from_json({"seeds": "edt", "h": 1})
    assert NucleusRule.from_json(NucleusRule("distance", 0.4).to_json()) == NucleusRule("distance", 0.4)
    prob = np.ones((8, 8), np.float32)
    with pytest.raises(TextDiffError, match="has none"):
        separate(prob, None, NucleusRule("distance", 0.5), mpp=0.25)
    with pytest.raises(TextDiffError, match="differ in size"):
        separate(prob, np.ones((4, 4), np.float32), NucleusRule("distance", 0.5), mpp=0.25)
    with pytest.raises(TextDiffError, match="micrometres per pixel"):
        separate(prob, None, NucleusRule(), mpp=0)
    assert separate(np.zeros((8, 8), np.float32), None, NucleusRule(), mpp=0.25).max() == 0


def test_a_false_fragment_is_removed_by_the_size_limit_that_val_pq_chooses():
    """A 3x3 px fragment costs AJI 9 pixels of union but PQ a whole false positive: the size limit
    is PQ's choice, so the fragment goes."""
    labels = _two_touching_discs()
    prob = (labels > 0).astype(np.float32)
    prob[2:5, 2:5] = 1  # 9 px = 0.56 um2 at 0.25 um/px, nothing there in the truth
    choice = choose_rule([prob], [None], [labels], mpp=0.25)
    assert choice.rule.min_area_um2 > 0.56
    assert separate(prob, None, choice.rule, mpp=0.25).max() == 2

"""Metrics against hand-computed cases, edge cases, a brute-force AJI cross-check, and speed."""

import time

import numpy as np
import pytest
from skimage.measure import label

from textdiff.errors import TextDiffError
from textdiff.evaluation.metrics import (
    PixelDice,
    aji,
    aji_plus,
    dice_pixel,
    image_metrics,
    instance_scores,
    iou_dice_textdiff,
    pq,
    summarize,
)

E = 1e-5


def _scene(b_pred_cols=(3, 7)):
    """10x10 masks.

    GT:   A rows 1-2, cols 1-2 (4 px);  B rows 5-6, cols 1-4 (8 px).
    Pred: A' == A (4 px);  B' rows 5-6, cols b_pred_cols;  C' rows 8-9, cols 8-9 (4 px, false positive).
    """
    gt = np.zeros((10, 10), np.uint8)
    gt[1:3, 1:3] = 1
    gt[5:7, 1:5] = 1
    pred = np.zeros((10, 10), np.uint8)
    pred[1:3, 1:3] = 1
    pred[5:7, b_pred_cols[0] : b_pred_cols[1]] = 1
    pred[8:10, 8:10] = 1
    return pred, gt


def test_half_overlap_scene():
    # B' = rows 5-6, cols 3-6 (8 px): B & B' = cols 3-4 -> 4 px, B | B' = 12 px, IoU(B, B') = 1/3.
    pred, gt = _scene((3, 7))
    # pixels: |P| = 16, |G| = 12, |P & G| = 4 + 4 = 8, |P | G| = 20
    dice, iou = iou_dice_textdiff(pred, gt)
    exp_iou = (8 + E) / (20 + E)
    assert iou == pytest.approx(exp_iou, rel=1e-12)
    assert dice == pytest.approx(2 * exp_iou / (1 + exp_iou), rel=1e-12)  # ~ 4/7
    # AJI: A->A' adds 4/4, B->B' adds 4/12, unused C' adds 4 to the denominator: 8 / 20
    assert aji(pred, gt) == pytest.approx(0.4, abs=1e-12)
    # PQ: only (A, A') has IoU > 0.5 -> TP 1 (IoU 1); FP = B', C' = 2; FN = B = 1
    # DQ = 1 / (1 + 1 + 0.5) = 0.4, SQ = 1, PQ = 0.4
    dq, sq, pq_ = pq(pred, gt)
    assert (dq, sq, pq_) == pytest.approx((0.4, 1.0, 0.4), abs=1e-12)


def test_good_overlap_scene():
    # B' = rows 5-6, cols 2-4 (6 px) inside B: inter 6, union 8, IoU 0.75
    pred, gt = _scene((2, 5))
    # AJI: (4 + 6) / (4 + 8 + 4 [C' unused]) = 10 / 16
    assert aji(pred, gt) == pytest.approx(10 / 16, abs=1e-12)
    # PQ: TP 2 (IoU 1, 0.75), FP 1 (C'), FN 0: DQ = 2 / 2.5 = 0.8, SQ = 0.875, PQ = 0.7
    assert pq(pred, gt) == pytest.approx((0.8, 0.875, 0.7), abs=1e-12)


def test_missed_nucleus_and_merged_prediction():
    gt = np.zeros((6, 8), np.uint8)
    gt[1:3, 1:3] = 1  # 4 px
    gt[1:3, 4:6] = 1  # 4 px, separated by column 3
    pred = np.zeros_like(gt)
    pred[1:3, 1:3] = 1
    # second GT nucleus overlaps nothing: AJI = 4 / (4 + 4) ; PQ: TP 1, FN 1 -> DQ 2/3
    assert aji(pred, gt) == pytest.approx(0.5, abs=1e-12)
    assert pq(pred, gt) == pytest.approx((2 / 3, 1.0, 2 / 3), abs=1e-12)
    # one prediction covering both (rows 1-2, cols 1-5 = 10 px): each GT picks it,
    # inter 4 + 4, union 10 + 10 (counted per GT, Kumar's definition) -> 0.4; PQ IoU 0.4 -> no TP
    merged = np.zeros_like(gt)
    merged[1:3, 1:6] = 1
    assert aji(merged, gt) == pytest.approx(8 / 20, abs=1e-12)
    assert pq(merged, gt) == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)


def test_eight_connectivity():
    # diagonal pixels form ONE instance (2 px); predicting one of them gives IoU 0.5, not > 0.5
    gt = np.zeros((3, 3), np.uint8)
    gt[0, 0] = gt[1, 1] = 1
    pred = np.zeros_like(gt)
    pred[0, 0] = 1
    assert pq(pred, gt)[0] == 0.0
    assert aji(pred, gt) == pytest.approx(0.5)


def test_empty_cases():
    z = np.zeros((5, 5), np.uint8)
    one = z.copy()
    one[2, 2:4] = 1  # 2 px
    assert iou_dice_textdiff(z, z) == (1.0, 1.0)
    assert aji(z, z) == 1.0
    assert pq(z, z) == (1.0, 1.0, 1.0)
    assert dice_pixel([z], [z]) == 1.0
    for p, g in [(z, one), (one, z)]:
        dice, iou = iou_dice_textdiff(p, g)
        assert iou == pytest.approx(E / (2 + E), rel=1e-12)  # TextDiff's smoothing: ~0, not exactly 0
        assert dice < 1e-5
        assert aji(p, g) == 0.0
        assert pq(p, g) == (0.0, 0.0, 0.0)
        assert dice_pixel([p], [g]) == 0.0


def test_pixel_dice_differs_from_per_image_mean():
    # image 1: 100 px nucleus, perfect -> dice 1; image 2: 1 px nucleus, missed -> dice ~0
    g1 = np.zeros((20, 20), np.uint8)
    g1[0:10, 0:10] = 1
    g2 = np.zeros((20, 20), np.uint8)
    g2[15, 15] = 1
    p1, p2 = g1.copy(), np.zeros_like(g2)
    per_image = [image_metrics(p1, g1), image_metrics(p2, g2)]
    mean_dice = summarize(per_image)["dice"]
    assert mean_dice == pytest.approx(0.5, abs=1e-4)
    # pooled: 2 * 100 / (100 + 101)
    assert dice_pixel([p1, p2], [g1, g2]) == pytest.approx(200 / 201, abs=1e-12)
    acc = PixelDice()
    acc.update(p1, g1)
    acc.update(p2, g2)
    assert acc.value() == pytest.approx(200 / 201, abs=1e-12)


def test_summarize_means_and_skips_names():
    rows = [{"name": "a", "dice": 0.5, "pq": 1.0}, {"name": "b", "dice": 1.0, "pq": 0.0}]
    assert summarize(rows) == {"dice": 0.75, "pq": 0.5}
    with pytest.raises(TextDiffError):
        summarize([])
    with pytest.raises(TextDiffError, match="lacks"):
        summarize([{"dice": 1.0}, {"iou": 1.0}])


def _aji_brute_force(pred, gt):
    gl = label(gt > 0, connectivity=2)
    pl = label(pred > 0, connectivity=2)
    gs = [gl == i for i in range(1, gl.max() + 1)]
    ps = [pl == j for j in range(1, pl.max() + 1)]
    if not gs and not ps:
        return 1.0
    num = den = 0
    used = set()
    for g in gs:
        ious = [(g & p).sum() / (g | p).sum() for p in ps]
        if ious and max(ious) > 0:
            j = int(np.argmax(ious))
            num += (g & ps[j]).sum()
            den += (g | ps[j]).sum()
            used.add(j)
        else:
            den += g.sum()
    den += sum(p.sum() for j, p in enumerate(ps) if j not in used)
    return num / den if den else 0.0


def test_aji_matches_brute_force_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        gt = rng.random((24, 24)) > 0.7
        pred = rng.random((24, 24)) > 0.7
        assert aji(pred, gt) == pytest.approx(_aji_brute_force(pred, gt), abs=1e-12)


def test_large_masks_fast():
    # 1000x1000, 484 square nuclei of 20x20 on a 45 px grid; prediction shifted by 5 px
    gt = np.zeros((1000, 1000), np.uint8)
    for r in range(10, 990, 45):
        for c in range(10, 990, 45):
            gt[r : r + 20, c : c + 20] = 1
    pred = np.roll(gt, 5, axis=1)
    t0 = time.perf_counter()
    m = image_metrics(pred, gt)
    elapsed = time.perf_counter() - t0
    # each pair: inter 20*15 = 300, union 500 -> IoU 0.6 -> every nucleus a TP
    assert m["aji"] == pytest.approx(0.6, abs=1e-12)
    assert (m["dq"], m["sq"]) == pytest.approx((1.0, 0.6), abs=1e-12)
    assert elapsed < 2.0


def test_bad_inputs_raise():
    with pytest.raises(TextDiffError, match="differs"):
        aji(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(TextDiffError, match="2-D"):
        pq(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(TextDiffError, match="iou_thresh"):
        pq(np.zeros((4, 4)), np.zeros((4, 4)), iou_thresh=0.3)


# -- boundary F1 -------------------------------------------------------------------------------


def test_boundary_f1_against_a_hand_count():
    from textdiff.evaluation.metrics import boundary_f1

    gt = np.zeros((40, 40), np.uint8)
    gt[10:30, 10:30] = 1  # inner contour: 4 * 20 - 4 = 76 pixels
    assert boundary_f1(gt, gt) == 1.0
    wide = np.zeros_like(gt)
    wide[8:32, 8:32] = 1  # 2 px too wide all round: contour of 92 pixels
    # Each side of the wide contour has 20 pixels exactly 2 px from the true contour; its 2 + 2 end
    # pixels are sqrt(5) or more away. So precision = 80 / 92; every true contour pixel has a
    # predicted one 2 px away, recall = 1; F1 = 2 p r / (p + r) = 160 / 172.
    assert boundary_f1(wide, gt) == pytest.approx(160 / 172)
    assert boundary_f1(wide, gt, tolerance=2.9) == 1.0  # the corners are 2*sqrt(2) = 2.83 away
    wider = np.zeros_like(gt)
    wider[7:33, 7:33] = 1  # 3 px: no boundary pixel within 2 px
    assert boundary_f1(wider, gt) == 0.0
    assert boundary_f1(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    assert boundary_f1(np.zeros_like(gt), gt) == 0.0 and boundary_f1(gt, np.zeros_like(gt)) == 0.0


# -- the published definitions on hand-computed cases (Kumar et al. 2017 AJI; Graham et al. 2019
#    AJI+; Kirillov et al. 2019 PQ), as HoVer-Net's get_fast_aji / get_fast_aji_plus / get_fast_pq


def _canvas() -> np.ndarray:
    return np.zeros((12, 24), np.uint8)


def test_one_nucleus_split_in_two():
    gt = _canvas()
    gt[0:10, 0:10] = 1  # 100 px
    pred = _canvas()
    pred[0:10, 0:4] = 1  # 40 px, IoU 0.4
    pred[0:10, 6:10] = 1  # 40 px, IoU 0.4 (a 2-px gap: two components)
    # AJI: the GT takes the first of the tied halves (inter 40, union 100), the other half is unused (+40)
    assert aji(pred, gt) == pytest.approx(40 / 140)
    assert aji_plus(pred, gt) == pytest.approx(40 / 140)  # one GT: the same single pair
    dq, sq, q = pq(pred, gt)  # no pair above IoU 0.5: TP 0, FP 2, FN 1
    assert (dq, sq, q) == (0.0, 0.0, 0.0)


def test_two_nuclei_merged_into_one():
    gt = _canvas()
    gt[0:10, 0:10] = 1
    gt[0:10, 12:22] = 1  # two 100-px nuclei, 2 px apart
    pred = _canvas()
    pred[0:10, 0:22] = 1  # one 220-px blob over both
    # AJI: both GT pick the blob: inter 100 + 100, union 220 + 220 (the blob counted twice)
    assert aji(pred, gt) == pytest.approx(200 / 440)
    # AJI+: one-to-one, so one GT is paired (100 / 220) and the other adds its 100 px to the union
    assert aji_plus(pred, gt) == pytest.approx(100 / 320)
    assert pq(pred, gt) == (0.0, 0.0, 0.0)  # IoU 100/220 < 0.5: TP 0, FP 1, FN 2


def test_a_good_match_a_miss_and_a_false_positive():
    gt = _canvas()
    gt[0:10, 0:10] = 1  # A: 100 px
    gt[0:4, 14:18] = 1  # B: 16 px, missed
    pred = _canvas()
    pred[0:10, 0:8] = 1  # 80 px inside A: IoU 0.8
    pred[8:12, 20:24] = 1  # 16 px, touches nothing
    assert aji(pred, gt) == pytest.approx(80 / (100 + 16 + 16))
    assert aji_plus(pred, gt) == pytest.approx(80 / (100 + 16 + 16))
    dq, sq, q = pq(pred, gt)  # TP 1 (IoU 0.8), FP 1, FN 1
    assert dq == pytest.approx(1 / (1 + 0.5 + 0.5)) and sq == pytest.approx(0.8) and q == pytest.approx(0.4)


def test_no_prediction_and_no_ground_truth():
    gt = _canvas()
    gt[2:6, 2:6] = 1
    empty = _canvas()
    for f in (aji, aji_plus):
        assert f(empty, gt) == 0.0 and f(gt, empty) == 0.0 and f(empty, empty) == 1.0
    assert pq(empty, gt) == (0.0, 0.0, 0.0) and pq(gt, empty) == (0.0, 0.0, 0.0)
    assert pq(empty, empty) == (1.0, 1.0, 1.0)


def test_aji_plus_never_below_aji_and_equal_without_shared_predictions():
    rng = np.random.default_rng(5)
    for _ in range(30):
        gt = (rng.random((40, 40)) > 0.7).astype(np.uint8)
        pred = (rng.random((40, 40)) > 0.7).astype(np.uint8)
        assert aji_plus(pred, gt) >= aji(pred, gt) - 1e-12
    gt = _canvas()
    gt[0:4, 0:4] = 1
    gt[0:4, 10:14] = 1
    pred = _canvas()
    pred[1:4, 0:4] = 1
    pred[0:3, 10:14] = 1
    assert aji_plus(pred, gt) == pytest.approx(aji(pred, gt))


# -- label maps (a per-nucleus ground truth): touching nuclei are separate instances


def _touching_pair() -> np.ndarray:
    gt = _canvas()
    gt[0:10, 0:10] = 1
    gt[0:10, 10:20] = 2  # two 100-px nuclei that touch: one blob to the binary metrics
    return gt


def test_label_maps_merge_of_touching_nuclei():
    gt = _touching_pair()
    merged = (gt > 0).astype(np.uint16)  # one label over both
    s = instance_scores(merged, gt)
    assert s["aji_instance"] == pytest.approx(200 / 400)  # the 200-px blob is in both unions
    assert s["aji_plus_instance"] == pytest.approx(100 / 300)
    assert s["pq_instance"] == 0.0 and s["dq_instance"] == 0.0  # IoU 100/200 is not > 0.5
    # the binary metrics cannot see the difference: one component each side
    assert aji(merged, gt) == 1.0


def test_label_maps_split_miss_false_positive_and_perfect():
    gt = _touching_pair()
    assert instance_scores(gt, gt) == {k: 1.0 for k in
                                       ("aji_instance", "aji_plus_instance", "pq_instance", "dq_instance",
                                        "sq_instance")}
    relabelled = np.where(gt == 1, 70, np.where(gt == 2, 3, 0)).astype(np.int32)  # ids need not be 1..n
    assert instance_scores(relabelled, gt)["aji_instance"] == 1.0
    split = gt.copy()
    split[0:10, 5:10] = 5  # nucleus 1 cut in halves of 50 px
    s = instance_scores(split, gt)
    # AJI: GT 1 takes the first half (50 / 100), GT 2 matches exactly (100 / 100), the other half +50
    assert s["aji_instance"] == pytest.approx(150 / 250)
    dq, sq = 1 / (1 + 0.5 * 2 + 0.5 * 1), 1.0  # TP 1 (GT 2), FP 2 halves, FN 1
    assert s["dq_instance"] == pytest.approx(dq) and s["pq_instance"] == pytest.approx(dq * sq)
    missed_and_fp = np.zeros_like(gt)
    missed_and_fp[0:10, 10:20] = 1  # GT 2 found, GT 1 missed
    missed_and_fp[10:12, 22:24] = 2  # 4 px of nothing
    s = instance_scores(missed_and_fp, gt)
    assert s["aji_instance"] == pytest.approx(100 / (100 + 100 + 4))
    assert s["pq_instance"] == pytest.approx(1 / (1 + 0.5 + 0.5))


def test_label_maps_empty_sides():
    gt = _touching_pair()
    empty = np.zeros_like(gt)
    assert instance_scores(empty, empty)["aji_instance"] == 1.0
    assert instance_scores(empty, empty)["pq_instance"] == 1.0
    for a, b in ((empty, gt), (gt, empty)):
        assert all(v == 0.0 for v in instance_scores(a, b).values())


def _hovernet_reference(pred, gt):
    """The published formulas written out per instance pair, as HoVer-Net's get_fast_aji and
    get_fast_pq (stats_utils.py) compute them: AJI with each GT's max-IoU partner, PQ at IoU > 0.5."""
    g_ids = [i for i in np.unique(gt) if i]
    p_ids = [j for j in np.unique(pred) if j]
    gs = [gt == i for i in g_ids]
    ps = [pred == j for j in p_ids]
    inter = np.array([[(g & p).sum() for p in ps] for g in gs], float).reshape(len(gs), len(ps))
    union = np.array([[(g | p).sum() for p in ps] for g in gs], float).reshape(len(gs), len(ps))
    num = den = 0.0
    used = set()
    for i, g in enumerate(gs):
        if len(ps) and inter[i].max() > 0:
            j = int(np.argmax(inter[i] / union[i]))
            num, den = num + inter[i, j], den + union[i, j]
            used.add(j)
        else:
            den += g.sum()
    den += sum(p.sum() for j, p in enumerate(ps) if j not in used)
    iou = inter / np.maximum(union, 1)
    tp_iou = iou[iou > 0.5]
    tp = tp_iou.size
    dq = tp / (tp + 0.5 * (len(ps) - tp) + 0.5 * (len(gs) - tp)) if (gs or ps) else 1.0
    return num / den if den else 1.0, dq * (tp_iou.mean() if tp else 0.0)


def test_label_maps_match_the_published_formulas_on_random_maps():
    from skimage.segmentation import watershed

    rng = np.random.default_rng(3)
    for _ in range(12):
        maps = []
        for _ in range(2):
            fg = rng.random((40, 40)) > 0.45
            markers = np.zeros((40, 40), np.int32)
            pts = rng.integers(0, 40, size=(8, 2))
            markers[pts[:, 0], pts[:, 1]] = rng.permutation(np.arange(1, 9)) * 7  # sparse ids
            maps.append(watershed(np.zeros((40, 40)), markers, mask=fg))
        pred, gt = maps
        want_aji, want_pq = _hovernet_reference(pred, gt)
        s = instance_scores(pred, gt)
        assert s["aji_instance"] == pytest.approx(want_aji, abs=1e-12)
        assert s["pq_instance"] == pytest.approx(want_pq, abs=1e-12)


def test_label_maps_equal_binary_scores_on_connected_components():
    rng = np.random.default_rng(5)
    pred, gt = rng.random((30, 30)) > 0.6, rng.random((30, 30)) > 0.6
    s = instance_scores(label(pred, connectivity=2), label(gt, connectivity=2))
    assert s["aji_instance"] == pytest.approx(aji(pred, gt))
    assert s["aji_plus_instance"] == pytest.approx(aji_plus(pred, gt))
    assert (s["dq_instance"], s["sq_instance"], s["pq_instance"]) == pytest.approx(pq(pred, gt))


def test_label_maps_refuse_what_is_not_a_label_map():
    gt = _touching_pair()
    with pytest.raises(TextDiffError, match="integer labels"):
        instance_scores(gt.astype(np.float32), gt)
    with pytest.raises(TextDiffError, match="negative"):
        instance_scores(gt.astype(np.int32) - 1, gt)
    with pytest.raises(TextDiffError, match="differs"):
        instance_scores(gt[:, :10], gt)
    with pytest.raises(TextDiffError, match="2-D"):
        instance_scores(gt[None], gt[None])

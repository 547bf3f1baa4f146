"""Evaluation metrics on binary masks (numpy, values {0, 1} or bool).

Two families:

- Semantic: `iou_dice_textdiff` reproduces the numbers TextDiff reports (per image, then averaged),
  `PixelDice` / `dice_pixel` pool every pixel of every image into one Dice.
- Instance (for nuclei), two ways. On binary masks (`aji`, `pq`, ...), instances are the connected
  components of each mask, found with 8-connectivity (skimage `connectivity=2`), so two diagonally
  touching blobs are one instance: the paper's binary ground truth allows nothing better. On label
  maps (`instance_scores`: a predicted map against a per-nucleus ground truth), the labels are the
  instances, so a merge of two touching nuclei costs what it should.
  `aji` (Kumar et al. 2017), `aji_plus` (Graham et al. 2019) and `pq` (Kirillov et al. 2019) are
  computed from one contingency matrix
  of (GT label, pred label) pixel counts, built with a single `np.bincount` -- fast for 1000x1000
  masks with hundreds of instances.

Empty-mask conventions: when both GT and prediction are empty every score is 1.0 (nothing to find,
nothing found; HoVer-Net's `get_fast_aji` divides 0 by 0 there); when exactly one is empty the
instance scores and pixel Dice are 0.0, while the TextDiff IoU/Dice keep their formula's smoothing
and give about 1e-5 / |non-empty mask| (~0). Otherwise `aji`, `aji_plus` and `pq` follow the
published definitions as HoVer-Net's `get_fast_aji`, `get_fast_aji_plus` and `get_fast_pq` implement
them (tests/test_metrics.py checks the hand-computed split and merge cases).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from skimage.measure import label as _cc_label

from textdiff.errors import TextDiffError

TEXTDIFF_SMOOTH = 1e-5


def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise TextDiffError(f"{name} must be a 2-D mask, got shape {mask.shape}")
    return mask > 0.5


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _binary(pred, "pred"), _binary(gt, "gt")
    if p.shape != g.shape:
        raise TextDiffError(f"pred shape {p.shape} differs from gt shape {g.shape}")
    return p, g


# ------------------------------------------------------------------ semantic


def iou_dice_textdiff(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(dice, iou) of one image exactly as TextDiff's `iou_score` (train.py) computes them.

    iou = (|P & G| + 1e-5) / (|P | G| + 1e-5) on masks thresholded at 0.5, dice = 2*iou / (iou + 1).
    (The release evaluates with batch_size 1, so its per-batch numbers are per image.)
    """
    p, g = _pair(pred, gt)
    inter = np.logical_and(p, g).sum()
    union = np.logical_or(p, g).sum()
    iou = (inter + TEXTDIFF_SMOOTH) / (union + TEXTDIFF_SMOOTH)
    dice = 2 * iou / (iou + 1)
    return float(dice), float(iou)


class PixelDice:
    """Accumulates 2*sum(TP) / (sum|P| + sum|G|) over many images (large objects weigh more)."""

    def __init__(self) -> None:
        self.tp = 0
        self.pred_sum = 0
        self.gt_sum = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        p, g = _pair(pred, gt)
        self.tp += int(np.logical_and(p, g).sum())
        self.pred_sum += int(p.sum())
        self.gt_sum += int(g.sum())

    def value(self) -> float:
        denom = self.pred_sum + self.gt_sum
        return 1.0 if denom == 0 else 2.0 * self.tp / denom


def dice_pixel(preds: Iterable[np.ndarray], gts: Iterable[np.ndarray]) -> float:
    """Dice over all pixels of all images pooled together (see PixelDice)."""
    acc = PixelDice()
    n = 0
    for p, g in zip(preds, gts, strict=True):
        acc.update(p, g)
        n += 1
    if n == 0:
        raise TextDiffError("dice_pixel needs at least one image")
    return acc.value()


# ------------------------------------------------------------------ instance

INSTANCE_KEYS = ("aji_instance", "aji_plus_instance", "pq_instance", "dq_instance", "sq_instance")


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise TextDiffError(f"{name} must be a 2-D label map, got shape {labels.shape}")
    if labels.dtype.kind not in "ui" and labels.dtype != bool:
        raise TextDiffError(f"{name} must hold integer labels, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise TextDiffError(f"{name} has negative labels (min {labels.min()})")
    return labels


def _label_overlaps(pred_labels: np.ndarray, gt_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection [G, P], gt areas [G], pred areas [P]) of two label maps, 0 = background.

    Labels need not be consecutive: both maps are renumbered 1..n first (`np.unique`), so a map with
    ids 3 and 70 has two instances, not 70. One `np.bincount` over (gt, pred) pairs builds the table.
    """
    p, g = _check_labels(pred_labels, "pred"), _check_labels(gt_labels, "gt")
    if p.shape != g.shape:
        raise TextDiffError(f"pred shape {p.shape} differs from gt shape {g.shape}")
    g_ids, g_inv = np.unique(g.ravel(), return_inverse=True)
    p_ids, p_inv = np.unique(p.ravel(), return_inverse=True)
    # After renumbering, index 0 is the background only when the map has background pixels.
    g_inv = g_inv + (0 if g_ids.size and g_ids[0] == 0 else 1)
    p_inv = p_inv + (0 if p_ids.size and p_ids[0] == 0 else 1)
    n_g, n_p = int(np.count_nonzero(g_ids)), int(np.count_nonzero(p_ids))
    pair = g_inv.astype(np.int64) * (n_p + 1) + p_inv
    table = np.bincount(pair, minlength=(n_g + 1) * (n_p + 1)).reshape(n_g + 1, n_p + 1)
    return table[1:, 1:], table[1:, :].sum(axis=1), table[:, 1:].sum(axis=0)


def _instance_overlaps(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The overlap table of two binary masks' connected components (8-connectivity)."""
    p, g = _pair(pred, gt)
    return _label_overlaps(_cc_label(p, connectivity=2), _cc_label(g, connectivity=2))


def _aji_from(inter: np.ndarray, gt_area: np.ndarray, pred_area: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017) from an overlap table.

    Each GT instance takes the prediction with the highest IoU (ties: lowest label): the
    intersection goes to the numerator, the union to the denominator, and that prediction is marked
    used. A GT instance that overlaps no prediction adds its area to the denominator. Finally every
    unused prediction adds its area to the denominator. (As in the original definition a prediction
    may serve several GT instances; its area is then counted in each union.)
    """
    n_g, n_p = inter.shape
    if n_g == 0 or n_p == 0:
        return 1.0 if n_g == n_p else 0.0
    union = gt_area[:, None] + pred_area[None, :] - inter
    iou = inter / union
    best = iou.argmax(axis=1)
    rows = np.arange(n_g)
    matched = inter[rows, best] > 0
    numerator = inter[rows, best][matched].sum()
    denominator = union[rows, best][matched].sum() + gt_area[~matched].sum()
    used = np.zeros(n_p, dtype=bool)
    used[best[matched]] = True
    denominator += pred_area[~used].sum()
    return float(numerator / denominator)


def _aji_plus_from(inter: np.ndarray, gt_area: np.ndarray, pred_area: np.ndarray) -> float:
    """AJI+ (Graham et al. 2019, HoVer-Net): AJI with a one-to-one pairing of maximal total IoU
    (Hungarian, `scipy.optimize.linear_sum_assignment`) instead of each GT instance's best match,
    so one prediction merging two nuclei is not counted in two unions (AJI's over-penalisation).
    Pairs without overlap are not pairs; every unpaired instance adds its area to the union."""
    from scipy.optimize import linear_sum_assignment

    n_g, n_p = inter.shape
    if n_g == 0 or n_p == 0:
        return 1.0 if n_g == n_p else 0.0
    union = gt_area[:, None] + pred_area[None, :] - inter
    rows, cols = linear_sum_assignment(-(inter / union))
    keep = inter[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    paired_g, paired_p = np.zeros(n_g, bool), np.zeros(n_p, bool)
    paired_g[rows], paired_p[cols] = True, True
    denominator = union[rows, cols].sum() + gt_area[~paired_g].sum() + pred_area[~paired_p].sum()
    return float(inter[rows, cols].sum() / denominator)


def _pq_from(inter: np.ndarray, gt_area: np.ndarray, pred_area: np.ndarray,
             iou_thresh: float = 0.5) -> tuple[float, float, float]:
    """(dq, sq, pq), Kirillov et al. 2019: a (GT, pred) pair with IoU > iou_thresh is a true
    positive; with iou_thresh >= 0.5 each instance is in at most one such pair.
    DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the TPs (0 without TPs), PQ = DQ * SQ."""
    if not 0.5 <= iou_thresh < 1.0:
        raise TextDiffError(f"iou_thresh must be in [0.5, 1) so matches are unique, got {iou_thresh}")
    n_g, n_p = inter.shape
    if n_g == 0 and n_p == 0:
        return 1.0, 1.0, 1.0
    union = gt_area[:, None] + pred_area[None, :] - inter
    iou = inter / np.maximum(union, 1)
    matched_iou = iou[iou > iou_thresh]
    tp = matched_iou.size
    dq = tp / (tp + 0.5 * (n_p - tp) + 0.5 * (n_g - tp))
    sq = float(matched_iou.mean()) if tp else 0.0
    return float(dq), sq, float(dq * sq)


def aji(pred: np.ndarray, gt: np.ndarray) -> float:
    """AJI of two binary masks, their connected components as instances (see `_aji_from`)."""
    return _aji_from(*_instance_overlaps(pred, gt))


def aji_plus(pred: np.ndarray, gt: np.ndarray) -> float:
    """AJI+ of two binary masks' connected components (see `_aji_plus_from`)."""
    return _aji_plus_from(*_instance_overlaps(pred, gt))


def pq(pred: np.ndarray, gt: np.ndarray, iou_thresh: float = 0.5) -> tuple[float, float, float]:
    """Panoptic quality of two binary masks' connected components: (dq, sq, pq), see `_pq_from`."""
    if not 0.5 <= iou_thresh < 1.0:
        raise TextDiffError(f"iou_thresh must be in [0.5, 1) so matches are unique, got {iou_thresh}")
    return _pq_from(*_instance_overlaps(pred, gt), iou_thresh=iou_thresh)


def instance_scores(pred_labels: np.ndarray, gt_labels: np.ndarray) -> dict[str, float]:
    """AJI, AJI+, PQ, DQ, SQ of a predicted label map against a per-nucleus ground truth (0 =
    background, any other value one nucleus), keyed as `INSTANCE_KEYS`. Unlike the binary-mask
    scores above, touching nuclei are separate here whenever the labels say so."""
    overlaps = _label_overlaps(pred_labels, gt_labels)
    dq, sq, pq_ = _pq_from(*overlaps)
    return {"aji_instance": _aji_from(*overlaps), "aji_plus_instance": _aji_plus_from(*overlaps),
            "pq_instance": pq_, "dq_instance": dq, "sq_instance": sq}


# ------------------------------------------------------------------ boundary


def boundary_f1(pred: np.ndarray, gt: np.ndarray, tolerance: float = 2.0) -> float:
    """Boundary F1 (the BF score of Csurka et al. 2013): how many predicted boundary pixels lie
    within `tolerance` pixels of a true boundary (precision) and vice versa (recall).

    Region overlap barely notices a nucleus drawn two pixels too wide all round; its boundary
    misses by two pixels everywhere, so blobby masks score low here. Boundaries are the masks'
    inner contours (`skimage.segmentation.find_boundaries(mode="inner")`), distances Euclidean
    (`scipy.ndimage.distance_transform_edt`). Both empty: 1.0; one empty: 0.0.
    """
    from scipy.ndimage import distance_transform_edt
    from skimage.segmentation import find_boundaries

    p, g = _pair(pred, gt)
    bp, bg = find_boundaries(p, mode="inner"), find_boundaries(g, mode="inner")
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    precision = float((distance_transform_edt(~bg)[bp] <= tolerance).mean())
    recall = float((distance_transform_edt(~bp)[bg] <= tolerance).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------ per image + summary


def image_metrics(pred: np.ndarray, gt: np.ndarray, instance: bool = True) -> dict[str, float]:
    """All per-image scores of one (pred, gt) pair: dice, iou (TextDiff), and aji, aji_plus, dq, sq, pq."""
    dice, iou = iou_dice_textdiff(pred, gt)
    out = {"dice": dice, "iou": iou}
    if instance:
        out["aji"] = aji(pred, gt)
        out["aji_plus"] = aji_plus(pred, gt)
        out["dq"], out["sq"], out["pq"] = pq(pred, gt)
    return out


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def summarize(per_image: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """Mean of each numeric metric over images.

    The metric keys are the numeric entries of the first row (non-numeric ones such as an image
    name are skipped); every row must carry them.
    """
    if not per_image:
        raise TextDiffError("summarize needs at least one per-image result")
    keys = [k for k, v in per_image[0].items() if _is_number(v)]
    for i, row in enumerate(per_image):
        missing = [k for k in keys if k not in row or not _is_number(row[k])]
        if missing:
            raise TextDiffError(f"per-image result {i} lacks numeric {', '.join(missing)}")
    return {k: float(np.mean([row[k] for row in per_image])) for k in keys}

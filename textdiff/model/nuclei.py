"""From a model's maps to separated nuclei: the one post-processing that evaluate, `textdiff
predict` and whole slides share (as HoVer-Net keeps one post-processing module for both).

A binary mask merges touching nuclei. The separation here is a marker-controlled watershed
(scikit-image) inside the foreground `prob > foreground`:

- `seeds: distance` (a model trained with `train.target: distance`): markers are the h-maxima of
  height `marker` of the predicted nucleus distance (0..1), flooded over the inverted map, so two
  touching nuclei with two peaks stay two however high the saddle between them. (Measured on val
  and test alike: a fixed threshold on the map, 0.2 to 0.6, separates worse; its saddles are not
  low enough, the map being smooth at the working size.)
- `seeds: edt` (any model, the binary ones and the baselines too): the foreground's own Euclidean
  distance transform, markers its h-maxima of height `marker` micrometres (a plain watershed).

Foreground that no marker reaches keeps its own label (a nucleus is never dropped for lack of a
seed); then nuclei smaller than `min_area_um2` are removed. Before any of it, where the rule says
so (`refine_um` > 0), the probability map at the image's own size is refined by the image's
hematoxylin edges (`model.refine`): the binary mask and the nuclei both come from that map.
Sizes are in micrometres, so one rule holds at any magnification the image is given at (`mpp`:
micrometres per pixel of the maps).
The knobs are chosen on validation images (`choose_rule`: the marker by AJI, then the refinement
by AJI, then the size limit by PQ), never on test, and stored in model.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from textdiff.errors import TextDiffError
from textdiff.runtime.device import usable_cpus

SEEDS = ("distance", "edt")
# The searched knobs (coordinate search: the marker first at no size limit, by val AJI; then the size
# limit, by val PQ).
MARKERS = {"distance": (0.02, 0.03, 0.05, 0.08, 0.12), "edt": (0.25, 0.5, 0.75, 1.0, 1.5)}
MIN_AREAS_UM2 = (0.0, 4.0, 8.0, 16.0, 24.0)
REFINES_UM = (0.0, 0.5, 0.75, 1.0)  # the guided filter's radius (model.refine); 0 = the map as upsampled
MAX_LABELS = 65535  # what a uint16 label image (`<id>_instances.png`) holds


@dataclass(frozen=True)
class NucleusRule:
    """How a probability (and distance) map becomes labelled nuclei; stored in model.json."""

    seeds: str = "edt"
    marker: float = 0.5  # h-maxima height: of the predicted map (distance), in micrometres (edt)
    min_area_um2: float = 0.0
    foreground: float = 0.5  # the mask's own threshold: the nuclei cover exactly the binary mask (minus small ones)
    refine_um: float = 0.0  # radius of the image-guided refinement of the foreground (model.refine); 0 = off

    def __post_init__(self) -> None:
        if self.seeds not in SEEDS:
            raise TextDiffError(f"unknown nucleus seeds {self.seeds!r}; valid: {', '.join(SEEDS)}")
        if self.marker <= 0 or self.min_area_um2 < 0 or not 0 < self.foreground < 1 or self.refine_um < 0:
            raise TextDiffError(f"invalid nucleus rule {self}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: object, source: str = "model.json") -> NucleusRule:
        if not isinstance(raw, dict):
            raise TextDiffError(f"{source}: the nucleus rule is not a mapping")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TextDiffError(f"{source}: unknown nucleus rule key '{unknown[0]}'")
        try:
            return cls(**raw)
        except TypeError as err:
            raise TextDiffError(f"{source}: invalid nucleus rule ({err})") from None


def _markers(prob: np.ndarray, distance: np.ndarray | None, rule: NucleusRule, mpp: float):
    """(foreground, landscape to flood, markers) of one image."""
    from scipy import ndimage
    from skimage.morphology import h_maxima

    fg = prob > rule.foreground
    if rule.seeds == "distance":
        if distance is None:
            raise TextDiffError("the nucleus rule seeds from the distance head, but the model has none")
        if distance.shape != prob.shape:
            raise TextDiffError(f"distance map {distance.shape} and probability map {prob.shape} differ in size")
        height = np.where(fg, distance, 0.0).astype(np.float32)
        peaks = h_maxima(height, rule.marker) if fg.any() else np.zeros(fg.shape, np.uint8)
        markers, _ = ndimage.label(peaks & fg)
        return fg, height, markers
    height = (ndimage.distance_transform_edt(fg) * mpp).astype(np.float32)
    peaks = h_maxima(height, rule.marker) if fg.any() else np.zeros(fg.shape, np.uint8)
    markers, _ = ndimage.label(peaks & fg)
    return fg, height, markers


def separate(prob: np.ndarray, distance: np.ndarray | None, rule: NucleusRule, mpp: float) -> np.ndarray:
    """Labelled nuclei (int32, 0 = background, 1..n) of one image's foreground probability map
    (and predicted distance map, same size), `mpp` micrometres per pixel of the maps."""
    from skimage.measure import label
    from skimage.segmentation import watershed

    if mpp <= 0:
        raise TextDiffError(f"separating nuclei needs the maps' micrometres per pixel, got {mpp}")
    prob = np.asarray(prob, np.float32)
    fg, height, markers = _markers(prob, None if distance is None else np.asarray(distance, np.float32), rule, mpp)
    labels = watershed(-height, markers, mask=fg) if markers.max() > 0 else np.zeros(fg.shape, np.int32)
    orphans = label(fg & (labels == 0), connectivity=1)
    labels = np.where(orphans > 0, orphans + labels.max(), labels)
    return _drop_small(labels.astype(np.int32), rule.min_area_um2 / mpp**2)


def _drop_small(labels: np.ndarray, min_pixels: float) -> np.ndarray:
    from skimage.segmentation import relabel_sequential

    if min_pixels > 0 and labels.max() > 0:
        areas = np.bincount(labels.ravel())
        small = areas < min_pixels
        small[0] = False
        labels = np.where(small[labels], 0, labels)
    return relabel_sequential(labels)[0].astype(np.int32)


@dataclass(frozen=True)
class RuleChoice:
    rule: NucleusRule
    score: float  # mean validation AJI of the chosen rule
    pq: float  # its mean validation PQ
    tried: list[tuple[NucleusRule, float, float]]  # (rule, mean val AJI, mean val PQ), in search order


def choose_rule(probs: Sequence[np.ndarray], distances: Sequence[np.ndarray | None], truths: Sequence[np.ndarray],
                mpp: float, images: Sequence[np.ndarray] | None = None) -> RuleChoice:
    """The rule validation images score best: each seed kind the maps allow and its markers at no
    size limit, by mean AJI (how well touching nuclei are split); then, given the images themselves
    (RGB uint8 at the maps' size), the radius of the image-guided refinement at that marker, by mean
    AJI; then the size limit, by mean PQ. The size limit is PQ's knob because a small false fragment
    costs PQ a whole false positive but AJI only its few pixels: AJI alone never removes them (on
    MoNuSeg val it kept 0 um2 where PQ takes 8). `distances` holds None for a model without the
    distance head."""
    from textdiff.evaluation.metrics import instance_scores
    from textdiff.model.refine import refine_probability

    if not probs:
        raise TextDiffError("choosing the nucleus rule needs at least one validation image with true instances")
    kinds = ["distance", "edt"] if all(d is not None for d in distances) else ["edt"]
    tried: list[tuple[NucleusRule, float, float]] = []
    markers = [NucleusRule(kind, m) for kind in kinds for m in MARKERS[kind]]

    def separated_and_scored(rule: NucleusRule, prob, distance, truth) -> tuple[np.ndarray, dict]:
        labels = separate(prob, distance, rule, mpp)
        return labels, instance_scores(labels, truth)

    def mean_of(per_image: Sequence[dict], rule: NucleusRule) -> tuple[float, float]:
        aji = float(np.mean([s["aji_instance"] for s in per_image]))
        pq = float(np.mean([s["pq_instance"] for s in per_image]))
        tried.append((rule, aji, pq))
        return aji, pq

    def best_of(rules: list[NucleusRule], maps: dict[float, Sequence[np.ndarray]], pool) -> tuple[NucleusRule, list]:
        """The rule of best mean AJI, and its label maps; every (rule, image) at once."""
        jobs = {rule: [pool.submit(separated_and_scored, rule, p, d, t)
                       for p, d, t in zip(maps[rule.refine_um], distances, truths)] for rule in rules}
        results = {rule: [job.result() for job in jobs[rule]] for rule in rules}
        best = max(rules, key=lambda r: mean_of([s for _, s in results[r]], r)[0])
        return best, [lab for lab, _ in results[best]]

    # Every (marker, image) at once on a thread pool: h-maxima, watershed and the scores release the
    # GIL for most of their time (1.9x on 2 cores; the search was most of a short run's training).
    # Each task is independent, so the choice is the sequential search's, bit for bit.
    maps: dict[float, Sequence[np.ndarray]] = {0.0: probs}
    with ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
        best, labels = best_of(markers, maps, pool)
        if images is not None:
            if len(images) != len(probs):
                raise TextDiffError(f"choosing the nucleus rule: {len(images)} images for {len(probs)} maps")
            radii = [r for r in REFINES_UM if r > 0 and round(r / mpp) >= 1]
            for r in radii:
                maps[r] = list(pool.map(lambda pi, r=r: refine_probability(pi[0], pi[1], r, mpp), zip(probs, images)))
            refined = [dataclasses.replace(best, refine_um=r) for r in radii]
            if refined:
                winner, winner_labels = best_of(refined, maps, pool)
                if _tried_aji(tried, winner) > _tried_aji(tried, best):  # a tie keeps the map as upsampled
                    best, labels = winner, winner_labels

        def with_size_limit(rule: NucleusRule) -> list[dict]:
            limit = rule.min_area_um2 / mpp**2
            return list(pool.map(lambda lt: instance_scores(_drop_small(lt[0], limit), lt[1]), zip(labels, truths)))

        sized = [dataclasses.replace(best, min_area_um2=a) for a in MIN_AREAS_UM2]
        best = max(sized, key=lambda r: mean_of(with_size_limit(r), r)[1])
    aji, pq = next((a, q) for r, a, q in reversed(tried) if r == best)
    return RuleChoice(best, aji, pq, tried)


def _tried_aji(tried: Sequence[tuple[NucleusRule, float, float]], rule: NucleusRule) -> float:
    """The mean validation AJI a rule of the search scored (its latest try)."""
    return next(a for r, a, _ in reversed(tried) if r == rule)

"""The views of an image that extract caches: the dihedral group D4 (the 8 flips and 90-degree
rotations) and the released code's small-angle rotation.

Extraction runs the teacher on every view of an image (`extract.views: 8`) so that training can
augment with flips/rotations and still see the teacher's *real* features of the transformed image,
rather than flipped features of the original (the teacher is not equivariant).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

Map = TypeVar("Map", np.ndarray, torch.Tensor)

NUM_VIEWS = 8


def apply_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """View k of x [..., H, W]: a horizontal flip when k >= 4, then k % 4 quarter turns."""
    if not 0 <= view < NUM_VIEWS:
        raise ValueError(f"view must be in [0, {NUM_VIEWS}), got {view}")
    if view >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k=view % 4, dims=(-2, -1))


def undo_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """The inverse of `apply_view` on [..., H, W]: a view's maps turned back onto the image (test-time
    augmentation in evaluate and `textdiff predict`)."""
    if not 0 <= view < NUM_VIEWS:
        raise ValueError(f"view must be in [0, {NUM_VIEWS}), got {view}")
    x = torch.rot90(x, k=-(view % 4), dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if view >= 4 else x


def mean_of_views(maps: Iterable[tuple[Map, Map | None]]) -> tuple[Map, Map | None]:
    """The mean (probability, distance or None) over views' maps already turned back onto the image
    (`undo_view`), kept as running sums so that memory is two maps, not two per view. One home for
    evaluate's and `textdiff predict`'s test-time averaging, so the two cannot drift apart."""
    prob_sum, distance_sum, n = None, None, 0
    for prob, distance in maps:
        prob_sum = prob if prob_sum is None else prob_sum + prob
        if distance is not None:
            distance_sum = distance if distance_sum is None else distance_sum + distance
        n += 1
    if prob_sum is None:
        raise ValueError("no views to average")
    return prob_sum / n, (distance_sum / n if distance_sum is not None else None)


def rotate_like_release(image: np.ndarray, degrees: float) -> np.ndarray:
    """`scipy.ndimage.rotate(order=0, reshape=False)`, the released code's call: nearest neighbour,
    the same size, black (0) where the rotated square leaves the frame. Works on [H, W] and [H, W, C]."""
    from scipy import ndimage

    return ndimage.rotate(image, degrees, axes=(1, 0), order=0, reshape=False, mode="constant", cval=0)


@dataclass(frozen=True)
class ViewLayout:
    """The order of an image's cached views, the one place that says it: `dihedral` views of D4
    (1: the image itself, or all 8), then `rotations` rotated copies (the release's augmentation),
    then `stain` stain-jittered copies. extract writes views in this order; training draws from it
    and the U-Net baseline rebuilds a view's pixels from it."""

    dihedral: int = 1
    rotations: int = 0
    stain: int = 0

    @property
    def total(self) -> int:
        return self.dihedral + self.rotations + self.stain

    def rotation(self, k: int) -> int:
        """The view index of rotated copy k."""
        return self.dihedral + k

    def stain_copy(self, k: int) -> int:
        """The view index of stain copy k."""
        return self.dihedral + self.rotations + k

    def kind(self, view: int) -> tuple[str, int]:
        """("dihedral", D4 element) | ("rotation", copy k) | ("stain", copy k) for a view index."""
        if not 0 <= view < self.total:
            raise ValueError(f"view {view} is outside the {self.total} cached views")
        if view < self.dihedral:
            return "dihedral", view
        if view < self.dihedral + self.rotations:
            return "rotation", view - self.dihedral
        return "stain", view - self.dihedral - self.rotations

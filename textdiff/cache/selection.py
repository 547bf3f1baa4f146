"""A finished cache regrouped into other splits, without copying a feature: e.g. leave-organ-out,
where training uses the images of every organ but one and the held-out organ's images of every
split are scored (`benchmarks/leave_organ_out.py`).

`SelectedCache` answers `split(name)` with a `Selection`: a `CachedSplit` whose item k is item
`index` of some split of the cache, so the training, rule search and scoring functions that take a
cache run on it unchanged. Resize caches only: a tiles cache's windows belong to source images by an
index of their own split, which a selection does not renumber.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from textdiff.cache.store import CachedSplit, FeatureCache
from textdiff.data.views import ViewLayout
from textdiff.errors import TextDiffError


class Selection(CachedSplit):
    """Items drawn from the splits of one cache, in the order given: `items[k]` = (split, index)."""

    def __init__(self, items: Sequence[tuple[CachedSplit, int]]):
        if not items:
            raise TextDiffError("a cache selection needs at least one image")
        if items[0][0].spec.tiled:
            raise TextDiffError("a cache selection regroups whole images: a tiles cache (data.mode: tiles) "
                                "numbers its windows per split")
        super().__init__(items[0][0].group, items[0][0].spec)
        self.items = list(items)

    @property
    def ids(self) -> list[str]:
        return [split.ids[i] for split, i in self.items]

    @property
    def texts(self) -> list[str]:
        return [split.texts[i] for split, i in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, name: str, key: Any) -> np.ndarray:
        if isinstance(key, slice):  # the whole array (texts, `approximate`): each split read once
            if key != slice(None):
                raise TypeError("a selection reads one item or the whole array")
            whole = {id(split): split._read(name, key) for split, _ in self.items}
            return np.stack([whole[id(split)][i] for split, i in self.items])
        index, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        split, i = self.items[int(index)]
        return split._read(name, (i, *rest) if rest else i)

    def feature_bytes(self) -> int:
        return max(split.feature_bytes() for split, _ in self.items)

    @property
    def view_layout(self) -> ViewLayout:
        """The training layout: the views every item has, whichever split it comes from (val and
        test items may hold test-time views beyond them, which a selection does not average)."""
        return self.spec.view_layout

    @property
    def scored_views(self) -> int:
        return 1


class SelectedCache:
    """`FeatureCache`'s read interface over regrouped splits: `splits` maps a split name to the
    (cache split, image id) pairs it holds, e.g. {"train": [("train", "TCGA-…"), ...], ...}."""

    def __init__(self, cache: FeatureCache, splits: Mapping[str, Sequence[tuple[str, str]]]):
        self.base, self.path, self.spec, self.provenance = cache, cache.path, cache.spec, cache.provenance
        self._splits: dict[str, Selection] = {}
        for name, members in splits.items():
            items = []
            for source, image_id in members:
                split = cache.split(source)
                if image_id not in split.ids:
                    raise TextDiffError(f"{cache.path}: no image {image_id} in its '{source}' split")
                items.append((split, split.ids.index(image_id)))
            self._splits[name] = Selection(items)

    def split(self, name: str) -> Selection:
        if name not in self._splits:
            raise TextDiffError(f"{self.path}: the selection has no '{name}' split")
        return self._splits[name]

    def block_channels(self) -> list[int]:
        return self.base.block_channels()

"""Segmenting new images with a trained pipeline: teacher -> features -> classifier, per image.

An image of any size is brought to the scale the classifier was trained at, cut into windows of
the training size (one window when it fits), and the foreground probabilities of overlapping
windows are blended with a Gaussian weight that trusts window centres over window borders (where
the UNet and the decoder see zero padding). The blended map is resized back to the image's size.

Which scale: the input's micrometres per pixel over the model's working resolution (model.json's
`working_mpp`; MoNuSeg's resize protocol: 0.25 x 1000/256 = 0.977 µm/px, a factor of 0.256 for a
40x image of any size, so a 3000² crop is cut into windows and its nuclei keep their size). An
explicit `scale` overrides it; `whole` resizes every image to the training size whatever its size
(the paper's protocol, right only for 1000² MoNuSeg-like tiles; also what a model trained before
the mpp was recorded gets). `tiles` models work at native resolution: factor 1 at the source mpp,
windows of `data.tile` every `data.stride`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from textdiff.data.images import IMAGE_SUFFIXES, image_files
from textdiff.data.resize import to_working_size
from textdiff.data.stain import normalize, tissue_pixels
from textdiff.data.tiles import blend_tiles, tile_grid
from textdiff.data.views import apply_view, mean_of_views, undo_view
from textdiff.encoders.image import Featurizer, build_featurizer, images_to_model_range
from textdiff.encoders.text import TextEncoder
from textdiff.errors import TextDiffError
from textdiff.model.card import ModelCard, load_trained, nuclei_rule, read_model_dir
from textdiff.model.classifier import PixelClassifier
from textdiff.model.inference import resize_probability
from textdiff.model.nuclei import NucleusRule
from textdiff.model.refine import refine_probability
from textdiff.predict.slides import SLIDE_SUFFIXES
from textdiff.teacher import checkpoint_sha256

PREDICT_SUFFIXES = tuple(dict.fromkeys(IMAGE_SUFFIXES + (".jpg", ".jpeg") + SLIDE_SUFFIXES))


def sliding_window(image: torch.Tensor, tile: int, stride: int, predict_windows, batch_size: int = 1) -> torch.Tensor:
    """Blend `predict_windows([B, 3, tile, tile]) -> B maps [..., tile, tile] (or None: glass)` over
    image [3, H, W] -> [..., H, W] (leading dims, e.g. a probability and a distance map, are blended
    alike). Windows go `batch_size` at a time, so memory is bounded by the batch, not the image.

    An image smaller than a tile is mirrored out to it (reflections of reflections where the tile is
    more than twice its size: a 256² crop at 40x is 65² at MoNuSeg's working resolution) and the
    result cropped back. Mirroring keeps nuclei-like texture everywhere; repeating the border row,
    as torch's "replicate" does, paints streaks the model was never shown (measured on MoNuSeg test
    crops: Dice 66 with streaks, see docs/generalise.md).
    """
    if batch_size < 1:
        raise TextDiffError(f"the window batch size must be at least 1, got {batch_size}")
    _, h, w = image.shape
    image = mirror_pad(image, tile)
    H, W = image.shape[1:]
    origins = tile_grid(H, W, tile, stride)
    probs: list = []
    for start in range(0, len(origins), batch_size):
        batch = origins[start : start + batch_size]
        probs.extend(predict_windows(torch.stack([image[:, y : y + tile, x : x + tile] for y, x in batch])))
    return blend_tiles(probs, origins, H, W, tile)[..., :h, :w]


def mirror_pad(image: torch.Tensor, size: int) -> torch.Tensor:
    """image [C, H, W] reflected at its bottom and right edges until both sides are at least `size`."""
    while image.shape[1] < size or image.shape[2] < size:
        h, w = image.shape[1:]
        if h < 2 or w < 2:  # a line of pixels has nothing to reflect
            image = F.pad(image[None], (0, max(0, size - w), 0, max(0, size - h)), mode="replicate")[0]
            break
        image = F.pad(image[None], (0, min(w - 1, max(0, size - w)), 0, min(h - 1, max(0, size - h))),
                      mode="reflect")[0]
    return image


GLASS_WINDOW = 0.01  # a window with less tissue than this share of its pixels is glass: not segmented


def is_glass(window: torch.Tensor) -> bool:
    """A model-range window [1, 3, h, w] that is (almost) all glass. The classifier normalises each
    image's decoder activations on their own statistics, so a blank window's faint noise would be
    stretched into confident 'nuclei' (measured: 13.6 % foreground on plain glass); glass has none."""
    rgb = ((window[0].permute(1, 2, 0).float().cpu().numpy() + 1.0) * 127.5).round().clip(0, 255)
    return float(tissue_pixels(rgb).mean()) < GLASS_WINDOW


@dataclass
class Segmenter:
    """Everything needed to segment an image: the frozen parts and the trained classifier."""

    extractor: Featurizer
    blocks: list[int]
    classifier: PixelClassifier
    encoder: object | None  # TextEncoder, None when the classifier ignores text
    image_size: int
    mode: str = "resize"
    tile: int = 256
    stride: int = 192
    scale: float | None = None
    device: torch.device = torch.device("cpu")
    protocol: str = "project"  # how prepare brought the training images to the teacher (data.protocol)
    stain: dict = field(default_factory=dict)  # data.stain's reference: inputs are normalised as prepare did
    working_mpp: float = 0.0  # µm/px the classifier works at (0: unknown, an older model: whole-image resize)
    source_mpp: float = 0.0  # the training images' µm/px: assumed for an input whose own is not known
    whole: bool = False  # resize every image to the training size (the paper's protocol), whatever its size
    rule: NucleusRule = field(default_factory=NucleusRule)  # how nuclei are separated (model.json, chosen on val)
    nucleus_area_um2: float = 0.0  # the training nuclei's median area (model.depth; 0: not recorded, no check)
    batch_size: int = 1  # windows through the teacher and the classifier at once (`--batch-size`)
    views: int = 1  # test-time augmentation: maps averaged over the first `views` dihedral views (1, 2, 4 or 8)

    def __post_init__(self) -> None:
        if self.views not in (1, 2, 4, 8):
            raise TextDiffError(f"views must be 1, 2, 4 or 8 (dihedral views averaged), got {self.views}")
        self._text_cache: dict[str, tuple] = {}

    def text_inputs(self, text: str):
        if self.encoder is None:
            return None, None, None
        if text not in self._text_cache:
            emb = self.encoder.encode([text])
            self._text_cache[text] = tuple(torch.from_numpy(a).to(self.device)
                                           for a in (emb.tokens, emb.mask, emb.pooled))
        return self._text_cache[text]

    def factor(self, mpp: float | None = None) -> float | None:
        """The input's rescale factor (input mpp / working mpp), or None for a whole-image resize:
        `--scale` wins, then `--resize-whole`; an image of unknown mpp is taken at the training source's."""
        if self.scale is not None:
            return float(self.scale)
        if self.whole or self.working_mpp <= 0:
            return None if self.mode == "resize" else 1.0
        return float(mpp or self.source_mpp) / self.working_mpp

    def probabilities(self, image: np.ndarray, text: str = "", mpp: float | None = None) -> np.ndarray:
        """Foreground probability [H, W] float32 for an RGB uint8 image [H, W, 3] of any size, at
        `mpp` micrometres per pixel (None: the training source's)."""
        return self.maps(image, text, mpp)[0]

    def maps(self, image: np.ndarray, text: str = "", mpp: float | None = None,
             refine: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(foreground probability, predicted nucleus distance or None without the head), both
        [H, W] float32 at the image's own size: what `model.nuclei.separate` reads; with `views`
        > 1 the mean over that many dihedral views. Where the model's nucleus rule says so
        (`refine_um`, chosen on val) the probability is then refined by the image's own edges, as
        evaluate refines by the source image (`refine=False`: as the classifier gave it; slides,
        whose maps stay at the working resolution, where the image holds no finer edge)."""
        prob, distance = mean_of_views(self.view_maps(image, text, mpp, range(self.views)))
        if refine and self.rule.refine_um > 0:
            prob = refine_probability(prob, image, self.rule.refine_um, float(mpp or self.source_mpp))
        return prob, distance

    @torch.no_grad()
    def view_maps(self, image: np.ndarray, text: str, mpp: float | None,
                  views: Sequence[int]) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """`maps` of each dihedral view in `views`, one after the other (`data.views.apply_view`:
        the teacher sees the turned image itself, it is not equivariant), turned back onto the image."""
        h, w = image.shape[:2]
        if self.stain:  # as prepare did to every training image, at the source resolution
            image = normalize(image, self.stain)
        tokens, mask, pooled = self.text_inputs(text)
        self.classifier.eval()

        def predict_windows(x: torch.Tensor) -> list[torch.Tensor | None]:
            """The windows' maps (None for glass), the tissue windows through the teacher and the
            classifier together: one batch (the teacher's noise is shared, so a window's maps do not
            depend on its batch-mates)."""
            out: list[torch.Tensor | None] = [None] * len(x)
            tissue = [k for k in range(len(x)) if not is_glass(x[k : k + 1])]
            if not tissue:
                return out
            feats = self.extractor(x[tissue].to(self.device))
            n = len(tissue)
            text = [t.expand(n, *t.shape[1:]) if t is not None else None for t in (tokens, mask, pooled)]
            maps = self.classifier([feats[b].to(self.device) for b in self.blocks], *text)
            prob = torch.softmax(maps["logits"].float(), dim=1)[:, 1]
            if "distance_logits" in maps:
                prob = torch.stack([prob, torch.sigmoid(maps["distance_logits"].float())[:, 0]], dim=1)
            for j, k in enumerate(tissue):
                out[k] = prob[j]
            return out

        factor = self.factor(mpp)
        if factor is None:
            size, tile, stride = (self.image_size, self.image_size), self.image_size, self.image_size
        else:
            size = (max(1, round(h * factor)), max(1, round(w * factor)))
            tile = self.tile if self.mode == "tiles" else self.image_size
            stride = self.stride if self.mode == "tiles" else max(1, (3 * self.image_size) // 4)
        x = images_to_model_range(to_working_size(image, size, self.protocol)[None])[0]
        for k in views:
            turned = apply_view(x, k).contiguous() if k else x
            blended = sliding_window(turned, tile, stride, predict_windows, self.batch_size)
            blended = undo_view(blended, k) if k else blended
            if blended.dim() == 2:
                yield np.clip(resize_probability(blended, (h, w)), 0, 1).astype(np.float32), None
            else:
                prob, distance = (np.clip(resize_probability(m, (h, w)), 0, 1).astype(np.float32) for m in blended)
                yield prob, distance


def nucleus_table(image_id: str, nuclei: np.ndarray, mpp: float = 0.0) -> list[dict]:
    """One row per separated nucleus of a label map (`model.nuclei.separate`): what a pathologist
    counts and measures; `area_um2` when the image's micrometres per pixel are known."""
    from skimage.measure import regionprops

    rows = []
    for region in regionprops(np.asarray(nuclei, np.int32)):
        cy, cx = region.centroid
        rows.append({"image": image_id, "label": int(region.label), "area": int(region.area),
                     "area_um2": round(float(region.area) * mpp**2, 2) if mpp > 0 else "",
                     "centroid_y": round(float(cy), 2), "centroid_x": round(float(cx), 2),
                     "eccentricity": round(float(region.eccentricity), 4)})
    return rows


def megapixels(shape: tuple[int, ...]) -> float:
    return math.prod(shape[:2]) / 1e6


def collect_images(inputs: list[Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted, hidden files skipped)."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = image_files(item, PREDICT_SUFFIXES)
            if not found:
                raise TextDiffError(f"{item}: folder holds no images ({', '.join(PREDICT_SUFFIXES)})")
            paths.extend(found)
        elif item.exists():
            paths.append(item)
        else:
            raise TextDiffError(f"{item}: no such file or folder")
    if not paths:
        raise TextDiffError("no images given")
    stems = [p.stem for p in paths]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise TextDiffError(f"two inputs share the id '{dupes[0]}' (file stem); outputs would collide")
    return paths


def find_teacher(card: ModelCard, model_dir: Path, override: Path | None) -> Path:
    """The teacher a model was trained with: --teacher, the path in model.json, or the one its
    cache recorded; whichever is found must have the sha256 the model was trained with."""
    candidates = [override] if override else []
    if card.teacher_path:
        candidates.append(Path(card.teacher_path))
    cache = Path(card.cache)
    if cache.is_dir():
        try:
            candidates.append(Path(zarr.open_group(str(cache), mode="r").attrs["provenance"]["teacher_path"]))
        except Exception:  # noqa: BLE001 - an unreadable cache is just one less place to look
            pass
    for path in candidates:
        if path and path.is_file():
            if checkpoint_sha256(path) != card.spec.teacher_sha256:
                raise TextDiffError(f"{path}: not the teacher {model_dir} was trained with (sha256 differs)")
            return path
    raise TextDiffError(f"{model_dir}/model.json: the teacher it was trained with was not found; pass --teacher PATH")


def build_segmenter(model_dir: Path, device: torch.device, teacher_override: Path | None,
                    scale: float | None, whole: bool = False, batch_size: int = 1,
                    views: int | None = None) -> tuple[Segmenter, ModelCard]:
    """Everything a trained model needs to segment new images, rebuilt from its model.json; `views`
    None = the test-time views its test scores were measured with (`extract.eval_views`)."""
    classifier, card = load_trained(model_dir, device)
    spec = card.spec
    views = spec.eval_views if views is None else views
    if spec.tiled and scale is not None and not card.working_mpp:
        raise TextDiffError("--scale applies to resize-mode models; this one works at native resolution (tiles)")
    teacher = None if spec.teacher_kind == "rgb" else find_teacher(card, model_dir, teacher_override)
    encoder = None
    if card.classifier.fusion != "none":
        encoder = TextEncoder(spec.text_encoder, spec.text_max_length, device)
    segmenter = Segmenter(extractor=build_featurizer(spec, teacher, device), blocks=list(spec.blocks),
                          classifier=classifier, encoder=encoder, image_size=spec.image_size, mode=spec.mode,
                          tile=spec.tile or spec.image_size, stride=spec.stride or spec.image_size, scale=scale,
                          device=device, protocol=spec.protocol, stain=dict(spec.stain),
                          working_mpp=card.working_mpp, source_mpp=card.source_mpp, whole=whole,
                          rule=nuclei_rule(read_model_dir(model_dir)), nucleus_area_um2=card.nucleus_area_um2,
                          batch_size=batch_size, views=views)
    return segmenter, card

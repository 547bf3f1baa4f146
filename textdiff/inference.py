"""A trained classifier on disk (model.pt + model.json) and its predictions on cached features.

model.json is the model's card: the classifier's architecture, the `CacheSpec` of the features it
was trained on (teacher, steps, blocks, text encoder, working size, protocol), the train params and
the validation score. evaluate and `textdiff predict` rebuild everything from it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from textdiff.atomic import atomic_dir
from textdiff.cache import CachedSplit, CacheSpec
from textdiff.classifier import ClassifierConfig, PixelClassifier
from textdiff.errors import TextDiffError
from textdiff.teacher.checkpoint import torch_load_reason
from textdiff.views import apply_view


@dataclass
class FeatureSample:
    """One cached image as training reads it."""

    features: list[torch.Tensor]  # per block [views, steps, C, H, W]
    mask: torch.Tensor  # [views, H, W] uint8
    tokens: torch.Tensor
    text_mask: torch.Tensor
    pooled: torch.Tensor


PRELOAD_BYTES = 6 * 2**30  # keep a split in RAM below this: zarr decompression would dominate an epoch


class SampleStore:
    """One split's samples, in RAM when small enough, else read from zarr on demand."""

    def __init__(self, split: CachedSplit, indices: list[int] | None = None):
        self.split = split
        self.indices = list(range(len(split))) if indices is None else list(indices)
        self.cached: dict[int, FeatureSample] | None = (
            {} if split.feature_bytes() * len(self.indices) < PRELOAD_BYTES else None)

    def __len__(self) -> int:
        return len(self.indices)

    def get_view(self, position: int, view: int) -> FeatureSample:
        """One view of one image, as a one-view sample: a split too large for RAM reads only that
        view from zarr (with 8 dihedral views and rotated copies, an image is 12x its own size)."""
        if self.cached is not None:
            full = self.get(position)
            return FeatureSample([f[view : view + 1] for f in full.features], full.mask[view : view + 1],
                                 full.tokens, full.text_mask, full.pooled)
        i = self.indices[position]
        tokens, text_mask, pooled = self.split.text(i)
        return FeatureSample([f[None] for f in self.split.features(i, view)], self.split.mask(i, view)[None],
                             tokens, text_mask, pooled)

    def get(self, position: int) -> FeatureSample:
        i = self.indices[position]
        if self.cached is not None and i in self.cached:
            return self.cached[i]
        tokens, text_mask, pooled = self.split.text(i)
        sample = FeatureSample(self.split.features(i), self.split.mask(i), tokens, text_mask, pooled)
        if self.cached is not None:
            self.cached[i] = sample
        return sample


def batch_of(samples: list[FeatureSample], views: list[int], jitter: list[int], device: torch.device):
    """Stack samples (one chosen cached view each, then an optional tensor-level dihedral op)."""
    feats = []
    for k in range(len(samples[0].features)):
        per = [apply_view(s.features[k][v], j) for s, v, j in zip(samples, views, jitter)]
        feats.append(torch.stack(per).to(device, non_blocking=True))
    mask = torch.stack([apply_view(s.mask[v], j) for s, v, j in zip(samples, views, jitter)])
    tokens = torch.stack([s.tokens for s in samples]).to(device)
    text_mask = torch.stack([s.text_mask for s in samples]).to(device)
    pooled = torch.stack([s.pooled for s in samples]).to(device)
    return feats, mask.long().to(device), tokens, text_mask, pooled


def resize_probability(prob: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A foreground-probability map at another size, bilinear (no antialiasing: it upsamples).
    `textdiff predict` brings a resize model's 256-px probabilities to the image's own size with it,
    and evaluate does the same for native-resolution scoring, so the two agree."""
    t = torch.as_tensor(np.ascontiguousarray(prob, dtype=np.float32)) if isinstance(prob, np.ndarray) else prob.float()
    if tuple(t.shape[-2:]) == tuple(size):
        return t.cpu().numpy()
    return F.interpolate(t[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()


@torch.no_grad()
def predict_split(model: PixelClassifier, data: SampleStore, device: torch.device,
                  keep_probs: bool = False) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Argmax masks, ground truths (and foreground probabilities) of view 0 of every image."""
    model.eval()
    preds, gts, probs = [], [], []
    for p in range(len(data)):
        feats, mask, tokens, text_mask, pooled = batch_of([data.get(p)], [0], [0], device)
        logits = model(feats, tokens, text_mask, pooled)["logits"].float()
        preds.append(logits.argmax(1)[0].cpu().numpy().astype(np.uint8))
        gts.append(mask[0].cpu().numpy().astype(np.uint8))
        if keep_probs:
            probs.append(torch.softmax(logits, 1)[0, 1].cpu().numpy())
    return preds, gts, probs


@dataclass
class ModelCard:
    """model.json: what a trained classifier is and what it needs at inference."""

    classifier: ClassifierConfig
    spec: CacheSpec
    train: dict  # the train params section
    best_epoch: int
    best_val_dice: float
    best_val_iou: float
    train_ids: list[str]
    cache: str  # the cache it was trained on
    teacher_path: str | None  # where the teacher was at training time (checked by sha256 on use)
    provenance: dict = field(default_factory=dict)
    source_mpp: float = 0.0  # data.mpp of the training images (0: a model from before it was recorded)
    working_mpp: float = 0.0  # µm per pixel the classifier works at (textdiff.magnification.working_mpp)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["classifier"] = self.classifier.to_json()
        out["cache_spec"] = out.pop("spec").to_json()
        return out

    @classmethod
    def from_json(cls, raw: dict, source: str) -> "ModelCard":
        values = dict(raw)
        spec = values.pop("cache_spec", values.pop("cache_fingerprint", None))  # the key before CacheSpec
        values["spec"] = CacheSpec.from_json(spec, source=source)
        values["classifier"] = ClassifierConfig.from_json(values["classifier"])
        return cls(**values)


def save_trained(out_dir: Path, state: dict[str, torch.Tensor], card: ModelCard) -> None:
    """model.pt + model.json, swapped in together (a half-written model is never left)."""
    with atomic_dir(out_dir) as tmp:
        torch.save(state, tmp / "model.pt")
        (tmp / "model.json").write_text(json.dumps(card.to_json(), indent=2) + "\n")


def load_classifier(state: dict, config: ClassifierConfig, device: torch.device) -> PixelClassifier:
    model = PixelClassifier(config)
    model.load_state_dict(state)
    return model.to(device).eval()


def load_trained(model_dir: Path, device: torch.device) -> tuple[PixelClassifier, ModelCard]:
    """The classifier in `model_dir` and its card; one-line errors for missing or foreign files."""
    weights, card_path = model_dir / "model.pt", model_dir / "model.json"
    if not card_path.is_file():
        raise TextDiffError(f"{card_path}: trained classifier not found (run `textdiff train`)")
    try:
        raw = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TextDiffError(f"{card_path}: not a classifier description ({type(err).__name__})") from None
    kind = raw.get("kind", "textdiff") if isinstance(raw, dict) else "textdiff"
    if kind != "textdiff":
        raise TextDiffError(f"{card_path}: holds the {kind} baseline (baseline.kind={kind}), not a TextDiff "
                            "classifier; train one with baseline.kind: none")
    if not weights.is_file():
        raise TextDiffError(f"{weights}: trained classifier not found (run `textdiff train`)")
    try:
        card = ModelCard.from_json(raw, source=str(card_path))
    except (KeyError, TypeError, AttributeError) as err:
        raise TextDiffError(f"{card_path}: not a classifier description ({type(err).__name__})") from None
    except TextDiffError as err:
        reason = str(err).removeprefix(f"{card_path}: ")
        raise TextDiffError(f"{card_path}: not a classifier description ({reason})") from None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling a foreign or damaged file raises many types
        raise TextDiffError(f"{weights}: not a loadable weights-only PyTorch file ({torch_load_reason(err)})") from None
    if not isinstance(state, dict):
        raise TextDiffError(f"{weights}: holds a {type(state).__name__}, not the classifier's state dict")
    try:
        model = load_classifier(state, card.classifier, device)
    except (RuntimeError, EOFError, ValueError, KeyError, TypeError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise TextDiffError(f"{weights}: cannot load the classifier weights ({reason})") from None
    return model, card

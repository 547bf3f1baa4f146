"""A trained classifier's predictions: over a cached split (validation, evaluate), and a
probability map brought to another size (evaluate's native scoring and `textdiff predict` share it)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from textdiff.cache.samples import SampleStore, batch_of
from textdiff.data.views import mean_of_views, undo_view
from textdiff.model.classifier import PixelClassifier


def resize_probability(prob: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A foreground-probability map at another size, bilinear (no antialiasing: it upsamples).
    `textdiff predict` brings a resize model's 256-px probabilities to the image's own size with it,
    and evaluate does the same for native-resolution scoring, so the two agree."""
    t = torch.as_tensor(np.ascontiguousarray(prob, dtype=np.float32)) if isinstance(prob, np.ndarray) else prob.float()
    if tuple(t.shape[-2:]) == tuple(size):
        return t.cpu().numpy()
    return F.interpolate(t[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()


def distance_map(out: dict) -> np.ndarray | None:
    """The predicted instance target [H, W] float32 of a one-image output, None without the head."""
    if "distance_logits" not in out:
        return None
    return torch.sigmoid(out["distance_logits"].float())[0, 0].cpu().numpy()


@torch.no_grad()
def view_maps(model: PixelClassifier, data: SampleStore, position: int, view: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The classifier's (probability, distance or None) of one cached view of one image, turned
    back onto the image."""
    feats, _, tokens, text_mask, pooled = batch_of([data.get_view(position, view)], [0], [0], device)
    out = model(feats, tokens, text_mask, pooled)
    prob = undo_view(torch.softmax(out["logits"].float(), 1)[0, 1], view)
    if "distance_logits" not in out:
        return prob, None
    return prob, undo_view(torch.sigmoid(out["distance_logits"].float())[0, 0], view)


@torch.no_grad()
def predict_split(model: PixelClassifier, data: SampleStore, device: torch.device, keep_probs: bool = False,
                  distances: list | None = None,
                  views: int = 1) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Masks, ground truths (and foreground probabilities) of every image; a list passed as
    `distances` receives each image's predicted distance map (None without the head).

    With `views` > 1 (test-time augmentation) the classifier reads the teacher's features of each
    of the first `views` cached dihedral views, one view at a time (as `textdiff predict` runs
    them), and its probabilities and distances, turned back onto the image, are averaged; the mask
    is then `probability > 0.5`. With one view it is the argmax of view 0, exactly as before."""
    model.eval()
    preds, gts, probs = [], [], []
    for p in range(len(data)):
        if views == 1:
            feats, mask, tokens, text_mask, pooled = batch_of([data.get_view(p, 0)], [0], [0], device)
            out = model(feats, tokens, text_mask, pooled)
            logits = out["logits"].float()
            preds.append(logits.argmax(1)[0].cpu().numpy().astype(np.uint8))
            gts.append(mask[0].cpu().numpy().astype(np.uint8))
            if keep_probs:
                probs.append(torch.softmax(logits, 1)[0, 1].cpu().numpy())
            if distances is not None:
                distances.append(distance_map(out))
            continue
        gts.append(data.mask(p, 0).numpy().astype(np.uint8))
        prob, distance = mean_of_views(view_maps(model, data, p, v, device) for v in range(views))
        prob = prob.cpu().numpy()
        preds.append((prob > 0.5).astype(np.uint8))
        if keep_probs:
            probs.append(prob)
        if distances is not None:
            distances.append(distance.cpu().numpy() if distance is not None else None)
    return preds, gts, probs

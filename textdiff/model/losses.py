"""Training losses: cross-entropy + soft Dice for the masks, cosine alignment for the embeddings.

The segmentation loss is the release's `CE + 1.5 * Dice` (train.py: `loss = criterion_cross_entro(
y_pred, y_batch); loss += 1.5 * criterion_dice(y_pred, y_batch)`). Its Dice is the TransUNet/LViT
`DiceLoss`: per class, over the whole batch, with squared terms in the denominator and a 1e-5
smoothing on both numerator and denominator, averaged over classes. One deliberate difference: the
release calls that loss with `softmax=False`, i.e. on raw logits; we apply the softmax, which is
what the loss is written for. `dice_on="logits"` reproduces the release (train.classifier: release).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from textdiff.errors import TextDiffError


def _check_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 4:
        raise TextDiffError(f"logits must be [B, C, H, W], got shape {tuple(logits.shape)}")
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise TextDiffError(
            f"target has shape {tuple(target.shape)}, expected {(logits.shape[0], *logits.shape[2:])}"
        )


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5,
                   on: str = "probabilities", reduce_sums: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   ) -> torch.Tensor:
    """1 - mean over classes of (2*sum(p*t) + eps) / (sum(p^2) + sum(t^2) + eps).

    p = softmax(logits) and t = one-hot(target); the sums run over the batch and all pixels
    together (as in the release), so an image with an empty class does not get a 0/0 of its own.
    `on="logits"` uses the raw logits as p, as the released code does (its `softmax=False`).
    `reduce_sums`: under DistributedDataParallel, a differentiable all-reduce of the per-class sums,
    so the Dice of a batch split over processes is the Dice of the whole batch.
    logits [B, C, H, W], target [B, H, W] integer class ids.
    """
    _check_target(logits, target)
    num_classes = logits.shape[1]
    if on not in ("probabilities", "logits"):
        raise TextDiffError(f"soft_dice_loss: on must be probabilities or logits, got {on!r}")
    probs = torch.softmax(logits.float(), dim=1) if on == "probabilities" else logits.float()
    onehot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    intersect = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    if reduce_sums is not None:
        intersect, denom = reduce_sums(torch.stack([intersect, denom])).unbind(0)
    dice = (2 * intersect + eps) / (denom + eps)
    return (1 - dice).mean()


def contrastive_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(img, txt)) over the batch: 0 when aligned, 2 when opposite."""
    if img_emb.shape != txt_emb.shape:
        raise TextDiffError(f"image embedding {tuple(img_emb.shape)} and text embedding {tuple(txt_emb.shape)} differ")
    return (1 - F.cosine_similarity(img_emb.float(), txt_emb.float(), dim=-1)).mean()


def total_loss(
    outputs: Mapping[str, torch.Tensor],
    target: torch.Tensor,
    dice_weight: float = 1.5,
    contrastive_weight: float = 0.0,
    dice_on: str = "probabilities",
    reduce_sums: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mean_weight: float = 1.0,
    distance: torch.Tensor | None = None,
    distance_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + dice_weight*Dice + contrastive_weight*contrastive, from a PixelClassifier output dict.

    Returns (loss, parts) where parts holds detached floats for logging: "ce", "dice",
    "contrastive" (only when contrastive_weight > 0) and "total". With contrastive_weight == 0 the
    contrastive term is not computed at all. With `distance` (the instance target [B, H, W] in
    [0, 1]) and `distance_weight` > 0, distance_weight * the mean squared error of
    sigmoid(distance_logits) is added ("distance" in parts), every pixel weighing the same, so the
    background is taught to stay at 0 and each nucleus to peak at its centre (DIST, Naylor et al.
    2019, regress the same map). Under DistributedDataParallel `mean_weight` scales the
    per-image means (CE, contrastive) by this rank's share of the batch times the number of ranks,
    and `reduce_sums` makes the Dice the whole batch's (see `soft_dice_loss`).
    """
    if dice_weight < 0 or contrastive_weight < 0:
        raise TextDiffError(f"loss weights must be >= 0, got dice {dice_weight}, contrastive {contrastive_weight}")
    logits = outputs["logits"]
    _check_target(logits, target)
    target = target.long()
    ce = F.cross_entropy(logits.float(), target)
    dice = soft_dice_loss(logits, target, on=dice_on, reduce_sums=reduce_sums)
    loss = mean_weight * ce + dice_weight * dice
    parts = {"ce": ce.item(), "dice": dice.item()}
    if contrastive_weight > 0:
        if "image_embedding" not in outputs or "text_embedding" not in outputs:
            raise TextDiffError("contrastive_weight > 0 needs the contrastive heads, which fusion 'none' does not have")
        con = contrastive_loss(outputs["image_embedding"], outputs["text_embedding"])
        loss = loss + mean_weight * contrastive_weight * con
        parts["contrastive"] = con.item()
    if distance_weight > 0:
        if "distance_logits" not in outputs or distance is None:
            raise TextDiffError("train.target=distance needs the distance head and the cache's instance targets")
        predicted = torch.sigmoid(outputs["distance_logits"].float())[:, 0]
        if predicted.shape != distance.shape:
            raise TextDiffError(f"distance target has shape {tuple(distance.shape)}, expected {tuple(predicted.shape)}")
        mse = F.mse_loss(predicted, distance.float())
        loss = loss + mean_weight * distance_weight * mse
        parts["distance"] = mse.item()
    parts["total"] = loss.item()
    return loss, parts

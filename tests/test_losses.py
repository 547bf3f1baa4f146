"""Losses: soft Dice limits and a hand-computed value, CE + Dice weighting, cosine alignment."""

import math

import pytest
import torch
import torch.nn.functional as F

from textdiff.errors import TextDiffError
from textdiff.model.losses import contrastive_loss, soft_dice_loss, total_loss


def _target():
    t = torch.zeros(2, 8, 8, dtype=torch.long)
    t[0, 2:5, 2:6] = 1
    t[1, 0:3, 5:8] = 1
    return t


def _logits_for(target, scale=30.0):
    onehot = F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    return scale * (2 * onehot - 1)


def test_dice_perfect_and_inverted():
    t = _target()
    assert soft_dice_loss(_logits_for(t), t).item() < 1e-6
    assert soft_dice_loss(_logits_for(1 - t), t).item() > 0.999


def test_dice_hand_computed():
    # 2x2 image, one foreground pixel, uniform logits -> p = 0.5 everywhere.
    # class 1: 2*sum(p t) = 1, sum p^2 = 1, sum t^2 = 1 -> (1 + e) / (2 + e)
    # class 0: 2*sum(p t) = 3, sum p^2 = 1, sum t^2 = 3 -> (3 + e) / (4 + e)
    e = 1e-5
    t = torch.tensor([[[0, 0], [0, 1]]])
    expected = 1 - ((1 + e) / (2 + e) + (3 + e) / (4 + e)) / 2  # ~ 0.375
    assert soft_dice_loss(torch.zeros(1, 2, 2, 2), t).item() == pytest.approx(expected, abs=1e-7)


def test_segmentation_loss_is_ce_plus_weighted_dice():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    t = _target()
    ce = F.cross_entropy(logits, t)
    dice = soft_dice_loss(logits, t)
    assert total_loss({"logits": logits}, t)[0].item() == pytest.approx((ce + 1.5 * dice).item(), rel=1e-6)
    assert total_loss({"logits": logits}, t, dice_weight=0.0)[0].item() == pytest.approx(ce.item(), rel=1e-6)


def test_contrastive_loss_values():
    v = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    assert contrastive_loss(v, v * 4).item() == pytest.approx(0.0, abs=1e-6)
    assert contrastive_loss(v, -v).item() == pytest.approx(2.0, abs=1e-6)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert contrastive_loss(a, b).item() == pytest.approx(1.0, abs=1e-6)


def test_total_loss_parts_and_skip():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    t = _target()
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # cos = 0 and 1 -> loss 0.5
    out = {"logits": logits, "image_embedding": img, "text_embedding": txt}
    loss0, parts0 = total_loss(out, t, dice_weight=1.5, contrastive_weight=0.0)
    assert "contrastive" not in parts0
    assert parts0["total"] == pytest.approx(parts0["ce"] + 1.5 * parts0["dice"], rel=1e-6)
    loss1, parts1 = total_loss(out, t, dice_weight=1.5, contrastive_weight=0.2)
    assert parts1["contrastive"] == pytest.approx(0.5, abs=1e-6)
    assert loss1.item() == pytest.approx(loss0.item() + 0.1, rel=1e-6)
    loss1.backward()
    assert logits.grad is not None
    assert math.isfinite(parts1["total"])


def test_total_loss_errors():
    t = _target()
    with pytest.raises(TextDiffError, match="contrastive"):
        total_loss({"logits": torch.zeros(2, 2, 8, 8)}, t, contrastive_weight=0.1)
    with pytest.raises(TextDiffError, match="target has shape"):
        total_loss({"logits": torch.zeros(2, 2, 8, 8)}, t[:, :4])

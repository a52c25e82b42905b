from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from busiseg.training.losses import (
    LossSpec,
    SegLoss,
    empty_loss,
    image_logits,
    soft_dice_loss,
    tversky_loss,
)


def masks(*rows: str) -> np.ndarray:
    """Tiny masks from strings: '#' is lesion."""
    return np.array([[c == "#" for c in r] for r in rows])


def test_soft_dice_and_tversky_by_hand():
    logits = torch.tensor([[[[10.0, -10.0], [-10.0, -10.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-4)
    half = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    # dice = (2*0.5 + 1) / (2 + 1 + 1) = 0.5
    assert soft_dice_loss(half, target).item() == pytest.approx(0.5)
    # tp 0.5, fp 1.5, fn 0.5: (0.5+1)/(0.5 + 0.3*1.5 + 0.7*0.5 + 1)
    expected = 1 - 1.5 / (0.5 + 0.45 + 0.35 + 1)
    assert tversky_loss(half, target, 0.3, 0.7).item() == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["bce_dice", "focal_dice", "tversky"])
def test_losses_prefer_the_right_answer(kind):
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, 2:5, 2:5] = 1
    good = (target * 2 - 1) * 6
    bad = -good
    loss = SegLoss(LossSpec(kind))
    assert loss(good, target) < loss(torch.zeros_like(good), target) < loss(bad, target)
    bce_only = SegLoss(LossSpec(kind, bce_weight=1, dice_weight=0))(torch.zeros_like(good), target)
    assert bce_only.item() == pytest.approx(math.log(2) if kind != "focal_dice" else
                                            0.25 * math.log(2), rel=1e-4)


def test_deep_supervision_list_weights_the_final_head():
    target = torch.ones(1, 1, 4, 4)
    good, bad = torch.full_like(target, 8.0), torch.full_like(target, -8.0)
    loss = SegLoss()
    mixed = loss([good, bad], target).item()
    assert mixed == pytest.approx((2 * loss(good, target).item() + loss(bad, target).item()) / 3)


@pytest.mark.parametrize("kind", ["bce_dice", "tversky"])
def test_image_reduction_charges_a_missed_small_lesion_in_full(kind):
    """Batch pooling lets a big lesion hide a missed small one; per-image reduction does not."""
    target = torch.zeros(3, 1, 16, 16)
    target[0, :, 2:14, 2:14] = 1  # big lesion, found
    target[1, :, 5:9, 5:9] = 1  # small lesion, missed
    # image 2 is normal and predicted empty
    logits = torch.where(target > 0, 10.0, -10.0)
    logits[1] = -10.0
    batch = SegLoss(LossSpec(kind, bce_weight=0, reduction="batch"))(logits, target).item()
    image = SegLoss(LossSpec(kind, bce_weight=0, reduction="image"))(logits, target).item()
    assert batch < 0.1  # the miss is 16 of 160 lesion pixels
    assert image == pytest.approx(0.5, abs=0.05)  # mean of ~0 (found) and ~1 (missed), normal out


def test_image_reduction_on_a_batch_without_lesions_leaves_the_pixel_term():
    target = torch.zeros(2, 1, 8, 8)
    logits = torch.full((2, 1, 8, 8), 0.3, requires_grad=True)
    region = soft_dice_loss(logits, target, reduction="image")
    assert region.item() == 0.0
    region.backward()  # still part of the graph
    full = SegLoss(LossSpec("bce_dice", reduction="image"))(logits, target)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert full.item() == pytest.approx(bce.item())


def test_image_reduction_matches_the_mean_of_single_image_losses():
    torch.manual_seed(0)
    target = (torch.rand(4, 1, 8, 8) > 0.7).float()
    logits = torch.randn(4, 1, 8, 8)
    each = [soft_dice_loss(logits[i:i + 1], target[i:i + 1]) for i in range(4)]
    assert soft_dice_loss(logits, target, reduction="image").item() == pytest.approx(
        torch.stack(each).mean().item())
    with pytest.raises(ValueError, match="reduction"):
        SegLoss(LossSpec(reduction="pixel"))


def test_image_logit_is_the_mean_of_the_top_share_of_pixel_logits():
    logits = torch.full((2, 1, 10, 10), -5.0)
    logits[0, 0, 0, :4] = torch.tensor([4.0, 2.0, 1.0, 9.0])
    got = image_logits(logits, topk=0.03)  # 3 of 100 pixels
    assert got.tolist() == pytest.approx([(9 + 4 + 2) / 3, -5.0])
    assert image_logits(logits, topk=1e-6)[0].item() == 9.0  # never fewer than one pixel


def test_empty_term_charges_a_small_false_positive_the_pixel_term_hardly_sees():
    """A 3×3 confident blob on a normal 32×32 image: 0.9 % of its pixels wrong."""
    target = torch.zeros(2, 1, 32, 32)
    target[1, :, 8:24, 8:24] = 1
    clean = torch.where(target > 0, 8.0, -8.0)
    blob = clean.clone()
    blob[0, :, 4:7, 4:7] = 8.0
    pixel = SegLoss(LossSpec(dice_weight=0, reduction="image"))
    empty = SegLoss(LossSpec(dice_weight=0, reduction="image", empty_weight=1.0))
    assert pixel(blob, target) - pixel(clean, target) < 0.04
    assert empty(blob, target) - empty(clean, target) > 1.0
    assert empty_loss(clean, target, 0.01) < 0.01


def test_empty_term_is_one_sided_and_averages_over_the_batch():
    target = torch.zeros(3, 1, 16, 16)
    target[0, :, 4:12, 4:12] = 1
    logits = torch.full((3, 1, 16, 16), -8.0, requires_grad=True)
    with torch.no_grad():
        logits[1] = 2.0  # one normal image all confident, the other (2) clean
    # lesion image 0 predicted empty: the Dice term's business, not this one's
    got = empty_loss(logits, target, 0.01)
    want = (torch.nn.functional.softplus(torch.tensor(2.0)) + torch.nn.functional.softplus(
        torch.tensor(-8.0))) / 3
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()
    assert logits.grad[0].abs().sum() == 0  # no gradient into the lesion image
    lesions_only = target[:1].expand(2, -1, -1, -1)
    zero = empty_loss(logits[:2], lesions_only, 0.01)
    assert zero.item() == 0.0 and zero.requires_grad


def test_empty_term_off_leaves_the_loss_bit_for_bit_unchanged():
    """empty_weight 0 is the pixel and region terms alone, exactly as before the term existed."""
    from torchvision.ops import sigmoid_focal_loss

    torch.manual_seed(1)
    target = (torch.rand(4, 1, 16, 16) > 0.8).float()
    target[2] = 0
    logits = torch.randn(4, 1, 16, 16)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    focal = sigmoid_focal_loss(logits, target, alpha=-1, gamma=2.0, reduction="mean")
    dice = soft_dice_loss(logits, target, reduction="image")
    tversky = tversky_loss(logits, target, 0.3, 0.7, reduction="image")
    bare = {"bce_dice": bce + dice, "focal_dice": focal + dice, "tversky": bce + tversky}
    for kind, want in bare.items():
        off = SegLoss(LossSpec(kind, reduction="image", empty_weight=0.0))
        assert torch.equal(off(logits, target), want)
        with_term = SegLoss(LossSpec(kind, reduction="image", empty_weight=0.5))(logits, target)
        assert torch.allclose(with_term - want, 0.5 * empty_loss(logits, target, 0.01))
        assert with_term > want
    with pytest.raises(ValueError, match="empty_topk"):
        SegLoss(LossSpec(empty_topk=0.0))

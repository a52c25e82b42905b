from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from busiseg.losses import SegLoss, empty_loss, image_logits, soft_dice_loss, tversky_loss
from busiseg.metrics import confusion, dice_iou, rounded, summarize


def masks(*rows: str) -> np.ndarray:
    """Tiny masks from strings: '#' is lesion."""
    return np.array([[c == "#" for c in r] for r in rows])


def test_dice_iou_by_hand():
    pred = masks("##..", "##..")
    true = masks("#...", "#...")
    counts = confusion(pred[None], true[None])
    assert counts.tolist() == [[2, 2, 0]]
    dice, iou = dice_iou(counts)
    assert dice[0] == pytest.approx(2 * 2 / (2 * 2 + 2 + 0))  # 0.667
    assert iou[0] == pytest.approx(2 / 4)


def test_empty_conventions():
    empty = np.zeros((1, 2, 2), bool)
    full = np.ones((1, 2, 2), bool)
    assert dice_iou(confusion(empty, empty))[0][0] == 1.0  # nothing to find, nothing found
    assert dice_iou(confusion(full, empty))[0][0] == 0.0  # false positives on a normal image
    assert dice_iou(confusion(empty, full))[0][0] == 0.0  # missed lesion


def test_summarize_on_crafted_predictions():
    true = np.stack([masks("##..", "...."), masks("....", "###."),
                     masks("....", "...."), masks("....", "....")])
    pred = np.stack([masks("##..", "...."),  # perfect: dice 1
                     masks("....", "#..."),  # tp 1 fp 0 fn 2: dice 0.5, iou 1/3
                     masks("....", "...."),  # normal, empty: good
                     masks("#...", "....")])  # normal with 1 false-positive pixel
    m, counts = summarize(pred, true, ["benign", "malignant", "normal", "normal"])
    assert m["n_lesion_images"] == 2 and m["n_normal_images"] == 2
    assert m["dice"] == pytest.approx((1 + 0.5) / 2)
    assert m["iou"] == pytest.approx((1 + 1 / 3) / 2)
    # pooled over lesion images: tp 3, fp 0, fn 2
    assert m["dice_pooled"] == pytest.approx(6 / 8)
    assert m["iou_pooled"] == pytest.approx(3 / 5)
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(3 / 5)
    assert m["dice_benign"] == 1.0 and m["dice_malignant"] == pytest.approx(0.5)
    assert m["normal_empty_rate"] == 0.5
    assert m["normal_fp_area"] == pytest.approx((0 + 1 / 8) / 2)


def test_summarize_without_normals_or_lesions_gives_null_not_nan_in_json():
    true = np.zeros((2, 2, 2), bool)
    m, _ = summarize(true, true, ["normal", "normal"])
    out = rounded(m)
    assert out["dice"] is None and out["normal_empty_rate"] == 1.0


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
    loss = SegLoss(kind)
    assert loss(good, target) < loss(torch.zeros_like(good), target) < loss(bad, target)
    bce_only = SegLoss(kind, bce_weight=1, dice_weight=0)(torch.zeros_like(good), target)
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
    batch = SegLoss(kind, bce_weight=0, reduction="batch")(logits, target).item()
    image = SegLoss(kind, bce_weight=0, reduction="image")(logits, target).item()
    assert batch < 0.1  # the miss is 16 of 160 lesion pixels
    assert image == pytest.approx(0.5, abs=0.05)  # mean of ~0 (found) and ~1 (missed), normal out


def test_image_reduction_on_a_batch_without_lesions_leaves_the_pixel_term():
    target = torch.zeros(2, 1, 8, 8)
    logits = torch.full((2, 1, 8, 8), 0.3, requires_grad=True)
    region = soft_dice_loss(logits, target, reduction="image")
    assert region.item() == 0.0
    region.backward()  # still part of the graph
    full = SegLoss("bce_dice", reduction="image")(logits, target)
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
        SegLoss(reduction="pixel")


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
    pixel = SegLoss(dice_weight=0, reduction="image")
    empty = SegLoss(dice_weight=0, reduction="image", empty_weight=1.0)
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
    torch.manual_seed(1)
    target = (torch.rand(4, 1, 16, 16) > 0.8).float()
    target[2] = 0
    logits = torch.randn(4, 1, 16, 16)
    for kind in ("bce_dice", "focal_dice", "tversky"):
        assert torch.equal(SegLoss(kind, reduction="image")(logits, target),
                           SegLoss(kind, reduction="image", empty_weight=0.0)(logits, target))
        assert SegLoss(kind, empty_weight=0.5)(logits, target) > SegLoss(kind)(logits, target)
    with pytest.raises(ValueError, match="empty_topk"):
        SegLoss(empty_topk=0.0)

from __future__ import annotations

import numpy as np
import pytest

from busiseg.evaluation.metrics import confusion, dice_iou, rounded, summarize


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

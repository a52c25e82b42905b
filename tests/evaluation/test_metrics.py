from __future__ import annotations

import math

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


def test_auroc_by_hand_with_ties_and_a_missing_class():
    from busiseg.evaluation.metrics import auroc

    labels = np.array([1, 1, 0, 0], bool)
    assert auroc(labels, np.array([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert auroc(labels, np.array([0.1, 0.2, 0.9, 0.8])) == 0.0
    assert auroc(labels, np.array([0.5, 0.9, 0.5, 0.1])) == 0.875  # (1 + 1 + 0.5 + 1) / 4
    assert math.isnan(auroc(np.array([1, 1], bool), np.array([0.1, 0.2])))


def test_auroc_is_scikit_learns_on_random_and_heavily_tied_scores():
    from sklearn.metrics import roc_auc_score

    from busiseg.evaluation.metrics import auroc

    rng = np.random.default_rng(0)
    for n, ties in ((7, 1), (50, 2), (300, 1), (700, 6), (40, None)):
        labels = rng.random(n) < 0.7
        labels[:2] = True, False
        scores = rng.random(n) if ties is None else np.round(rng.random(n), ties)
        assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        flat = np.full(n, 0.3)  # every score tied: chance
        assert auroc(labels, flat) == 0.5


def test_whole_population_figures_score_emptiness_as_the_public_benchmark_does():
    """Two lesion images (one hit at Dice 0.8, one missed) and two normals (one left empty, one
    given a false lesion): dice_all = (0.8 + 0 + 1 + 0) / 4."""
    target = np.zeros((4, 1, 10), bool)
    pred = np.zeros((4, 1, 10), bool)
    target[0, 0, :5], pred[0, 0, 1:6] = True, True  # tp 4, fp 1, fn 1: Dice 0.8
    target[1, 0, :3] = True  # missed
    pred[3, 0, :2] = True  # a lesion drawn on a normal image
    scores = np.array([0.9, 0.3, 0.2, 0.6])
    m, _ = summarize(pred, target, ["benign", "malignant", "normal", "normal"], scores)
    assert m["dice_all"] == pytest.approx((0.8 + 0 + 1 + 0) / 4)
    assert m["iou_all"] == pytest.approx((4 / 6 + 0 + 1 + 0) / 4)
    assert m["detect_sensitivity"] == 0.5 and m["detect_specificity"] == 0.5
    assert m["detect_auroc"] == 0.75  # 0.9 beats both normals, 0.3 beats one
    assert m["dice"] == pytest.approx(0.4)  # the lesion-only key keeps its meaning
    assert "detect_auroc" not in summarize(pred, target, ["benign"] * 2 + ["normal"] * 2)[0]

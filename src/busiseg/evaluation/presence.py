"""Whether an image holds a lesion at all: choosing the presence threshold, and calibrating the
lesion score into a probability one can read.

A normal breast given a "lesion" costs a healthy woman a biopsy discussion, and the lesion-only
Dice never sees it. `evaluate.presence_threshold` empties the masks of images whose lesion score
(the presence head's probability, or a model without one its most confident pixel) is below
it; `auto` chooses it, like the pixel threshold, on held-out data only (val, or the other folds)
for the best whole-population Dice (`dice_all`). `expected` keeps a mask where the calibrated
lesion probability times the Dice the mask is expected to have beats the probability that there
is no lesion at all, both fitted on held-out data the same way.
"""

from __future__ import annotations

import numpy as np

from busiseg.evaluation.metrics import PROBABILITY_GRID, confusion, dice_iou
from busiseg.inference.confidence import logit
from busiseg.inference.segment import gate

BINS = 10  # reliability bins of equal width


def dice_all(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(dice_iou(confusion(pred, truth))[0].mean()) if len(pred) else float("nan")


def choose_threshold(masks: np.ndarray, truth: np.ndarray, scores: np.ndarray) -> float | None:
    """The presence threshold with the best dice_all on these (held-out) images; None (off) when
    no threshold beats leaving every mask as it is (ties keep it off, the simpler rule)."""
    best, best_dice = None, dice_all(masks, truth)
    for t in PROBABILITY_GRID:
        d = dice_all(gate(masks, scores, float(t)), truth)
        if d > best_dice + 1e-12:
            best, best_dice = float(t), d
    return best


def fit_expected_dice(masks: np.ndarray, truth: np.ndarray,
                      trust: np.ndarray) -> tuple[tuple[float, float], ...] | None:
    """The curve of the expected-Dice rule (MaskSettings.keep): each held-out lesion image's
    Dice against its confidence, fitted isotonic (a more confident mask is never expected to be
    worse), as (confidence, Dice) knots rounded to 6 decimals, so that the rule evaluate applies
    is the one eval.json, the packaged model and an export carry. None (the gate off) without
    both lesion and normal images: with no normal image held out, emptying a mask can only lose."""
    from sklearn.isotonic import IsotonicRegression

    lesion = truth.reshape(len(truth), -1).any(axis=1)
    if lesion.all() or not lesion.any():
        return None
    dice = dice_iou(confusion(masks[lesion], truth[lesion]))[0]
    curve = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(trust[lesion], dice)
    return tuple((round(float(x), 6), round(float(y), 6))
                 for x, y in zip(curve.X_thresholds_, curve.y_thresholds_))


def fit_temperature(scores: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling: the T minimising the log loss of sigmoid(logit(score) / T), against
    Platt's smoothed targets ((n₊ + 1) / (n₊ + 2) for lesions, 1 / (n₋ + 2) for normals): with
    hard 0/1 targets, held-out scores that happen to separate the classes drive T towards 0 and
    every probability to 0 or 1, a certainty no finite sample supports."""
    z, labels = logit(scores), np.asarray(labels, dtype=bool)
    if len(z) == 0 or labels.all() or not labels.any():
        return 1.0
    n1, n0 = int(labels.sum()), int((~labels).sum())
    y = np.where(labels, (n1 + 1) / (n1 + 2), 1 / (n0 + 2))

    def nll(t: float) -> float:
        p = np.clip(1 / (1 + np.exp(-z / t)), 1e-12, 1 - 1e-12)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 121))
    t = float(grid[np.argmin([nll(g) for g in grid])])
    for step in (0.5, 0.25, 0.1, 0.05):  # refine around the grid's best, in log space
        t = min((t * np.exp(d) for d in (-step, 0, step)), key=nll)
    return float(np.clip(t, grid[0], grid[-1]))


def reliability(probs: np.ndarray, labels: np.ndarray) -> tuple[float, list[dict]]:
    """Expected calibration error over BINS equal-width bins, and the table behind the plot."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, float)
    rows, ece = [], 0.0
    for b in range(BINS):
        lo, hi = b / BINS, (b + 1) / BINS
        sel = (probs >= lo) & ((probs < hi) if b < BINS - 1 else (probs <= hi))
        if sel.any():
            conf, acc = float(probs[sel].mean()), float(labels[sel].mean())
            ece += sel.sum() / len(probs) * abs(conf - acc)
            rows.append({"bin": round((lo + hi) / 2, 3), "confidence": round(conf, 6),
                         "lesion_rate": round(acc, 6), "images": int(sel.sum())})
    return (float(ece) if len(probs) else float("nan")), rows

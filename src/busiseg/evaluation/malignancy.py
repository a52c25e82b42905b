"""Malignancy figures of the classifier's p_malignant: among the images whose lesion is labelled
benign or malignant, how well it ranks them (AUROC), its sensitivity and specificity at a
threshold chosen on other images (out of fold: on the other folds; on test: on every out-of-fold
image), and its calibration (ECE). Research figures: BUSI's labels, not a diagnosis."""

from __future__ import annotations

import numpy as np

from busiseg.evaluation.figures import FigureSettings
from busiseg.evaluation.metrics import auroc
from busiseg.evaluation.presence import fit_temperature, reliability
from busiseg.inference.confidence import calibrate

LABELLED = {"benign": 0, "malignant": 1}


def labelled(classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(which images have a benign/malignant label, the 0/1 labels of those)."""
    known = np.array([c in LABELLED for c in classes], dtype=bool)
    return known, np.array([LABELLED[c] for c in classes if c in LABELLED], dtype=np.float64)


def youden_threshold(prob: np.ndarray, label: np.ndarray) -> float:
    """The cut with the best sensitivity + specificity (Youden's J), the midpoint between two
    observed probabilities so it never sits on an image; 0.5 without both classes."""
    if len(np.unique(label)) < 2:
        return 0.5
    values = np.unique(prob)
    cuts = np.concatenate([[0.0], (values[1:] + values[:-1]) / 2, [1.0]])
    pos, neg = label == 1, label == 0
    j = [(prob[pos] >= c).mean() + (prob[neg] < c).mean() for c in cuts]
    return float(cuts[int(np.argmax(j))])


def _sensitivity(rows: np.ndarray) -> float:
    pos = rows[:, 1] == 1
    return float(rows[pos, 2].mean()) if pos.any() else float("nan")


def _specificity(rows: np.ndarray) -> float:
    neg = rows[:, 1] == 0
    return float(1 - rows[neg, 2].mean()) if neg.any() else float("nan")


STATS = {"auroc": lambda r: auroc(r[:, 1], r[:, 0]), "sensitivity": _sensitivity,
         "specificity": _specificity}


def malignancy_figures(f: FigureSettings, prob: np.ndarray, classes: list[str],
                       threshold: np.ndarray | float, prefix: str = "",
                       calibrated: np.ndarray | None = None) -> dict:
    """`prob`: p_malignant of every image, `calibrated` (default `prob`) the same calibrated;
    `threshold`: one cut on the calibrated value, or one per image (out of fold, each fold's
    own). Keys `{prefix}malignant_auroc` (the ranking of `prob`, as detection's AUROC ranks the
    raw lesion score: folds calibrated apart are not pooled), `_sensitivity`, `_specificity`
    with 95 % intervals, `_ece` (of the calibrated value), and the counts; none without
    labelled images of both classes."""
    known, label = labelled(classes)
    if len(np.unique(label)) < 2:
        return {}
    calibrated = prob if calibrated is None else calibrated
    cut = np.broadcast_to(np.asarray(threshold, dtype=np.float64), prob.shape)[known]
    p, c = prob[known], calibrated[known]
    rows = np.column_stack([p, label, (c >= cut).astype(np.float64)])
    out = {}
    for key, stat in STATS.items():
        out[f"{prefix}malignant_{key}"] = stat(rows)
        low, high = f.interval(rows, stat)
        out[f"{prefix}malignant_{key}_ci_low"], out[f"{prefix}malignant_{key}_ci_high"] = low, high
    out[f"{prefix}malignant_ece"] = reliability(c, label.astype(bool))[0]
    out[f"{prefix}n_malignant"] = int(label.sum())
    out[f"{prefix}n_benign"] = int((label == 0).sum())
    return out


def malignancy_keys(f: FigureSettings, held: np.ndarray, held_classes: list[str],
                    held_fold: np.ndarray | None, test: np.ndarray,
                    test_classes: list[str]) -> tuple[dict, np.ndarray, np.ndarray]:
    """p_malignant calibrated, and its cut chosen, on held-out images: a temperature that
    calibrates it among the labelled ones (as the lesion score's), then Youden's cut on the
    calibrated value. Out of fold (`held_fold` given) each fold takes what the other folds
    chose, `cv_` keys; test what every held-out image chose. Without folds `held` is val: the
    choice is made there and only test is reported. Returns the keys and the calibrated
    p_malignant of the held-out and the test images."""
    known, known_labels = labelled(held_classes)
    label = np.zeros(len(held))  # per image; read only where `known`
    label[known] = known_labels
    folds = [] if held_fold is None else list(np.unique(held_fold))
    chosen_on = {None: known, **{k: known & (held_fold != k) for k in folds}}
    temperature = {k: round(fit_temperature(held[use], label[use].astype(bool)), 6)  # as eval.json
                   for k, use in chosen_on.items()}
    calibrated = {k: calibrate(held, t) for k, t in temperature.items()}
    test_calibrated = calibrate(test, temperature[None])
    cut = {k: youden_threshold(calibrated[k][use], label[use]) for k, use in chosen_on.items()}
    out, held_calibrated = {}, calibrated[None].copy()
    if folds:
        cuts = np.zeros(len(held))
        for k in folds:
            mine = held_fold == k
            cuts[mine], held_calibrated[mine] = cut[k], calibrated[k][mine]
        out.update(malignancy_figures(f, held, held_classes, cuts, "cv_", held_calibrated))
    out.update(malignancy_figures(f, test, test_classes, cut[None], calibrated=test_calibrated))
    if len(np.unique(label[known])) == 2:  # else nothing was fitted
        out.update(malignant_threshold=cut[None], malignant_temperature=temperature[None])
    return out, held_calibrated, test_calibrated

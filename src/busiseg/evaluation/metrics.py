"""Segmentation metrics with explicit conventions.

Published BUSI numbers mix per-image means, batch-pooled pixels and the inclusion of normal images;
every figure here says which it is (see the README's "How the numbers are computed").
"""

from __future__ import annotations

import numpy as np

from busiseg.data.classes import TUMOUR_CLASSES
from busiseg.data.images import outline
from busiseg.errors import BusisegError

PROBABILITY_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)  # candidate pixel/presence thresholds


def confusion(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image pixel counts [tp, fp, fn] for boolean arrays shaped N×H×W (or N×1×H×W)."""
    p = pred.reshape(len(pred), -1).astype(bool)
    t = target.reshape(len(target), -1).astype(bool)
    tp = np.count_nonzero(p & t, axis=1)
    fp = np.count_nonzero(p & ~t, axis=1)
    fn = np.count_nonzero(~p & t, axis=1)
    return np.stack([tp, fp, fn], axis=1).astype(np.int64)


def dice_iou(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU; an image with no lesion and no prediction scores 1 (perfect)."""
    tp, fp, fn = counts[:, 0].astype(float), counts[:, 1].astype(float), counts[:, 2].astype(float)
    denom_d = 2 * tp + fp + fn
    denom_i = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denom_d > 0, 2 * tp / denom_d, 1.0)
        iou = np.where(denom_i > 0, tp / denom_i, 1.0)
    return dice, iou


def lesion_dice_iou(counts: np.ndarray) -> tuple[float, float]:
    """Per-image mean Dice and IoU over images whose ground truth has a lesion (tp + fn > 0)."""
    dice, iou = dice_iou(counts)
    lesion = (counts[:, 0] + counts[:, 2]) > 0
    if not lesion.any():
        return float("nan"), float("nan")
    return float(dice[lesion].mean()), float(iou[lesion].mean())


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for boolean `labels`, ties counted half: the
    Mann–Whitney U over the positives' mid-ranks (the value scikit-learn's roc_auc_score gives,
    without its input checks, which cost a millisecond on each of the bootstrap's thousand
    resamples); NaN when one class is absent."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.all() or not labels.any():
        return float("nan")
    _, where, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2  # tied scores share their mean rank
    positives = int(labels.sum())
    u = mid_rank[where.reshape(-1)][labels].sum() - positives * (positives + 1) / 2
    return float(u / (positives * (len(labels) - positives)))


SENSITIVITY_FLOOR = 0.95  # the screening operating point: miss at most one lesion in twenty


def specificity_at_sensitivity(labels: np.ndarray, scores: np.ndarray,
                               floor: float = SENSITIVITY_FLOOR) -> float:
    """The best specificity any cut on `scores` reaches while it still finds at least `floor`
    of the lesion images (score ≥ cut counts as found): how good a detector the score is where a
    screening reader would run it, whatever cut the gate itself chose. NaN when one class is
    absent."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float)
    if labels.all() or not labels.any():
        return float("nan")
    found = np.sort(scores[labels])[::-1]
    cut = found[max(1, int(np.ceil(floor * len(found) - 1e-9))) - 1]
    return float((scores[~labels] < cut).mean())


def detection(labels: np.ndarray, decisions: np.ndarray,
              scores: np.ndarray | None = None) -> dict:
    """Image level, lesion vs normal: sensitivity (lesion images given a mask), specificity
    (normal images left empty) and, with a per-image score, the AUROC."""
    labels, decisions = np.asarray(labels, bool), np.asarray(decisions, bool)
    out = {"detect_sensitivity": float(decisions[labels].mean()) if labels.any() else np.nan,
           "detect_specificity": float((~decisions[~labels]).mean()) if (~labels).any()
           else np.nan}
    if scores is not None:
        out["detect_auroc"] = auroc(labels, scores)
    return out


def population_rows(counts: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """One row per image for the whole-population figures and their bootstrap: Dice and IoU with
    emptiness scored (1 for an empty prediction on an empty truth, 0 for any disagreement),
    lesion label, non-empty prediction, score."""
    dice, iou = dice_iou(counts)
    labels = (counts[:, 0] + counts[:, 2]) > 0
    decisions = (counts[:, 0] + counts[:, 1]) > 0
    score = np.full(len(counts), np.nan) if scores is None else np.asarray(scores, float)
    return np.column_stack([dice, iou, labels, decisions, score])


POPULATION_STATS = {  # key -> statistic of population_rows
    "dice_all": lambda r: float(r[:, 0].mean()),
    "iou_all": lambda r: float(r[:, 1].mean()),
    "detect_sensitivity": lambda r: detection(r[:, 2], r[:, 3])["detect_sensitivity"],
    "detect_specificity": lambda r: detection(r[:, 2], r[:, 3])["detect_specificity"],
    "detect_auroc": lambda r: auroc(r[:, 2].astype(bool), r[:, 4]),
    "detect_specificity_at_sens95": lambda r: specificity_at_sensitivity(r[:, 2], r[:, 4]),
}
SCORE_STATS = ("detect_auroc", "detect_specificity_at_sens95")  # need a per-image score


def population(counts: np.ndarray, scores: np.ndarray | None = None) -> dict:
    """Whole-population figures over every image, normals included: `dice_all` / `iou_all`
    (the public BUS benchmark's per-image convention) and image-level detection."""
    rows = population_rows(counts, scores)
    keys = [k for k in POPULATION_STATS if scores is not None or k not in SCORE_STATS]
    return {k: POPULATION_STATS[k](rows) if len(rows) else float("nan") for k in keys}


def summarize(pred: np.ndarray, target: np.ndarray, classes: list[str],
              scores: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """Test-set figures of N×H×W masks of one size (`summarize_counts`), and their per-image
    confusion counts."""
    counts = confusion(pred, target)
    pixels = np.full(len(counts), pred[0].size if len(pred) else 1, dtype=np.float64)
    return summarize_counts(counts, pixels, classes, scores), counts


def summarize_counts(counts: np.ndarray, pixels: np.ndarray, classes: list[str],
                     scores: np.ndarray | None = None) -> dict:
    """Test-set figures from per-image confusion counts (tp, fp, fn) and each image's pixel
    count, so images of different sizes (`busiseg score`) are summarised as evaluate's are:
    Dice/IoU over lesion images only; normals scored by false positives, as a share of their
    own image; and the whole population (`population`), with `scores` (per image) for the
    AUROC."""
    dice, iou = dice_iou(counts)
    classes_arr = np.asarray(classes)
    lesion = (counts[:, 0] + counts[:, 2]) > 0
    normal = ~lesion
    tp, fp, fn = counts[lesion].sum(axis=0) if lesion.any() else (0, 0, 0)
    pred_area = counts[:, 0] + counts[:, 1]
    out = {
        "n_lesion_images": int(lesion.sum()),
        "n_normal_images": int(normal.sum()),
        "dice": float(dice[lesion].mean()) if lesion.any() else float("nan"),
        "iou": float(iou[lesion].mean()) if lesion.any() else float("nan"),
        "dice_pooled": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou_pooled": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }
    for cls in TUMOUR_CLASSES:
        sel = lesion & (classes_arr == cls)
        out[f"dice_{cls}"] = float(dice[sel].mean()) if sel.any() else float("nan")
        out[f"iou_{cls}"] = float(iou[sel].mean()) if sel.any() else float("nan")
    out["normal_empty_rate"] = (float((pred_area[normal] == 0).mean()) if normal.any()
                                else float("nan"))
    out["normal_fp_area"] = (float((pred_area[normal] / pixels[normal]).mean()) if normal.any()
                             else float("nan"))
    out.update(population(counts, scores))
    return out


def _stack(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks, dtype=bool)
    return masks[:, 0] if masks.ndim == 4 and masks.shape[1] == 1 else masks


def boundary_metrics(pred: np.ndarray, true: np.ndarray, spacing: np.ndarray,
                     tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-image 95 % Hausdorff distance (HD95) and normalised surface Dice (NSD): how far the
    predicted outline strays from the true one, which Dice barely sees on a large lesion.

    pred, true: N×H×W boolean masks (N×1×H×W accepted). spacing: N×2 (or one 2-vector for all)
    size of a pixel along rows and columns, in the unit the distances and `tolerance` are in.
    Distances run from each boundary pixel (`outline`) to the nearest boundary pixel of the
    other mask, Euclidean in that unit. HD95 is the larger of the two directed 95th percentiles
    (P's boundary to T's, T's to P's; numpy's linear interpolation), as in MONAI and Metrics
    Reloaded, not the percentile of their union. NSD is the share of both boundaries within
    `tolerance` (≤) of the other: (|∂P near ∂T| + |∂T near ∂P|) / (|∂P| + |∂T|) (Nikolov et al.
    2021).

    Empty masks, scored rather than dropped as Metrics Reloaded advises: both empty (a normal
    image left empty) is perfect, HD95 0 and NSD 1; exactly one empty is the worst case, NSD 0
    and HD95 the image's diagonal in the spacing's unit, √((H·row spacing)² + (W·column
    spacing)²), longer than any distance between two of its pixels, so a missed lesion never
    scores better than a badly drawn one."""
    from scipy import ndimage

    pred, true = _stack(pred), _stack(true)
    if pred.ndim != 3 or pred.shape != true.shape:
        raise BusisegError(f"boundary_metrics: prediction {pred.shape} and truth {true.shape} "
                           "must be the same N×H×W masks")
    n, height, width = pred.shape
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (n, 2))
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise BusisegError("boundary_metrics: every pixel spacing must be a positive number")
    if not tolerance >= 0:
        raise BusisegError(f"boundary_metrics: tolerance is {tolerance}; it must be ≥ 0")
    edge_p, edge_t = outline(pred), outline(true)
    hd95, nsd = np.zeros(n), np.ones(n)
    for i in range(n):
        p, t = edge_p[i], edge_t[i]
        has_p, has_t = p.any(), t.any()
        if not (has_p and has_t):
            if has_p or has_t:
                hd95[i] = float(np.hypot(height * spacing[i, 0], width * spacing[i, 1]))
                nsd[i] = 0.0
            continue
        rows, cols = np.flatnonzero((p | t).any(axis=1)), np.flatnonzero((p | t).any(axis=0))
        box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # every point involved is in it
        p, t = p[box], t[box]
        p_to_t = ndimage.distance_transform_edt(~t, sampling=spacing[i])[p]
        t_to_p = ndimage.distance_transform_edt(~p, sampling=spacing[i])[t]
        hd95[i] = max(np.percentile(p_to_t, 95), np.percentile(t_to_p, 95))
        near = np.count_nonzero(p_to_t <= tolerance) + np.count_nonzero(t_to_p <= tolerance)
        nsd[i] = near / (len(p_to_t) + len(t_to_p))
    return hd95, nsd


def rounded(metrics: dict, digits: int = 6) -> dict:
    """JSON-friendly: round floats, turn NaN into None (JSON has no NaN)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, float):
            out[k] = None if np.isnan(v) else round(v, digits) + 0.0  # no "-0.0"
        else:
            out[k] = v
    return out


def lesion_dice_per_image(counts: np.ndarray) -> np.ndarray:
    """Per-image Dice of the images whose ground truth has a lesion: the values `dice` averages."""
    dice, _ = dice_iou(counts)
    return dice[(counts[:, 0] + counts[:, 2]) > 0]


def risk_coverage(risk: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage k/n and the mean risk of the k most confident images, k = 1..n. Images with equal
    confidence cannot be told apart, so each tied group contributes its mean risk (the expected
    curve over every order of the ties), never the order they happen to be listed in."""
    risk, conf = np.asarray(risk, dtype=np.float64), np.asarray(confidence, dtype=np.float64)
    n = len(risk)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-conf, kind="stable")
    risk, conf = risk[order], conf[order]
    _, start, counts = np.unique(-conf, return_index=True, return_counts=True)
    group_mean = np.add.reduceat(risk, start) / counts
    smoothed = np.repeat(group_mean, counts)
    k = np.arange(1, n + 1)
    return k / n, np.cumsum(smoothed) / k


def aurc(risk: np.ndarray, confidence: np.ndarray) -> float:
    """Area under the risk–coverage curve (the mean selective risk over coverages 1/n..1): low
    when the confident images are the good ones. Risk is 1 − per-image Dice, all images."""
    return float(risk_coverage(risk, confidence)[1].mean()) if len(risk) else float("nan")


def aurc_baselines(risk: np.ndarray) -> dict:
    """What `aurc` means: a random order scores the mean risk, an oracle that ranks by the risk
    itself the least any score can."""
    risk = np.asarray(risk, dtype=np.float64)
    if not len(risk):
        return {"aurc_random": float("nan"), "aurc_optimal": float("nan")}
    return {"aurc_random": float(risk.mean()), "aurc_optimal": aurc(risk, -risk)}

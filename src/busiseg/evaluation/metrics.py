"""Segmentation metrics with explicit conventions.

Published BUSI numbers mix per-image means, batch-pooled pixels and the inclusion of normal images;
every figure here says which it is (see the README's "How the numbers are computed").
"""

from __future__ import annotations

import numpy as np

from busiseg.data.classes import TUMOUR_CLASSES


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


def summarize(pred: np.ndarray, target: np.ndarray, classes: list[str]) -> tuple[dict, np.ndarray]:
    """Test-set figures: Dice/IoU over lesion images only; normals scored by false positives."""
    counts = confusion(pred, target)
    dice, iou = dice_iou(counts)
    classes_arr = np.asarray(classes)
    lesion = target.reshape(len(target), -1).any(axis=1)
    normal = ~lesion
    tp, fp, fn = counts[lesion].sum(axis=0) if lesion.any() else (0, 0, 0)
    n_pixels = pred[0].size if len(pred) else 1
    pred_area = pred.reshape(len(pred), -1).sum(axis=1)
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
    out["normal_fp_area"] = (float(pred_area[normal].mean() / n_pixels) if normal.any()
                             else float("nan"))
    return out, counts


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


def bootstrap_ci(rows: np.ndarray, stat, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of `stat` over images resampled with replacement (rows of `rows`, one
    per image, so paired columns stay paired). Seeded: the same call gives the same interval."""
    rows = np.asarray(rows, dtype=float)
    if len(rows) == 0 or n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(rows), size=(n_boot, len(rows)))
    stats = np.array([stat(rows[d]) for d in draws])
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)

"""The figures of one set of masks against the truth, written once for evaluate's test split,
its out-of-fold images and `busiseg score`: each image is measured first (metrics, presence,
sizes), then the measures are summed up here, each figure with its bootstrap 95 % interval, in
the order eval.json lists them. Each caller decides which masks it scores; how they are scored
is written here once: evaluate calls figures_of, and `busiseg score`, which has no per-image
lesion score, calls the same interval, boundary, size and population functions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from busiseg.evaluation import presence
from busiseg.evaluation.metrics import (
    POPULATION_STATS,
    SCORE_STATS,
    aurc,
    aurc_baselines,
    boundary_metrics,
    lesion_dice_per_image,
    population_rows,
    risk_coverage,
    summarize,
)
from busiseg.inference.segment import Decided
from busiseg.inference.sizes import size_tables
from busiseg.params import EvaluateParams


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
    stats = stats[~np.isnan(stats)]  # a resample without normals has no specificity
    if len(stats) == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class FigureSettings:
    """The params that say how a figure is drawn, not which masks it scores: the bootstrap
    (resamples, seed), NSD's tolerance in original pixels, and whether images are flagged."""

    bootstrap: int = EvaluateParams.bootstrap
    bootstrap_seed: int = EvaluateParams.bootstrap_seed
    surface_tolerance: float = EvaluateParams.surface_tolerance
    flagging: bool = False  # evaluate.review_fraction > 0: the kept and flagged images' Dice

    @classmethod
    def of(cls, e: EvaluateParams) -> FigureSettings:
        return cls(e.bootstrap, e.bootstrap_seed, e.surface_tolerance, e.review_fraction > 0)

    def interval(self, rows: np.ndarray, stat) -> tuple[float, float]:
        return bootstrap_ci(rows, stat, self.bootstrap, self.bootstrap_seed)


def mean_of_first(rows: np.ndarray) -> float:
    return float(rows[:, 0].mean())


def population_intervals(f: FigureSettings, rows: np.ndarray, scored: bool,
                         prefix: str = "") -> dict:
    """Bootstrap 95 % intervals of every whole-population figure (`dice_all`, ...) over
    metrics.population_rows; without per-image scores (busiseg score) no AUROC."""
    out = {}
    for key, stat in POPULATION_STATS.items():
        if not scored and key in SCORE_STATS:
            continue
        out[f"{prefix}{key}_ci_low"], out[f"{prefix}{key}_ci_high"] = f.interval(rows, stat)
    return out


def boundary_means(f: FigureSettings, hd95: np.ndarray, nsd: np.ndarray, lesion: np.ndarray,
                   prefix: str = "") -> dict:
    """The means of per-image HD95 and NSD over the `lesion` images, as `dice` is taken, and
    their intervals. busiseg score measures its masks apart (they differ in size)."""
    out = {}
    for key, values in (("hd95", hd95), ("nsd", nsd)):
        out[f"{prefix}{key}"] = float(values[lesion].mean()) if lesion.any() else float("nan")
        out[f"{prefix}{key}_ci_low"], out[f"{prefix}{key}_ci_high"] = f.interval(
            values[lesion][:, None], mean_of_first)
    return out


def size_figures(f: FigureSettings, sizes: pd.DataFrame, lesion: np.ndarray,
                 prefix: str = "") -> tuple[dict, pd.DataFrame]:
    """From each image's predicted and true sizes (inference.sizes.size_tables), the long
    axis's error, and its mean absolute value over the `lesion` images, as hd95 is taken, with
    a 95 % interval: in px, and in mm over the lesion images whose pixel size is known (with
    their count), where there are any."""
    table, out = sizes.copy(), {}
    for unit in ("px", "mm"):
        error = (table[f"long_axis_{unit}"] - table[f"true_long_axis_{unit}"]).to_numpy()
        table[f"long_axis_error_{unit}"] = error
        use = lesion & ~np.isnan(error)
        if unit == "mm" and not use.any():
            continue
        key = f"{prefix}long_axis_mae_{unit}"
        out[key] = float(np.abs(error[use]).mean()) if use.any() else float("nan")
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = f.interval(np.abs(error[use])[:, None],
                                                                 mean_of_first)
        if unit == "mm":
            out[f"{prefix}n_long_axis_mm"] = int(use.sum())
    return out, table.round(4)


def _dice_where(rows: np.ndarray, flagged: int) -> float:
    """Mean per-image Dice (column 0) of the rows whose flag (column 2) is `flagged`."""
    sel = rows[:, 2] == flagged
    return float(rows[sel, 0].mean()) if sel.any() else float("nan")


TRUST_STATS = {  # key -> statistic of rows (per-image Dice over all images, confidence, flag)
    "aurc": lambda r: aurc(1 - r[:, 0], r[:, 1]),
    "dice_kept": lambda r: _dice_where(r, 0),
    "dice_flagged": lambda r: _dice_where(r, 1),
    "dice_kept_gain": lambda r: _dice_where(r, 0) - float(r[:, 0].mean()),
}


def trust_figures(f: FigureSettings, population: np.ndarray, trust: np.ndarray,
                  flagged: np.ndarray, prefix: str = "") -> dict:
    """How well the confidence ranks the predictions: the area under the risk–coverage curve
    (risk = 1 − per-image Dice, every image, normals scored as in dice_all: `population`'s
    column 0) beside what a random and an oracle ranking would give; with a review threshold,
    the Dice of the kept and the flagged images and what flagging gains the kept ones, each
    with its 95 % interval. Out of fold each fold is flagged at the threshold chosen on the
    other folds."""
    rows = np.column_stack([population[:, 0], trust, flagged])
    keys = ["aurc", *(["dice_kept", "dice_flagged", "dice_kept_gain"] if f.flagging else [])]
    out = aurc_baselines(1 - population[:, 0])
    for key in keys:
        out[key] = TRUST_STATS[key](rows) if len(rows) else float("nan")
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = f.interval(rows, TRUST_STATS[key])
    if f.flagging:
        out["flagged_fraction"] = float(np.mean(flagged)) if len(flagged) else float("nan")
    return {f"{prefix}{k}": v for k, v in out.items()}


@dataclass
class Scored:
    """One set of images as the chosen settings decided them, all the figures read."""

    rows: pd.DataFrame  # the split's rows of these images (case_id, class)
    true: np.ndarray  # N boolean masks at the cache's size
    decided: Decided  # the masks, lesion scores, calibrated scores, confidences, flags
    spacing: np.ndarray | None  # (row, column) pixel size in original pixels; None: no unit
    mm: np.ndarray | None  # an original pixel in mm, NaN where unknown


@dataclass
class Figures:
    metrics: dict  # summarize's keys, the Dice interval, boundary, sizes, population intervals
    detect_ece: float  # the calibrated lesion score's expected calibration error
    trust: dict  # trust_figures
    table: pd.DataFrame  # one row per image
    counts: np.ndarray  # per image (tp, fp, fn), as metrics.confusion
    reliability: pd.DataFrame  # the calibrated score's reliability bins


def figures_of(f: FigureSettings, s: Scored, prefix: str = "") -> Figures:
    """Every figure of `s`, keys prefixed (`cv_` out of fold), in eval.json's order."""
    d = s.decided
    metrics, counts = summarize(d.masks, s.true, s.rows["class"].tolist(), d.scores)
    population = population_rows(counts, d.scores)  # Dice, IoU, lesion, decision, score
    lesion_dice = lesion_dice_per_image(counts)
    lesion = population[:, 2] > 0
    measured = s.spacing is not None  # a distance or a size needs the original pixel as unit
    if measured:
        hd95, nsd = boundary_metrics(d.masks, s.true, s.spacing, f.surface_tolerance)
    ece, reliability = presence.reliability(d.calibrated, lesion)
    if measured:
        sizes = size_tables(d.masks, s.true, s.spacing, s.mm)

    metrics = {**{f"{prefix}{k}": v for k, v in metrics.items()},
               **dict(zip((f"{prefix}dice_ci_low", f"{prefix}dice_ci_high"),
                          f.interval(lesion_dice[:, None], mean_of_first)))}
    table = per_image_table(s, population)
    if measured:
        table["hd95"], table["nsd"] = np.round(hd95, 6), np.round(nsd, 6)
        sized, sizes = size_figures(f, sizes, lesion, prefix)
        metrics.update({**boundary_means(f, hd95, nsd, lesion, prefix), **sized})
        table = pd.concat([table, sizes], axis=1)
    metrics.update(population_intervals(f, population, True, prefix))
    return Figures(metrics, ece, trust_figures(f, population, d.trust, d.flagged, prefix), table,
                   counts, reliability)


def gain_over_members(rows: np.ndarray) -> float:
    """Column 0 is the ensemble's per-image Dice, the others each member's on the same image."""
    return float(rows[:, 0].mean() - rows[:, 1:].mean())


def member_figures(f: FigureSettings, ensemble_counts: np.ndarray, member_masks: list,
                   true: np.ndarray, classes: list[str]) -> dict:
    """Each fold model alone on the test images (`member_masks`: its masks at the ensemble's
    settings), and what the ensemble gains over them (paired per image, with its interval)."""
    singles = [lesion_dice_per_image(summarize(masks, true, classes)[1])
               for masks in member_masks]
    ensemble = lesion_dice_per_image(ensemble_counts)
    paired = np.column_stack([ensemble, *singles])
    gain_low, gain_high = f.interval(paired, gain_over_members)
    return {
        "dice_single_mean": float(np.mean([s.mean() for s in singles])) if len(ensemble)
        else float("nan"),
        **{f"dice_single_{k}": float(s.mean()) if len(s) else float("nan")
           for k, s in enumerate(singles)},
        "dice_ensemble_gain": gain_over_members(paired) if len(ensemble) else float("nan"),
        "dice_ensemble_gain_ci_low": gain_low,
        "dice_ensemble_gain_ci_high": gain_high,
    }


def per_image_table(s: Scored, population: np.ndarray) -> pd.DataFrame:
    d = s.decided
    return pd.DataFrame({
        "case_id": s.rows["case_id"].tolist(),
        "class": s.rows["class"].tolist(),
        "dice": np.round(population[:, 0], 6),
        "iou": np.round(population[:, 1], 6),
        "lesion_area": s.true.reshape(len(s.true), -1).mean(axis=1).round(6),
        "pred_area": d.masks.reshape(len(d.masks), -1).mean(axis=1).round(6),
        "image_score": np.round(d.scores, 6),
        "confidence": np.round(d.trust, 6),
        "flagged": np.asarray(d.flagged, dtype=int),
    })


def risk_coverage_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The risk–coverage curve of each per-image table that carries a confidence (1 − per-image
    Dice over every image, the most confident first): the data behind risk_coverage.png and
    `dvc plots diff`."""
    parts = []
    for name, table in tables.items():
        if len(table) and "confidence" in table:
            coverage, risk = risk_coverage(1 - table["dice"].to_numpy(),
                                           table["confidence"].to_numpy())
            parts.append(pd.DataFrame({"set": name, "coverage": coverage.round(6),
                                       "risk": risk.round(6)}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["set", "coverage", "risk"])

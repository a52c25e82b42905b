"""Evaluate: score the chosen model on the held-out test split.

The threshold is fixed by params or tuned on the validation split, never on test. Post-processing
(largest component, hole filling) and flip test-time augmentation are params, applied identically
to val and test. With `select_on_val` the pieces the params enable are candidates: every subset is
scored on val and the best is applied to test, so a piece that hurts on this model is dropped
without looking at test.

With a cross-validation model (`split.folds` = K) the same choice is made on the out-of-fold
predictions instead of val, the test keys score the fold ensemble, and the `cv_` keys score every
non-test case by the one fold model that never trained on it, with a choice made on the other
folds only, so tuning never sees the fold it is scored on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import product

import numpy as np
import pandas as pd
import torch

from busiseg.data.cache import Cache, load_cache
from busiseg.errors import BusisegError
from busiseg.evaluation.metrics import (
    bootstrap_ci,
    confusion,
    dice_iou,
    lesion_dice_iou,
    lesion_dice_per_image,
    rounded,
    summarize,
)
from busiseg.inference.segment import binarize, probabilities
from busiseg.modeling.model_file import load_model
from busiseg.params import Params
from busiseg.runtime.device import amp_dtype, place

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)
PIECES = ("tta", "largest_cc", "fill_holes", "tune_threshold")


def binarize_as(probs: np.ndarray, threshold: float, p: Params) -> np.ndarray:
    return binarize(probs, threshold, p.evaluate.largest_cc, p.evaluate.fill_holes)


def lesion_dice(pred: np.ndarray, target: np.ndarray) -> float:
    return lesion_dice_iou(confusion(pred, target))[0]


def threshold_sweep(va_prob: np.ndarray, va_true: np.ndarray, p: Params) -> pd.DataFrame:
    """Val lesion Dice at every candidate threshold, post-processing as configured in p."""
    return pd.DataFrame({"threshold": THRESHOLDS,
                         "val_dice": [round(lesion_dice(binarize_as(va_prob, t, p), va_true), 6)
                                      for t in THRESHOLDS]})


def pick_threshold(sweep: pd.DataFrame, p: Params) -> float:
    """The params' threshold, or the val sweep's best when tune_threshold is on."""
    if not p.evaluate.tune_threshold:
        return p.evaluate.threshold
    return float(sweep.loc[sweep["val_dice"].idxmax(), "threshold"])


def _subset(cache: Cache, split: pd.DataFrame, name: str) -> tuple[list[int], pd.DataFrame]:
    rows = split[split["split"] == name]
    return cache.indices(rows["case_id"].tolist()), rows


@dataclass
class Loaded:
    """The model file (a single model, or a fold ensemble and its members), the cache and the
    split, loaded once; `probs` runs any of the models through the one inference path."""

    model: torch.nn.Module
    members: list[torch.nn.Module]
    cache: Cache
    split: pd.DataFrame
    probs: Callable[[torch.nn.Module, list[int], bool], np.ndarray]

    def truth(self, idx: list[int]) -> np.ndarray:
        return self.cache.masks[torch.tensor(idx, dtype=torch.long)][:, 0].numpy() > 0


def load(p: Params, model_path, cache_path, split_path) -> Loaded:
    device, _ = place(p.evaluate.device, "evaluate.device")  # a queued run's share, as train's
    dtype = amp_dtype(p.evaluate.amp, device)
    model, blob = load_model(model_path, device)
    cache = load_cache(cache_path)
    split = pd.read_csv(split_path, dtype={"case_id": str}, keep_default_na=False)
    pre = blob["preprocess"]

    def probs(forward: torch.nn.Module, idx: list[int], tta: bool) -> np.ndarray:
        return probabilities(forward, cache.images[torch.tensor(idx, dtype=torch.long)],
                             pre["input_mean"], pre["input_std"], device, p.evaluate.batch_size,
                             dtype, tta=tta)[:, 0].numpy()

    members = list(model.members) if blob.get("members") else []
    return Loaded(model, members, cache, split, probs)


@dataclass
class Splits:
    """A single model's val and test subsets, for the research tools that probe the model."""

    probs: Callable[[list[int], bool], np.ndarray]
    va_idx: list[int]
    te_idx: list[int]
    te_rows: pd.DataFrame
    va_true: np.ndarray
    te_true: np.ndarray


def load_splits(p: Params, model_path, cache_path, split_path) -> Splits:
    m = load(p, model_path, cache_path, split_path)
    va_idx, _ = _subset(m.cache, m.split, "val")
    te_idx, te_rows = _subset(m.cache, m.split, "test")
    return Splits(lambda idx, tta: m.probs(m.model, idx, tta), va_idx, te_idx, te_rows,
                  m.truth(va_idx), m.truth(te_idx))


def candidates(p: Params) -> list[Params]:
    """The evaluate settings to choose among: p itself, or with select_on_val every subset of the
    pieces p switches on (fewest pieces first, so a tie keeps the simpler setting)."""
    if not p.evaluate.select_on_val:
        return [p]
    on = [k for k in PIECES if getattr(p.evaluate, k)]
    subsets = sorted(product((False, True), repeat=len(on)), key=sum)
    return [replace(p, evaluate=replace(p.evaluate, **dict(zip(on, flags)))) for flags in subsets]


def score_setting(q: Params, prob: np.ndarray, truth: np.ndarray,
                  sweeps: dict) -> tuple[pd.DataFrame, float, float]:
    """Threshold sweep, chosen threshold and lesion Dice of one evaluate setting on held-out
    cases. The sweep does not depend on tune_threshold, so `sweeps` (one per set of cases) keeps
    one per post-processing setting."""
    e = q.evaluate
    key = (e.tta, e.largest_cc, e.fill_holes)
    if key not in sweeps:
        sweeps[key] = threshold_sweep(prob, truth, q)
    sweep = sweeps[key]
    threshold = pick_threshold(sweep, q)
    return sweep, threshold, round(lesion_dice(binarize_as(prob, threshold, q), truth), 6)


def choose(settings: list[Params], probs: dict[bool, np.ndarray],
           truth: np.ndarray) -> tuple[Params, pd.DataFrame, float, float]:
    """The setting and threshold with the best held-out lesion Dice; max keeps the first of
    equals, and candidates come simplest first."""
    sweeps: dict = {}
    scored = [(q, *score_setting(q, probs[q.evaluate.tta], truth, sweeps)) for q in settings]
    return max(scored, key=lambda s: s[3])


def per_image_table(rows: pd.DataFrame, pred: np.ndarray, true: np.ndarray,
                    counts: np.ndarray) -> pd.DataFrame:
    dice, iou = dice_iou(counts)
    return pd.DataFrame({
        "case_id": rows["case_id"].tolist(),
        "class": rows["class"].tolist(),
        "dice": np.round(dice, 6),
        "iou": np.round(iou, 6),
        "lesion_area": true.reshape(len(true), -1).mean(axis=1).round(6),
        "pred_area": pred.reshape(len(pred), -1).mean(axis=1).round(6),
    })


def interval(p: Params, rows: np.ndarray, stat) -> tuple[float, float]:
    return bootstrap_ci(rows, stat, p.evaluate.bootstrap, p.evaluate.bootstrap_seed)


def mean_of_first(rows: np.ndarray) -> float:
    return float(rows[:, 0].mean())


def gain_over_members(rows: np.ndarray) -> float:
    """Column 0 is the ensemble's per-image Dice, the others each member's on the same image."""
    return float(rows[:, 0].mean() - rows[:, 1:].mean())


def evaluate(p: Params, model_path, cache_path, split_path) -> dict:
    m = load(p, model_path, cache_path, split_path)
    if m.members:
        return evaluate_folds(p, m)
    settings = candidates(p)
    va_idx, _ = _subset(m.cache, m.split, "val")
    va_probs = {tta: m.probs(m.model, va_idx, tta) for tta in {q.evaluate.tta for q in settings}}
    q, sweep, threshold, val_dice = choose(settings, va_probs, m.truth(va_idx))
    result = score_test(p, m, q, threshold, val_dice)
    result["threshold_sweep"] = sweep
    return result


def score_test(p: Params, m: Loaded, q: Params, threshold: float, val_dice: float) -> dict:
    """The model file's model on the test split with the chosen setting, and its 95 % interval."""
    te_idx, te_rows = _subset(m.cache, m.split, "test")
    te_true = m.truth(te_idx)
    te_pred = binarize_as(m.probs(m.model, te_idx, q.evaluate.tta), threshold, q)
    metrics, counts = summarize(te_pred, te_true, te_rows["class"].tolist())
    low, high = interval(p, lesion_dice_per_image(counts)[:, None], mean_of_first)
    metrics = rounded({
        **metrics,
        "dice_ci_low": low,
        "dice_ci_high": high,
        "threshold": threshold,
        "val_dice": val_dice,
        "n_test": len(te_idx),
        # what was applied to test (0/1), which select_on_val may have narrowed from the params
        **{f"used_{k}": int(getattr(q.evaluate, k)) for k in PIECES},
    })
    return {"metrics": metrics, "per_image": per_image_table(te_rows, te_pred, te_true, counts),
            "test_pred": te_pred, "test_idx": te_idx, "counts": counts, "test_true": te_true,
            "test_rows": te_rows}


def evaluate_folds(p: Params, m: Loaded) -> dict:
    cv_rows = m.split[m.split["split"] == "cv"].sort_values("fold", kind="stable")
    if cv_rows.empty or sorted(cv_rows["fold"].unique()) != list(range(len(m.members))):
        raise BusisegError(f"data/split.csv: its folds do not match the model's "
                           f"{len(m.members)} fold models; re-run dvc repro")
    fold = cv_rows["fold"].to_numpy()
    oof_idx = m.cache.indices(cv_rows["case_id"].tolist())
    settings = candidates(p)
    # out of fold: every non-test case predicted by the one fold model that never trained on it
    oof_prob = {}
    for tta in {q.evaluate.tta for q in settings}:
        parts = [m.probs(member, [i for i, f in zip(oof_idx, fold) if f == k], tta)
                 for k, member in enumerate(m.members)]
        oof_prob[tta] = np.concatenate(parts)
    oof_true = m.truth(oof_idx)

    # the cross-validation score: fold k with the setting chosen on the other folds
    cv_pred = np.zeros_like(oof_true)
    for k in range(len(m.members)):
        mine, rest = fold == k, fold != k
        qk, _, tk, _ = choose(settings, {t: v[rest] for t, v in oof_prob.items()}, oof_true[rest])
        cv_pred[mine] = binarize_as(oof_prob[qk.evaluate.tta][mine], tk, qk)
    cv_metrics, cv_counts = summarize(cv_pred, oof_true, cv_rows["class"].tolist())
    cv_low, cv_high = interval(p, lesion_dice_per_image(cv_counts)[:, None], mean_of_first)

    # the test split: the setting chosen on all out-of-fold predictions, applied to the ensemble
    q, sweep, threshold, oof_dice = choose(settings, oof_prob, oof_true)
    result = score_test(p, m, q, threshold, oof_dice)
    te_idx, te_true = result["test_idx"], result["test_true"]
    classes = result["test_rows"]["class"].tolist()
    singles = []
    for member in m.members:  # each fold model alone, on the same images
        pred = binarize_as(m.probs(member, te_idx, q.evaluate.tta), threshold, q)
        singles.append(lesion_dice_per_image(summarize(pred, te_true, classes)[1]))
    ensemble = lesion_dice_per_image(result["counts"])
    paired = np.column_stack([ensemble, *singles])
    gain_low, gain_high = interval(p, paired, gain_over_members)
    single_mean = float(np.mean([s.mean() for s in singles])) if len(ensemble) else float("nan")
    extra = {
        "folds": len(m.members),
        **{f"cv_{k}": v for k, v in cv_metrics.items()},
        "cv_dice_ci_low": cv_low,
        "cv_dice_ci_high": cv_high,
        "dice_single_mean": single_mean,
        **{f"dice_single_{k}": float(s.mean()) if len(s) else float("nan")
           for k, s in enumerate(singles)},
        "dice_ensemble_gain": gain_over_members(paired) if len(ensemble) else float("nan"),
        "dice_ensemble_gain_ci_low": gain_low,
        "dice_ensemble_gain_ci_high": gain_high,
    }
    result["metrics"].update(rounded(extra))
    cv_table = per_image_table(cv_rows, cv_pred, oof_true, cv_counts)
    cv_table.insert(2, "fold", fold)
    result.update(threshold_sweep=sweep, cv_per_image=cv_table, cv_pred=cv_pred, cv_idx=oof_idx)
    return result

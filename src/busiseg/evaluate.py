"""Evaluate: score the chosen model on the held-out test split.

The threshold is fixed by params or tuned on the validation split, never on test. Post-processing
(largest component, hole filling) and flip test-time augmentation are params, applied identically
to val and test. With `select_on_val` the pieces the params enable are candidates: every subset is
scored on val and the best is applied to test, so a piece that hurts on this model is dropped
without looking at test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import product

import numpy as np
import pandas as pd
import torch

from busiseg.data import Cache, load_cache
from busiseg.inference import binarize, probabilities
from busiseg.metrics import confusion, dice_iou, lesion_dice_iou, rounded, summarize
from busiseg.modelio import load_model
from busiseg.params import Params
from busiseg.runtime import amp_dtype, pick_device

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
class Splits:
    """The trained model and the val/test subsets, loaded once for evaluate and the research
    tools that probe the same model."""

    probs: Callable[[list[int], bool], np.ndarray]
    va_idx: list[int]
    te_idx: list[int]
    te_rows: pd.DataFrame
    va_true: np.ndarray
    te_true: np.ndarray


def load_splits(p: Params, model_path, cache_path, split_path) -> Splits:
    device = pick_device(p.evaluate.device, "evaluate.device")
    dtype = amp_dtype(p.evaluate.amp, device)
    model, blob = load_model(model_path, device)
    cache = load_cache(cache_path)
    split = pd.read_csv(split_path, dtype={"case_id": str}, keep_default_na=False)
    va_idx, _ = _subset(cache, split, "val")
    te_idx, te_rows = _subset(cache, split, "test")
    pre = blob["preprocess"]

    def probs(idx: list[int], tta: bool) -> np.ndarray:
        return probabilities(model, cache.images[torch.tensor(idx)], pre["input_mean"],
                             pre["input_std"], device, p.evaluate.batch_size, dtype,
                             tta=tta)[:, 0].numpy()

    def truth(idx: list[int]) -> np.ndarray:
        return cache.masks[torch.tensor(idx)][:, 0].numpy() > 0

    return Splits(probs, va_idx, te_idx, te_rows, truth(va_idx), truth(te_idx))


def candidates(p: Params) -> list[Params]:
    """The evaluate settings to choose among: p itself, or with select_on_val every subset of the
    pieces p switches on (fewest pieces first, so a tie keeps the simpler setting)."""
    if not p.evaluate.select_on_val:
        return [p]
    on = [k for k in PIECES if getattr(p.evaluate, k)]
    subsets = sorted(product((False, True), repeat=len(on)), key=sum)
    return [replace(p, evaluate=replace(p.evaluate, **dict(zip(on, flags)))) for flags in subsets]


def _on_val(d: Splits, q: Params, va_prob: np.ndarray,
            sweeps: dict) -> tuple[pd.DataFrame, float, float]:
    """Threshold sweep, chosen threshold and val lesion Dice of one evaluate setting. The sweep
    does not depend on tune_threshold, so `sweeps` keeps one per post-processing setting."""
    e = q.evaluate
    key = (e.tta, e.largest_cc, e.fill_holes)
    if key not in sweeps:
        sweeps[key] = threshold_sweep(va_prob, d.va_true, q)
    sweep = sweeps[key]
    threshold = pick_threshold(sweep, q)
    return sweep, threshold, round(lesion_dice(binarize_as(va_prob, threshold, q), d.va_true), 6)


def evaluate(p: Params, model_path, cache_path, split_path) -> dict:
    d = load_splits(p, model_path, cache_path, split_path)
    settings = candidates(p)
    va_probs = {tta: d.probs(d.va_idx, tta) for tta in {q.evaluate.tta for q in settings}}
    sweeps: dict = {}
    scored = [(q, *_on_val(d, q, va_probs[q.evaluate.tta], sweeps)) for q in settings]
    # max keeps the first of equals, and candidates come simplest first
    q, sweep, threshold, val_dice = max(scored, key=lambda s: s[3])

    te_prob = d.probs(d.te_idx, q.evaluate.tta)
    te_pred = binarize_as(te_prob, threshold, q)
    te_true, te_rows = d.te_true, d.te_rows
    classes = te_rows["class"].tolist()
    metrics, counts = summarize(te_pred, te_true, classes)
    dice, iou = dice_iou(counts)
    per_image = pd.DataFrame({
        "case_id": te_rows["case_id"].tolist(),
        "class": classes,
        "dice": np.round(dice, 6),
        "iou": np.round(iou, 6),
        "lesion_area": te_true.reshape(len(te_true), -1).mean(axis=1).round(6),
        "pred_area": te_pred.reshape(len(te_pred), -1).mean(axis=1).round(6),
    })
    metrics = {
        **rounded(metrics),
        "threshold": threshold,
        "val_dice": val_dice,
        "n_test": len(d.te_idx),
        # what was applied to test (0/1), which select_on_val may have narrowed from the params
        **{f"used_{k}": int(getattr(q.evaluate, k)) for k in PIECES},
    }
    return {"metrics": metrics, "per_image": per_image, "threshold_sweep": sweep,
            "test_pred": te_pred, "test_idx": d.te_idx}

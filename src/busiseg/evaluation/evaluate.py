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
from busiseg.evaluation import presence
from busiseg.evaluation.metrics import (
    POPULATION_STATS,
    aurc,
    aurc_baselines,
    bootstrap_ci,
    confusion,
    dice_iou,
    lesion_dice_iou,
    lesion_dice_per_image,
    population_rows,
    rounded,
    summarize,
)
from busiseg.inference.confidence import calibrate, confidence, flag
from busiseg.inference.segment import binarize, gate, predict_probabilities
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
    # probability maps and each image's lesion score (segment.lesion_score), in one forward pass
    predict: Callable[[torch.nn.Module, list[int], bool], tuple[np.ndarray, np.ndarray]]

    def truth(self, idx: list[int]) -> np.ndarray:
        return self.cache.masks[torch.tensor(idx, dtype=torch.long)][:, 0].numpy() > 0


def load(p: Params, model_path, cache_path, split_path) -> Loaded:
    device, _ = place(p.evaluate.device, "evaluate.device")  # a queued run's share, as train's
    dtype = amp_dtype(p.evaluate.amp, device)
    model, blob = load_model(model_path, device)
    cache = load_cache(cache_path)
    split = pd.read_csv(split_path, dtype={"case_id": str}, keep_default_na=False)
    pre = blob["preprocess"]

    def predict(forward: torch.nn.Module, idx: list[int],
                tta: bool) -> tuple[np.ndarray, np.ndarray]:
        prob, score = predict_probabilities(
            forward, cache.images[torch.tensor(idx, dtype=torch.long)], pre["input_mean"],
            pre["input_std"], device, p.evaluate.batch_size, dtype, tta=tta)
        return prob[:, 0].numpy(), score.numpy().astype(np.float64)

    members = list(model.members) if blob.get("members") else []
    return Loaded(model, members, cache, split, lambda f, idx, tta: predict(f, idx, tta)[0],
                  predict)


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
                    counts: np.ndarray, scores: np.ndarray, trust: np.ndarray,
                    flagged: np.ndarray) -> pd.DataFrame:
    dice, iou = dice_iou(counts)
    return pd.DataFrame({
        "case_id": rows["case_id"].tolist(),
        "class": rows["class"].tolist(),
        "dice": np.round(dice, 6),
        "iou": np.round(iou, 6),
        "lesion_area": true.reshape(len(true), -1).mean(axis=1).round(6),
        "pred_area": pred.reshape(len(pred), -1).mean(axis=1).round(6),
        "image_score": np.round(scores, 6),
        "confidence": np.round(trust, 6),
        "flagged": np.asarray(flagged, dtype=int),
    })


def interval(p: Params, rows: np.ndarray, stat) -> tuple[float, float]:
    return bootstrap_ci(rows, stat, p.evaluate.bootstrap, p.evaluate.bootstrap_seed)


def population_intervals(p: Params, counts: np.ndarray, scores: np.ndarray,
                         prefix: str = "") -> dict:
    """Bootstrap 95 % intervals of every whole-population figure (`dice_all`, ...)."""
    rows = population_rows(counts, scores)
    out = {}
    for key, stat in POPULATION_STATS.items():
        low, high = interval(p, rows, stat)
        out[f"{prefix}{key}_ci_low"], out[f"{prefix}{key}_ci_high"] = low, high
    return out


def presence_choice(p: Params, masks: np.ndarray, truth: np.ndarray,
                    scores: np.ndarray) -> float | None:
    """evaluate.presence_threshold: off (None), a number, or auto: chosen on these held-out
    images for the best dice_all."""
    if p.evaluate.presence_threshold == "auto":
        return presence.choose_threshold(masks, truth, scores)
    return p.evaluate.presence_threshold


def trust_of(p: Params, probs: np.ndarray, scores: np.ndarray, temperature: float,
             threshold: float) -> np.ndarray:
    """Each image's confidence (evaluate.confidence), as `busiseg predict` computes it."""
    return confidence(probs, calibrate(scores, temperature), threshold, p.evaluate.confidence)


def review_choice(p: Params, trust: np.ndarray) -> float | None:
    """evaluate.review_fraction: the confidence below which that share of these held-out images
    falls (None: flag nothing)."""
    fraction = p.evaluate.review_fraction
    if fraction <= 0 or not len(trust):
        return None
    return float(np.sort(trust)[min(len(trust) - 1, int(round(fraction * len(trust))))])


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


def trust_figures(p: Params, counts: np.ndarray, trust: np.ndarray, flagged: np.ndarray,
                  prefix: str = "") -> dict:
    """How well the confidence ranks the predictions: the area under the risk–coverage curve
    (risk = 1 − per-image Dice, every image, normals scored as in dice_all) beside its random
    and oracle values; with a review threshold, the Dice of the kept and the flagged images and
    what flagging gains the kept ones, each with its 95 % interval. Out of fold each fold is
    flagged at the threshold chosen on the other folds."""
    rows = np.column_stack([population_rows(counts)[:, 0], trust, flagged])
    flagging = p.evaluate.review_fraction > 0
    keys = ["aurc", *(["dice_kept", "dice_flagged", "dice_kept_gain"] if flagging else [])]
    out = aurc_baselines(1 - rows[:, 0])
    for key in keys:
        out[key] = TRUST_STATS[key](rows) if len(rows) else float("nan")
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = interval(p, rows, TRUST_STATS[key])
    if flagging:
        out["flagged_fraction"] = float(np.mean(flagged)) if len(flagged) else float("nan")
    return {f"{prefix}{k}": v for k, v in out.items()}


def has_lesion(truth: np.ndarray) -> np.ndarray:
    return truth.reshape(len(truth), -1).any(axis=1)


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
    va = {tta: m.predict(m.model, va_idx, tta) for tta in {q.evaluate.tta for q in settings}}
    va_true = m.truth(va_idx)
    q, sweep, threshold, val_dice = choose(settings, {t: v[0] for t, v in va.items()}, va_true)
    va_prob, va_scores = va[q.evaluate.tta]
    gate_at = presence_choice(p, binarize_as(va_prob, threshold, q), va_true, va_scores)
    temperature = presence.fit_temperature(va_scores, has_lesion(va_true))
    review_at = review_choice(p, trust_of(p, va_prob, va_scores, temperature, threshold))
    result = score_test(p, m, q, threshold, val_dice, gate_at, temperature, review_at)
    result["threshold_sweep"] = sweep
    return result


def score_test(p: Params, m: Loaded, q: Params, threshold: float, val_dice: float,
               presence_threshold: float | None = None, temperature: float = 1.0,
               review_at: float | None = None) -> dict:
    """The model file's model on the test split with the chosen setting (pixel threshold,
    pieces, presence threshold), its 95 % intervals, the calibration of its lesion score
    (temperature fitted on held-out data), and how well each image's confidence tells good
    predictions from bad (the review threshold chosen on held-out data)."""
    te_idx, te_rows = _subset(m.cache, m.split, "test")
    te_true = m.truth(te_idx)
    te_prob, scores = m.predict(m.model, te_idx, q.evaluate.tta)
    te_pred = gate(binarize_as(te_prob, threshold, q), scores, presence_threshold)
    metrics, counts = summarize(te_pred, te_true, te_rows["class"].tolist(), scores)
    ece, table = presence.reliability(calibrate(scores, temperature), has_lesion(te_true))
    trust = trust_of(p, te_prob, scores, temperature, threshold)
    flagged = flag(trust, review_at)
    low, high = interval(p, lesion_dice_per_image(counts)[:, None], mean_of_first)
    metrics = rounded({
        **metrics,
        "dice_ci_low": low,
        "dice_ci_high": high,
        **population_intervals(p, counts, scores),
        "threshold": threshold,
        "presence_threshold": presence_threshold,  # null: off
        "presence_temperature": temperature,
        "detect_ece": ece,
        **trust_figures(p, counts, trust, flagged),
        "confidence": p.evaluate.confidence,
        "review_threshold": review_at,  # null: nothing flagged
        "val_dice": val_dice,
        "n_test": len(te_idx),
        # what was applied to test (0/1), which select_on_val may have narrowed from the params
        **{f"used_{k}": int(getattr(q.evaluate, k)) for k in PIECES},
    })
    return {"metrics": metrics,
            "per_image": per_image_table(te_rows, te_pred, te_true, counts, scores, trust,
                                         flagged),
            "test_pred": te_pred, "test_idx": te_idx, "counts": counts, "test_true": te_true,
            "test_rows": te_rows, "reliability": table}


def evaluate_folds(p: Params, m: Loaded) -> dict:
    cv_rows = m.split[m.split["split"] == "cv"].sort_values("fold", kind="stable")
    if cv_rows.empty or sorted(cv_rows["fold"].unique()) != list(range(len(m.members))):
        raise BusisegError(f"data/split.csv: its folds do not match the model's "
                           f"{len(m.members)} fold models; re-run dvc repro")
    fold = cv_rows["fold"].to_numpy()
    oof_idx = m.cache.indices(cv_rows["case_id"].tolist())
    settings = candidates(p)
    # out of fold: every non-test case predicted by the one fold model that never trained on it
    oof_prob, oof_scores = {}, {}
    for tta in {q.evaluate.tta for q in settings}:
        parts = [m.predict(member, [i for i, f in zip(oof_idx, fold) if f == k], tta)
                 for k, member in enumerate(m.members)]
        oof_prob[tta] = np.concatenate([prob for prob, _ in parts])
        oof_scores[tta] = np.concatenate([score for _, score in parts])
    oof_true = m.truth(oof_idx)
    labels = has_lesion(oof_true)

    # the cross-validation score: fold k with the setting chosen on the other folds
    # (and the presence threshold and the score's temperature, chosen there the same way)
    cv_pred = np.zeros_like(oof_true)
    cv_scores, cv_calibrated = np.zeros(len(cv_pred)), np.zeros(len(cv_pred))
    cv_trust, cv_flagged = np.zeros(len(cv_pred)), np.zeros(len(cv_pred), dtype=bool)
    for k in range(len(m.members)):
        mine, rest = fold == k, fold != k
        qk, _, tk, _ = choose(settings, {t: v[rest] for t, v in oof_prob.items()}, oof_true[rest])
        prob, scores = oof_prob[qk.evaluate.tta], oof_scores[qk.evaluate.tta]
        gate_k = presence_choice(p, binarize_as(prob[rest], tk, qk), oof_true[rest], scores[rest])
        cv_pred[mine] = gate(binarize_as(prob[mine], tk, qk), scores[mine], gate_k)
        cv_scores[mine] = scores[mine]
        t_k = presence.fit_temperature(scores[rest], labels[rest])
        cv_calibrated[mine] = calibrate(scores[mine], t_k)
        cv_trust[mine] = trust_of(p, prob[mine], scores[mine], t_k, tk)
        cv_flagged[mine] = flag(cv_trust[mine], review_choice(
            p, trust_of(p, prob[rest], scores[rest], t_k, tk)))
    cv_ece, cv_table_reliability = presence.reliability(cv_calibrated, labels)
    cv_metrics, cv_counts = summarize(cv_pred, oof_true, cv_rows["class"].tolist(), cv_scores)
    cv_low, cv_high = interval(p, lesion_dice_per_image(cv_counts)[:, None], mean_of_first)

    # the test split: the setting chosen on all out-of-fold predictions, applied to the ensemble
    q, sweep, threshold, oof_dice = choose(settings, oof_prob, oof_true)
    prob, scores = oof_prob[q.evaluate.tta], oof_scores[q.evaluate.tta]
    gate_at = presence_choice(p, binarize_as(prob, threshold, q), oof_true, scores)
    temperature = presence.fit_temperature(scores, labels)
    review_at = review_choice(p, trust_of(p, prob, scores, temperature, threshold))
    result = score_test(p, m, q, threshold, oof_dice, gate_at, temperature, review_at)
    te_idx, te_true = result["test_idx"], result["test_true"]
    classes = result["test_rows"]["class"].tolist()
    singles = []
    for member in m.members:  # each fold model alone, on the same images
        member_prob, member_scores = m.predict(member, te_idx, q.evaluate.tta)
        pred = gate(binarize_as(member_prob, threshold, q), member_scores, gate_at)
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
        **population_intervals(p, cv_counts, cv_scores, "cv_"),
        "cv_detect_ece": cv_ece,
        **trust_figures(p, cv_counts, cv_trust, cv_flagged, "cv_"),
        "dice_single_mean": single_mean,
        **{f"dice_single_{k}": float(s.mean()) if len(s) else float("nan")
           for k, s in enumerate(singles)},
        "dice_ensemble_gain": gain_over_members(paired) if len(ensemble) else float("nan"),
        "dice_ensemble_gain_ci_low": gain_low,
        "dice_ensemble_gain_ci_high": gain_high,
    }
    result["metrics"].update(rounded(extra))
    cv_table = per_image_table(cv_rows, cv_pred, oof_true, cv_counts, cv_scores, cv_trust,
                               cv_flagged)
    cv_table.insert(2, "fold", fold)
    result.update(threshold_sweep=sweep, cv_per_image=cv_table, cv_pred=cv_pred, cv_idx=oof_idx,
                  reliability=cv_table_reliability)  # out of fold: the calibration to trust
    return result

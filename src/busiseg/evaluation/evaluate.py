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

import numpy as np
import pandas as pd
import torch

from busiseg.data.cache import Cache, load_cache
from busiseg.data.manifest import read_manifest
from busiseg.errors import BusisegError
from busiseg.evaluation import presence
from busiseg.evaluation.choose import HeldOut, candidates, choose, has_lesion, tta_settings
from busiseg.evaluation.classifier import malignancy_keys, open_classifier, out_of_fold
from busiseg.evaluation.metrics import (
    POPULATION_STATS,
    SCORE_STATS,
    aurc,
    aurc_baselines,
    bootstrap_ci,
    boundary_metrics,
    dice_iou,
    lesion_dice_per_image,
    lesion_mean,
    population_rows,
    rounded,
    summarize,
)
from busiseg.inference.classify import Classifier
from busiseg.inference.confidence import calibrate, flag
from busiseg.inference.segment import Feed, MaskSettings, predict_probabilities
from busiseg.inference.sizes import SIZE_COLUMNS, size_row
from busiseg.modeling.archs import FoldEnsemble
from busiseg.modeling.model_file import load_model
from busiseg.params import Params
from busiseg.runtime.device import amp_dtype, place
from busiseg.runtime.progress import bar, show_progress

Prediction = tuple[np.ndarray, np.ndarray]  # N probability maps (H×W) and N lesion scores


def subset(cache: Cache, split: pd.DataFrame, name: str) -> tuple[list[int], pd.DataFrame]:
    rows = split[split["split"] == name]
    return cache.indices(rows["case_id"].tolist()), rows


@dataclass
class Loaded:
    """The model file (a single model, or a fold ensemble and its members), the cache and the
    split, loaded once; `predict` runs any of the models through the one inference path."""

    model: torch.nn.Module
    members: list[torch.nn.Module]
    cache: Cache
    split: pd.DataFrame
    # probability maps and each image's lesion score (segment.lesion_score), in one forward pass
    predict: Callable[[torch.nn.Module, list[int], bool], Prediction]
    progress: object = None  # a bar over evaluate's steps (evaluate.progress), or None
    # per cache image, the (row, column) size of its pixels in original-image pixels
    # (original_spacing); None leaves the boundary figures out, having no unit to give them
    spacing: np.ndarray | None = None
    batch_size: int = 16  # the images `predict` runs at once (evaluate.batch_size)
    # per cache image, an original pixel's (height, width) in mm, NaN where the file states
    # none (DICOM only); None without a manifest
    pixel_mm: np.ndarray | None = None
    # the image classifier (stage classify), whose p_lesion is then the lesion score
    classifier: Classifier | None = None

    def step(self, what: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(what)
            self.progress.update(1)

    def spacing_of(self, idx: list[int]) -> np.ndarray | None:
        return None if self.spacing is None else self.spacing[idx]

    def pixel_mm_of(self, idx: list[int]) -> np.ndarray | None:
        return None if self.pixel_mm is None else self.pixel_mm[idx]

    def images(self, idx: list[int]) -> torch.Tensor:
        return self.cache.images[torch.tensor(idx, dtype=torch.long)]

    def truth(self, idx: list[int]) -> np.ndarray:
        return self.cache.masks[torch.tensor(idx, dtype=torch.long)][:, 0].numpy() > 0

    def predict_with_members(self, idx: list[int], tta: bool) -> tuple[Prediction,
                                                                     list[Prediction]]:
        """The fold ensemble's maps and scores on `idx`, and each member's alone, from one pass
        of every member: the members' outputs are kept as the ensemble combines them, then
        replayed through the same inference path, so each member's figures are those it gives
        when run by itself, at the cost of one forward. A chunk of batches at a time (whole
        batches, so every batch is the one a single pass makes) bounds what is kept."""
        self.model.eval()
        chunk = self.batch_size * 8
        parts = [self._with_members(idx[i:i + chunk], tta)
                 for i in range(0, len(idx), chunk)] or [self._with_members(idx, tta)]

        def joined(runs: list[Prediction]) -> Prediction:
            return np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs])

        return (joined([joint for joint, _ in parts]),
                [joined([alone[k] for _, alone in parts]) for k in range(len(self.members))])

    def _with_members(self, idx: list[int], tta: bool) -> tuple[Prediction, list[Prediction]]:
        calls: list[list] = []  # per forward call (a batch, or its flip), every member's output

        def ensemble(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            outputs = [member(x) for member in self.members]
            calls.append(outputs)
            return FoldEnsemble.combine(outputs)

        def replay(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
            kept = iter(calls)
            return lambda x: next(kept)[k]

        joint = self.predict(ensemble, idx, tta)
        return joint, [self.predict(replay(k), idx, tta) for k in range(len(self.members))]

    def held_out(self, forward: torch.nn.Module, idx: list[int], ttas: set[bool]) -> HeldOut:
        runs = {tta: self.predict(forward, idx, tta) for tta in ttas}
        return HeldOut({t: r[0] for t, r in runs.items()}, {t: r[1] for t, r in runs.items()},
                       self.truth(idx))


def open_model(p: Params, model_path) -> tuple[torch.nn.Module, dict]:
    """The model file on evaluate's device (a queued run's share, as train's)."""
    device, _ = place(p.evaluate.device, "evaluate.device")
    return load_model(model_path, device)


def original_spacing(manifest_path, case_ids: list[str], size: int) -> np.ndarray:
    """Each case's (row, column) pixel size at the cache's size×size, in pixels of its original
    image (the manifest's height and width): the cache squashes every image to one square, so
    a distance in cache pixels would mean something different on every image."""
    manifest = read_manifest(manifest_path)
    if not {"case_id", "width", "height"} <= set(manifest.columns):
        raise BusisegError(f"{manifest_path}: no width/height columns; re-run the ingest stage "
                           "(dvc repro)")
    sizes = manifest.drop_duplicates("case_id").set_index("case_id")[["height", "width"]]
    missing = [c for c in case_ids if c not in sizes.index]
    if missing:
        raise BusisegError(f"{manifest_path} has no case '{missing[0]}' (and {len(missing) - 1} "
                           "more): the manifest and the cache disagree; re-run dvc repro")
    hw = sizes.loc[case_ids].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not (hw > 0).all():
        raise BusisegError(f"{manifest_path}: an image's width or height is not a positive "
                           "number; re-run the ingest stage (dvc repro)")
    return hw / size


def pixel_mm(manifest_path, case_ids: list[str]) -> np.ndarray:
    """Each case's original pixel (height, width) in mm, NaN where the manifest has none (its
    images are not DICOM, or the file states no usable size)."""
    manifest = read_manifest(manifest_path).drop_duplicates("case_id").set_index("case_id")
    if not {"pixel_height_mm", "pixel_width_mm"} <= set(manifest.columns):
        return np.full((len(case_ids), 2), np.nan)
    sizes = manifest.loc[case_ids, ["pixel_height_mm", "pixel_width_mm"]]
    return sizes.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)


def size_figures(p: Params, pred: np.ndarray, true: np.ndarray, spacing: np.ndarray | None,
                 mm: np.ndarray | None, prefix: str = "") -> tuple[dict, pd.DataFrame | None]:
    """Each image's predicted and true lesion size (inference.sizes: area, long and short axis)
    in original pixels and, where known, mm; the long axis's error, and its mean absolute value
    over the lesion images, as hd95 is taken, with a 95 % interval: in px, and in mm over the
    lesion images whose pixel size is known (with their count), where there are any."""
    if spacing is None:
        return {}, None
    mm = np.full((len(pred), 2), np.nan) if mm is None else mm
    rows = []
    for q, t, px, size in zip(pred, true, spacing, mm):
        known = None if np.isnan(size).any() else (float(size[0]), float(size[1]))
        rows.append({**size_row(q, tuple(px), known), **size_row(t, tuple(px), known, "true_")})
    table = pd.DataFrame(rows, columns=[*SIZE_COLUMNS, *(f"true_{c}" for c in SIZE_COLUMNS)])
    out = {}
    lesion = np.array([bool(np.any(t)) for t in true], dtype=bool)  # masks of any sizes
    for unit in ("px", "mm"):
        error = (table[f"long_axis_{unit}"] - table[f"true_long_axis_{unit}"]).to_numpy()
        table[f"long_axis_error_{unit}"] = error
        use = lesion & ~np.isnan(error)
        if unit == "mm" and not use.any():
            continue
        key = f"{prefix}long_axis_mae_{unit}"
        out[key] = float(np.abs(error[use]).mean()) if use.any() else float("nan")
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = interval(
            p, np.abs(error[use])[:, None], mean_of_first)
        if unit == "mm":
            out[f"{prefix}n_long_axis_mm"] = int(use.sum())
    return out, table.round(4)


def load(p: Params, model_path, cache_path, split_path,
         opened: tuple[torch.nn.Module, dict] | None = None, steps: int | None = None,
         manifest_path=None, classifier_path=None) -> Loaded:
    """Everything scoring reads; `opened`: the model file already loaded by open_model; `steps`:
    the progress bar's length when it is not evaluate's (an external set's); `manifest_path`:
    the images' original sizes, the unit of the boundary figures (hd95, nsd), left out
    without it; `classifier_path`: models/classifier.pt (none: the mask model's score)."""
    model, blob = opened or open_model(p, model_path)
    device = next(model.parameters()).device
    dtype = amp_dtype(p.evaluate.amp, device)
    cache = load_cache(cache_path)
    split = pd.read_csv(split_path, dtype={"case_id": str}, keep_default_na=False)
    pre = blob["preprocess"]
    feed = Feed(pre["input_mean"], pre["input_std"], device, p.evaluate.batch_size, dtype)

    def predict(forward: torch.nn.Module, idx: list[int],
                tta: bool) -> tuple[np.ndarray, np.ndarray]:
        prob, score = predict_probabilities(
            forward, cache.images[torch.tensor(idx, dtype=torch.long)], feed, tta=tta)
        return prob[:, 0].numpy(), score.numpy().astype(np.float64)

    members = list(model.members) if blob.get("members") else []
    # steps: held-out predictions, choices (one per fold and one for test), test, the members
    if steps is None:
        steps = 2 + 3 * len(members) + (0 if members else 1)
    spacing = (original_spacing(manifest_path, cache.case_ids, cache.size)
               if manifest_path is not None else None)
    mm = pixel_mm(manifest_path, cache.case_ids) if manifest_path is not None else None
    classifier = (open_classifier(classifier_path, device, p.evaluate.batch_size, dtype,
                                  blob.get("split"), cache.size)
                  if classifier_path is not None else None)
    return Loaded(model, members, cache, split, predict,
                  bar(steps, "evaluate", show_progress(p.evaluate.progress)), spacing,
                  p.evaluate.batch_size, mm, classifier)


def per_image_table(rows: pd.DataFrame, pred: np.ndarray, true: np.ndarray,
                    counts: np.ndarray, scores: np.ndarray, trust: np.ndarray,
                    flagged: np.ndarray,
                    boundary: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
    """One row per image; `boundary`: its HD95 and NSD (boundary_figures), when measured."""
    dice, iou = dice_iou(counts)
    table = pd.DataFrame({
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
    if boundary is not None:
        table["hd95"], table["nsd"] = np.round(boundary[0], 6), np.round(boundary[1], 6)
    return table


def interval(p: Params, rows: np.ndarray, stat) -> tuple[float, float]:
    return bootstrap_ci(rows, stat, p.evaluate.bootstrap, p.evaluate.bootstrap_seed)


def population_intervals(p: Params, counts: np.ndarray, scores: np.ndarray | None,
                         prefix: str = "") -> dict:
    """Bootstrap 95 % intervals of every whole-population figure (`dice_all`, ...); without
    per-image scores (busiseg score) no AUROC, as `population`."""
    rows = population_rows(counts, scores)
    out = {}
    for key, stat in POPULATION_STATS.items():
        if scores is None and key in SCORE_STATS:
            continue
        low, high = interval(p, rows, stat)
        out[f"{prefix}{key}_ci_low"], out[f"{prefix}{key}_ci_high"] = low, high
    return out


def boundary_figures(p: Params, pred: np.ndarray, true: np.ndarray,
                     spacing: np.ndarray | None,
                     prefix: str = "") -> tuple[dict, tuple[np.ndarray, np.ndarray] | None]:
    """HD95 and NSD (metrics.boundary_metrics, at `evaluate.surface_tolerance`), each the mean
    over the lesion images as `dice` is, with its 95 % interval; and the per-image values.
    Without `spacing` there are none: a distance needs the original pixel as its unit."""
    if spacing is None:
        return {}, None
    hd95, nsd = boundary_metrics(pred, true, spacing, p.evaluate.surface_tolerance)
    return boundary_means(p, hd95, nsd, true, prefix), (hd95, nsd)


def boundary_means(p: Params, hd95: np.ndarray, nsd: np.ndarray, true: np.ndarray,
                   prefix: str = "") -> dict:
    """The lesion-image means of per-image HD95 and NSD and their intervals; apart from
    boundary_figures for busiseg score, whose masks differ in size and are measured apart."""
    lesion = has_lesion(true)
    out = {}
    for key, values in (("hd95", hd95), ("nsd", nsd)):
        out[f"{prefix}{key}"] = lesion_mean(values, true)
        out[f"{prefix}{key}_ci_low"], out[f"{prefix}{key}_ci_high"] = interval(
            p, values[lesion][:, None], mean_of_first)
    return out


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


def mean_of_first(rows: np.ndarray) -> float:
    return float(rows[:, 0].mean())


def gain_over_members(rows: np.ndarray) -> float:
    """Column 0 is the ensemble's per-image Dice, the others each member's on the same image."""
    return float(rows[:, 0].mean() - rows[:, 1:].mean())


def evaluate(p: Params, model_path, cache_path, split_path, manifest_path=None,
             classifier_path=None) -> dict:
    m = load(p, model_path, cache_path, split_path, manifest_path=manifest_path,
             classifier_path=classifier_path)
    if m.members:
        return evaluate_folds(p, m)
    va_idx, va_rows = subset(m.cache, m.split, "val")
    held = m.held_out(m.model, va_idx, tta_settings(p.evaluate))
    classified = None
    if m.classifier is not None:  # its p_lesion is the lesion score from here on
        classified = m.classifier.probabilities(m.images(va_idx))
        held = replace(held, scores=dict.fromkeys(held.scores, classified[:, 0]))
    m.step("validation predicted")
    choice = choose(p.evaluate, held)
    m.step("settings chosen on validation")
    result = score_test(p, m, choice.settings)
    if classified is not None:
        add_malignancy(p, m, result, classified, va_rows["class"].tolist(), None)
    m.step("test scored")
    result["threshold_sweep"] = choice.sweep
    return result


def add_malignancy(p: Params, m: Loaded, result: dict, held: np.ndarray,
                   held_classes: list[str], held_fold: np.ndarray | None) -> None:
    """The classifier's figures into the result: the malignancy keys (where it learnt
    malignancy), and p_lesion, p_malignant in the per-image tables."""
    test = result["classifier_test"].copy()
    held = held.copy()
    if m.classifier.malignancy:  # p_malignant calibrated as chosen on held-out images
        keys, held[:, 1], test[:, 1] = malignancy_keys(
            p, held[:, 1], held_classes, held_fold, test[:, 1],
            result["test_rows"]["class"].tolist())
        result["metrics"].update(rounded(keys))
    for table, probs in ((result["per_image"], test), (result.get("cv_per_image"), held)):
        if table is not None:
            table["p_lesion"] = np.round(probs[:, 0], 6)
            table["p_malignant"] = np.round(probs[:, 1], 6)


def score_test(p: Params, m: Loaded, settings: MaskSettings,
               test: Prediction | None = None) -> dict:
    """The model file's model on the test split with the settings chosen on held-out data
    (pixel threshold, pieces, presence threshold, the lesion score's temperature, the review
    threshold): the test figures, their 95 % intervals, the lesion score's calibration, and how
    well each image's confidence tells good predictions from bad. `test`: the model's
    prediction on the test split when the caller has made it already."""
    te_idx, te_rows = subset(m.cache, m.split, "test")
    te_true = m.truth(te_idx)
    te_prob, scores = test if test is not None else m.predict(m.model, te_idx, settings.tta)
    classified = None
    if m.classifier is not None:  # every member's p_lesion is the lesion score on test
        classified = m.classifier.probabilities(m.images(te_idx))
        scores = classified[:, 0]
    trust = settings.confidences(te_prob, scores)  # read by the expected-Dice rule too
    te_pred = settings.masks(te_prob, scores, trust)
    chosen = settings.eval_keys()
    flagged = flag(trust, settings.review_threshold)
    calibrated = calibrate(scores, settings.presence_temperature)
    ece, table = presence.reliability(calibrated, has_lesion(te_true))
    metrics, counts = summarize(te_pred, te_true, te_rows["class"].tolist(), scores)
    low, high = interval(p, lesion_dice_per_image(counts)[:, None], mean_of_first)
    bounds, boundary = boundary_figures(p, te_pred, te_true, m.spacing_of(te_idx))
    sized, sizes = size_figures(p, te_pred, te_true, m.spacing_of(te_idx), m.pixel_mm_of(te_idx))
    population = population_intervals(p, counts, scores)
    trusted = trust_figures(p, counts, trust, flagged)
    metrics = rounded({
        **metrics,
        "dice_ci_low": low,
        "dice_ci_high": high,
        **bounds,
        **sized,
        **population,
        "threshold": chosen.pop("threshold"),
        "presence_threshold": chosen.pop("presence_threshold"),  # null: off
        "presence_temperature": chosen.pop("presence_temperature"),
        "detect_ece": ece,
        **trusted,
        "confidence": chosen.pop("confidence"),
        "review_threshold": chosen.pop("review_threshold"),  # null: nothing flagged
        # the held-out Dice it was chosen at, the test size, and what was applied (0/1), which
        # select_on_val may have narrowed from the params
        "val_dice": chosen.pop("val_dice"),
        "n_test": len(te_idx),
        "presence_rule": chosen.pop("presence_rule"),
        "presence_expected_dice": chosen.pop("presence_expected_dice"),
        **chosen,
    })
    per_image = per_image_table(te_rows, te_pred, te_true, counts, scores, trust, flagged,
                                boundary)
    return {"metrics": metrics,
            "per_image": per_image if sizes is None else pd.concat([per_image, sizes], axis=1),
            "test_pred": te_pred, "test_idx": te_idx, "counts": counts, "test_true": te_true,
            "test_rows": te_rows, "reliability": table, "settings": settings,
            "classifier_test": classified}


def evaluate_folds(p: Params, m: Loaded) -> dict:
    """A cross-validation model: the out-of-fold score (fold k with everything chosen on the
    other folds), then test with everything chosen on all out-of-fold images, applied to the
    ensemble, and each member alone on the same test images."""
    cv_rows = m.split[m.split["split"] == "cv"].sort_values("fold", kind="stable")
    if cv_rows.empty or sorted(cv_rows["fold"].unique()) != list(range(len(m.members))):
        raise BusisegError(f"data/split.csv: its folds do not match the model's "
                           f"{len(m.members)} fold models; re-run dvc repro")
    fold = cv_rows["fold"].to_numpy()
    oof_idx = m.cache.indices(cv_rows["case_id"].tolist())
    # out of fold: every non-test case predicted by the one fold model that never trained on it
    parts = []
    for k, member in enumerate(m.members):
        parts.append(m.held_out(member, [i for i, f in zip(oof_idx, fold) if f == k],
                                tta_settings(p.evaluate)))
        m.step(f"fold {k} predicted out of fold")
    oof = HeldOut({t: np.concatenate([h.probs[t] for h in parts]) for t in parts[0].probs},
                  {t: np.concatenate([h.scores[t] for h in parts]) for t in parts[0].scores},
                  np.concatenate([h.truth for h in parts]))
    classified = None
    if m.classifier is not None:  # fold k's images by fold k's classifier members alone
        classified = out_of_fold(m.classifier, m.cache.images, oof_idx, fold)
        oof = replace(oof, scores=dict.fromkeys(oof.scores, classified[:, 0]))
    cv = score_out_of_fold(p, m, oof, fold, cv_rows)
    choice = choose(p.evaluate, oof)
    m.step("settings chosen out of fold")
    ensemble, members = m.predict_with_members(subset(m.cache, m.split, "test")[0],
                                               choice.settings.tta)
    result = score_test(p, m, choice.settings, ensemble)
    m.step("test scored")
    if classified is not None:  # each mask member gated by the classifier, as the ensemble
        members = [(prob, result["classifier_test"][:, 0]) for prob, _ in members]
    alone = member_figures(p, m, result, members)
    result["metrics"].update(rounded({"folds": len(m.members), **cv["metrics"], **alone}))
    result.update(threshold_sweep=choice.sweep, cv_per_image=cv["table"], cv_pred=cv["pred"],
                  cv_idx=oof_idx, reliability=cv["reliability"])  # out of fold: the one to trust
    if classified is not None:
        add_malignancy(p, m, result, classified, cv_rows["class"].tolist(), fold)
    return result


def score_out_of_fold(p: Params, m: Loaded, oof: HeldOut, fold: np.ndarray,
                      cv_rows: pd.DataFrame) -> dict:
    """Fold k's images with everything chosen on the other folds (the `cv_` figures), so no
    choice ever sees the images it is scored on."""
    for c in candidates(p.evaluate):  # every image's counts at every threshold, computed once
        oof.sweep_counts(c)
    cv_pred = np.zeros_like(oof.truth)
    cv_scores, cv_calibrated = np.zeros(len(cv_pred)), np.zeros(len(cv_pred))
    cv_trust, cv_flagged = np.zeros(len(cv_pred)), np.zeros(len(cv_pred), dtype=bool)
    for k in np.unique(fold):
        mine = fold == k
        s = choose(p.evaluate, oof.rows(fold != k)).settings
        prob, scores = oof.probs[s.tta][mine], oof.scores[s.tta][mine]
        cv_trust[mine] = s.confidences(prob, scores)
        cv_pred[mine] = s.masks(prob, scores, cv_trust[mine])
        cv_scores[mine] = scores
        cv_calibrated[mine] = calibrate(scores, s.presence_temperature)
        cv_flagged[mine] = flag(cv_trust[mine], s.review_threshold)
        m.step(f"fold {k} chosen on the others")
    ece, reliability = presence.reliability(cv_calibrated, has_lesion(oof.truth))
    metrics, counts = summarize(cv_pred, oof.truth, cv_rows["class"].tolist(), cv_scores)
    low, high = interval(p, lesion_dice_per_image(counts)[:, None], mean_of_first)
    spacing = m.spacing_of(m.cache.indices(cv_rows["case_id"].tolist()))
    bounds, boundary = boundary_figures(p, cv_pred, oof.truth, spacing, "cv_")
    mm = m.pixel_mm_of(m.cache.indices(cv_rows["case_id"].tolist()))
    sized, sizes = size_figures(p, cv_pred, oof.truth, spacing, mm, "cv_")
    table = per_image_table(cv_rows, cv_pred, oof.truth, counts, cv_scores, cv_trust, cv_flagged,
                            boundary)
    table.insert(2, "fold", fold)
    if sizes is not None:
        table = pd.concat([table, sizes], axis=1)
    return {"metrics": {**{f"cv_{k}": v for k, v in metrics.items()},
                        "cv_dice_ci_low": low, "cv_dice_ci_high": high, **bounds, **sized,
                        **population_intervals(p, counts, cv_scores, "cv_"),
                        "cv_detect_ece": ece,
                        **trust_figures(p, counts, cv_trust, cv_flagged, "cv_")},
            "table": table, "pred": cv_pred, "reliability": reliability}


def member_figures(p: Params, m: Loaded, result: dict, members: list[Prediction]) -> dict:
    """Each fold model alone on the test images (`members`: their predictions), with the
    ensemble's settings, and what the ensemble gains over them (paired per image, with its
    interval)."""
    settings, te_true = result["settings"], result["test_true"]
    classes = result["test_rows"]["class"].tolist()
    singles = []
    for member_prob, member_scores in members:
        pred = settings.masks(member_prob, member_scores)
        singles.append(lesion_dice_per_image(summarize(pred, te_true, classes)[1]))
        m.step(f"member {len(singles) - 1} alone on test")
    ensemble = lesion_dice_per_image(result["counts"])
    paired = np.column_stack([ensemble, *singles])
    gain_low, gain_high = interval(p, paired, gain_over_members)
    return {
        "dice_single_mean": float(np.mean([s.mean() for s in singles])) if len(ensemble)
        else float("nan"),
        **{f"dice_single_{k}": float(s.mean()) if len(s) else float("nan")
           for k, s in enumerate(singles)},
        "dice_ensemble_gain": gain_over_members(paired) if len(ensemble) else float("nan"),
        "dice_ensemble_gain_ci_low": gain_low,
        "dice_ensemble_gain_ci_high": gain_high,
    }

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
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from busiseg.data.cache import Cache, load_cache
from busiseg.data.manifest import read_manifest
from busiseg.errors import BusisegError
from busiseg.evaluation.choose import HeldOut, candidates, choose, tta_settings
from busiseg.evaluation.classifier import open_classifier
from busiseg.evaluation.figures import FigureSettings, Scored, figures_of, member_figures
from busiseg.evaluation.malignancy import malignancy_keys
from busiseg.evaluation.metrics import rounded
from busiseg.inference.classify import Classifier
from busiseg.inference.segment import Decided, Feed, MaskSettings, predict_probabilities
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

    def held_out(self, forward: torch.nn.Module, idx: list[int], ttas: set[bool],
                 fold: int | None = None) -> tuple[HeldOut, np.ndarray | None]:
        """`forward`'s maps and lesion scores on held-out images, at each TTA setting choose
        weighs; with the classifier, its p_lesion is the lesion score from here on, by fold
        `fold`'s members alone (None: all of them), and its N×2 (p_lesion, p_malignant) comes
        back beside."""
        runs = {tta: self.predict(forward, idx, tta) for tta in ttas}
        classified = (None if self.classifier is None else
                      self.classifier.probabilities(self.images(idx), fold))
        scores = {t: r[1] if classified is None else classified[:, 0] for t, r in runs.items()}
        return HeldOut({t: r[0] for t, r in runs.items()}, scores, self.truth(idx)), classified


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


def evaluate(p: Params, model_path, cache_path, split_path, manifest_path=None,
             classifier_path=None) -> dict:
    m = load(p, model_path, cache_path, split_path, manifest_path=manifest_path,
             classifier_path=classifier_path)
    if m.members:
        return evaluate_folds(p, m)
    va_idx, va_rows = subset(m.cache, m.split, "val")
    held, classified = m.held_out(m.model, va_idx, tta_settings(p.evaluate))
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
            FigureSettings.of(p.evaluate), held[:, 1], held_classes, held_fold, test[:, 1],
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
    decided = settings.decide(te_prob, scores)
    chosen = settings.eval_keys()
    fig = figures_of(FigureSettings.of(p.evaluate), Scored(
        te_rows, te_true, decided, m.spacing_of(te_idx), m.pixel_mm_of(te_idx)))
    metrics = rounded({
        **fig.metrics,
        "threshold": chosen.pop("threshold"),
        "presence_threshold": chosen.pop("presence_threshold"),  # null: off
        "presence_temperature": chosen.pop("presence_temperature"),
        "detect_ece": fig.detect_ece,
        **fig.trust,
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
    return {"metrics": metrics, "per_image": fig.table, "test_pred": decided.masks,
            "test_idx": te_idx, "counts": fig.counts, "test_true": te_true, "test_rows": te_rows,
            "reliability": fig.reliability, "settings": settings, "classifier_test": classified}


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
    parts, classified = [], []
    for k, member in enumerate(m.members):
        held, fold_classified = m.held_out(member, [i for i, f in zip(oof_idx, fold) if f == k],
                                           tta_settings(p.evaluate), k)
        parts.append(held)
        classified.append(fold_classified)
        m.step(f"fold {k} predicted out of fold")
    oof = HeldOut({t: np.concatenate([h.probs[t] for h in parts]) for t in parts[0].probs},
                  {t: np.concatenate([h.scores[t] for h in parts]) for t in parts[0].scores},
                  np.concatenate([h.truth for h in parts]))
    classified = None if m.classifier is None else np.concatenate(classified)
    cv = score_out_of_fold(p, m, oof, fold, cv_rows)
    choice = choose(p.evaluate, oof)
    m.step("settings chosen out of fold")
    ensemble, members = m.predict_with_members(subset(m.cache, m.split, "test")[0],
                                               choice.settings.tta)
    result = score_test(p, m, choice.settings, ensemble)
    m.step("test scored")
    if classified is not None:  # each mask member gated by the classifier, as the ensemble
        members = [(prob, result["classifier_test"][:, 0]) for prob, _ in members]
    member_masks = []
    for k, (prob, scores) in enumerate(members):
        member_masks.append(choice.settings.masks(prob, scores))
        m.step(f"member {k} alone on test")
    alone = member_figures(FigureSettings.of(p.evaluate), result["counts"], member_masks,
                           result["test_true"], result["test_rows"]["class"].tolist())
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
    parts, order = [], []  # each fold's images decided by the settings the others chose
    for k in np.unique(fold):
        mine = np.flatnonzero(fold == k)
        s = choose(p.evaluate, oof.rows(fold != k)).settings
        parts.append(s.decide(oof.probs[s.tta][mine], oof.scores[s.tta][mine]))
        order.append(mine)
        m.step(f"fold {k} chosen on the others")
    back = np.argsort(np.concatenate(order))
    decided = Decided(*(np.concatenate(column)[back] for column in zip(*parts)))
    idx = m.cache.indices(cv_rows["case_id"].tolist())
    fig = figures_of(FigureSettings.of(p.evaluate), Scored(
        cv_rows, oof.truth, decided, m.spacing_of(idx), m.pixel_mm_of(idx)), "cv_")
    fig.table.insert(2, "fold", fold)
    return {"metrics": {**fig.metrics, "cv_detect_ece": fig.detect_ece, **fig.trust},
            "table": fig.table, "pred": decided.masks, "reliability": fig.reliability}

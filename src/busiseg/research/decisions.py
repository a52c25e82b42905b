"""Lesion-presence decisions re-fitted out of fold on evaluate's per-image table, with no
training: which rule would have given the best Dice over all images on these predictions.

    uv run python -m busiseg.research.decisions plots/evaluate/cv_per_image.csv \
        [--presence-from OTHER_RUN/cv_per_image.csv]

The table must come from a run with the gate off (`evaluate.presence_threshold: off`), so that
every image's mask and Dice are the ungated ones. Each fold is decided by a rule fitted on the
other folds only, as evaluate's `auto` is. `--presence-from` takes each image's lesion score
from another run on the same split (masks from one model, presence from another, e.g. a presence
head's). Prints aggregate figures only.

Rules: `off`; `auto` (evaluate's: the grid threshold on the lesion score with the best held-out
Dice over all images); `every_score` (the same with every held-out score a candidate, no grid
ceiling); `expected` (keep a mask iff p·q̂ > 1 − p, p the temperature-calibrated lesion score and
q̂ the Dice expected from the mask's confidence, isotonic on held-out lesion images: dropping a
mask pays 1 on a normal image and costs its Dice on a lesion image); `stacked_auto` and
`stacked_expected` (the same two on a stacked presence score: a logistic regression on the
lesion score's logit, the log predicted area and the confidence, fitted on held-out images).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from busiseg.errors import BusisegError
from busiseg.evaluation.metrics import PROBABILITY_GRID, auroc
from busiseg.evaluation.presence import fit_temperature
from busiseg.inference.confidence import calibrate


def _best_cut(candidates, scores, dice, lesion) -> float | None:
    """The cut with the best Dice over all images (ties and no gain: None, the gate off)."""
    best, best_dice = None, dice.mean()
    for t in candidates:
        d = np.where(scores >= t, dice, np.where(lesion, 0.0, 1.0)).mean()
        if d > best_dice + 1e-12:
            best, best_dice = float(t), d
    return best


def _expected_keep(fit: pd.DataFrame, apply: pd.DataFrame, p_fit: np.ndarray | None = None,
                   p_apply: np.ndarray | None = None) -> np.ndarray:
    """p · q̂ > 1 − p; p the calibrated lesion score unless given (a stacked probability). Written
    apart from evaluate's (MaskSettings.keep) on purpose: on a gate-off table it re-fits the rule
    without the models, and a test holds evaluate's out-of-fold decisions to it."""
    from sklearn.isotonic import IsotonicRegression

    lesion = fit["class"].to_numpy() != "normal"
    if p_apply is None:
        temperature = fit_temperature(fit["image_score"].to_numpy(), lesion)
        p_apply = calibrate(apply["image_score"].to_numpy(), temperature)
    q = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(
        fit["confidence"].to_numpy()[lesion], fit["dice"].to_numpy()[lesion])
    return p_apply * q.predict(apply["confidence"].to_numpy()) > 1 - p_apply


def _features(t: pd.DataFrame) -> np.ndarray:
    score = np.clip(t["image_score"].to_numpy(float), 1e-6, 1 - 1e-6)
    return np.column_stack([np.log(score) - np.log1p(-score),
                            np.log(t["pred_area"].to_numpy(float) + 1e-4),
                            t["confidence"].to_numpy(float)])


def _stacked(fit: pd.DataFrame, apply: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-sample stacked probabilities for `fit` (by 5-fold cross-fitting inside it, so the
    cut chosen on them is not chosen on fitted values) and for `apply`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    x, y = _features(fit), fit["class"].to_numpy() != "normal"
    model = LogisticRegression(C=1.0, max_iter=1000)
    inner = cross_val_predict(model, x, y, cv=5, method="predict_proba")[:, 1]
    return inner, model.fit(x, y).predict_proba(_features(apply))[:, 1]


def decide(table: pd.DataFrame) -> dict:
    """Each rule's out-of-fold Dice over all images, sensitivity and specificity."""
    if "fold" not in table or table["fold"].nunique() < 2:
        raise BusisegError("the table has no fold column: give a cv_per_image.csv of a run with "
                           "split.folds > 1")
    lesion = table["class"].to_numpy() != "normal"
    dice, scores, fold = (table[c].to_numpy() for c in ("dice", "image_score", "fold"))
    keep = {rule: np.ones(len(table), bool) for rule in (
        "off", "auto", "every_score", "expected", "stacked_auto", "stacked_expected")}
    stacked_auroc = np.zeros(len(table))
    for k in np.unique(fold):
        fit, mine = fold != k, fold == k
        args = (scores[fit], dice[fit], lesion[fit])
        for rule, grid in (("auto", PROBABILITY_GRID), ("every_score", np.unique(scores[fit]))):
            cut = _best_cut(grid, *args)
            keep[rule][mine] = True if cut is None else scores[mine] >= cut
        keep["expected"][mine] = _expected_keep(table[fit], table[mine])
        inner, outer = _stacked(table[fit], table[mine])
        stacked_auroc[mine] = outer
        cut = _best_cut(PROBABILITY_GRID, inner, dice[fit], lesion[fit])
        keep["stacked_auto"][mine] = True if cut is None else outer >= cut
        keep["stacked_expected"][mine] = _expected_keep(table[fit], table[mine], inner, outer)
    drawn = table["pred_area"].to_numpy() > 0
    out = {}
    for rule, kept in keep.items():
        per_image = np.where(kept, dice, np.where(lesion, 0.0, 1.0))
        says = kept & drawn
        out[rule] = {"cv_dice_all": round(float(per_image.mean()), 6),
                     "sensitivity": round(float(says[lesion].mean()), 6),
                     "specificity": round(float((~says[~lesion]).mean()), 6)}
    out["auroc"] = {"score": round(auroc(lesion, scores), 6),
                    "stacked": round(auroc(lesion, stacked_auroc), 6)}
    return out


def with_presence_from(table: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """`table` with each image's lesion score replaced by `other`'s for the same image."""
    if set(table["case_id"]) != set(other["case_id"]):
        raise BusisegError("--presence-from: the two tables hold different images; give a run "
                           "on the same split")
    scores = other.set_index("case_id")["image_score"]
    return table.assign(image_score=scores.loc[table["case_id"]].to_numpy())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table")
    ap.add_argument("--presence-from", metavar="OTHER_TABLE")
    args = ap.parse_args(argv)
    table = pd.read_csv(args.table, dtype={"case_id": str})
    if args.presence_from:
        table = with_presence_from(table, pd.read_csv(args.presence_from, dtype={"case_id": str}))
    print(json.dumps(decide(table), indent=1))


if __name__ == "__main__":
    main()

"""Choosing on held-out data: everything evaluate picks before it looks at test.

One function, `choose`, picks the pieces (flip TTA, largest component, hole filling), the pixel
threshold, the lesion score's temperature, the presence decision and the review threshold, in
that order, on held-out images only (val, all out-of-fold images, or the other folds), and returns
them as one `MaskSettings`: the type predict, export and the external sets apply. Test scoring,
out-of-fold scoring fold by fold and the single-split run all call it, so the chain is written
once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import product

import numpy as np
import pandas as pd

from busiseg.evaluation import presence
from busiseg.evaluation.metrics import PROBABILITY_GRID, confusion, lesion_dice_iou
from busiseg.inference.segment import MaskSettings, binarize
from busiseg.params import FITTED_PRESENCE, EvaluateParams

PIECES = ("tta", "largest_cc", "fill_holes", "tune_threshold")  # select_on_val's candidates


@dataclass(frozen=True)
class HeldOut:
    """Held-out images: probability maps and lesion scores for each TTA setting tried, and the
    true masks. Each image's pixel counts at every candidate threshold are computed once per
    set of pieces and shared with every subset (`rows`): out of fold, the K choices on K − 1
    folds each re-use them instead of post-processing every image again."""

    probs: dict[bool, np.ndarray]
    scores: dict[bool, np.ndarray]
    truth: np.ndarray
    counts: dict[tuple, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def rows(self, which: np.ndarray) -> HeldOut:
        return HeldOut({t: v[which] for t, v in self.probs.items()},
                       {t: v[which] for t, v in self.scores.items()}, self.truth[which],
                       {k: v[:, which] for k, v in self.counts.items()})

    def sweep_counts(self, s: MaskSettings) -> np.ndarray:
        """[threshold, image, (tp, fp, fn)] at every PROBABILITY_GRID threshold, with s's
        pieces."""
        key = (s.tta, s.largest_cc, s.fill_holes)
        if key not in self.counts:
            prob = self.probs[s.tta]
            self.counts[key] = np.stack([
                confusion(binarize(prob, t, s.largest_cc, s.fill_holes), self.truth)
                for t in PROBABILITY_GRID])
        return self.counts[key]


@dataclass(frozen=True)
class Choice:
    settings: MaskSettings
    sweep: pd.DataFrame  # held-out lesion Dice at every threshold, for the chosen pieces


def tta_settings(e: EvaluateParams) -> set[bool]:
    """The TTA settings the candidates need predictions for."""
    return {c.tta for c in candidates(e)}


def candidates(e: EvaluateParams) -> list[MaskSettings]:
    """The settings to choose among: the params' own, or with select_on_val every subset of the
    pieces they switch on (fewest pieces first, so a tie keeps the simpler setting). A
    candidate's `tuned_threshold` says whether its threshold is still to be chosen."""
    on = [k for k in PIECES if getattr(e, k)] if e.select_on_val else []
    subsets = sorted(product((False, True), repeat=len(on)), key=sum) if on else [()]
    fixed = {k: getattr(e, k) for k in PIECES if k not in on}
    out = []
    for flags in subsets:
        pieces = {**fixed, **dict(zip(on, flags))}
        out.append(MaskSettings(threshold=e.threshold, tta=pieces["tta"],
                                largest_cc=pieces["largest_cc"], fill_holes=pieces["fill_holes"],
                                confidence=e.confidence,
                                tuned_threshold=pieces["tune_threshold"]))
    return out


def lesion_dice(pred: np.ndarray, target: np.ndarray) -> float:
    return lesion_dice_iou(confusion(pred, target))[0]


def threshold_sweep(held: HeldOut, s: MaskSettings) -> pd.DataFrame:
    """Held-out lesion Dice at every candidate threshold, with the setting's pieces."""
    counts = held.sweep_counts(s)
    return pd.DataFrame({"threshold": PROBABILITY_GRID, "val_dice": [
        round(lesion_dice_iou(c)[0], 6) for c in counts]})


def review_threshold(fraction: float, trust: np.ndarray) -> float | None:
    """evaluate.review_fraction: the confidence below which that share of the held-out images
    falls (None: flag nothing)."""
    if fraction <= 0 or not len(trust):
        return None
    return float(np.sort(trust)[min(len(trust) - 1, int(round(fraction * len(trust))))])


def has_lesion(truth: np.ndarray) -> np.ndarray:
    return truth.reshape(len(truth), -1).any(axis=1)


def choose(e: EvaluateParams, held: HeldOut) -> Choice:
    """Pieces and pixel threshold with the best held-out lesion Dice (the first of equals, and
    candidates come simplest first); then the temperature that calibrates the lesion score; with
    those masks the presence decision (evaluate.presence_threshold: auto, the threshold with the
    best Dice over all images; expected, the expected-Dice curve; else the param's); and the
    review threshold that flags evaluate.review_fraction of the images."""
    sweeps: dict[tuple, pd.DataFrame] = {}
    best, best_dice = None, -np.inf
    for c in candidates(e):
        key = (c.tta, c.largest_cc, c.fill_holes)
        if key not in sweeps:
            sweeps[key] = threshold_sweep(held, c)
        sweep = sweeps[key]
        if c.tuned_threshold or c.threshold in PROBABILITY_GRID:
            at = sweep["val_dice"].idxmax() if c.tuned_threshold else \
                int(np.flatnonzero(c.threshold == PROBABILITY_GRID)[0])
            t, dice = float(sweep.loc[at, "threshold"]), float(sweep.loc[at, "val_dice"])
        else:  # a fixed threshold off the grid
            t = c.threshold
            pred = binarize(held.probs[c.tta], t, c.largest_cc, c.fill_holes)
            dice = round(lesion_dice(pred, held.truth), 6)
        if best is None or dice > best_dice:  # max()'s rule: the first of equals (or NaNs)
            best, best_dice = replace(c, threshold=t, val_dice=dice), dice
    prob, scores = held.probs[best.tta], held.scores[best.tta]
    # rounded as eval.json, the packaged model and an export carry it: the p the expected-Dice
    # rule reads here is then the p predict reads
    best = replace(best, presence_temperature=round(presence.fit_temperature(scores,
                                                                    has_lesion(held.truth)), 6))
    trust = best.confidences(prob, scores)
    gate_at, curve = e.presence_threshold, None
    if gate_at in FITTED_PRESENCE:
        masks = binarize(prob, best.threshold, best.largest_cc, best.fill_holes)
        if gate_at == "auto":
            gate_at = presence.choose_threshold(masks, held.truth, scores)
        else:
            gate_at, curve = None, presence.fit_expected_dice(masks, held.truth, trust)
    best = replace(best, presence_threshold=gate_at, presence_expected_dice=curve,
                   review_threshold=review_threshold(e.review_fraction, trust))
    return Choice(best, sweeps[(best.tta, best.largest_cc, best.fill_holes)])


def provenance(e: EvaluateParams, chosen: MaskSettings, held_out: str) -> dict[str, str]:
    """Where each of `choose`'s settings came from, in words a model card and predict's record
    can show beside the value; `chosen` is what choose returned (with select_on_val the params
    alone do not say whether the threshold was tuned), `held_out` names the images it chose on
    (e.g. "out of fold, 699 images")."""
    picked = f"chosen on held-out data ({held_out})"
    among = f"{picked} among the pieces switched on (evaluate.select_on_val)"
    pieces = {k: among if e.select_on_val and getattr(e, k) else f"evaluate.{k}"
              for k in ("tta", "largest_cc", "fill_holes")}
    if chosen.tuned_threshold:
        threshold = f"{picked}, best lesion Dice (evaluate.tune_threshold)"
    elif e.select_on_val and e.tune_threshold:
        threshold = f"evaluate.threshold: tuning it lost on held-out data ({held_out})"
    else:
        threshold = "evaluate.threshold"
    gate = e.presence_threshold
    if gate == "expected":
        expected = (f"{picked}: keep a mask iff p·q̂ > 1 − p, q̂ the lesion Dice expected at its "
                    "confidence, isotonic on the held-out lesion images (evaluate."
                    "presence_threshold: expected)"
                    if chosen.presence_expected_dice is not None else
                    "evaluate.presence_threshold: expected, off: the held-out images lack lesion "
                    "or normal images")
    else:
        expected = ("not used (evaluate.presence_threshold: "
                    f"{'off' if gate is None else gate})")
    return {
        "threshold": threshold,
        **pieces,
        "presence_threshold": f"{picked}, best Dice over all images (evaluate.presence_threshold:"
        " auto)" if gate == "auto" else "evaluate.presence_threshold: off" if gate is None
        else "evaluate.presence_threshold: expected (the rule below, no threshold)"
        if gate == "expected" else "evaluate.presence_threshold",
        "presence_expected_dice": expected,
        "presence_temperature": f"fitted on held-out data ({held_out}) to calibrate the lesion "
        "score",
        "confidence": "evaluate.confidence",
        "review_threshold": f"{picked}: flags evaluate.review_fraction of the images"
        if e.review_fraction > 0 else "evaluate.review_fraction: 0",
    }

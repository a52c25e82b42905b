"""Score: a folder of predicted masks against a folder of true masks, by evaluate's rules.

Masks from busiseg predict, nnU-Net or any script are matched to the truth by name and scored
with the very functions evaluate scores the test split with, so a figure here and the one of
the same name in metrics/eval.json mean the same thing and can be compared side by side.

Names follow the dataset layouts' rule (`{id}_mask`, further masks `_mask_1`, `_mask_2`, … of
one case merged as ingest merges them), or a plain `{id}` for a tool that writes one mask per
case under the case's own name, but only in a folder without any `_mask` file: beside those a
plain name is an image (BUSI's folders, predict's output folder), ignored and never scored.
Masks are read as ingest reads them (0/1, 0/255, RGB, palette alike; more than two values
binarised by ingest's rule, and said) and scored at their own resolution, so distances are in
their pixels.
"""

from __future__ import annotations

import shlex
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from busiseg import busiseg_version
from busiseg.data.classes import ALL_CLASSES, CLASSES
from busiseg.data.images import mask_to_bool, open_image, process_map
from busiseg.data.ingest import _natural_key
from busiseg.data.layouts import IMAGE_SUFFIXES, OS_CLUTTER, name_rule
from busiseg.errors import BusisegError
from busiseg.evaluation.figures import (
    FigureSettings,
    boundary_means,
    mean_of_first,
    population_intervals,
    size_figures,
)
from busiseg.evaluation.metrics import (
    boundary_metrics,
    confusion,
    dice_iou,
    lesion_dice_per_image,
    population_rows,
    rounded,
    summarize_counts,
)
from busiseg.inference.predict import OWN_OUTPUT, OWN_SUFFIXES
from busiseg.inference.sizes import size_tables
from busiseg.params import EvaluateParams, Params

MASK_RULE = name_rule("{id}_mask", multi=True)  # the layouts' default (BUSI's) mask rule
CSV_NAME, JSON_NAME = "scores.csv", "scores.json"
RULE = "NAME_mask.png (further masks NAME_mask_1.png, ...) or NAME.png"

# why a file in a mask folder is not scored (scores.json's `ignored_pred`/`ignored_truth`)
IMAGE_BESIDE_MASKS = "an image: a name without _mask in a folder that holds NAME_mask files"
IMAGE_IN_CLASS = "an image: a name without _mask in a BUSI class folder"
SUBFOLDER = "a folder inside the mask folder (score does not look in)"
OUTSIDE_CLASSES = f"outside the class folders ({', '.join(c + '/' for c in CLASSES)})"
NOT_IMAGE = f"not an image file ({' '.join(IMAGE_SUFFIXES)})"
CLUTTER = "the operating system's own file"
BINARISED = "values binarised"  # in mask_to_bool's note on a mask of more than two values


@dataclass
class Found:
    """The masks of one folder by case id (`files`: first mask, then further ones), each case's
    class folder ("" where the class comes from the mask) and every file not used, relative,
    with the reason."""

    root: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    cls: dict[str, str] = field(default_factory=dict)
    ignored: list[dict[str, str]] = field(default_factory=list)

    def rel(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix()

    def ignore(self, p: Path, reason: str) -> None:
        self.ignored.append({"path": self.rel(p) + ("/" if p.is_dir() else ""),
                             "reason": reason})


def _not_a_mask(p: Path, stem: str, own: tuple[str, ...]) -> str | None:
    if p.is_dir():
        return SUBFOLDER
    if p.name.lower() in OS_CLUTTER:
        return CLUTTER
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        return NOT_IMAGE
    if own and stem.endswith(own):
        return OWN_OUTPUT
    return None


def collect(found: Found, folder: Path, cls: str = "", plain_masks: bool = True,
            own: tuple[str, ...] = ()) -> None:
    """Add the masks of one folder. A name without `_mask` is a mask of its own only in a
    folder of masks (`plain_masks`) that holds no `_mask` file at all: beside one it is an image
    (a BUSI-like folder; predict's output folder, where an image whose prediction failed has no
    mask) and is ignored, never scored. Names ending in `own` are another tool's extras."""
    ruled: dict[str, dict[int, Path]] = defaultdict(dict)
    plain: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        stem = p.name[: -len(p.suffix)] if p.suffix else p.name
        reason = _not_a_mask(p, stem, own)
        if reason is not None:
            found.ignore(p, reason)
            continue
        m = MASK_RULE.match(stem)
        if m is None:
            plain[stem].append(p)
            continue
        k = int(m["k"] or 0)
        if k in ruled[m["id"]]:
            raise BusisegError(f"{p}: same mask name as {ruled[m['id']][k]}; keep one")
        ruled[m["id"]][k] = p
    images = IMAGE_IN_CLASS if not plain_masks else IMAGE_BESIDE_MASKS if ruled else None
    for stem, paths in plain.items():
        if images is not None:
            for p in paths:
                found.ignore(p, images)
        elif len(paths) > 1:
            raise BusisegError(f"{paths[1]}: same case name as {paths[0]}; keep one")
        else:
            ruled[stem][0] = paths[0]
    for cid, masks in ruled.items():
        first = masks[min(masks)]
        if cid in found.files:
            raise BusisegError(f"{first}: same case id '{cid}' as {found.files[cid][0]}; "
                               "rename or remove one")
        found.files[cid] = [masks[k] for k in sorted(masks)]
        found.cls[cid] = cls


def find_truth(truth: Path) -> tuple[Found, str]:
    """The true masks and the layout they were found in: `busi` when the folder holds class
    folders (benign/, malignant/, normal/: classes from the folders, the images beside the
    masks ignored), else `flat`, a folder of masks whose classes come from the masks alone."""
    found = Found(truth)
    entries = sorted(truth.iterdir(), key=lambda p: p.name)
    if not any(p.is_dir() and p.name.lower() in CLASSES for p in entries):
        collect(found, truth)
        return found, "flat"
    for p in entries:
        if p.is_dir() and p.name.lower() in CLASSES:
            collect(found, p, p.name.lower(), plain_masks=False)
        else:
            found.ignore(p, OUTSIDE_CLASSES)
    return found, "busi"


def find_predictions(pred: Path) -> Found:
    found = Found(pred)
    collect(found, pred, own=OWN_SUFFIXES)
    return found


def read_case(paths: list[Path]) -> tuple[np.ndarray, list[str]]:
    """One case's masks merged (their union), each read by ingest's rule (`mask_to_bool`), and
    what that rule had to do to read them (a mask with more than two values binarised, ...)."""
    union, notes = None, []
    for p in paths:
        said: list[str] = []
        m = mask_to_bool(open_image(p), p, said)
        notes += [f"{p}: {s}" for s in said]
        if union is not None and m.shape != union.shape:
            raise BusisegError(f"{p}: mask is {m.shape[1]}x{m.shape[0]} but {paths[0].name} of "
                               f"the same case is {union.shape[1]}x{union.shape[0]}; re-export "
                               "it at the image size")
        union = m if union is None else union | m
    return union, notes


def boundary_per_image(pred: list[np.ndarray], true: list[np.ndarray],
                       tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """HD95 and NSD in the masks' own pixels (spacing 1), each size scored on its own so an
    empty mask's worst case is its own image's diagonal."""
    hd95, nsd = np.zeros(len(pred)), np.zeros(len(pred))
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, m in enumerate(true):
        by_shape[m.shape].append(i)
    for idx in by_shape.values():
        hd95[idx], nsd[idx] = boundary_metrics(np.stack([pred[i] for i in idx]),
                                               np.stack([true[i] for i in idx]), np.ones(2),
                                               tolerance)
    return hd95, nsd


def score_params(bootstrap: int | None = None, seed: int | None = None,
                 tolerance: float | None = None) -> Params:
    """The options as evaluate's own params (None: evaluate's default), so every interval is
    drawn as evaluate draws it."""
    base = EvaluateParams()
    bootstrap = base.bootstrap if bootstrap is None else bootstrap
    seed = base.bootstrap_seed if seed is None else seed
    tolerance = base.surface_tolerance if tolerance is None else tolerance
    if bootstrap < 0:
        raise BusisegError(f"--bootstrap {bootstrap}: must be ≥ 0 (0 = no intervals)")
    if not tolerance > 0:
        raise BusisegError(f"--surface-tolerance {tolerance}: must be > 0 (pixels of the masks)")
    return Params(evaluate=replace(base, bootstrap=bootstrap, bootstrap_seed=seed,
                                   surface_tolerance=tolerance))


@dataclass
class Scores:
    table: pd.DataFrame  # one row per matched case
    report: dict  # what scores.json holds


MISSING = ("empty", "error")  # --missing: a truth without a prediction scored as a miss, or refused


def score_folders(pred: Path, truth: Path, bootstrap: int | None = None, seed: int | None = None,
                  tolerance: float | None = None, out: Path | None = None,
                  workers: int = 0, missing: str = "empty") -> Scores:
    """Match, read and score; options left None take evaluate's defaults (`out` only goes into
    the command recorded). A truth without a prediction is scored as an empty mask (`missing`
    empty), so a tool that writes only its non-empty masks scores as what it answered, or
    stops the scoring (`missing` error)."""
    p = score_params(bootstrap, seed, tolerance)
    matched = match_folders(Path(pred), Path(truth))
    if matched.missing and missing == "error":
        raise BusisegError(f"--pred {pred}: {len(matched.missing)} truth case(s) have no "
                           f"prediction: {named(matched.missing, 10)}; write their masks, or "
                           "give --missing empty to score them as empty masks")
    cases = read_cases(matched, workers)
    metrics, table = figures(p, cases.pred, cases.true, cases.classes)
    table.insert(0, "case_id", cases.ids)
    table.insert(1, "class", cases.classes)
    table.insert(2, "predicted", [int(c not in matched.missing) for c in cases.ids])
    return Scores(table, report(p, matched, cases, metrics, out, missing))


@dataclass
class Matched:
    """The two folders' masks and how they pair: `ids` the cases in both (truth's order),
    `missing` truth cases without a prediction, `unmatched` prediction files without a truth."""

    pred: Found
    truth: Found
    layout: str
    ids: list[str]
    missing: list[str]
    unmatched: list[str]


def match_folders(pred: Path, truth: Path) -> Matched:
    """Find both folders' masks and pair them by case id; a folder that is none, holds no masks
    or shares no case with the other ends in one line."""
    for option, folder in (("--pred", pred), ("--truth", truth)):
        if not folder.is_dir():
            raise BusisegError(f"{option} {folder}: " + ("is not a folder" if folder.exists()
                               else "does not exist") + "; give the folder of masks")
    if pred.resolve() == truth.resolve():
        raise BusisegError(f"--pred and --truth are the same folder ({pred}); give the folder "
                           "of predicted masks and the folder of true masks")
    true_found, layout = find_truth(truth)
    pred_found = find_predictions(pred)
    if not true_found.files:
        raise BusisegError(f"--truth {truth}: holds no masks ({RULE}, or BUSI's class folders "
                           "of them); point it at the true masks")
    if not pred_found.files:
        raise BusisegError(f"--pred {pred}: holds no masks ({RULE}); point it at the "
                           "predicted masks")
    ids = [c for c in true_found.files if c in pred_found.files]
    if not ids:
        raise BusisegError(f"--pred {pred}: none of its {len(pred_found.files)} mask(s) is named "
                           f"after one of the {len(true_found.files)} case(s) in {truth} "
                           f"({RULE}, NAME as in the truth); check the two folders")
    missing = sorted((c for c in true_found.files if c not in pred_found.files), key=_natural_key)
    unmatched = sorted((pred_found.rel(f) for c, fs in pred_found.files.items()
                        if c not in true_found.files for f in fs), key=_natural_key)
    return Matched(pred_found, true_found, layout, ids, missing, unmatched)


@dataclass
class Cases:
    """The matched cases read, in ingest's order: ids, classes, masks and the reading notes."""

    ids: list[str]
    classes: list[str]
    true: list[np.ndarray]
    pred: list[np.ndarray]
    notes: list[str]


def read_cases(matched: Matched, workers: int = 0) -> Cases:
    """Read every matched pair (a prediction of another size than its truth ends in one line),
    class each case (its class folder, else `lesion`/`normal` from the true mask) and put them
    in ingest's order (class, then natural name), which the pipeline's split and test set keep,
    so the bootstrap draws the same images as evaluate's on the same cases."""
    ids = matched.ids + matched.missing  # the missing read as empty masks (_read_pair)
    read = partial(_read_pair, matched.truth.files, matched.pred.files)
    pairs = process_map(read, ids, workers, desc="score")
    mismatched = [(c, t.shape, q.shape) for c, (t, q, _) in zip(ids, pairs) if t.shape != q.shape]
    if mismatched:
        c, ts, ps = mismatched[0]
        more = f" ({len(mismatched) - 1} more case(s) likewise)" if len(mismatched) > 1 else ""
        raise BusisegError(f"{matched.pred.files[c][0]}: mask is {ps[1]}x{ps[0]} but its truth "
                           f"{matched.truth.files[c][0]} is {ts[1]}x{ts[0]}{more}; write the "
                           "predictions at the true masks' size")
    classes = [matched.truth.cls[c] or ("lesion" if t.any() else "normal")
               for c, (t, _, _) in zip(ids, pairs)]
    order = sorted(range(len(ids)), key=lambda i: (ALL_CLASSES.index(classes[i]),
                                                   _natural_key(ids[i])))
    return Cases([ids[i] for i in order], [classes[i] for i in order],
                 [pairs[i][0] for i in order], [pairs[i][1] for i in order],
                 [n for i in order for n in pairs[i][2]])


def _read_pair(truth: dict[str, list[Path]], pred: dict[str, list[Path]],
               cid: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    t, t_notes = read_case(truth[cid])
    if cid not in pred:  # no prediction: scored as an answer of no lesion
        return t, np.zeros_like(t), t_notes
    q, q_notes = read_case(pred[cid])
    return t, q, t_notes + q_notes


def report(p: Params, matched: Matched, cases: Cases, metrics: dict,
           out: Path | None = None, missing: str = "empty") -> dict:
    """scores.json: the command that redoes it, the version, the figures and what became of
    every file in the two folders."""
    pred, truth, e = matched.pred.root, matched.truth.root, p.evaluate
    command = ["busiseg", "score", "--pred", str(pred), "--truth", str(truth),
               *(["--out", str(out)] if out is not None else []),
               "--bootstrap", str(e.bootstrap), "--bootstrap-seed", str(e.bootstrap_seed),
               "--surface-tolerance", f"{e.surface_tolerance:g}", "--missing", missing]
    return {
        "command": shlex.join(command),
        "busiseg": busiseg_version(),  # as predict's predictions.json names it
        "pred": str(pred),
        "truth": str(truth),
        "truth_layout": matched.layout,
        "bootstrap": e.bootstrap,
        "bootstrap_seed": e.bootstrap_seed,
        "surface_tolerance": e.surface_tolerance,
        "metrics": metrics,
        "matching": {
            "n_truth": len(matched.truth.files),
            "n_pred": len(matched.pred.files),
            "n_matched": len(matched.ids),
            "n_missing": len(matched.missing),
            "missing_scored_as": "empty mask",  # each in the figures as a miss (--missing)
            "n_scored": len(cases.ids),
            "n_unmatched": len(matched.unmatched),
            "missing": matched.missing,  # truth cases without a prediction (case ids)
            "unmatched": matched.unmatched,  # prediction files without a truth (under --pred)
            "ignored_pred": matched.pred.ignored,  # {path (under --pred), reason}
            "ignored_truth": matched.truth.ignored,
        },
        "notes": cases.notes,  # what reading a mask took (binarised, palette, ...)
    }


def figures(p: Params, pred: list[np.ndarray], true: list[np.ndarray],
            classes: list[str]) -> tuple[dict, pd.DataFrame]:
    """evaluate's test figures without the ones that need a model's per-image score (AUROC,
    calibration, confidence): `summarize_counts` over each image at its own size, the lesion
    Dice's and the whole population's intervals, and the boundary figures over the lesion
    images, each drawn by figures.py's functions as evaluate draws them."""
    counts = np.stack([confusion(a[None], b[None])[0] for a, b in zip(pred, true, strict=True)])
    sizes = np.array([m.size for m in true], dtype=np.float64)
    metrics = summarize_counts(counts, sizes, classes)
    pred_area = (counts[:, 0] + counts[:, 1]) / sizes
    true_area = (counts[:, 0] + counts[:, 2]) / sizes
    f = FigureSettings.of(p.evaluate)
    low, high = f.interval(lesion_dice_per_image(counts)[:, None], mean_of_first)
    hd95, nsd = boundary_per_image(pred, true, f.surface_tolerance)
    population = population_rows(counts)
    lesion = population[:, 2] > 0
    ones = np.ones((len(pred), 2))  # each mask at its own size: its pixels are the unit
    sized, sizes = size_figures(f, size_tables(pred, true, ones, None), lesion)
    metrics = rounded({**metrics, "dice_ci_low": low, "dice_ci_high": high,
                       **boundary_means(f, hd95, nsd, lesion), **sized,
                       **population_intervals(f, population, False)})
    dice, iou = dice_iou(counts)
    table = pd.DataFrame({"dice": np.round(dice, 6), "iou": np.round(iou, 6),
                          "lesion_area": true_area.round(6), "pred_area": pred_area.round(6),
                          "hd95": np.round(hd95, 6), "nsd": np.round(nsd, 6)})
    unknown = [c for c in sizes.columns if c.endswith(("_mm", "_mm2"))]  # no pixel size here
    return metrics, pd.concat([table, sizes.drop(columns=unknown)], axis=1)


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BusisegError(f"--out {out}: is a file; give a folder for {CSV_NAME} and "
                           f"{JSON_NAME} (default: the --pred folder)")


def write(scores: Scores, out: Path) -> tuple[Path, Path]:
    from busiseg.pipeline.stage import write_json

    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / CSV_NAME, out / JSON_NAME
    scores.table.to_csv(csv_path, index=False)
    write_json(json_path, scores.report)
    return csv_path, json_path


def named(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more in {JSON_NAME})" if len(items) > limit
                    else "")


def by_reason(ignored: list[dict[str, str]]) -> str:
    return "; ".join(f"{n} {reason}" for reason, n in
                     Counter(i["reason"] for i in ignored).most_common())


def stderr_lines(report: dict) -> list[str]:
    """The stderr lines: every truth case left unscored, every prediction not used, what was
    ignored and why, and every mask binarised (an image named as a mask would be too)."""
    m, lines = report["matching"], []
    if m["missing"]:
        lines.append(f"score: {len(m['missing'])} truth case(s) without a prediction "
                     f"(missing), scored as empty masks: {named(m['missing'])}")
    if m["unmatched"]:
        lines.append(f"score: {len(m['unmatched'])} prediction(s) without a truth "
                     f"(unmatched): {named(m['unmatched'])}")
    for option, key in (("--pred", "ignored_pred"), ("--truth", "ignored_truth")):
        if m[key]:
            lines.append(f"score: ignored {len(m[key])} file(s) in {option} (listed in "
                         f"{JSON_NAME}): {by_reason(m[key])}")
    binarised = [n for n in report["notes"] if BINARISED in n]
    if binarised:
        lines.append(f"score: {len(binarised)} mask(s) had more than two values and were "
                     f"binarised as ingest binarises them, e.g. {binarised[0]}; an image named "
                     "as a mask would be too: check that these are masks")
    others = [n for n in report["notes"] if BINARISED not in n]
    if others:
        lines.append(f"score: {len(others)} mask(s) needed a reading rule, e.g. "
                     f"{others[0]} (all in {JSON_NAME})")
    return lines


def summary(report: dict) -> list[str]:
    m, match = report["metrics"], report["matching"]
    return [
        f"score: {match['n_matched']} matched, {match['n_missing']} missing"
        + (" (scored as empty masks)" if match["n_missing"] else "")
        + f", {match['n_unmatched']} unmatched ({m['n_lesion_images']} lesion, "
        f"{m['n_normal_images']} normal images)",
        f"score: Dice {m['dice']} [{m['dice_ci_low']}, {m['dice_ci_high']}] (lesion images, "
        f"per-image mean), pooled {m['dice_pooled']}; all images Dice {m['dice_all']} "
        f"[{m['dice_all_ci_low']}, {m['dice_all_ci_high']}]",
        f"score: detection sensitivity {m['detect_sensitivity']}, specificity "
        f"{m['detect_specificity']}; HD95 {m['hd95']}, NSD {m['nsd']} (tolerance "
        f"{report['surface_tolerance']:g} px)",
        f"score: long-axis error {m['long_axis_mae_px']} px [{m['long_axis_mae_px_ci_low']}, "
        f"{m['long_axis_mae_px_ci_high']}] (mean absolute, lesion images)",
    ]

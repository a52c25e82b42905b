"""Score: a folder of predicted masks against a folder of true masks, by evaluate's rules.

Masks from busiseg predict, nnU-Net or any script are matched to the truth by name and scored
with the very functions evaluate scores the test split with, so a figure here and the one of
the same name in metrics/eval.json mean the same thing and can be compared side by side.

Names follow the dataset layouts' rule (`{id}_mask`, further masks `_mask_1`, `_mask_2`, … of
one case merged as ingest merges them), or a plain `{id}` for a tool that writes one mask per
case under the case's own name. Masks are read as ingest reads them (0/1, 0/255, RGB, palette
alike) and scored at their own resolution, so distances are in their pixels.
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

import busiseg
from busiseg.data.classes import ALL_CLASSES, CLASSES
from busiseg.data.images import mask_to_bool, open_image, process_map
from busiseg.data.ingest import _natural_key
from busiseg.data.layouts import IMAGE_SUFFIXES, OS_CLUTTER, name_rule
from busiseg.errors import BusisegError
from busiseg.evaluation.evaluate import (
    boundary_means,
    interval,
    mean_of_first,
    population_intervals,
)
from busiseg.evaluation.metrics import (
    boundary_metrics,
    dice_iou,
    lesion_dice_per_image,
    rounded,
    summarize,
)
from busiseg.params import EvaluateParams, Params

MASK_RULE = name_rule("{id}_mask", multi=True)  # the layouts' default (BUSI's) mask rule
PREDICT_OWN = ("_overlay", "_prob")  # what busiseg predict writes beside its masks
CSV_NAME, JSON_NAME = "scores.csv", "scores.json"


@dataclass
class Found:
    """The masks of one folder by case id (`files`: first mask, then further ones), each case's
    class folder ("" where the class comes from the mask) and every file not used, relative."""

    root: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    cls: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def rel(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix()


def collect(found: Found, folder: Path, cls: str = "", plain_masks: bool = True,
            own: tuple[str, ...] = ()) -> None:
    """Add the masks of one folder. A name without `_mask` is a mask of its own only in a
    folder of masks (`plain_masks`), and even there not beside a `_mask` file of the same case,
    whose image it then is; names ending in `own` are another tool's extras."""
    ruled: dict[str, dict[int, Path]] = defaultdict(dict)
    plain: dict[str, Path] = {}
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        stem = p.name[: -len(p.suffix)] if p.suffix else p.name
        if (p.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES
                or p.name.lower() in OS_CLUTTER or stem.endswith(own)):
            found.ignored.append(found.rel(p) + ("/" if p.is_dir() else ""))
            continue
        m = MASK_RULE.match(stem)
        if m is None:
            if not plain_masks:
                found.ignored.append(found.rel(p))
            elif stem in plain:
                raise BusisegError(f"{p}: same case name as {plain[stem]}; keep one")
            else:
                plain[stem] = p
            continue
        k = int(m["k"] or 0)
        if k in ruled[m["id"]]:
            raise BusisegError(f"{p}: same mask name as {ruled[m['id']][k]}; keep one")
        ruled[m["id"]][k] = p
    for stem, p in plain.items():
        if stem not in ruled:
            ruled[stem][0] = p
        else:
            found.ignored.append(found.rel(p))
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
            found.ignored.append(found.rel(p) + ("/" if p.is_dir() else ""))
    return found, "busi"


def find_predictions(pred: Path) -> Found:
    found = Found(pred)
    collect(found, pred, own=PREDICT_OWN)
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


def stacked(masks: list[np.ndarray]) -> np.ndarray:
    """N×H×W for the metrics; masks of different sizes padded with background, which none of
    the figures computed from the stack counts (the areas are taken per image instead)."""
    h, w = max(m.shape[0] for m in masks), max(m.shape[1] for m in masks)
    out = np.zeros((len(masks), h, w), dtype=bool)
    for i, m in enumerate(masks):
        out[i, : m.shape[0], : m.shape[1]] = m
    return out


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


def score_params(bootstrap: int, seed: int, tolerance: float) -> Params:
    """The options as evaluate's own params, so every interval is drawn as evaluate draws it."""
    if bootstrap < 0:
        raise BusisegError(f"--bootstrap {bootstrap}: must be ≥ 0 (0 = no intervals)")
    if not tolerance > 0:
        raise BusisegError(f"--surface-tolerance {tolerance}: must be > 0 (pixels of the masks)")
    return Params(evaluate=replace(EvaluateParams(), bootstrap=bootstrap, bootstrap_seed=seed,
                                   surface_tolerance=tolerance))


@dataclass
class Scores:
    table: pd.DataFrame  # one row per matched case
    report: dict  # what scores.json holds


def score_folders(pred: Path, truth: Path, bootstrap: int | None = None, seed: int | None = None,
                  tolerance: float | None = None, out: Path | None = None,
                  workers: int = 0) -> Scores:
    """Match, read and score; options left None take evaluate's defaults (`out` only goes into
    the command recorded)."""
    base = EvaluateParams()
    p = score_params(base.bootstrap if bootstrap is None else bootstrap,
                     base.bootstrap_seed if seed is None else seed,
                     base.surface_tolerance if tolerance is None else tolerance)
    pred, truth = Path(pred), Path(truth)
    for option, folder in (("--pred", pred), ("--truth", truth)):
        if not folder.is_dir():
            raise BusisegError(f"{option} {folder}: " + ("is not a folder" if folder.exists()
                               else "does not exist") + "; give the folder of masks")
    if pred.resolve() == truth.resolve():
        raise BusisegError(f"--pred and --truth are the same folder ({pred}); give the folder "
                           "of predicted masks and the folder of true masks")
    true_found, layout = find_truth(truth)
    pred_found = find_predictions(pred)
    rule = "NAME_mask.png (further masks NAME_mask_1.png, ...) or NAME.png"
    if not true_found.files:
        raise BusisegError(f"--truth {truth}: holds no masks ({rule}, or BUSI's class folders "
                           "of them); point it at the true masks")
    if not pred_found.files:
        raise BusisegError(f"--pred {pred}: holds no masks ({rule}); point it at the "
                           "predicted masks")
    ids = [c for c in true_found.files if c in pred_found.files]
    if not ids:
        raise BusisegError(f"--pred {pred}: none of its {len(pred_found.files)} mask(s) is named "
                           f"after one of the {len(true_found.files)} case(s) in {truth} "
                           f"({rule}, NAME as in the truth); check the two folders")
    missing = sorted((c for c in true_found.files if c not in pred_found.files), key=_natural_key)
    unmatched = sorted((pred_found.rel(f) for c, fs in pred_found.files.items()
                        if c not in true_found.files for f in fs), key=_natural_key)

    read = partial(_read_pair, true_found.files, pred_found.files)
    pairs = process_map(read, ids, workers, desc="score")
    mismatched = [(c, t.shape, q.shape) for c, (t, q, _) in zip(ids, pairs) if t.shape != q.shape]
    if mismatched:
        c, ts, ps = mismatched[0]
        more = f" ({len(mismatched) - 1} more case(s) likewise)" if len(mismatched) > 1 else ""
        raise BusisegError(f"{pred_found.files[c][0]}: mask is {ps[1]}x{ps[0]} but its truth "
                           f"{true_found.files[c][0]} is {ts[1]}x{ts[0]}{more}; write the "
                           "predictions at the true masks' size")
    classes = [true_found.cls[c] or ("lesion" if t.any() else "normal")
               for c, (t, _, _) in zip(ids, pairs)]
    # ingest's order (class, then natural name), which the pipeline's split and test set keep,
    # so the bootstrap draws the same images as evaluate's on the same cases
    order = sorted(range(len(ids)), key=lambda i: (ALL_CLASSES.index(classes[i]),
                                                   _natural_key(ids[i])))
    ids, classes = [ids[i] for i in order], [classes[i] for i in order]
    true_list, pred_list = [pairs[i][0] for i in order], [pairs[i][1] for i in order]
    notes = [n for i in order for n in pairs[i][2]]

    metrics, table = figures(p, pred_list, true_list, classes)
    table.insert(0, "case_id", ids)
    table.insert(1, "class", classes)
    report = {
        "command": shlex.join(["busiseg", "score", "--pred", str(pred), "--truth", str(truth),
                               *(["--out", str(out)] if out is not None else []),
                               "--bootstrap", str(p.evaluate.bootstrap), "--bootstrap-seed",
                               str(p.evaluate.bootstrap_seed), "--surface-tolerance",
                               f"{p.evaluate.surface_tolerance:g}"]),
        "busiseg_version": busiseg.__version__,
        "pred": str(pred),
        "truth": str(truth),
        "truth_layout": layout,
        "bootstrap": p.evaluate.bootstrap,
        "bootstrap_seed": p.evaluate.bootstrap_seed,
        "surface_tolerance": p.evaluate.surface_tolerance,
        "metrics": metrics,
        "matching": {
            "n_truth": len(true_found.files),
            "n_pred": len(pred_found.files),
            "n_matched": len(ids),
            "n_missing": len(missing),
            "n_unmatched": len(unmatched),
            "missing": missing,  # truth cases without a prediction (case ids)
            "unmatched": unmatched,  # prediction files without a truth (relative to --pred)
            "ignored_pred": pred_found.ignored,
            "ignored_truth": true_found.ignored,
        },
        "notes": notes,  # what reading a mask took (binarised, palette, ...)
    }
    return Scores(table, report)


def _read_pair(truth: dict[str, list[Path]], pred: dict[str, list[Path]],
               cid: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    t, t_notes = read_case(truth[cid])
    q, q_notes = read_case(pred[cid])
    return t, q, t_notes + q_notes


def figures(p: Params, pred: list[np.ndarray], true: list[np.ndarray],
            classes: list[str]) -> tuple[dict, pd.DataFrame]:
    """evaluate's test figures without the ones that need a model's per-image score (AUROC,
    calibration, confidence): `summarize`, the lesion Dice's and the whole population's
    intervals as score_test draws them, and the boundary figures over the lesion images."""
    pred_arr, true_arr = stacked(pred), stacked(true)
    metrics, counts = summarize(pred_arr, true_arr, classes)
    sizes = np.array([m.size for m in true], dtype=np.float64)
    pred_area = np.array([m.sum() for m in pred], dtype=np.float64) / sizes
    true_area = np.array([m.sum() for m in true], dtype=np.float64) / sizes
    if len(set(m.shape for m in true)) > 1:  # summarize divides by one image size
        normal = true_area == 0
        metrics["normal_fp_area"] = (float(pred_area[normal].mean()) if normal.any()
                                     else float("nan"))
    low, high = interval(p, lesion_dice_per_image(counts)[:, None], mean_of_first)
    hd95, nsd = boundary_per_image(pred, true, p.evaluate.surface_tolerance)
    metrics = rounded({**metrics, "dice_ci_low": low, "dice_ci_high": high,
                       **boundary_means(p, hd95, nsd, true_arr),
                       **population_intervals(p, counts, None)})
    dice, iou = dice_iou(counts)
    table = pd.DataFrame({"dice": np.round(dice, 6), "iou": np.round(iou, 6),
                          "lesion_area": true_area.round(6), "pred_area": pred_area.round(6),
                          "hd95": np.round(hd95, 6), "nsd": np.round(nsd, 6)})
    return metrics, table


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


def stderr_lines(report: dict) -> list[str]:
    """The stderr lines: every truth case left unscored and every prediction not used."""
    m, lines = report["matching"], []
    if m["missing"]:
        lines.append(f"score: {len(m['missing'])} truth case(s) without a prediction "
                     f"(missing): {named(m['missing'])}")
    if m["unmatched"]:
        lines.append(f"score: {len(m['unmatched'])} prediction(s) without a truth "
                     f"(unmatched): {named(m['unmatched'])}")
    if m["ignored_pred"] or m["ignored_truth"]:
        lines.append(f"score: ignored {len(m['ignored_pred'])} file(s) in --pred and "
                     f"{len(m['ignored_truth'])} in --truth (images, and files no name rule makes "
                     f"a mask; listed in {JSON_NAME})")
    if report["notes"]:
        lines.append(f"score: {len(report['notes'])} mask(s) needed a reading rule, e.g. "
                     f"{report['notes'][0]} (all in {JSON_NAME})")
    return lines


def summary(report: dict) -> list[str]:
    m, match = report["metrics"], report["matching"]
    return [
        f"score: {match['n_matched']} matched, {match['n_missing']} missing, "
        f"{match['n_unmatched']} unmatched ({m['n_lesion_images']} lesion, "
        f"{m['n_normal_images']} normal images)",
        f"score: Dice {m['dice']} [{m['dice_ci_low']}, {m['dice_ci_high']}] (lesion images, "
        f"per-image mean), pooled {m['dice_pooled']}; all images Dice {m['dice_all']} "
        f"[{m['dice_all_ci_low']}, {m['dice_all_ci_high']}]",
        f"score: detection sensitivity {m['detect_sensitivity']}, specificity "
        f"{m['detect_specificity']}; HD95 {m['hd95']}, NSD {m['nsd']} (tolerance "
        f"{report['surface_tolerance']:g} px)",
    ]

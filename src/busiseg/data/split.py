"""Split: seeded, class-stratified train/val/test that keeps duplicate groups together.

Near-identical frames of one lesion in both train and test would inflate test scores, so the unit
of splitting is the duplicate group found at ingest, not the image.
"""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from busiseg.data.classes import ALL_CLASSES, CLASSES
from busiseg.errors import BusisegError


def _group_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per duplicate group, labelled with its most common class."""
    groups = manifest.groupby("dup_group", sort=True)["class"].agg(
        lambda s: s.value_counts().sort_index().idxmax())
    return groups.rename("class").reset_index()


def _split_groups(groups: pd.DataFrame, frac: float, seed: int, what: str):
    try:
        return train_test_split(groups, test_size=frac, random_state=seed, shuffle=True,
                                stratify=groups["class"])
    except ValueError as exc:
        counts = groups["class"].value_counts().to_dict()
        raise BusisegError(f"split: cannot make a stratified {what} split of {len(groups)} "
                           f"groups {counts} ({exc}); add images or change split.{what}") from None


def make_split(manifest: pd.DataFrame, train: float, val: float, test: float, seed: int,
               folds: int = 0) -> pd.DataFrame:
    """Columns case_id, class, dup_group, split, fold. Without folds, split is train/val/test and
    fold is -1. With K folds the test split is held out as before and every other case is "cv"
    with a fold 0..K-1: fold model k trains on the other folds and validates on fold k."""
    if "dup_group" not in manifest.columns:
        manifest = manifest.assign(dup_group=range(len(manifest)))
    groups = _group_table(manifest)
    rest, test_g = _split_groups(groups, test, seed, "test")
    which = {g: "test" for g in test_g["dup_group"]}
    fold_of: dict = {}
    if folds:
        rest = rest.reset_index(drop=True)
        try:
            kf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            for k, (_, idx) in enumerate(kf.split(rest, rest["class"])):
                fold_of.update({g: k for g in rest.loc[idx, "dup_group"]})
        except ValueError as exc:
            raise BusisegError(f"split.folds={folds}: {exc}; lower split.folds") from None
        which.update({g: "cv" for g in rest["dup_group"]})
    else:
        train_g, val_g = _split_groups(rest, val / (train + val), seed, "val")
        which.update({g: "train" for g in train_g["dup_group"]})
        which.update({g: "val" for g in val_g["dup_group"]})
    out = manifest[["case_id", "class", "dup_group"]].copy()
    out["split"] = out["dup_group"].map(which)
    out["fold"] = out["dup_group"].map(fold_of).fillna(-1).astype(int)
    return out


def split_metrics(split: pd.DataFrame) -> dict:
    m = {f"n_{s}": int((split["split"] == s).sum()) for s in ("train", "val", "test")}
    for s in ("train", "val", "test"):
        for cls in [c for c in ALL_CLASSES if c in CLASSES or (split["class"] == c).any()]:
            m[f"n_{s}_{cls}"] = int(((split["split"] == s) & (split["class"] == cls)).sum())
    crossing = split.groupby("dup_group")["split"].nunique()
    m["n_groups_across_splits"] = int((crossing > 1).sum())
    folds = sorted(k for k in split["fold"].unique() if k >= 0)
    if folds:
        m["n_cv"] = int((split["split"] == "cv").sum())
        for k in folds:
            m[f"n_fold_{k}"] = int((split["fold"] == k).sum())
        m["n_groups_across_folds"] = int((split[split["fold"] >= 0].groupby("dup_group")["fold"]
                                          .nunique() > 1).sum())
    return m

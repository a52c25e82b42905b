"""Time to quality: minutes of training until a run's validation Dice first reaches a reference
run's level, fold by fold, for two cross-validation runs on the same folds.

    uv run python -m busiseg.research.time_to_quality REFERENCE_DIR RUN_DIR

Each DIR is a workspace after `dvc exp run` (or `dvc exp apply`): dvclive/train/fold_K/ holds the
per-epoch val Dice, metrics/train.json the fold timings. A fold's level is the reference's
last-epoch val Dice on that fold (the weights cross-validation keeps). Minutes are epochs times the
run's fastest fold's seconds per epoch: epochs cost the same within a run, and a fold that shared
the machine with other work says nothing about the recipe.

A fold the run never brings to the reference's level leaves the per-fold total undefined, so the
curves are also compared as cross-validation reports them: the mean val Dice over the folds at
each epoch, against the reference's mean at its last epoch (minutes for all K folds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_run(workspace: str | Path) -> tuple[list[list[float]], float]:
    """Per-fold val Dice histories and the seconds per epoch of one workspace."""
    root = Path(workspace)
    train = json.loads((root / "metrics" / "train.json").read_text())
    histories = []
    for k in range(train["folds"]):
        tsv = root / "dvclive" / "train" / f"fold_{k}" / "plots" / "metrics" / "val_dice.tsv"
        rows = [line.split("\t") for line in tsv.read_text().split("\n")[1:] if line.strip()]
        if len(rows) != int(rows[-1][0]):
            raise SystemExit(f"error: {tsv} has no validation at some epochs (train.val_every "
                             "> 1); time to quality needs every epoch's: re-run with "
                             "-S train.val_every=1")
        histories.append([float(value) for _, value in rows])
    return histories, epoch_seconds(train)


def epoch_seconds(train: dict) -> float:
    return min(train[f"fold_{k}_seconds"] / train[f"fold_{k}_epochs_run"]
               for k in range(train["folds"]))


def first_epoch_at(history: list[float], level: float) -> int | None:
    """1-based epoch at which val Dice first reaches `level`; None if it never does."""
    return next((e + 1 for e, d in enumerate(history) if d >= level), None)


def time_to_quality(reference: list[list[float]], ref_epoch_s: float,
                    run: list[list[float]], run_epoch_s: float) -> dict:
    if len(reference) != len(run):
        raise SystemExit(f"error: the runs have {len(reference)} and {len(run)} folds; compare "
                         "runs on the same folds (same split.seed and split.folds)")
    folds, ref_total, run_total = [], 0.0, 0.0
    for ref, hist in zip(reference, run):
        level = ref[-1]
        ref_e, run_e = first_epoch_at(ref, level), first_epoch_at(hist, level)
        ref_total += ref_e * ref_epoch_s / 60
        run_total = None if run_e is None or run_total is None else \
            run_total + run_e * run_epoch_s / 60
        folds.append({"level": level, "reference_epoch": ref_e, "run_epoch": run_e,
                      "reference_min": round(ref_e * ref_epoch_s / 60, 2),
                      "run_min": None if run_e is None else round(run_e * run_epoch_s / 60, 2)})
    k = len(folds)
    ref_mean, run_mean = mean_curve(reference), mean_curve(run)
    level = ref_mean[-1]
    ref_e, run_e = first_epoch_at(ref_mean, level), first_epoch_at(run_mean, level)
    mean = {"level": round(level, 6), "reference_epoch": ref_e, "run_epoch": run_e,
            "reference_min": round(ref_e * ref_epoch_s * k / 60, 1),
            "run_min": None if run_e is None else round(run_e * run_epoch_s * k / 60, 1),
            "ratio": None if run_e is None else round(run_e * run_epoch_s / (ref_e * ref_epoch_s),
                                                      3)}
    return {"folds": folds, "reference_epoch_s": round(ref_epoch_s, 1),
            "run_epoch_s": round(run_epoch_s, 1), "reference_min": round(ref_total, 1),
            "run_min": None if run_total is None else round(run_total, 1),
            "ratio": None if run_total is None else round(run_total / ref_total, 3),
            "mean_over_folds": mean}


def mean_curve(histories: list[list[float]]) -> list[float]:
    """Mean val Dice over the folds, epoch by epoch (as far as every fold got)."""
    n = min(len(h) for h in histories)
    return [sum(h[e] for h in histories) / len(histories) for e in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", help="workspace of the reference run (e.g. busi-cpu-cv5)")
    ap.add_argument("run", help="workspace of the run to time (e.g. busi-lite0-cv5)")
    args = ap.parse_args()
    result = time_to_quality(*read_run(args.reference), *read_run(args.run))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

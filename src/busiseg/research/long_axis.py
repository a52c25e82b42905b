"""How far a finished run's lesion sizes are from the truth: re-scores a run folder (a `dvc exp
run` of a preset, its model, cache, split and manifest in place) with this checkout's evaluate,
and files the long-axis figures, out of fold and on test, with the lesion Dice beside them to
show that the masks scored are the run's own.

    uv run python -m busiseg.research.long_axis RUN_DIR --name busi-lite0-cv5

Only aggregate figures are written (docs/results/sizes/NAME.json): nothing per image.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from busiseg.evaluation.evaluate import evaluate
from busiseg.params import load_params
from busiseg.research.records import file_record

KEYS = ("cv_dice", "cv_dice_ci_low", "cv_dice_ci_high", "dice", "n_test",
        "cv_long_axis_mae_px", "cv_long_axis_mae_px_ci_low", "cv_long_axis_mae_px_ci_high",
        "long_axis_mae_px", "long_axis_mae_px_ci_low", "long_axis_mae_px_ci_high",
        "cv_long_axis_mae_mm", "long_axis_mae_mm")


def measure(run: Path) -> dict:
    here = Path.cwd()
    os.chdir(run)
    try:
        p = load_params("params.yaml")
        start = time.perf_counter()
        result = evaluate(p, "models/model.pt", "data/cache.npz", "data/split.csv",
                          "data/manifest.csv")
        seconds = time.perf_counter() - start
    finally:
        os.chdir(here)
    metrics = result["metrics"]
    table = result.get("cv_per_image")
    lesion = table[table["true_long_axis_px"] > 0] if table is not None else None
    return {
        **{k: metrics[k] for k in KEYS if k in metrics},
        # the scale the error is read against: the true long axes out of fold
        "cv_true_long_axis_px_median": (round(float(lesion["true_long_axis_px"].median()), 2)
                                        if lesion is not None else None),
        "evaluate_seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run's folder")
    ap.add_argument("--name", required=True, help="the preset the run is (the record's name)")
    args = ap.parse_args()
    file_record("sizes", args.name, {"preset": args.name, "figures": measure(args.run)},
                f"uv run python -m busiseg.research.long_axis RUN_DIR --name {args.name}")

if __name__ == "__main__":
    main()

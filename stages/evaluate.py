"""Stage evaluate: score the trained model (or fold ensemble) on the held-out test split, and
with K folds the out-of-fold cross-validation score."""

from pathlib import Path

import pandas as pd
import torch

from busiseg.evaluation.evaluate import evaluate
from busiseg.evaluation.figures import risk_coverage_table
from busiseg.params import load_params
from busiseg.pipeline.stage import remove_outputs, run, write_json

METRICS = Path("metrics/eval.json")
PER_IMAGE = Path("plots/evaluate/per_image.csv")
CV_PER_IMAGE = Path("plots/evaluate/cv_per_image.csv")  # header only without folds
SWEEP = Path("plots/evaluate/threshold.csv")
RELIABILITY = Path("plots/evaluate/reliability.csv")  # the lesion score's calibration
RISK_COVERAGE = Path("plots/evaluate/risk_coverage.csv")  # how well the confidence ranks images
PREDICTIONS = Path("data/predictions.pt")


def main() -> None:
    remove_outputs(METRICS, PER_IMAGE, CV_PER_IMAGE, SWEEP, RELIABILITY, RISK_COVERAGE,
                   PREDICTIONS)
    result = evaluate(load_params(), "models/model.pt", "data/cache.npz", "data/split.csv",
                      "data/manifest.csv", "models/classifier.pt")
    PER_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    result["per_image"].to_csv(PER_IMAGE, index=False)
    cv = result.get("cv_per_image", pd.DataFrame(columns=[*result["per_image"].columns, "fold"]))
    cv.to_csv(CV_PER_IMAGE, index=False)
    result["threshold_sweep"].to_csv(SWEEP, index=False)
    pd.DataFrame(result["reliability"], columns=["bin", "confidence", "lesion_rate",
                                                 "images"]).to_csv(RELIABILITY, index=False)
    risk_coverage_table({"test": result["per_image"], "out-of-fold": cv}).to_csv(RISK_COVERAGE,
                                                                                 index=False)
    saved = {"test_idx": result["test_idx"],
             "pred": torch.from_numpy(result["test_pred"]).to(torch.uint8),
             "cv_idx": result.get("cv_idx", []),
             "cv_pred": torch.from_numpy(result["cv_pred"]).to(torch.uint8)
             if "cv_pred" in result else torch.zeros(0, dtype=torch.uint8)}
    torch.save(saved, PREDICTIONS)
    m = result["metrics"]
    write_json(METRICS, m)
    print(f"evaluate: test Dice {m['dice']} [{m['dice_ci_low']}, {m['dice_ci_high']}] (lesion "
          f"images, per-image mean), pooled Dice {m['dice_pooled']}, normal empty rate "
          f"{m['normal_empty_rate']}")
    print(f"evaluate: all images (normals too) Dice {m['dice_all']} [{m['dice_all_ci_low']}, "
          f"{m['dice_all_ci_high']}], detection sensitivity {m['detect_sensitivity']}, "
          f"specificity {m['detect_specificity']}, AUROC {m['detect_auroc']}; presence gate "
          f"{m['presence_rule']}" + (f" at {m['presence_threshold']}"
                                     if m["presence_threshold"] is not None else ""))
    print(f"evaluate: boundary (lesion images, original pixels) HD95 {m['hd95']} "
          f"[{m['hd95_ci_low']}, {m['hd95_ci_high']}], NSD {m['nsd']} [{m['nsd_ci_low']}, "
          f"{m['nsd_ci_high']}]")
    flags = (f"; flagged {m['flagged_fraction']} for review: Dice of the rest {m['dice_kept']} "
             f"[{m['dice_kept_ci_low']}, {m['dice_kept_ci_high']}], of the flagged "
             f"{m['dice_flagged']}" if "dice_kept" in m else "")
    print(f"evaluate: confidence ({m['confidence']}) AURC {m['aurc']} [{m['aurc_ci_low']}, "
          f"{m['aurc_ci_high']}], random {m['aurc_random']}, oracle {m['aurc_optimal']}{flags}")
    if "cv_dice" in m:
        print(f"evaluate: cross-validation Dice {m['cv_dice']} [{m['cv_dice_ci_low']}, "
              f"{m['cv_dice_ci_high']}]; single fold models {m['dice_single_mean']}, ensemble "
              f"gain {m['dice_ensemble_gain']} [{m['dice_ensemble_gain_ci_low']}, "
              f"{m['dice_ensemble_gain_ci_high']}]")


if __name__ == "__main__":
    run(main)

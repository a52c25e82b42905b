"""Stage external@NAME: score the trained model on external dataset NAME (params external.NAME),
with the threshold and post-processing chosen on BUSI; it trains nothing."""

import sys
from pathlib import Path

from busiseg.evaluation.external import evaluate_external
from busiseg.params import load_params
from busiseg.pipeline.stage import remove_outputs, run, write_json


def main() -> None:
    name = sys.argv[1]
    metrics, per_image = Path(f"metrics/external/{name}.json"), Path(f"plots/external/{name}.csv")
    report = Path(f"data/external/{name}_report.json")
    remove_outputs(metrics, per_image, report)
    result = evaluate_external(load_params(), name, "models/model.pt", "metrics/eval.json",
                               "models/classifier.pt")
    per_image.parent.mkdir(parents=True, exist_ok=True)
    result["per_image"].to_csv(per_image, index=False)
    write_json(metrics, result["metrics"])
    report.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, result["report"])
    m = result["metrics"]
    print(f"external {name}: Dice {m['dice']} [{m['dice_ci_low']}, {m['dice_ci_high']}] on "
          f"{m['n_lesion_images']} lesion images, normal empty rate {m['normal_empty_rate']} on "
          f"{m['n_normal_images']} (threshold {m['threshold']} from BUSI)")
    for problem in result["problems"]:
        print(f"skipped: {problem}")


if __name__ == "__main__":
    run(main)

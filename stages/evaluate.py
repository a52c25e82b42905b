"""Stage evaluate: score the trained model on the held-out test split."""

from pathlib import Path

import torch

from busiseg.evaluate import evaluate
from busiseg.params import load_params
from busiseg.stage import remove_outputs, run, write_json

METRICS = Path("metrics/eval.json")
PER_IMAGE = Path("plots/evaluate/per_image.csv")
SWEEP = Path("plots/evaluate/threshold.csv")
PREDICTIONS = Path("data/predictions.pt")


def main() -> None:
    remove_outputs(METRICS, PER_IMAGE, SWEEP, PREDICTIONS)
    result = evaluate(load_params(), "models/model.pt", "data/cache.npz", "data/split.csv")
    PER_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    result["per_image"].to_csv(PER_IMAGE, index=False)
    result["threshold_sweep"].to_csv(SWEEP, index=False)
    torch.save({"test_idx": result["test_idx"],
                "pred": torch.from_numpy(result["test_pred"]).to(torch.uint8)}, PREDICTIONS)
    m = result["metrics"]
    write_json(METRICS, m)
    print(f"evaluate: test Dice {m['dice']} IoU {m['iou']} (lesion images, per-image mean), "
          f"pooled Dice {m['dice_pooled']}, normal empty rate {m['normal_empty_rate']}")


if __name__ == "__main__":
    run(main)

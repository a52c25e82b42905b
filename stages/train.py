"""Stage train: fit the model on the train split, pick the best epoch on val."""

from pathlib import Path

import torch

from busiseg.params import load_params
from busiseg.stage import remove_outputs, run, write_json
from busiseg.train import train

MODEL = Path("models/model.pt")
CHECKPOINT = Path("models/checkpoint.pt")  # persisted by DVC: a killed run resumes from it
LIVE = Path("dvclive/train")  # per-epoch metrics and plots (DVCLive)
METRICS = Path("metrics/train.json")


def main() -> None:
    params = load_params()
    remove_outputs(MODEL, METRICS)  # not the checkpoint: a killed run resumes from it
    for p in (MODEL, METRICS):
        p.parent.mkdir(parents=True, exist_ok=True)
    metrics = train(params, Path("data/cache.npz"), Path("data/split.csv"), MODEL, CHECKPOINT,
                    LIVE)
    write_json(METRICS, metrics)
    print(f"train: best epoch {metrics['best_epoch']}, val Dice {metrics['best_val_dice']:.4f}, "
          f"{metrics['images_per_s']} images/s on {metrics['device']} "
          f"(torch {torch.__version__}) -> {MODEL}")


if __name__ == "__main__":
    run(main)

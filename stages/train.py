"""Stage train: fit the model on the train split, pick the best epoch on val."""

from pathlib import Path

import torch

from busiseg.params import load_params
from busiseg.pipeline.stage import remove_outputs, run, write_json
from busiseg.runtime import distributed
from busiseg.training.cross_validation import train_cross_validation
from busiseg.training.train import train

MODEL = Path("models/model.pt")  # with split.folds = K: one file holding the K fold models
CHECKPOINTS = Path("models/checkpoints")  # persisted by DVC: a killed run resumes from it
LIVE = Path("dvclive/train")  # per-epoch metrics and plots (DVCLive), per fold with K folds
METRICS = Path("metrics/train.json")


def main() -> None:
    params = load_params()
    ranks = distributed.current()
    if ranks.main:
        remove_outputs(MODEL, METRICS)  # not the checkpoints: a killed run resumes from them
    if params.train.processes > 1 and ranks.world == 1:
        distributed.launch(params.train, Path(__file__))  # this script again, as N ranks
        return
    for p in (MODEL, METRICS, CHECKPOINTS / "run.pt"):
        p.parent.mkdir(parents=True, exist_ok=True)
    data = Path("data/cache.npz"), Path("data/split.csv")
    try:
        if params.split.folds:
            metrics = train_cross_validation(params, *data, MODEL, CHECKPOINTS, LIVE)
            done = (f"{params.split.folds} fold models ({metrics.get('fold_workers')} at once) "
                    f"in {metrics.get('wall_seconds', 0) / 60:.1f} min")
        else:
            metrics = train(params, *data, MODEL, CHECKPOINTS / "run.pt", LIVE)
            done = f"best epoch {metrics['best_epoch']}, val Dice {metrics['best_val_dice']:.4f}"
    finally:
        distributed.close()
    if ranks.main:
        write_json(METRICS, metrics)
        speed = metrics.get("wall_images_per_s", metrics["images_per_s"])
        print(f"train: {done}, {speed} images/s on {metrics['device']} "
              f"({metrics['processes']} process(es), torch {torch.__version__}) -> {MODEL}")


if __name__ == "__main__":
    run(main)

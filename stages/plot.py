"""Stage plot: training curves, a test montage and the worst test cases as PNGs."""

from pathlib import Path

import pandas as pd
import torch

from busiseg.data import load_cache
from busiseg.params import load_params
from busiseg.plots import pick_montage, pick_worst, plot_cases, plot_curves, read_live_curves
from busiseg.stage import run

OUT = Path("plots/figures")


def main() -> None:
    params = load_params().plot
    OUT.mkdir(parents=True, exist_ok=True)
    plot_curves(read_live_curves("dvclive/train"), OUT / "curves.png")
    per_image = pd.read_csv("plots/evaluate/per_image.csv", dtype={"case_id": str})
    cache = load_cache("data/cache.npz")
    saved = torch.load("data/predictions.pt", weights_only=True)
    idx = torch.tensor(saved["test_idx"])
    images, truths = cache.images[idx][:, 0].numpy(), cache.masks[idx][:, 0].numpy()
    preds = saved["pred"].numpy()
    for name, rows, heading in (
        ("montage.png", pick_montage(per_image, params.n_montage), "test cases"),
        ("worst.png", pick_worst(per_image, params.n_worst), "worst test cases by Dice"),
    ):
        titles = [f"{per_image.case_id[i]}\nDice {per_image.dice[i]:.2f}" for i in rows]
        plot_cases(images[rows], truths[rows], preds[rows], titles, OUT / name, heading)
    print(f"plot: wrote {', '.join(sorted(p.name for p in OUT.glob('*.png')))} to {OUT}")


if __name__ == "__main__":
    run(main)

"""Stage plot: training curves, the per-image Dice distribution, risk–coverage, a test montage
and the worst test cases (and, with folds, the worst out-of-fold cases) as PNGs."""

from pathlib import Path

import pandas as pd
import torch

from busiseg.data.cache import load_cache
from busiseg.evaluation.plots import (
    pick_montage,
    pick_worst,
    plot_cases,
    plot_curves,
    plot_dice_distribution,
    plot_risk_coverage,
    read_live_runs,
)
from busiseg.params import load_params
from busiseg.pipeline.stage import run

OUT = Path("plots/figures")


def draw_cases(cache, table: pd.DataFrame, idx, preds, rows: list[int], out: Path,
               heading: str) -> None:
    idx = torch.tensor(list(idx), dtype=torch.long)
    images, truths = cache.images[idx].numpy(), cache.masks[idx][:, 0].numpy()
    images = images.transpose(0, 2, 3, 1) if images.shape[1] == 3 else images[:, 0]  # colour
    titles = [f"{table.case_id[i]}\nDice {table.dice[i]:.2f}" for i in rows]
    plot_cases(images[rows], truths[rows], preds.numpy()[rows], titles, out, heading)


def main() -> None:
    params = load_params().plot
    OUT.mkdir(parents=True, exist_ok=True)
    plot_curves(read_live_runs("dvclive/train"), OUT / "curves.png")
    test = pd.read_csv("plots/evaluate/per_image.csv", dtype={"case_id": str})
    cv = pd.read_csv("plots/evaluate/cv_per_image.csv", dtype={"case_id": str})
    plot_dice_distribution({"test": test, "out-of-fold": cv}, OUT / "dice_distribution.png")
    plot_risk_coverage({"test": test, "out-of-fold": cv}, OUT / "risk_coverage.png")
    cache = load_cache("data/cache.npz")
    saved = torch.load("data/predictions.pt", weights_only=True)
    test_cases = saved["test_idx"], saved["pred"]
    draw_cases(cache, test, *test_cases, pick_montage(test, params.n_montage),
               OUT / "montage.png", "test cases")
    draw_cases(cache, test, *test_cases, pick_worst(test, params.n_worst), OUT / "worst.png",
               "worst test cases by Dice")
    if len(cv):
        cv_titles = cv.assign(case_id=cv.case_id + " (fold " + cv.fold.astype(str) + ")")
        draw_cases(cache, cv_titles, saved["cv_idx"], saved["cv_pred"],
                   pick_worst(cv, params.n_worst), OUT / "worst_cv.png",
                   "worst out-of-fold cases by Dice, across all folds")
    print(f"plot: wrote {', '.join(sorted(p.name for p in OUT.glob('*.png')))} to {OUT}")


if __name__ == "__main__":
    run(main)

"""What each evaluate-time piece is worth on one trained model: every combination of flip TTA,
largest component, hole filling and a val-tuned threshold, scored on test with the model fixed.

    uv run python -m busiseg.research.ablate      # the workspace's trained model, as a table
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from itertools import product
from pathlib import Path

import pandas as pd

from busiseg.evaluation.evaluate import binarize_as, load_splits, score_setting
from busiseg.evaluation.metrics import summarize
from busiseg.params import Params, load_params


def ablate(p: Params, model_path, cache_path, split_path) -> pd.DataFrame:
    d = load_splits(p, model_path, cache_path, split_path)
    classes = d.te_rows["class"].tolist()
    rows, sweeps = [], {}
    for tta in (False, True):
        va_prob, te_prob = d.probs(d.va_idx, tta), d.probs(d.te_idx, tta)
        for lcc, fill, tune in product((False, True), repeat=3):
            q = replace(p, evaluate=replace(p.evaluate, tta=tta, largest_cc=lcc, fill_holes=fill,
                                            tune_threshold=tune))
            _, threshold, val_dice = score_setting(q, va_prob, d.va_true, sweeps)
            metrics, _ = summarize(binarize_as(te_prob, threshold, q), d.te_true, classes)
            rows.append({"tta": tta, "largest_cc": lcc, "fill_holes": fill,
                         "tune_threshold": tune, "threshold": float(threshold),
                         "val_dice": val_dice,
                         **{k: metrics[k] for k in ("dice", "iou", "dice_pooled",
                                                     "normal_empty_rate")}})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/model.pt"))
    args = ap.parse_args()
    table = ablate(load_params(), args.model, Path("data/cache.npz"), Path("data/split.csv"))
    print(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()

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

from busiseg.evaluation.choose import HeldOut, choose
from busiseg.evaluation.metrics import summarize
from busiseg.inference.segment import binarize
from busiseg.params import Params, load_params
from busiseg.research.splits import load_splits


def ablate(p: Params, model_path, cache_path, split_path) -> pd.DataFrame:
    d = load_splits(p, model_path, cache_path, split_path)
    classes = d.te_rows["class"].tolist()
    rows = []
    for tta in (False, True):
        va_prob, te_prob = d.probs(d.va_idx, tta), d.probs(d.te_idx, tta)
        held = HeldOut({tta: va_prob}, {tta: va_prob.reshape(len(va_prob), -1).max(1)},
                       d.va_true)
        for lcc, fill, tune in product((False, True), repeat=3):
            e = replace(p.evaluate, tta=tta, largest_cc=lcc, fill_holes=fill,
                        tune_threshold=tune, select_on_val=False, presence_threshold=None,
                        review_fraction=0.0)
            s = choose(e, held).settings
            metrics, _ = summarize(binarize(te_prob, s.threshold, lcc, fill), d.te_true, classes)
            rows.append({"tta": tta, "largest_cc": lcc, "fill_holes": fill,
                         "tune_threshold": tune, "threshold": float(s.threshold),
                         "val_dice": s.val_dice,
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

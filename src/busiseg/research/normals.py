"""Could an evaluate-time gate keep normal images empty? How confident the model is on them.

    uv run dvc exp apply busi-cpu-long-s0       # or any trained workspace
    uv run python -m busiseg.research.normals [--split test] [--threshold 0.5] [--tta]

For the normal (lesion-free) images of one split, prints the peak probability and the predicted
area; for the lesion images, their true area. An area or confidence cut-off can only empty the
normals without erasing real lesions if the two do not overlap. Aggregates only, no case ids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from busiseg.params import load_params
from busiseg.research.splits import load_splits

REPO = Path(__file__).resolve().parents[3]


def stats(prob: np.ndarray, true: np.ndarray, threshold: float) -> dict:
    n = len(prob)
    lesion = true.reshape(n, -1).any(axis=1)
    peak = prob.reshape(n, -1).max(axis=1)
    area = (prob >= threshold).reshape(n, -1).mean(axis=1)
    true_area = true.reshape(n, -1).mean(axis=1)[lesion]
    fp = area[~lesion & (area > 0)]
    median_fp = float(np.median(fp)) if len(fp) else 0.0
    return {
        "n_normal": int((~lesion).sum()),
        "n_normal_nonempty": int(len(fp)),
        "n_normal_peak_ge_0.9": int((peak[~lesion] >= 0.9).sum()),
        "median_normal_pred_area": round(median_fp, 4),
        "n_lesion": int(lesion.sum()),
        "n_lesion_smaller_than_that": int((true_area < median_fp).sum()),
        "n_lesion_peak_lt_0.9": int((peak[lesion] < 0.9).sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("val", "test"), default="test")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "model.pt")
    ap.add_argument("--cache", type=Path, default=REPO / "data" / "cache.npz")
    ap.add_argument("--split-file", type=Path, default=REPO / "data" / "split.csv")
    args = ap.parse_args()
    d = load_splits(load_params(args.params), args.model, args.cache, args.split_file)
    idx, true = (d.va_idx, d.va_true) if args.split == "val" else (d.te_idx, d.te_true)
    print(json.dumps(stats(d.probs(idx, args.tta), true, args.threshold)))


if __name__ == "__main__":
    main()

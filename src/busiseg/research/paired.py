"""How much two runs differ on the same images, with a paired bootstrap interval: two recipes'
intervals can overlap while one is reliably worse, so a "quality kept" claim is judged on the
per-image differences, not on two separate intervals.

    uv run python -m busiseg.research.paired A_PER_IMAGE.csv B_PER_IMAGE.csv [--all-images]

The tables are evaluate's per-image CSVs (plots/evaluate/cv_per_image.csv or per_image.csv) of
two runs on one split, e.g. from their experiments (`git show EXP:plots/evaluate/…`). Lesion
images only by default (the `dice` the lesion figures average); `--all-images` also counts the
normals as `dice_all` does. Prints aggregate figures only.
"""

from __future__ import annotations

import argparse
import json

import pandas as pd

from busiseg.errors import BusisegError
from busiseg.evaluation.figures import bootstrap_ci


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, column: str = "dice",
                      lesion_only: bool = True, n_boot: int = 2000, seed: int = 0) -> dict:
    """mean(a − b) over the images both tables hold, with its 95 % bootstrap interval (images
    resampled, each image's pair kept together)."""
    if set(a["case_id"]) != set(b["case_id"]):
        raise BusisegError(f"the two tables hold different images ({len(a)} vs {len(b)}); "
                           "compare runs on the same split")
    both = a.merge(b, on="case_id", suffixes=("_a", "_b"))
    if lesion_only:
        both = both[both["class_a"] != "normal"]
    diff = (both[f"{column}_a"] - both[f"{column}_b"]).to_numpy(dtype=float)[:, None]
    low, high = bootstrap_ci(diff, lambda r: float(r[:, 0].mean()), n_boot, seed)
    return {"column": column, "images": "lesion" if lesion_only else "all", "n": len(diff),
            "mean_a": round(float(both[f"{column}_a"].mean()), 6),
            "mean_b": round(float(both[f"{column}_b"].mean()), 6),
            "difference": round(float(diff.mean()), 6) if len(diff) else None,
            "ci_low": round(low, 6), "ci_high": round(high, 6)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--column", default="dice")
    ap.add_argument("--all-images", action="store_true")
    args = ap.parse_args(argv)
    tables = [pd.read_csv(p, dtype={"case_id": str}) for p in (args.a, args.b)]
    print(json.dumps(paired_difference(*tables, args.column, not args.all_images), indent=1))


if __name__ == "__main__":
    main()

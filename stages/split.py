"""Stage split: seeded, class-stratified, duplicate-aware train/val/test split."""

from busiseg.data.manifest import read_manifest
from busiseg.data.split import make_split, split_metrics
from busiseg.params import load_params
from busiseg.pipeline.stage import remove_outputs, run, write_json

SPLIT = "data/split.csv"
METRICS = "metrics/split.json"


def main() -> None:
    remove_outputs(SPLIT, METRICS)
    p = load_params().split
    split = make_split(read_manifest("data/manifest.csv"), p.train, p.val, p.test, p.seed, p.folds)
    split.to_csv(SPLIT, index=False)
    m = split_metrics(split)
    write_json(METRICS, m)
    if p.folds:
        sizes = ", ".join(str(m[f"n_fold_{k}"]) for k in range(p.folds))
        print(f"split: {m['n_cv']} cases in {p.folds} folds ({sizes}), {m['n_test']} test")
    else:
        print(f"split: {m['n_train']} train, {m['n_val']} val, {m['n_test']} test")


if __name__ == "__main__":
    run(main)

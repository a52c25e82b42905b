"""The image classifier measured beside a finished cross-validation run's masks: trains the
classify stage's members on the run's own cache and folds, then scores the run twice with this
checkout's evaluate, gated by its own lesion score and gated by the classifier's p_lesion, and
files both with their paired difference over all images.

    uv run python -m busiseg.research.classifier_on_run RUN_DIR --name NAME \
        -S classify.kind=encoder -S classify.threads=2 -S classify.cpu_isa=avx2

RUN_DIR is a `dvc exp run` of a `-cv5` preset (its params.yaml, data/ and models/model.pt in
place); the classifier lands in RUN_DIR/models/classifier.pt. Both scorings use
`evaluate.presence_threshold: auto` unless -S says otherwise. Only aggregates are written
(docs/results/classify/NAME.json): nothing per image.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from busiseg.evaluation.evaluate import evaluate
from busiseg.params import parse_params, read_yaml
from busiseg.research.paired import paired_difference
from busiseg.research.presets import apply_overrides
from busiseg.research.records import file_record
from busiseg.training.classify import train_classifier

KEYS = ("dice_all", "detect_auroc", "detect_sensitivity", "detect_specificity",
        "detect_specificity_at_sens95", "detect_ece", "dice", "malignant_auroc",
        "malignant_sensitivity", "malignant_specificity", "malignant_ece")


def figures(metrics: dict) -> dict:
    """Out of fold and test, each key with its interval where it has one."""
    out = {}
    for prefix in ("cv_", ""):
        for key in KEYS:
            for suffix in ("", "_ci_low", "_ci_high"):
                name = f"{prefix}{key}{suffix}"
                if name in metrics:
                    out[name] = metrics[name]
    for key in ("presence_threshold", "presence_rule", "malignant_threshold", "cv_n_malignant",
                "cv_n_benign", "n_malignant", "n_benign"):
        if key in metrics:
            out[key] = metrics[key]
    return out


def measure(run: Path, overrides: dict) -> dict:
    raw = read_yaml((run / "params.yaml").read_text())
    raw = apply_overrides(raw, {"evaluate.presence_threshold": "auto", **overrides})
    p = parse_params(raw)
    here = Path.cwd()
    os.chdir(run)
    try:
        start = time.perf_counter()
        trained = train_classifier(p, "data/cache.npz", "data/split.csv", "models/classifier.pt")
        train_seconds = time.perf_counter() - start
        paths = ("models/model.pt", "data/cache.npz", "data/split.csv", "data/manifest.csv")
        base = evaluate(p, *paths)
        start = time.perf_counter()
        composed = evaluate(p, *paths, "models/classifier.pt")
        evaluate_seconds = time.perf_counter() - start
    finally:
        os.chdir(here)
    paired = {f"{split}_dice_all_gain": paired_difference(
        composed[table], base[table], lesion_only=False)
        for split, table in (("cv", "cv_per_image"), ("test", "per_image"))}
    return {"classifier": trained, "classify_seconds": round(train_seconds, 1),
            "evaluate_seconds": round(evaluate_seconds, 1),
            "with_classifier": figures(composed["metrics"]),
            "own_score": figures(base["metrics"]), "paired": paired}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("-S", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = {key: read_yaml(value) for key, value in (s.split("=", 1) for s in args.sets)}
    record = {"name": args.name, "run": str(args.run), "overrides": overrides,
              **measure(args.run, overrides)}
    file_record("classify", args.name, record,
                "uv run python -m busiseg.research.classifier_on_run RUN_DIR --name "
                f"{args.name} " + " ".join(f"-S {s}" for s in args.sets))

if __name__ == "__main__":
    main()

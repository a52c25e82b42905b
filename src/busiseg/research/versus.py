"""A finished cross-validation run against others on the same images, paired: the figures a
recipe is judged on (Dice over all images gated as each run gates, lesion Dice ungated), each
difference with its paired 95 % bootstrap interval, and with train.seeds > 1 what the seeds
bought over the first seed alone (the same run's seed-0 members, so nothing else differs).

    uv run python -m busiseg.research.versus RUN_DIR --name NAME \
        --against busi-lite0-cv5=OTHER_RUN_DIR [--against ...]

Each RUN_DIR is a `dvc exp run` of a `-cv5` preset on the same split (its params.yaml, data/ and
models/ in place). Every run is scored by this checkout's evaluate with its own params: gated as
its params say (the others with `evaluate.presence_threshold: auto` on their own lesion score,
as the README's "all images" column), and once more ungated. Only aggregates are written
(docs/results/versus/NAME.json): nothing per image.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from busiseg.errors import BusisegError
from busiseg.evaluation.evaluate import evaluate
from busiseg.files import atomic_torch_save
from busiseg.modeling.model_file import read_model_file, weights_digest
from busiseg.params import parse_params, read_yaml
from busiseg.research.classifier_on_run import figures
from busiseg.research.paired import paired_difference
from busiseg.research.presets import apply_overrides
from busiseg.research.records import file_record

PATHS = ("models/model.pt", "data/cache.npz", "data/split.csv", "data/manifest.csv")
CLASSIFIER = "models/classifier.pt"


@contextmanager
def inside(run: Path):
    here = Path.cwd()
    os.chdir(run)
    try:
        yield
    finally:
        os.chdir(here)


def score(run: Path, overrides: dict, model: str = PATHS[0]) -> dict:
    """evaluate's result for the run with `overrides`, its classifier composed where it has one
    (classify.kind in its params)."""
    p = parse_params(apply_overrides(read_yaml((run / "params.yaml").read_text()), overrides))
    with inside(run):
        classifier = CLASSIFIER if p.classify.kind != "none" and Path(CLASSIFIER).is_file() \
            else None
        start = time.perf_counter()
        result = evaluate(p, model, *PATHS[1:], classifier)
        result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def first_seed_model(run: Path, out: Path) -> Path:
    """The run's model file with each fold's seed-0 member alone: the one-seed run it holds."""
    blob = read_model_file(run / PATHS[0])
    if blob.get("seeds", 1) < 2:
        raise BusisegError(f"{run / PATHS[0]}: trained with one seed; nothing to compare")
    state = {}
    for name, t in blob["state_dict"].items():
        head, rest = name.split(".members.", 1)  # members.K.members.S.rest
        seed, rest = rest.split(".", 1)
        if seed == "0":
            state[f"{head}.{rest}"] = t
    blob = {**blob, "state_dict": state, "digest": weights_digest(state)}
    blob.pop("seeds")
    atomic_torch_save(blob, out)
    return out


def paired(a: dict, b: dict) -> dict:
    return {"cv_dice_all": paired_difference(a["cv_per_image"], b["cv_per_image"],
                                             lesion_only=False),
            "test_dice_all": paired_difference(a["per_image"], b["per_image"],
                                               lesion_only=False)}


def versus(a: tuple[dict, dict], b: tuple[dict, dict]) -> dict:
    """Run a against run b, each given as (gated, ungated) results."""
    return {"paired_gated": paired(a[0], b[0]),
            "paired_lesion_ungated": paired_difference(a[1]["cv_per_image"],
                                                       b[1]["cv_per_image"])}


def run_metrics(run: Path) -> dict:
    """What the run's own stages recorded of its training (times, members, kernels)."""
    import json

    return {name: json.loads((run / "metrics" / f"{name}.json").read_text())
            for name in ("train", "classify") if (run / "metrics" / f"{name}.json").is_file()}


def measure(run: Path, against: dict[str, Path]) -> dict:
    """The run, each other run, and with seeds the run's first seed alone, each scored gated
    and ungated; the run (and its first seed) paired against every other."""
    ungated = {"evaluate.presence_threshold": "off"}
    own = score(run, {}), score(run, ungated)
    out = {"run_metrics": run_metrics(run),
           "run": figures(own[0]["metrics"]), "run_ungated": figures(own[1]["metrics"]),
           "evaluate_seconds": own[0]["seconds"], "against": {}}
    one = None
    if read_model_file(run / PATHS[0]).get("seeds", 1) > 1:
        with tempfile.TemporaryDirectory() as tmp:
            single = first_seed_model(run, Path(tmp) / "seed0.pt")
            one = score(run, {}, str(single)), score(run, ungated, str(single))
        out["first_seed"] = {"gated": figures(one[0]["metrics"]),
                             "ungated": figures(one[1]["metrics"]), **versus(own, one)}
    for name, other in against.items():
        theirs = score(other, {"evaluate.presence_threshold": "auto"}), score(other, ungated)
        out["against"][name] = {"gated_auto": figures(theirs[0]["metrics"]),
                                "ungated": figures(theirs[1]["metrics"]), **versus(own, theirs),
                                **({"first_seed": versus(one, theirs)} if one else {})}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--against", action="append", default=[], metavar="NAME=RUN_DIR")
    args = ap.parse_args()
    if any("=" not in a for a in args.against):
        ap.error("--against takes NAME=RUN_DIR")
    against = {k: Path(v) for k, v in (a.split("=", 1) for a in args.against)}
    try:
        record = {"name": args.name, **measure(args.run, against)}
    except (BusisegError, KeyError) as exc:
        raise SystemExit(f"error: {exc}; each RUN_DIR must be a finished cross-validation run "
                         "(split.folds > 1) of the same split") from None
    file_record("versus", args.name, record,
                f"uv run python -m busiseg.research.versus RUN_DIR --name {args.name} "
                + " ".join(f"--against {k}=RUN_DIR" for k in against))


if __name__ == "__main__":
    main()

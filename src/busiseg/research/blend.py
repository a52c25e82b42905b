"""Trained cross-validation models as one model file: masks from some, the lesion score from
others (modeling.archs.Blend), fold by fold.

    uv run python -m busiseg.research.blend --masks A/model.pt [A2/model.pt ...] \
        --presence B/model.pt [...] --out blend.pt [--evaluate RESULT.json \
        [--presence-threshold auto|expected|off|P]]

Two uses (issue #37): masks from a model trained without a presence head, which the head would
cost some lesion Dice, gated by a second model's head; and seed ensembles (`--masks A B
--presence A B`: each fold's models from two training seeds, averaged). Every file must come
from the same `split.folds` cross-validation on the same split (same data, `split.seed`): fold
k of the blend is fold k of each, so out of fold an image still meets only models that never
trained on it. Model files record their split (seed, folds, the digest of split.csv), and a
part trained on another split is refused: it would leak training images into the out-of-fold
figures. Files written before they recorded it are checked no further than the number of folds
and the input. The blend is an ordinary busiseg model file: predict and export take it as they
take any. `--evaluate` scores it as the evaluate stage would (out of fold and on test, with
params.yaml's evaluate section and the workspace's data/ of that split, which the runs' own
workspace has), and writes the metrics (aggregates only) to RESULT.json and the out-of-fold
per-image table beside it (RESULT.cv_per_image.csv, for research.paired; per-image, so not for
committing on real data), leaving DVC's outputs alone. Its kernels are the first masks
model's (train.cpu_isa): the other parts compute within float rounding of their own runs.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from busiseg.errors import BusisegError
from busiseg.evaluation.evaluate import evaluate
from busiseg.files import atomic_torch_save
from busiseg.modeling.archs import Blend, FoldEnsemble
from busiseg.modeling.model_file import (
    model_from_file,
    read_model_file,
    recorded_cpu_isa,
    weights_digest,
)
from busiseg.params import load_params, parse_presence_threshold
from busiseg.pipeline.stage import write_json


def blend(masks: list[Path], presence: list[Path], out: Path, cpu_isa: str | None = None) -> dict:
    """Write the blend to `out` and return its model-file contents. A run named in both lists is
    one part, run once per image; its record (`blob["blend"]`) names each file, its weights'
    digest and its role, so the blend says what it was made of. One process computes with one
    kernel set: parts pinned to different ones (train.cpu_isa) need `cpu_isa`, which the blend
    then records as its own."""
    files = list(dict.fromkeys([*masks, *presence]))  # each file one part, in order given
    read = {f: read_model_file(f) for f in files}
    pins = {f: recorded_cpu_isa(b) for f, b in read.items()}
    other = next((f for f in files if pins[f] != pins[files[0]]), None)
    if cpu_isa is None and other is not None:
        raise BusisegError(f"{other}: trained with train.cpu_isa={pins[other]}, {files[0]} with "
                           f"{pins[files[0]]}; one process computes with one kernel set: give "
                           "--cpu-isa native|avx2|avx512 for the blend")
    loaded = [model_from_file(read[f], f, cpu_isa=cpu_isa) for f in files]
    first = loaded[0][1]
    for f, (_, blob) in zip(files, loaded):
        if not blob.get("members"):
            raise BusisegError(f"{f}: not a cross-validation model (split.folds > 1); a blend "
                               "is made fold by fold")
        if blob.get("seeds", 1) > 1:
            raise BusisegError(f"{f}: trained with train.seeds {blob['seeds']}; a blend takes "
                               "one-seed runs (its parts are averaged as seeds already)")
        if blob["members"] != first["members"]:
            raise BusisegError(f"{f}: {blob['members']} fold models against {files[0]}'s "
                               f"{first['members']}; blend runs of one cross-validation")
        if blob["preprocess"] != first["preprocess"]:
            raise BusisegError(f"{f}: its input ({blob['preprocess']}) differs from {files[0]}'s "
                               f"({first['preprocess']}); blend models fed alike")
    known = [(f, b["split"]) for f, (_, b) in zip(files, loaded) if b.get("split")]
    for f, split in known[1:]:
        f0, split0 = known[0]
        if split != split0:
            raise BusisegError(f"{f}: trained on another split (seed {split.get('seed')}, "
                               f"split.csv {str(split.get('sha256'))[:12]}) than {f0} "
                               f"(seed {split0.get('seed')}, split.csv "
                               f"{str(split0.get('sha256'))[:12]}); blend runs of one split")
    where = {f: i for i, f in enumerate(files)}
    ensemble = FoldEnsemble([
        Blend([model.members[k] for model, _ in loaded], [where[f] for f in masks],
              [where[f] for f in presence]) for k in range(first["members"])])
    state = ensemble.state_dict()
    blob = {**first, "model": dict(ensemble.members[0].config), "state_dict": state,
            "digest": weights_digest(state),
            "blend": [{"file": str(f), "digest": b["digest"],
                       "role": "+".join(r for r, fs in (("masks", masks), ("presence", presence))
                                        if f in fs)} for f, (_, b) in zip(files, loaded)]}
    blob.pop("settings", None), blob.pop("settings_source", None)  # evaluate chooses anew
    # the split every part recorded; none where a part predates split records (unchecked)
    blob["split"] = known[0][1] if known and len(known) == len(files) else {}
    if cpu_isa is not None:  # the kernels the blend computes with, as evaluate and predict read
        blob["params"] = {**blob["params"], "train": {**blob["params"]["train"],
                                                      "cpu_isa": cpu_isa}}
    atomic_torch_save(blob, out)
    return blob


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", nargs="+", type=Path, required=True)
    ap.add_argument("--presence", nargs="+", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--evaluate", type=Path, metavar="RESULT_JSON")
    ap.add_argument("--presence-threshold", help="evaluate.presence_threshold for --evaluate")
    ap.add_argument("--cpu-isa", choices=("native", "avx2", "avx512"),
                    help="the kernels of a blend whose parts were pinned to different ones")
    args = ap.parse_args(argv)
    try:
        if args.presence_threshold is not None:
            if not args.evaluate:
                raise BusisegError("--presence-threshold sets the gate --evaluate scores with; "
                                   "give --evaluate RESULT.json too")
            parse_presence_threshold(args.presence_threshold, "--presence-threshold")
        blob = blend(args.masks, args.presence, args.out, args.cpu_isa)
        print(f"blend: {args.out} ({blob['members']} folds; "
              + ", ".join(f"{b['role']} from {b['file']}" for b in blob["blend"]) + ")")
        if args.evaluate:
            m = evaluate_blend(args.out, args.evaluate, args.presence_threshold)
            print(f"blend: out of fold Dice over all images {m['cv_dice_all']} "
                  f"[{m['cv_dice_all_ci_low']}, {m['cv_dice_all_ci_high']}], lesion Dice "
                  f"{m['cv_dice']}; written to {args.evaluate}")
    except BusisegError as exc:
        raise SystemExit(f"error: {exc}") from None


def evaluate_blend(model: Path, out: Path, presence_threshold: str | None = None,
                   params: Path = Path("params.yaml"), data: Path = Path("data")) -> dict:
    """The evaluate stage's metrics for the blend, with params' evaluate section (its presence
    threshold replaced when given), on the workspace's cache and split."""
    p = load_params(params)
    if presence_threshold is not None:
        gate = parse_presence_threshold(presence_threshold, "--presence-threshold")
        p = replace(p, evaluate=replace(p.evaluate, presence_threshold=gate))
    manifest = data / "manifest.csv"  # for HD95 and NSD in original pixels, when there
    result = evaluate(p, model, data / "cache.npz", data / "split.csv",
                      manifest if manifest.is_file() else None)
    write_json(out, result["metrics"])
    if "cv_per_image" in result:  # for research.paired; per image: never commit it for real data
        result["cv_per_image"].to_csv(out.with_suffix(".cv_per_image.csv"), index=False)
    return result["metrics"]


if __name__ == "__main__":
    main()

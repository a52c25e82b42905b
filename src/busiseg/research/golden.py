"""The golden run: the recommended recipe, shrunk to seconds on a fixed slice of the real BUSI,
with its exact results pinned in tests/research/golden_busi.json.

A full recipe takes hours; a code change that moves it would otherwise be seen only when someone
re-runs it. The golden run trains the same stage scripts with the recipe's params (the preset
below) on the first images of each class, at 64 px, for 2 folds of 2 epochs, and compares every
metric and the model's weight digest with the pinned record: any change to reading, resizing,
splitting, training or evaluation shows as a difference.

CPUs differ: oneDNN picks convolution kernels by instruction set, and AVX-512 and AVX2 kernels
round differently (busi-lite0-cv5's fold 0 at AVX2 matches its record to 6 digits; at AVX-512 its
first val Dice is 0.500, not 0.520). The run therefore pins the kernels to AVX2, which every
x86-64 CPU of the last decade has, and the threads to 2, so one reference serves every such
machine; a CPU without AVX2 (or not x86) has no reference and the test skips.

A second golden run shrinks busi-lite0-fast-cv5 likewise (one epoch) but keeps its placement:
five folds of one thread each, trained side by side in processes of their own, so a change to
that path (or to a default it reads) shows too. Its kernels are AVX2 like the first, not the
preset's AVX-512, so that every x86-64 machine has one reference.

    uv run python -m busiseg.research.golden            # run both and compare with the records
    uv run python -m busiseg.research.golden --record   # re-record after an intended change
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from busiseg.params import read_yaml
from busiseg.research.presets import apply_overrides, load_presets

REPO = Path(__file__).resolve().parents[3]
SUBSET = {"benign": 24, "malignant": 16, "normal": 12}  # the first images of each class
SHRINK = {"preprocess.size": 64, "train.epochs": 2, "split.folds": 2, "train.threads": 2,
          "train.device": "cpu", "evaluate.device": "cpu", "evaluate.bootstrap": 200,
          "train.progress": "off"}
# five folds of the preset's one thread each, side by side as its placement puts them on 2 cores
# (fold_workers pinned, so a machine of one core takes the same path)
SHRINK_SIDE_BY_SIDE = {"preprocess.size": 64, "train.epochs": 1, "split.folds": 5,
                       "train.fold_workers": 5, "train.cpu_isa": "avx2", "train.device": "cpu",
                       "evaluate.device": "cpu", "evaluate.bootstrap": 200,
                       "train.progress": "off"}
GOLDEN = {  # recipe -> (its record, how it is shrunk)
    "busi-lite0-cv5": (REPO / "tests" / "research" / "golden_busi.json", SHRINK),
    "busi-lite0-fast-cv5": (REPO / "tests" / "research" / "golden_busi_side_by_side.json",
                            SHRINK_SIDE_BY_SIDE),
}
RECIPE = "busi-lite0-cv5"
RECORD = GOLDEN[RECIPE][0]
KERNELS = "AVX2"
PIN = {"ONEDNN_MAX_CPU_ISA": KERNELS, "ATEN_CPU_CAPABILITY": KERNELS.lower(),
       "MKL_ENABLE_INSTRUCTIONS": KERNELS, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
TIMING = {"seconds", "images_per_s"}
STAGES = ("ingest", "preprocess", "split", "train", "classify", "evaluate")


def cpu_has(flag: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(rf"^flags\s*:.*\b{flag}\b", text, re.M))


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def make_subset(raw: Path, dest: Path) -> Path:
    """The first SUBSET images of each class (natural order) with all their masks."""
    for cls, n in SUBSET.items():
        files = sorted((p for p in (raw / cls).iterdir() if p.is_file()), key=lambda p: p.name)
        images = sorted((p for p in files if "_mask" not in p.stem), key=lambda p: _natural(p.name))
        (dest / cls).mkdir(parents=True)
        for image in images[:n]:
            for p in files:
                if p == image or p.stem.startswith(f"{image.stem}_mask"):
                    shutil.copy2(p, dest / cls / p.name)
    return dest


def golden_params(raw_dir: Path, recipe: str = RECIPE) -> dict:
    base = read_yaml((REPO / "params.yaml").read_text())
    overrides = load_presets(params_path=REPO / "params.yaml")[recipe].overrides
    return apply_overrides(base, {**overrides, **GOLDEN[recipe][1], "data.raw_dir": str(raw_dir)})


def run(raw: Path, work: Path, recipe: str = RECIPE) -> dict:
    """The golden run of `recipe` in `work`; its results (no timings) as a dict."""
    import torch

    subset = make_subset(raw, work / "raw")
    params = golden_params(subset, recipe)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, **PIN}
    for stage in STAGES:
        cmd = [sys.executable, str(REPO / "stages" / f"{stage}.py")]
        if stage == "preprocess":
            cmd += ["--size", str(params["preprocess"]["size"])]
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"golden run: stage {stage} failed:\n{proc.stderr[-2000:]}")

    def metrics(name: str) -> dict:
        m = json.loads((work / "metrics" / f"{name}.json").read_text())
        return {k: v for k, v in m.items()
                if k not in TIMING and not k.endswith(tuple(f"_{t}" for t in TIMING))}

    blob = torch.load(work / "models" / "model.pt", map_location="cpu", weights_only=True)
    return {"ingest": metrics("ingest"), "split": metrics("split"), "train": metrics("train"),
            "eval": metrics("eval"), "model_digest": blob["digest"]}


def differences(got: dict, want: dict, prefix: str = "") -> list[str]:
    """Every key whose value differs, as `key: recorded -> now`."""
    out = []
    for key in sorted(set(got) | set(want)):
        a, b = want.get(key, "(absent)"), got.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(b, a, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def record_header(recipe: str = RECIPE) -> dict:
    from busiseg.runtime.device import machine

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    return {"what": f"{recipe} shrunk: {SUBSET} first images per class, {GOLDEN[recipe][1]}",
            "command": "uv run python -m busiseg.research.golden --record",
            "kernels_pinned": KERNELS, "pinned_env": PIN, "recorded_at_commit": commit or None,
            "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m busiseg.research.golden", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw-dir", type=Path,
                    default=REPO.parent / "shared" / "data" / "Dataset_BUSI_with_GT")
    ap.add_argument("--record", action="store_true", help="write the records from this run")
    ap.add_argument("--recipe", choices=sorted(GOLDEN), action="append",
                    help="one golden run (repeatable); default: all")
    args = ap.parse_args(argv)
    if not (args.raw_dir / "benign").is_dir():
        print(f"error: {args.raw_dir}: not a Dataset_BUSI_with_GT folder; pass --raw-dir",
              file=sys.stderr)
        return 1
    if not cpu_has(KERNELS.lower()):
        print(f"error: this CPU has no {KERNELS}: no golden reference for it", file=sys.stderr)
        return 1
    moved = False
    for recipe in args.recipe or GOLDEN:
        record = GOLDEN[recipe][0]
        with tempfile.TemporaryDirectory() as tmp:
            result = run(args.raw_dir, Path(tmp), recipe)
        if args.record:
            record.write_text(json.dumps({**record_header(recipe), "result": result}, indent=1)
                              + "\n")
            print(f"golden {recipe}: recorded {record.relative_to(REPO)} (eval dice "
                  f"{result['eval']['dice']}, cv_dice {result['eval'].get('cv_dice')})")
            continue
        diff = differences(result, json.loads(record.read_text())["result"])
        print("\n".join(f"{recipe}: {d}" for d in diff) if diff
              else f"golden {recipe}: identical to the record")
        moved = moved or bool(diff)
    return 1 if moved else 0


if __name__ == "__main__":
    sys.exit(main())

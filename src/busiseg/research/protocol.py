"""The results protocol: run a preset over three split seeds and report mean ± sd.

    uv run python -m busiseg.research.protocol show busi-cpu     # the dvc exp run commands
    uv run python -m busiseg.research.protocol run busi-cpu [--seeds 0 1 2] [--raw-dir PATH]
    uv run python -m busiseg.research.protocol record busi-cpu --seeds 0   # file a run made
    uv run python -m busiseg.research.protocol table                       # markdown tables
    uv run python -m busiseg.research.protocol paired zoo-unet piece-tversky  # gain, by seed
    uv run python -m busiseg.research.protocol noise zoo-unet --split-seed 0 --train-seeds 0 1 2

Each seed is one `dvc exp run` (split.seed = train.seed = seed), so every run is also an
experiment in `dvc exp show`. After each run the evaluate-time pieces (flip TTA, largest component,
hole filling, val-tuned threshold) are switched on and off on the same trained model, which says
what each is worth without retraining. `noise` trains one split from several training seeds:
the spread is what a single run moves on its own, the yardstick for `paired` gains. Only aggregate
figures are written (docs/results/protocol/PRESET.json, noise/PRESET.json); nothing per-image from
the real data.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from busiseg.evaluation.choose import PIECES
from busiseg.params import load_params, override_value, parse_params, read_yaml
from busiseg.research.ablate import ablate
from busiseg.research.presets import PINS, PRESETS, apply_overrides, exp_command, load_presets
from busiseg.runtime.device import machine

REPO = Path(__file__).resolve().parents[3]
OUT = REPO / "docs" / "results" / "protocol"
BUSI = "../shared/data/Dataset_BUSI_with_GT"
KEYS = ("dice", "iou", "dice_pooled", "dice_benign", "dice_malignant", "normal_empty_rate")
# what can change a run besides its overrides: code, stage wiring, defaults, locked versions
TRAINING_CODE = ("src", "stages", "dvc.yaml", "params.yaml", "uv.lock")


def load_preset(name: str):
    presets = load_presets(PRESETS, REPO / "params.yaml")
    if name not in presets:
        sys.exit(f"error: presets.yaml has no preset {name!r}; it has: {', '.join(presets)}")
    return presets[name]


def show(args) -> None:
    preset = load_preset(args.preset)
    for seed in args.seeds:
        print("uv run " + shlex.join(exp_command(preset, seed, args.raw_dir)))


def run(args) -> None:
    preset = load_preset(args.preset)
    for seed in args.seeds:
        _run_one(preset, seed, args.raw_dir, None)


def noise(args) -> None:
    preset = load_preset(args.preset)
    _noise_path(preset.name, args.split_seed)  # a clash with an earlier split fails before training
    for t in args.train_seeds:
        _run_one(preset, args.split_seed, args.raw_dir, t)


def _run_one(preset, seed: int, raw_dir: str, train_seed: int | None) -> None:
    cmd = exp_command(preset, seed, raw_dir, train_seed)
    # a workspace run leaves its -S values in params.yaml: start each from the committed one
    subprocess.run(["git", "checkout", "HEAD", "--", "params.yaml"], cwd=REPO, check=True)
    print("$ uv run " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, check=True)
    record(preset, seed, raw_dir, time.perf_counter() - start, train_seed)


def _noise_path(name: str, split_seed: int) -> Path:
    """One noise record per preset, all on one split: training seeds are only comparable there."""
    path = OUT / "noise" / f"{name}.json"
    held = json.loads(path.read_text())["split_seed"] if path.is_file() else split_seed
    if held != split_seed:
        sys.exit(f"error: {path} holds runs on split seed {held}; use --split-seed {held}, or "
                 "move the file away to start another split")
    return path


def record_existing(args) -> None:
    """Record the run now in the workspace (made with `show`'s command) without re-running it."""
    preset = load_preset(args.preset)
    for seed in args.seeds:
        record(preset, seed, args.raw_dir, None)


def record(preset, seed: int, raw_dir: str, wall: float | None,
           train_seed: int | None = None) -> None:
    """File the workspace run under its preset and seed; with `train_seed`, as a noise run (one
    split, several training seeds), without the evaluate-time ablation."""
    p = load_params(REPO / "params.yaml")
    t = seed if train_seed is None else train_seed
    want = {"data.raw_dir": raw_dir, **preset.overrides, "split.seed": seed, "train.seed": t}
    expected = parse_params(apply_overrides({}, want))  # each value as params.yaml reads it
    for key, value in want.items():  # refuse to file a run under the wrong preset or seed
        section, _, name = key.partition(".")
        have = getattr(getattr(p, section), name)
        if have != getattr(getattr(expected, section), name):
            sys.exit(f"error: params.yaml has {key}={have!r}, preset {preset.name} seed {seed} "
                     f"needs {value!r}; run the preset's command first")
    noisy = train_seed is not None
    path = _noise_path(preset.name, seed) if noisy else OUT / f"{preset.name}.json"
    rec = json.loads(path.read_text()) if path.is_file() else {}
    rec.update({"preset": preset.name, "about": preset.about, "overrides": preset.overrides,
                "pins": {k: preset.overrides[k] for k in PINS if k in preset.overrides},
                "raw_dir": raw_dir, "machine": machine()})
    if noisy:
        rec["split_seed"] = seed
    ev = json.loads((REPO / "metrics" / "eval.json").read_text())
    tr = json.loads((REPO / "metrics" / "train.json").read_text())
    classify = REPO / "metrics" / "classify.json"
    cl = json.loads(classify.read_text()) if classify.is_file() else {}
    table = None if noisy or p.split.folds else ablate(  # the ablation reads a val split
        p, REPO / "models" / "model.pt", REPO / "data" / "cache.npz", REPO / "data" / "split.csv")
    rec.setdefault("runs", {})[str(t if noisy else seed)] = {
        "command": "uv run " + shlex.join(exp_command(preset, seed, raw_dir, train_seed)),
        "eval": ev,
        "train": {k: v for k, v in tr.items() if k.startswith("fold") or k in (
            "best_epoch", "best_val_dice", "epochs_run", "seconds", "images_per_s", "device",
            "wall_seconds", "wall_images_per_s", "threads", "amp", "kernel_isa")},
        **({"classify": cl} if cl.get("members") else {}),
        "wall_seconds": None if wall is None else round(wall, 1),
        # the code that trained it: a pair of runs from two codes is not the recipe change alone
        "commit": _commit(),
        **({} if table is None else {"ablation": table.round(6).to_dict(orient="records")}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2, sort_keys=False) + "\n")
    tag = f"seed {seed}" + ("" if train_seed is None else f" training seed {train_seed}")
    print(f"{preset.name} {tag}: test Dice {ev['dice']}, training "
          f"{tr.get('wall_seconds', tr['seconds']) / 60:.1f} min", flush=True)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def _commit() -> str | None:
    """HEAD, with -dirty when the workspace's code differs from it (params.yaml is the run's)."""
    head = _git("rev-parse", "--short", "HEAD").stdout.strip()
    if not head:
        return None
    dirty = _git("status", "--porcelain", "--", *(p for p in TRAINING_CODE if p != "params.yaml"))
    return head + ("-dirty" if dirty.stdout.strip() else "")


def code_diff(a: str, b: str) -> list[str] | None:
    """Files that can change a run and differ between two recorded commits; None when that
    cannot be known (a commit git does not have, or a run from a modified workspace)."""
    if a.endswith("-dirty") or b.endswith("-dirty"):
        return None
    out = _git("diff", "--name-only", a, b, "--", *TRAINING_CODE)
    return None if out.returncode else out.stdout.split()


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def piece_worth(rec: dict) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per seed and evaluate-time piece: test Dice change when it is removed from the preset's
    setting, and when it is added alone to no post-processing at all (fixed threshold)."""
    removed: dict[str, list[float]] = {k: [] for k in PIECES}
    alone: dict[str, list[float]] = {k: [] for k in PIECES}
    for r in rec["runs"].values():
        # what was applied to test: the run's own record (select_on_val may narrow the preset)
        chosen = {k: bool(r["eval"].get(f"used_{k}", rec["overrides"].get(f"evaluate.{k}", False)))
                  for k in PIECES}
        rows = {tuple(row[k] for k in PIECES): row["dice"] for row in r["ablation"]}
        here = rows[tuple(chosen[k] for k in PIECES)]
        bare = rows[(False,) * len(PIECES)]
        for k in PIECES:
            flipped = tuple((not chosen[j]) if j == k else chosen[j] for j in PIECES)
            removed[k].append((1 if chosen[k] else -1) * (here - rows[flipped]))
            alone[k].append(rows[tuple(j == k for j in PIECES)] - bare)
    return removed, alone


def noise_summary(rec: dict) -> dict:
    """Spread of test Dice over training seeds on one split, and the codes that trained them."""
    dice = [r["eval"]["dice"] for r in rec["runs"].values()]
    return {"preset": rec["preset"], "split_seed": rec["split_seed"], "n": len(dice),
            "mean": statistics.mean(dice), "sd": statistics.stdev(dice) if len(dice) > 1 else None,
            "min": min(dice), "max": max(dice),
            "commits": sorted({str(r.get("commit")) for r in rec["runs"].values()})}


def noise_band(sd: float, k: int) -> float:
    """Half-width of the range a mean paired gain over k splits stays in about 95 % of the time
    when the change did nothing: each gain is a difference of two runs (variance 2 sd^2)."""
    return 2 * sd * (2 / k) ** 0.5


def table(args) -> None:
    print("| preset | arch | size | seeds | test Dice | IoU | pooled Dice | benign | malignant "
          "| normal empty | training / run | hardware |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = load_params(REPO / "params.yaml")
    worth_lines, commands = [], []
    for path in sorted(OUT.glob("*.json")):
        rec = json.loads(path.read_text())
        runs = [rec["runs"][s] for s in sorted(rec["runs"], key=int)]
        col = {k: _ms([r["eval"][k] for r in runs]) for k in KEYS}
        minutes = statistics.mean(r["train"]["seconds"] for r in runs) / 60
        m = rec["machine"]
        hw = m["cuda"] if m.get("cuda") else f"{m.get('cpu_model') or m['cpu']}, {m['threads']} thr"
        ov = rec["overrides"]
        arch = f"{ov.get('model.arch', base.model.arch)} {ov.get('model.base', base.model.base)}"
        size = ov.get("preprocess.size", base.preprocess.size)
        print(f"| {rec['preset']} | {arch} | {size} | {','.join(sorted(rec['runs'], key=int))} | "
              f"{col['dice']} | {col['iou']} | {col['dice_pooled']} | {col['dice_benign']} | "
              f"{col['dice_malignant']} | {col['normal_empty_rate']} | {minutes:.1f} min | {hw} |")
        removed, alone = piece_worth(rec)
        kept = "; ".join(f"seed {s}: " + (" + ".join(k for k in PIECES if r["eval"][f"used_{k}"])
                                           or "none")
                         for s, r in sorted(rec["runs"].items()) if "used_tta" in r["eval"])
        worth_lines.append(f"- {rec['preset']}: " + ", ".join(
            f"{k} {statistics.mean(removed[k]):+.3f} (alone {statistics.mean(alone[k]):+.3f})"
            for k in PIECES) + (f" [applied to test: {kept}]" if kept else ""))
        commands.append(f"# {rec['preset']}\n{runs[0]['command']}")
    print("\nWhat each evaluate-time piece was worth: test Dice of the preset minus the preset "
          "without it, and (alone) of the piece alone minus none at all; mean over seeds:")
    print("\n".join(worth_lines))
    print("\nCommands (first seed; the others change split.seed and train.seed):")
    print("\n".join(commands))
    noise_lines = []
    for path in sorted((OUT / "noise").glob("*.json")):
        n = noise_summary(json.loads(path.read_text()))
        if n["sd"] is not None:
            noise_lines.append(
                f"- {n['preset']}, split seed {n['split_seed']}: test Dice {n['mean']:.3f} ± "
                f"{n['sd']:.3f} over {n['n']} training seeds (range {n['min']:.3f}-{n['max']:.3f}"
                f"; code {', '.join(n['commits'])})")
    if noise_lines:
        print("\nTraining noise: one split trained from several training seeds (`noise`):")
        print("\n".join(noise_lines))


def paired(base: dict, other: dict, defaults: dict | None = None, diff=None) -> dict:
    """Test-Dice gain of one preset over another on the splits both ran, seed by seed: with
    76-81 test images the split moves Dice more than most recipe changes, so only differences on
    the same split say what a change was worth."""
    if base.get("raw_dir") != other.get("raw_dir"):
        raise ValueError(f"{other['preset']} ran on {other.get('raw_dir')!r}, {base['preset']} on "
                         f"{base.get('raw_dir')!r}: paired figures need the same data")
    seeds = sorted(set(base["runs"]) & set(other["runs"]), key=int)
    if not seeds:
        raise ValueError(f"{other['preset']} and {base['preset']} share no split seed; run both "
                         "with the same --seeds")
    defaults = defaults or {}  # params.yaml's values, for a key only one preset sets
    b, o = ({**{k: defaults.get(k) for k in set(base["overrides"]) | set(other["overrides"])},
             **r["overrides"]} for r in (base, other))
    changed = {k: override_value(o[k]) for k in sorted(o) if b[k] != o[k]}
    gain = {s: other["runs"][s]["eval"]["dice"] - base["runs"][s]["eval"]["dice"] for s in seeds}
    empty = {s: (base["runs"][s]["eval"]["normal_empty_rate"],
                 other["runs"][s]["eval"]["normal_empty_rate"]) for s in seeds}
    # a pair from two codes is not the recipe change alone; `diff(a, b)` (code_diff) lists the
    # files that can change a run and differ between the two commits.
    code = {}
    for s in seeds:
        cb, co = base["runs"][s].get("commit"), other["runs"][s].get("commit")
        files = diff(cb, co) if diff and cb and co and cb != co else None
        code[s] = ("unknown" if not (cb and co) else "same" if cb == co or files == [] else
                   f"{cb} vs {co}" + (f" ({', '.join(files)} differ)" if files else ""))
    # no training-time ratio: runs not timed side by side on a quiet machine say nothing about speed
    return {"preset": other["preset"], "changed": changed, "gain": gain,
            "mean": statistics.mean(gain.values()), "wins": sum(g > 0 for g in gain.values()),
            "normal_empty": empty, "code": code}


def paired_table(args) -> None:
    def load(name: str) -> dict:  # a preset's record, or a record file given by path
        path = Path(name) if name.endswith(".json") else OUT / f"{name}.json"
        if not path.is_file():
            sys.exit(f"error: {path} not found; run "
                     f"`python -m busiseg.research.protocol run {name}` first")
        return json.loads(path.read_text())

    base = load(args.base)
    raw = read_yaml((REPO / "params.yaml").read_text())
    defaults = {f"{sec}.{k}": v for sec, d in raw.items() for k, v in d.items()}
    try:  # every record checked before a line is printed
        rows = [paired(base, load(name), defaults, code_diff) for name in args.presets]
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"| preset | changed from {args.base} | test Dice gain by seed | mean | better on "
          "| normal empty (base → preset) | trained by |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        changed = ", ".join(f"`{k}={v}`" for k, v in r["changed"].items()) or "nothing"
        by_seed = " / ".join(f"{g:+.3f}" for g in r["gain"].values())
        empty = " / ".join(f"{a:.2f} → {b:.2f}" if a is not None and b is not None else "n/a"
                           for a, b in r["normal_empty"].values())
        codes = set(r["code"].values())
        code = ("same code" if codes == {"same"} else
                "; ".join(f"seed {s}: {c}" for s, c in r["code"].items() if c != "same"))
        print(f"| {r['preset']} | {changed} | {by_seed} | **{r['mean']:+.3f}** | "
              f"{r['wins']} of {len(r['gain'])} | {empty} | {code} |")
    noise_path = OUT / "noise" / f"{base['preset']}.json"
    rec = json.loads(noise_path.read_text()) if noise_path.is_file() else None
    if rec is not None and (rec["overrides"], rec.get("raw_dir")) != (base["overrides"],
                                                                       base.get("raw_dir")):
        print(f"\n{noise_path} was measured with other params or data than this "
              f"{base['preset']}: no noise band.")
        return
    n = noise_summary(rec) if rec is not None else None
    if n is None or n["sd"] is None:
        print(f"\nNo training-noise record for {base['preset']}: run "
              f"`python -m busiseg.research.protocol noise {base['preset']}` to learn which of "
              "these gains a single run could make alone.")
        return
    bands = ", ".join(f"±{noise_band(n['sd'], k):.3f} over {k} split(s)"
                      for k in sorted({len(r["gain"]) for r in rows}))
    print(f"\nTraining noise of {base['preset']} (split seed {n['split_seed']}, {n['n']} training "
          f"seeds): test Dice sd {n['sd']:.3f}. A change that does nothing gives a mean gain "
          f"within {bands} about 95 % of the time.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("show", show), ("run", run), ("record", record_existing)):
        sp = sub.add_parser(name)
        sp.add_argument("preset")
        sp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        sp.add_argument("--raw-dir", default=BUSI)
        sp.set_defaults(fn=fn)
    sp = sub.add_parser("noise", help="one split, several training seeds: what a run moves alone")
    sp.add_argument("preset")
    sp.add_argument("--split-seed", type=int, default=0)
    sp.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    sp.add_argument("--raw-dir", default=BUSI)
    sp.set_defaults(fn=noise)
    sub.add_parser("table").set_defaults(fn=table)
    sp = sub.add_parser("paired", help="test Dice gain over a baseline preset, seed by seed")
    sp.add_argument("base")
    sp.add_argument("presets", nargs="+")
    sp.set_defaults(fn=paired_table)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()

"""Two recipes run one after the other on one machine, side by side: the figures the fast
protocol is judged on (issue #35), from their protocol records and their evaluations with the
presence gate chosen out of fold.

    uv run python -m busiseg.research.side_by_side OUT.json \
        --run busi-lite0-cv5 RECORD.json AUTO_EVAL.json \
        --run busi-lite0-fast-cv5 RECORD.json AUTO_EVAL.json

RECORD.json is the preset's docs/results/protocol record (`protocol run … --seeds 0`, whose
`wall_seconds` times the whole `dvc exp run`); AUTO_EVAL.json is metrics/eval.json after
`dvc exp run -S evaluate.presence_threshold=auto` on that run (evaluate only). Only aggregate
figures are written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from busiseg.runtime.device import machine

WITH_INTERVALS = ("cv_dice", "dice")  # lesion Dice out of fold and on test, gate off
GATED = ("cv_dice_all", "dice_all", "cv_detect_sensitivity", "cv_detect_specificity",
         "cv_detect_auroc")  # whole population, gate chosen out of fold


def figures(record: dict, auto: dict, seed: str = "0") -> dict:
    run = record["runs"][seed]
    ev, tr = run["eval"], run["train"]
    out = {"commit": run.get("commit"), "command": run["command"],
           "wall_seconds": run.get("wall_seconds"),
           "train_seconds": tr.get("wall_seconds", tr.get("seconds")),
           "train_seconds_summed_over_folds": tr.get("seconds"),
           **{k: tr.get(k) for k in ("fold_workers", "threads", "amp", "kernel_isa")}}
    for key in WITH_INTERVALS:
        out[key] = [ev.get(key), ev.get(f"{key}_ci_low"), ev.get(f"{key}_ci_high")]
    for key in GATED:
        out[f"{key}_gate_auto"] = [auto.get(key), auto.get(f"{key}_ci_low"),
                                   auto.get(f"{key}_ci_high")]
    out["presence_threshold_auto"] = auto.get("presence_threshold")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--run", nargs=3, action="append", required=True,
                    metavar=("PRESET", "RECORD", "AUTO_EVAL"))
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    runs = {name: figures(json.loads(Path(rec).read_text()), json.loads(Path(auto).read_text()))
            for name, rec, auto in args.run}
    names = list(runs)
    base, fast = runs[names[0]], runs[names[-1]]
    result = {"what": f"{' vs '.join(names)}, one after the other on one machine, split seed 0",
              "machine": machine(), "note": args.note, "runs": runs,
              "speedup_wall": round(base["wall_seconds"] / fast["wall_seconds"], 3)
              if base.get("wall_seconds") and fast.get("wall_seconds") else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

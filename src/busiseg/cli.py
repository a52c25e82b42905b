"""`busiseg` command line: `busiseg predict --model models/model.pt IMAGE_OR_DIR... --out DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from busiseg.errors import BusisegError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="busiseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="segment images with a trained model")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--model", default="models/model.pt", type=Path)
    pr.add_argument("--out", required=True, type=Path, help="folder for masks and overlays")
    pr.add_argument("--threshold", type=float, default=None,
                    help="probability threshold (default: the one stored in the model file)")
    pr.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    pr.add_argument("--tta", action="store_true", help="average with the flipped prediction")
    pr.add_argument("--largest-cc", action="store_true", help="keep the largest component")
    pr.add_argument("--fill-holes", action="store_true")
    pr.add_argument("--from-eval", type=Path, metavar="EVAL_JSON",
                    help="use the threshold and pieces the evaluate stage applied to test "
                         "(metrics/eval.json of the same run); replaces the four options above")
    args = parser.parse_args(argv)
    if args.from_eval and (args.threshold is not None or args.tta or args.largest_cc
                           or args.fill_holes):
        parser.error("--from-eval sets the threshold, --tta, --largest-cc and --fill-holes; "
                     "give either it or them")
    try:
        from busiseg.predict import eval_settings, predict_paths

        settings = (eval_settings(args.from_eval) if args.from_eval else
                    {"threshold": args.threshold, "tta": args.tta, "largest_cc": args.largest_cc,
                     "fill_holes": args.fill_holes})
        written, failures = predict_paths(args.model, args.inputs, args.out,
                                          device=args.device, **settings)
    except BusisegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for f in failures:
        print(f"skipped: {f.path}: {f.reason}", file=sys.stderr)
    print(f"predict: wrote {len(written)} mask(s) and overlay(s) to {args.out}"
          + (f"; {len(failures)} input(s) failed" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

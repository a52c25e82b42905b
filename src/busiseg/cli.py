"""`busiseg` command line.

    busiseg predict --model models/model.pt IMAGE_OR_DIR... --out DIR
    busiseg export --model models/model.pt --format onnx --out model.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from busiseg.errors import BusisegError

EVAL_JSON = Path("metrics/eval.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="busiseg", description="Breast-ultrasound lesion "
                                     "segmentation: predict with or export a trained model.")
    sub = parser.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="segment images with a trained model (.pt or .onnx)")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--model", default="models/model.pt", type=Path)
    pr.add_argument("--out", required=True, type=Path, help="folder for masks and overlays")
    pr.add_argument("--from-eval", type=Path, metavar="EVAL_JSON",
                    help="take the threshold and pieces the evaluate stage applied to test from "
                         f"this file (default for a .pt model: {EVAL_JSON}; an .onnx model "
                         "carries its own)")
    pr.add_argument("--threshold", type=float, default=None,
                    help="probability threshold (with the three options below: instead of an "
                         "evaluate file; default 0.5)")
    pr.add_argument("--tta", action="store_true", help="average with the flipped prediction")
    pr.add_argument("--largest-cc", action="store_true", help="keep the largest component")
    pr.add_argument("--fill-holes", action="store_true")
    pr.add_argument("--presence-threshold", metavar="P|off",
                    help="empty the mask of an image whose lesion score is below P; off: no "
                         "gate (either one replaces the gate of the evaluate file or export)")
    pr.add_argument("--save-probabilities", action="store_true",
                    help="also write each image's probability map as NAME_prob.png, 16-bit "
                         "(p = value / 65535)")
    pr.add_argument("--device", default="cpu",
                    help="auto, cpu, cuda or mps (.pt models; default cpu)")
    pr.add_argument("--mask-marks", action="store_true",
                    help="paint burned-in colour marks over first, as training did with "
                         "data.burned_marks: mask")

    ex = sub.add_parser("export", help="write a trained model as a self-contained ONNX file")
    ex.add_argument("--model", default="models/model.pt", type=Path)
    ex.add_argument("--format", choices=["onnx"], default="onnx")
    ex.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    ex.add_argument("--from-eval", type=Path, default=EVAL_JSON, metavar="EVAL_JSON",
                    help="the evaluate stage's choice of threshold and post-processing to embed "
                         f"(default {EVAL_JSON})")
    args = parser.parse_args(argv)
    try:
        return predict(args, parser) if args.command == "predict" else export(args)
    except BusisegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _overrides(args) -> dict:
    """MaskSettings fields given on the command line, to apply over the evaluate file's or the
    export's: the presence threshold, read as params.yaml reads it (auto is evaluate's)."""
    from busiseg.params import parse_presence_threshold

    if args.presence_threshold is None:
        return {}
    value = parse_presence_threshold(args.presence_threshold, "--presence-threshold")
    if value == "auto":
        raise BusisegError("--presence-threshold auto: auto is chosen by the evaluate stage on "
                           "held-out data; give a number in [0, 1] or off")
    return {"presence_threshold": value}


def predict(args, parser) -> int:
    from busiseg.inference.predict import predict_paths
    from busiseg.inference.segment import MaskSettings

    flags = args.threshold is not None or args.tta or args.largest_cc or args.fill_holes
    if args.from_eval and flags:
        parser.error("--from-eval sets the threshold, --tta, --largest-cc and --fill-holes; "
                     "give either it or them")
    if flags:
        settings = MaskSettings(0.5 if args.threshold is None else args.threshold, args.tta,
                                args.largest_cc, args.fill_holes).checked("--threshold")
        source = "options"
    elif args.from_eval or args.model.suffix.lower() != ".onnx":
        path = args.from_eval or EVAL_JSON
        settings, source = MaskSettings.from_eval(path), str(path)
    else:
        settings, source = None, f"{args.model} metadata"
    written, failures = predict_paths(args.model, args.inputs, args.out, settings,
                                      device=args.device, mask_marks=args.mask_marks,
                                      overrides=_overrides(args),
                                      save_probabilities=args.save_probabilities)
    for f in failures:
        print(f"skipped: {f.path}: {f.reason}", file=sys.stderr)
    print(f"predict: wrote {len(written)} mask(s) and overlay(s) to {args.out} (settings from "
          f"{source})" + (f"; {len(failures)} input(s) failed" if failures else ""))
    return 1 if failures else 0


def export(args) -> int:
    from busiseg.inference.onnx_model import export_onnx
    from busiseg.inference.segment import MaskSettings
    from busiseg.modeling.model_file import load_model

    if args.out.suffix.lower() != ".onnx":
        raise BusisegError(f"--out {args.out}: name the file *.onnx")
    settings = MaskSettings.from_eval(args.from_eval)
    model, blob = load_model(args.model)
    meta = export_onnx(model, blob, settings, args.out)
    print(f"export: wrote {args.out} (opset {meta['opset']}, input {meta['size']}x{meta['size']}"
          f", threshold {meta['threshold']}, tta {meta['tta']}, largest_cc {meta['largest_cc']}"
          f", fill_holes {meta['fill_holes']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

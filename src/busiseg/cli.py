"""`busiseg` command line.

    busiseg predict --model models/model.pt IMAGE_OR_DIR... --out DIR
    busiseg export --model models/model.pt --format onnx --out model.onnx
    busiseg score --pred DIR --truth DIR [--out DIR]
    busiseg export-dataset --format nnunet --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from busiseg import busiseg_version
from busiseg.errors import BusisegError

EVAL_JSON = Path("metrics/eval.json")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = ["busiseg", *(sys.argv[1:] if argv is None else argv)]
    try:
        if args.command == "score":
            return score(args)
        if args.command == "export-dataset":
            return export_dataset(args)
        return predict(args, parser) if args.command == "predict" else export(args)
    except BusisegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="busiseg", description="Breast-ultrasound lesion "
                                     "segmentation: predict with or export a trained model, "
                                     "score predicted masks.")
    parser.add_argument("--version", action="version", version=f"busiseg {busiseg_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_predict_parser(sub)
    add_export_parser(sub)
    add_score_parser(sub)
    add_export_dataset_parser(sub)
    return parser


def add_predict_parser(sub) -> None:
    pr = sub.add_parser("predict", help="segment images with a trained model (.pt or .onnx)")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--model", default="models/model.pt", type=Path)
    pr.add_argument("--out", required=True, type=Path, help="folder for masks and overlays")
    pr.add_argument("--from-eval", type=Path, metavar="EVAL_JSON",
                    help="take the threshold and pieces the evaluate stage applied to test from "
                         "this file (default: the settings the model carries, an .onnx export "
                         f"or a packaged .pt; else {EVAL_JSON})")
    pr.add_argument("--threshold", type=float, default=None,
                    help="probability threshold (with the three options below: instead of an "
                         "evaluate file or the model's settings, one not given being off; "
                         "default 0.5)")
    pr.add_argument("--tta", action="store_true", help="average with the flipped prediction")
    pr.add_argument("--largest-cc", action="store_true", help="keep the largest component")
    pr.add_argument("--fill-holes", action="store_true")
    pr.add_argument("--presence-threshold", metavar="P|off",
                    help="empty the mask of an image whose lesion score is below P; off: no "
                         "gate (either one replaces the gate of the evaluate file or model)")
    pr.add_argument("--save-probabilities", action="store_true",
                    help="also write each image's probability map as NAME_prob.png, 16-bit "
                         "(p = value / 65535)")
    pr.add_argument("--no-overlay", action="store_true", help="write no NAME_overlay.png")
    pr.add_argument("--mask-values", type=int, choices=(255, 1), default=255,
                    help="a lesion pixel's value in NAME_mask.png: 255 (default, viewable) or "
                         "1 (label masks for other tools)")
    pr.add_argument("--continue", dest="resume", action="store_true",
                    help="resume a killed run: skip an image whose NAME_mask.png and "
                         "predictions.csv row are already in --out (predictions.csv keeps the "
                         "earlier rows); refused if the earlier run's model, settings, "
                         "--mask-values or --mask-marks differ")
    pr.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "mps"),
                    help="auto, cpu, cuda or mps (.pt models; an .onnx runs on the CPU; "
                         "default cpu)")
    pr.add_argument("--mask-marks", action="store_true",
                    help="paint burned-in colour marks over first, as training did with "
                         "data.burned_marks: mask")
    pr.add_argument("--frames", default="all", metavar="all|first|middle|1,5,9",
                    help="a multi-frame DICOM's frames to predict, each written as "
                         "NAME_fNNN_mask.png (1-based; default all)")
    pr.add_argument("--dicom-seg", action="store_true",
                    help="also write NAME_seg.dcm for each DICOM input: a DICOM Segmentation of "
                         "its frames' masks, referencing the source image")
    pr.add_argument("--version", action="version", version=f"busiseg {busiseg_version()}")


def add_export_parser(sub) -> None:
    ex = sub.add_parser("export", help="write a trained model as a self-contained ONNX file")
    ex.add_argument("--model", default="models/model.pt", type=Path)
    ex.add_argument("--format", choices=["onnx"], default="onnx")
    ex.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    ex.add_argument("--from-eval", type=Path, metavar="EVAL_JSON",
                    help="the evaluate stage's choice of threshold and post-processing to embed "
                         "(default: the settings a packaged model carries, else "
                         f"{EVAL_JSON})")


def _overrides(args) -> dict:
    """MaskSettings fields given on the command line, to apply over the evaluate file's or the
    export's: the presence threshold, read as params.yaml reads it (auto is evaluate's)."""
    from busiseg.params import FITTED_PRESENCE, parse_presence_threshold

    if args.presence_threshold is None:
        return {}
    value = parse_presence_threshold(args.presence_threshold, "--presence-threshold")
    if value in FITTED_PRESENCE:
        raise BusisegError(f"--presence-threshold {value}: {value} is fitted by the evaluate "
                           "stage on held-out data; give a number in [0, 1] or off")
    return {"presence_threshold": value, "presence_expected_dice": None}


def predict(args, parser) -> int:
    from busiseg.inference.predict import predict_run, settings_from_eval, settings_from_flags
    from busiseg.inference.predict_options import Outputs, RunOptions
    from busiseg.inference.run_record import RECORD, SCORES

    flags = args.threshold is not None or args.tta or args.largest_cc or args.fill_holes
    if args.from_eval and flags:
        parser.error("--from-eval sets the threshold, --tta, --largest-cc and --fill-holes; "
                     "give either it or them")
    chosen = None  # the model's own settings, else metrics/eval.json
    if flags:
        chosen = settings_from_flags(args.threshold, args.tta, args.largest_cc, args.fill_holes)
    elif args.from_eval:
        chosen = settings_from_eval(args.from_eval)
    outputs = Outputs(overlays=not args.no_overlay, probabilities=args.save_probabilities,
                      mask_value=args.mask_values, resume=args.resume, dicom_seg=args.dicom_seg)
    try:
        options = RunOptions(device=args.device, mask_marks=args.mask_marks,
                             overrides=_overrides(args), fallback_eval=EVAL_JSON,
                             command=args.argv, frames=args.frames)
        run = predict_run(args.model, args.inputs, args.out, chosen, options, outputs)
    except KeyboardInterrupt:
        print(f"predict: interrupted; the images done are in {args.out / SCORES}: give the same "
              "command with --continue to predict the rest", file=sys.stderr)
        return 130
    for f in run.failures:
        print(f"skipped: {f.path}: {f.reason}", file=sys.stderr)
    by_reason: dict[str, list] = {}
    for f in run.skipped:
        by_reason.setdefault(f.reason, []).append(f.path)
    for reason, paths in by_reason.items():
        print(f"skipped: {paths[0]}: {reason}" if len(paths) == 1 else
              f"skipped {len(paths)} files: {reason} (each named in {args.out / RECORD})",
              file=sys.stderr)
    what = "mask(s) and overlay(s)" if outputs.overlays else "mask(s)"
    print(f"predict: wrote {len(run.written)} {what} to {args.out} (settings from "
          f"{run.chosen.origin}; record: {args.out / RECORD})"
          + (f"; {len(run.failures)} input(s) failed" if run.failures else ""))
    return 1 if run.failures else 0


def export(args) -> int:
    from busiseg.inference.onnx_model import export_onnx
    from busiseg.inference.segment import MaskSettings
    from busiseg.modeling.model_file import load_model

    if args.out.suffix.lower() != ".onnx":
        raise BusisegError(f"--out {args.out}: name the file *.onnx")
    model, blob = load_model(args.model)
    own = None if args.from_eval else MaskSettings.from_model_file(blob, f"--model {args.model}")
    if own is not None:  # a packaged model (models/busiseg-model): evaluate's choice inside it
        settings, sources = own, blob.get("settings_source")
    else:
        path = args.from_eval or EVAL_JSON
        if not path.is_file():
            raise BusisegError(f"{path}: not found, and --model {args.model} carries no settings;"
                               " export the packaged model (models/busiseg-model/model.pt) or "
                               "give --from-eval EVAL_JSON")
        settings = MaskSettings.from_eval(path)
        sources = {k: f"eval file {path}" for k in settings.as_dict()}
    meta = export_onnx(model, blob, settings, args.out, sources)
    print(f"export: wrote {args.out} (opset {meta['opset']}, input {meta['size']}x{meta['size']}"
          f", threshold {meta['threshold']}, tta {meta['tta']}, largest_cc {meta['largest_cc']}"
          f", fill_holes {meta['fill_holes']}"
          + (f", with its {meta['classifier']['kind']} image classifier ("
             f"{meta['classifier']['members']} members)" if meta.get("classifier") else "")
          + ")")
    return 0


def add_score_parser(sub) -> None:
    from busiseg.params import EvaluateParams

    defaults = EvaluateParams()  # evaluate's own, so both score by one rule unless told
    sc = sub.add_parser("score", help="score a folder of predicted masks against true masks by "
                        "evaluate's rules (from busiseg predict, nnU-Net or any tool)")
    sc.add_argument("--pred", required=True, type=Path,
                    help="folder of predicted masks: NAME_mask.png or NAME.png (0/1, 0/255 or "
                         "RGB); predict's _overlay and _prob files are ignored")
    sc.add_argument("--truth", required=True, type=Path,
                    help="folder of true masks (NAME_mask.png, NAME_mask_1.png, ... merged, or "
                         "NAME.png), or BUSI's benign/ malignant/ normal/ folders")
    sc.add_argument("--out", type=Path,
                    help="folder for scores.csv and scores.json (default: the --pred folder)")
    sc.add_argument("--bootstrap", type=int, default=defaults.bootstrap, metavar="N",
                    help=f"resamples for the 95 %% intervals; 0 = none (default "
                         f"{defaults.bootstrap}, as evaluate.bootstrap)")
    sc.add_argument("--bootstrap-seed", type=int, default=defaults.bootstrap_seed,
                    help=f"default {defaults.bootstrap_seed}, as evaluate.bootstrap_seed")
    sc.add_argument("--surface-tolerance", type=float, default=defaults.surface_tolerance,
                    metavar="PX", help="NSD's tolerance in pixels of the masks (default "
                    f"{defaults.surface_tolerance:g}, as evaluate.surface_tolerance)")
    sc.add_argument("--missing", choices=("empty", "error"), default="empty",
                    help="a true mask without a prediction: empty (default) scores it as an "
                         "empty prediction, a miss, and says how many; error stops, naming them")


def score(args) -> int:
    from busiseg.evaluation.score import check_out, score_folders, stderr_lines, summary, write

    out = args.out or args.pred
    check_out(out)  # before the scoring, not after it
    scores = score_folders(args.pred, args.truth, args.bootstrap, args.bootstrap_seed,
                           args.surface_tolerance, out, missing=args.missing)
    for line in stderr_lines(scores.report):
        print(line, file=sys.stderr)
    csv_path, json_path = write(scores, out)
    for line in summary(scores.report):
        print(line)
    print(f"score: wrote {csv_path} and {json_path}")
    return 0


def add_export_dataset_parser(sub) -> None:
    ed = sub.add_parser("export-dataset", help="write the ingested images, union masks and "
                        "folds for another tool (nnU-Net v2), from a project after dvc repro")
    ed.add_argument("--format", choices=["nnunet"], default="nnunet",
                    help="nnunet: nnU-Net v2's raw dataset (imagesTr, labelsTr, imagesTs, "
                         "labelsTs, dataset.json) with busiseg's folds in splits_final.json "
                         "and case ids in cases.csv")
    ed.add_argument("--out", required=True, type=Path,
                    help="a new or empty folder; named DatasetXXX_Name it can go under "
                         "nnUNet_raw as it is (docs/datasets.md)")


def export_dataset(args) -> int:
    from busiseg.data.nnunet import export_nnunet, summary_line
    from busiseg.params import load_params

    print(summary_line(export_nnunet(load_params(), args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

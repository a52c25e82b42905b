"""Segment new images with a trained model (PyTorch or ONNX): a mask PNG at the original size,
and an overlay. The prediction itself is `inference.segment`, the path evaluate scores; what the
run leaves beside the masks is `inference.run_record`. Each image's mask is written last, so a
killed run resumes with --continue (`inference.resume`)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from busiseg.data import dicom
from busiseg.data.images import load_image, outline
from busiseg.data.layouts import IMAGE_SUFFIXES
from busiseg.errors import BusisegError, first_line
from busiseg.files import atomic_path, file_sha256
from busiseg.inference.classify import Classifier
from busiseg.inference.onnx_model import load_onnx
from busiseg.inference.predict_options import Outputs, Predictor, RunOptions, SourcedSettings
from busiseg.inference.resume import check_resume, plan_resume
from busiseg.inference.run_record import (
    RECORD,
    SCORES,
    Failure,
    Tally,
    append_score,
    input_path,
    mask_name,
    run_record,
    write_record,
    write_scores,
)
from busiseg.inference.segment import (
    EARLIER_NAMES,
    SETTING_NAMES,
    SETTINGS,
    Feed,
    MaskSettings,
    as_stats,
    segment_with_score,
)
from busiseg.inference.sizes import size_row
from busiseg.modeling.model_file import load_model, model_file_path
from busiseg.runtime.device import place

SUFFIXES = IMAGE_SUFFIXES
OWN_SUFFIXES = ("_overlay", "_prob")  # predict's outputs besides the mask
SEG_SUFFIX = "_seg"  # NAME_seg.dcm, predict's DICOM SEG (--dicom-seg)
MASK_LIKE = "name looks like a mask (contains _mask)"
OWN_OUTPUT = "predict's own output"
EXISTS = "already done: its mask and predictions.csv row are in --out (--continue)"


def field_sources(present: Iterable[str], label: str,
                  notes: dict[str, str] | None = None) -> dict[str, str]:
    """Each field's source: `label` (with the writer's note on it, if any) where the file or
    model named the field under any of its names (segment.SETTINGS), else "default"."""
    present, notes = set(present), notes or {}
    sources = {}
    for name in SETTING_NAMES:
        names = (name, SETTINGS[name][0], EARLIER_NAMES.get(name))
        note = next((notes[n] for n in names if notes.get(n)), None)
        named = any(n in present for n in names if n)
        sources[name] = (f"{label}: {note}" if note else label) if named else "default"
    return sources


def settings_from_flags(threshold: float | None, tta: bool, largest_cc: bool,
                        fill_holes: bool) -> SourcedSettings:
    """The command line's set replaces the whole of an evaluate file's or a model's (an option
    not given is off), so what a mask shows never mixes two sources' post-processing."""
    settings = MaskSettings(0.5 if threshold is None else threshold, tta, largest_cc,
                            fill_holes).checked("--threshold")
    given = {"threshold": threshold is not None, "tta": tta, "largest_cc": largest_cc,
             "fill_holes": fill_holes}
    return SourcedSettings(settings, {name: f"flag --{name.replace('_', '-')}"
                                      if given.get(name) else "default" for name in SETTING_NAMES},
                           "options")


def settings_from_eval(path: str | Path) -> SourcedSettings:
    path = Path(path)
    if path.is_dir():
        raise BusisegError(f"--from-eval {path}: is a folder; name the evaluate stage's "
                           "metrics file (metrics/eval.json)")
    settings = MaskSettings.from_eval(path)
    names = json.loads(path.read_text())  # from_eval has read it as a JSON object
    return SourcedSettings(settings, field_sources(names, f"eval file {path}"), str(path))


def load_predictor(model_path: str | Path, device: str = "cpu") -> Predictor:
    """A .onnx file runs on ONNX Runtime; anything else must be a busiseg PyTorch model file.
    Either may carry the settings evaluate chose (an export always does, a packaged .pt too)."""
    model_path = Path(model_path)  # or a packaged model's folder, which load_model reads
    if model_path.suffix.lower() == ".onnx" and not model_path.is_dir():
        if device not in ("cpu", "auto"):
            raise BusisegError(f"--device {device}: ONNX models run on ONNX Runtime's CPU "
                               "provider; use --device cpu, or the .pt model on the GPU")
        forward, meta = _named("--model", load_onnx, model_path)
        predictor = Predictor(forward, int(meta["size"]), as_stats(meta["input_mean"]),
                              as_stats(meta["input_std"]), torch.device("cpu"),
                              MaskSettings.from_dict(meta), int(meta.get("channels", 1)),
                              field_sources(meta, "model", _notes(meta)), "onnx",
                              meta.get("weights_digest"), classifier=onnx_classifier(forward, meta))
    else:
        where, _ = place(device, "--device")
        model, blob = _named("--model", load_model, model_path, where)
        pre = blob["preprocess"]
        own = MaskSettings.from_model_file(blob, f"--model {model_path}")
        sources = field_sources(blob["settings"], "model", _notes(blob)) if own else {}
        classifier = (Classifier.from_blob(blob["classifier"], where)
                      if blob.get("classifier") else None)
        predictor = Predictor(model, int(pre["size"]), as_stats(pre["input_mean"]),
                              as_stats(pre["input_std"]), where, own,
                              int(pre.get("channels", 1)), sources, "pt", str(blob["digest"]),
                              classifier=classifier)
    return replace(predictor, file_sha256=file_sha256(model_file_path(model_path)))


def onnx_classifier(forward, meta: dict) -> Classifier | None:
    """An export's classifier output as a Classifier of one member, fed as the masks are (the
    graph restores the classifier's own normalisation)."""
    c = meta.get("classifier")
    if not c:
        return None
    feed = Feed(as_stats(meta["input_mean"]), as_stats(meta["input_std"]), torch.device("cpu"), 1)
    return Classifier([forward.classifier_member()], [-1], feed, int(meta["size"]),
                      bool(c.get("malignancy")), c.get("malignant_temperature"))


def _named(option: str, load, *args):
    """A loader's one-line error, prefixed with the option the user gave the path by."""
    try:
        return load(*args)
    except BusisegError as exc:
        raise BusisegError(f"{option} {exc}") from None


def _notes(m: dict) -> dict[str, str]:
    """The writer's word on where each setting came from (`settings_source`), when it left one."""
    notes = m.get("settings_source")
    return {str(k): str(v) for k, v in notes.items()} if isinstance(notes, dict) else {}


def collect_inputs(inputs: list[str | Path], frames: str = "all") -> tuple[
        list[Path], list[Failure], list[Failure]]:
    """(images to predict, failures, skipped). A folder contributes its image files; what else
    it holds is skipped with its reason (masks beside their images, predict's own outputs,
    other files, subfolders), so the user learns why an image was not predicted. A file named
    explicitly is predicted whatever its name; a missing path is a failure, and so is an image
    whose outputs would overwrite an earlier one's (`same_names`). A multi-frame DICOM file
    gives the frames `frames` selects (dicom.select_frames), each an image of its own."""
    files, failures, skipped = [], [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found = []
            for p in sorted(item.iterdir()):
                reason = _skip_reason(p)
                if reason:
                    skipped.append(Failure(p, reason))
                else:
                    found.append(p)
            if not found:
                failures.append(Failure(item, "folder holds no images"))
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            failures.append(Failure(item, "no such file or folder"))
    files = _frames(files, frames, failures)
    files, clashes = same_names(files)
    return files, failures + clashes, skipped


def _frames(files: list[Path], rule: str, failures: list[Failure]) -> list[Path]:
    out = []
    for p in files:
        if not dicom.is_dicom(p):
            out.append(p)
            continue
        try:
            out += dicom.frames(p, rule, "--frames")
        except BusisegError as exc:
            if "--frames" in str(exc):
                raise
            failures.append(Failure(p, str(exc).split(": ", 1)[-1]))
    return out


def same_names(files: list[Path]) -> tuple[list[Path], list[Failure]]:
    """(the files whose outputs have names of their own, the rest as failures): a/x.png and
    b/x.jpg, or one file given twice, would both write x_mask.png. Names are compared ignoring
    case, as macOS and Windows file systems do."""
    first: dict[str, Path] = {}
    kept, clashes = [], []
    for p in files:
        key = mask_name(p).casefold()
        if key in first:
            clashes.append(Failure(p, f"its outputs would overwrite those of {first[key]} "
                                      "(same name)"))
        else:
            first[key] = p
            kept.append(p)
    return kept, clashes


def _skip_reason(p: Path) -> str | None:
    if p.is_dir():
        return "a folder inside a folder (predict does not look in; name it to predict it)"
    if p.name in (SCORES, RECORD) or (p.suffix.lower() == ".png"
                                      and p.stem.endswith(OWN_SUFFIXES)) or (
            p.suffix.lower() == ".dcm" and p.stem.endswith(SEG_SUFFIX)):
        return OWN_OUTPUT
    if p.suffix.lower() not in SUFFIXES and not dicom.is_dicom(p):
        return f"not an image file predict reads ({' '.join(SUFFIXES)}, or DICOM)"
    if "_mask" in p.stem:
        return MASK_LIKE
    return None


def overlay(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The image (grey, or colour H×W×3) with the lesion tinted red and its outline drawn."""
    rgb = (image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)).astype(
        np.float32)
    tint = np.array([255, 40, 40], dtype=np.float32)
    rgb[mask] = 0.65 * rgb[mask] + 0.35 * tint
    edge = outline(mask)
    rgb[edge] = tint
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


@dataclass
class PredictRun:
    written: list[Path]
    failures: list[Failure]
    skipped: list[Failure]
    chosen: SourcedSettings
    record: Path


def resolve_settings(predictor: Predictor, model_path: Path, chosen: SourcedSettings | None,
                     fallback_eval: Path | None, overrides: dict | None) -> SourcedSettings:
    """`chosen` (the command line's flags or --from-eval), else the model's own, else
    `fallback_eval` (metrics/eval.json for a model that carries none), else the defaults; then
    `overrides` (MaskSettings fields from the command line, the presence threshold) on top."""
    if chosen is None and predictor.own_settings is not None:
        chosen = SourcedSettings(predictor.own_settings, predictor.own_sources,
                                 f"{model_path} metadata")
    if chosen is None and fallback_eval is not None:
        if not Path(fallback_eval).is_file():
            raise BusisegError(f"--model {model_path} carries no settings of its own and "
                               f"{fallback_eval} is not here; give --from-eval EVAL_JSON or "
                               "--threshold, or run from the project after `dvc repro "
                               "evaluate`")
        chosen = settings_from_eval(fallback_eval)
    if chosen is None:
        chosen = SourcedSettings(MaskSettings(), dict.fromkeys(SETTING_NAMES, "default"),
                                 "defaults")
    if overrides:
        settings = replace(chosen.settings, **overrides).checked("--presence-threshold")
        sources = {**chosen.sources,
                   **dict.fromkeys(overrides, "flag --presence-threshold")}
        chosen = SourcedSettings(settings, sources, chosen.origin)
    return chosen


def predict_run(model_path: str | Path, inputs: list[str | Path], out_dir: str | Path,
                chosen: SourcedSettings | None = None, options: RunOptions | None = None,
                outputs: Outputs | None = None) -> PredictRun:
    """Masks (and overlays, probability maps) for every readable input, predictions.csv and
    predictions.json. Settings: see `resolve_settings`."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    options, outputs = options or RunOptions(), outputs or Outputs()
    if out_dir.exists() and not out_dir.is_dir():
        raise BusisegError(f"--out {out_dir}: is a file; name a folder for the masks (a new "
                           "one, or an existing folder)")
    predictor = load_predictor(model_path, options.device)
    chosen = resolve_settings(predictor, model_path, chosen, options.fallback_eval,
                              options.overrides)
    files, failures, skipped = collect_inputs(inputs, options.frames)

    def record(rows: list[dict], finished: bool) -> dict:
        return run_record(predictor, model_path, chosen, outputs, options,
                          Tally(len(files), rows, skipped, failures), finished)

    todo, kept = files, []
    if outputs.resume:
        base = check_resume(out_dir / RECORD, record([], finished=False)) or Path.cwd()
        todo, done, kept, clashes = plan_resume(out_dir, files, base)
        skipped += [Failure(p, EXISTS) for p in done]
        failures += clashes
    _make_folder(out_dir)
    write_scores(out_dir / SCORES, kept, chosen.settings)  # this run's rows: one per image done
    write_record(out_dir / RECORD, record([], finished=False))  # what --continue checks
    from tqdm import tqdm

    show = sys.stderr.isatty() if options.progress is None else options.progress
    rows = []
    for path in tqdm(todo, desc="predict", disable=not show or len(todo) < 2):
        row = _predict_one(predictor, chosen.settings, path, out_dir, outputs,
                           options.mask_marks, failures)
        if row is not None:
            append_score(out_dir / SCORES, row, chosen.settings)
            rows.append(row)
    if outputs.dicom_seg:
        _write_segmentations(predictor, files, out_dir, failures)
    write_record(out_dir / RECORD, record(rows, finished=True))
    return PredictRun([out_dir / r["mask"] for r in rows], failures, skipped, chosen,
                      out_dir / RECORD)


def _predict_one(predictor: Predictor, settings: MaskSettings, path: Path, out_dir: Path,
                 outputs: Outputs, mask_marks: bool, failures: list[Failure]) -> dict | None:
    """One image's outputs, and its predictions.csv row; None (and a failure) if unreadable."""
    try:
        image = load_image(path, mask_marks, predictor.channels)
        pixel_mm = dicom.pixel_size_mm(path)[0] if dicom.is_dicom(dicom.split_ref(path)[0]) \
            else None
    except BusisegError as exc:
        failures.append(Failure(path, str(exc).split(": ", 1)[-1]))
        return None
    classified: dict = {}
    score_of = None
    if predictor.classifier is not None:
        def score_of(small: torch.Tensor) -> np.ndarray:
            p_lesion, p_malignant = predictor.classifier.probabilities(small)[0]
            classified.update(p_lesion=round(float(p_lesion), 6), p_malignant=round(
                float(p_malignant), 6) if predictor.classifier.malignancy else "")
            return np.array([p_lesion], dtype=np.float64)
    seg = segment_with_score(predictor.forward, image, predictor.size, predictor.input_mean,
                             predictor.input_std, settings, predictor.device, score_of)
    _write_outputs(out_dir, path, image, seg, outputs)
    sizes = {k: "" if np.isnan(v) else round(float(v), 4)
             for k, v in size_row(seg.mask, (1.0, 1.0), pixel_mm).items()}
    return {"image": input_path(path), "mask": mask_name(path), "lesion_score": round(seg.score, 6),
            "lesion": int(seg.mask.any()), "confidence": round(seg.confidence, 6),
            "flagged": int(seg.flagged), **sizes, **classified}


def _write_segmentations(predictor: Predictor, files: list[Path], out_dir: Path,
                         failures: list[Failure]) -> None:
    """NAME_seg.dcm for each DICOM input, from its frames' masks in --out (this run's, and an
    earlier run's under --continue), so the SEG holds every frame predicted, each written once."""
    from busiseg import busiseg_version
    from busiseg.inference.dicom_seg import write_dicom_seg

    by_file: dict[Path, dict[int, Path]] = {}
    for path in files:
        source, frame = dicom.split_ref(path)
        if dicom.is_dicom(source) and (out_dir / mask_name(path)).is_file():
            by_file.setdefault(source, {})[0 if frame is None else frame - 1] = path
    for source, frames in by_file.items():
        masks = {k: np.asarray(Image.open(out_dir / mask_name(p))) > 0 for k, p in frames.items()}
        try:
            with warnings.catch_warnings():  # highdicom's quote the patient's name: not logged
                warnings.simplefilter("ignore")
                write_dicom_seg(source, masks, out_dir / f"{dicom.image_stem(source)}_seg.dcm",
                                model_digest=predictor.weights_digest or predictor.file_sha256,
                                version=busiseg_version())
        except BusisegError as exc:
            failures.append(Failure(source, f"no DICOM SEG: {str(exc).split(': ', 1)[-1]}"))


def _make_folder(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BusisegError(f"--out {out_dir}: cannot make the folder ({first_line(exc)}); "
                           "choose a folder you can write to") from None
    if not os.access(out_dir, os.W_OK):
        raise BusisegError(f"--out {out_dir}: not writable; choose a folder you can write to")


def _write_outputs(out_dir: Path, path: Path, image: np.ndarray, seg, outputs: Outputs) -> None:
    """The probability map and overlay first, the mask last, each written beside and renamed:
    a mask in the folder means the image's outputs are whole (`plan_resume`)."""
    stem = dicom.image_stem(path)
    pieces = []
    if outputs.probabilities:
        pieces.append((f"{stem}_prob.png",
                       lambda tmp: save_probability_png(seg.probability, tmp)))
    if outputs.overlays:
        pieces.append((f"{stem}_overlay.png",
                       lambda tmp: overlay(image, seg.mask).save(tmp, format="PNG")))
    pieces.append((mask_name(path), lambda tmp: Image.fromarray(
        seg.mask.astype(np.uint8) * np.uint8(outputs.mask_value), "L").save(tmp, format="PNG")))
    try:
        for name, save in pieces:
            with atomic_path(out_dir / name) as tmp:
                save(tmp)
    except OSError as exc:
        raise BusisegError(f"--out {out_dir}: cannot write the outputs of {path.name} "
                           f"({first_line(exc)}); free space or choose another folder") from None


def save_probability_png(probability: np.ndarray, path: Path) -> None:
    """A probability map as a 16-bit grey PNG: value = round(p × 65535), so p = value / 65535
    to within 8e-6, lossless and readable by any image tool (numpy, PIL, ITK, ImageJ)."""
    scaled = np.round(np.clip(probability, 0, 1) * 65535).astype(np.uint16)
    Image.fromarray(scaled).save(path, format="PNG")

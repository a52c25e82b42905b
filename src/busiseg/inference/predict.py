"""Segment new images with a trained model (PyTorch or ONNX): a mask PNG at the original size,
and an overlay. The prediction itself is `inference.segment`, the path evaluate scores.

Beside the masks, predictions.csv (one row per image) and predictions.json: how the masks were
made (version, model and its digest, every setting and where it came from, device, command) and
what became of every input, so a folder of masks can be traced without the shell history."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from busiseg.data.images import load_image
from busiseg.errors import BusisegError, first_line
from busiseg.files import atomic_path, atomic_write_text, file_sha256
from busiseg.inference.onnx_model import load_onnx
from busiseg.inference.segment import Forward, MaskSettings, Stats, as_stats, segment_with_score
from busiseg.modeling.model_file import load_model
from busiseg.runtime.device import place

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SCORES = "predictions.csv"
RECORD = "predictions.json"
OWN_SUFFIXES = ("_overlay", "_prob")  # predict's outputs besides the mask
MASK_LIKE = "name looks like a mask (contains _mask)"
OWN_OUTPUT = "predict's own output"
EXISTS = "output exists (--continue)"

FIELDS = tuple(f.name for f in fields(MaskSettings))
# metrics/eval.json's name for a field where it is not the field's own (MaskSettings.eval_keys)
EVAL_NAMES = {"tta": "used_tta", "largest_cc": "used_largest_cc", "fill_holes": "used_fill_holes",
              "tuned_threshold": "used_tune_threshold", "temperature": "presence_temperature",
              "held_out_dice": "val_dice"}


@dataclass(frozen=True)
class SourcedSettings:
    """Settings with where each field came from, so the record can say why a mask looks as it
    does; `origin` is the short summary the command prints."""

    settings: MaskSettings
    sources: dict[str, str]
    origin: str


def field_sources(present: Iterable[str], label: str,
                  notes: dict[str, str] | None = None) -> dict[str, str]:
    """Each field's source: `label` (with the writer's note on it, if any) where the file or
    model named the field under its own or its metrics/eval.json name, else "default"."""
    present, notes = set(present), notes or {}
    return {name: (f"{label}: {notes[name]}" if notes.get(name) else label)
            if name in present or EVAL_NAMES.get(name) in present else "default"
            for name in FIELDS}


def settings_from_flags(threshold: float | None, tta: bool, largest_cc: bool,
                        fill_holes: bool) -> SourcedSettings:
    """The command line's set replaces the whole of an evaluate file's or a model's (an option
    not given is off), so what a mask shows never mixes two sources' post-processing."""
    settings = MaskSettings(0.5 if threshold is None else threshold, tta, largest_cc,
                            fill_holes).checked("--threshold")
    given = {"threshold": threshold is not None, "tta": tta, "largest_cc": largest_cc,
             "fill_holes": fill_holes}
    return SourcedSettings(settings, {name: f"flag --{name.replace('_', '-')}"
                                      if given.get(name) else "default" for name in FIELDS},
                           "options")


def settings_from_eval(path: str | Path) -> SourcedSettings:
    path = Path(path)
    if path.is_dir():
        raise BusisegError(f"--from-eval {path}: is a folder; name the evaluate stage's "
                           "metrics file (metrics/eval.json)")
    settings = MaskSettings.from_eval(path)
    names = json.loads(path.read_text())  # from_eval has read it as a JSON object
    return SourcedSettings(settings, field_sources(names, f"eval file {path}"), str(path))


@dataclass
class Predictor:
    """A loaded model of either kind, with what feeding it needs."""

    forward: Forward
    size: int
    input_mean: Stats
    input_std: Stats
    device: torch.device
    own_settings: MaskSettings | None  # evaluate's choice, when the model file carries it
    channels: int = 1  # what the model takes: 1 grey, 3 colour (preprocess.channels)
    own_sources: dict[str, str] = field(default_factory=dict)  # per field: "model: …"
    kind: str = "pt"  # pt | onnx
    digest: str = ""  # .pt: its weights' digest; .onnx: the file's sha256


def load_predictor(model_path: str | Path, device: str = "cpu") -> Predictor:
    """A .onnx file runs on ONNX Runtime; anything else must be a busiseg PyTorch model file.
    Either may carry the settings evaluate chose (an export always does, a packaged .pt too)."""
    model_path = Path(model_path)
    if model_path.suffix.lower() == ".onnx":
        if device not in ("cpu", "auto"):
            raise BusisegError(f"--device {device}: ONNX models run on ONNX Runtime's CPU "
                               "provider; use --device cpu, or the .pt model on the GPU")
        forward, meta = _named("--model", load_onnx, model_path)
        return Predictor(forward, int(meta["size"]), as_stats(meta["input_mean"]),
                         as_stats(meta["input_std"]), torch.device("cpu"),
                         MaskSettings.from_metadata(meta), int(meta.get("channels", 1)),
                         field_sources(meta, "model", _notes(meta)), "onnx",
                         file_sha256(model_path))
    where, _ = place(device, "--device")
    model, blob = _named("--model", load_model, model_path, where)
    pre = blob["preprocess"]
    own, sources = None, {}
    if blob.get("settings") is not None:
        try:
            own = MaskSettings.from_metadata(blob["settings"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BusisegError(f"--model {model_path}: its settings are unreadable "
                               f"({type(exc).__name__}: {exc}); package the model again, or "
                               "give --from-eval or --threshold") from None
        own = own.checked(f"--model {model_path} settings")
        sources = field_sources(blob["settings"], "model", _notes(blob))
    return Predictor(model, int(pre["size"]), as_stats(pre["input_mean"]),
                     as_stats(pre["input_std"]), where, own, int(pre.get("channels", 1)),
                     sources, "pt", str(blob["digest"]))


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


@dataclass
class Failure:
    path: Path
    reason: str


def collect_inputs(inputs: list[str | Path]) -> tuple[list[Path], list[Failure], list[Failure]]:
    """(images to predict, failures, skipped). A folder contributes its image files; what else
    it holds is skipped with its reason (masks beside their images, predict's own outputs,
    other files, subfolders), so the user learns why an image was not predicted. A file named
    explicitly is predicted whatever its name; a missing path is a failure."""
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
    return files, failures, skipped


def _skip_reason(p: Path) -> str | None:
    if p.is_dir():
        return "a folder inside a folder (predict does not look in; name it to predict it)"
    if p.name in (SCORES, RECORD) or (p.suffix.lower() == ".png"
                                      and p.stem.endswith(OWN_SUFFIXES)):
        return OWN_OUTPUT
    if p.suffix.lower() not in SUFFIXES:
        return f"not an image file predict reads ({' '.join(SUFFIXES)})"
    if "_mask" in p.stem:
        return MASK_LIKE
    return None


def overlay(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The image (grey, or colour H×W×3) with the lesion tinted red and its outline drawn."""
    rgb = (image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)).astype(
        np.float32)
    tint = np.array([255, 40, 40], dtype=np.float32)
    rgb[mask] = 0.65 * rgb[mask] + 0.35 * tint
    edge = mask & ~_erode(mask)
    rgb[edge] = tint
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def _erode(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1, constant_values=False)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


@dataclass(frozen=True)
class Outputs:
    """What predict writes for each image besides its mask, and how."""

    overlays: bool = True
    probabilities: bool = False  # NAME_prob.png, 16-bit (`save_probability_png`)
    mask_value: int = 255  # a lesion pixel's value: 255 to view, 1 for label-reading tools
    resume: bool = False  # --continue: an image whose mask is already in the folder is skipped


@dataclass
class PredictRun:
    written: list[Path]
    failures: list[Failure]
    skipped: list[Failure]
    chosen: SourcedSettings
    record: Path


def mask_name(image: Path) -> str:
    return f"{image.stem}_mask.png"


def predict_paths(model_path: Path, inputs: list[str | Path], out_dir: Path,
                  settings: MaskSettings | None = None, device: str = "cpu",
                  progress: bool | None = None, mask_marks: bool = False,
                  overrides: dict | None = None,
                  save_probabilities: bool = False) -> tuple[list[Path], list[Failure]]:
    """`predict_run` for library callers that hold the settings themselves: (masks written,
    failures)."""
    chosen = None if settings is None else SourcedSettings(
        settings, dict.fromkeys(FIELDS, "given to predict_paths"), "the caller")
    run = predict_run(model_path, inputs, out_dir, chosen, device=device, progress=progress,
                      mask_marks=mask_marks, overrides=overrides,
                      outputs=Outputs(probabilities=save_probabilities))
    return run.written, run.failures


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
        chosen = SourcedSettings(MaskSettings(), dict.fromkeys(FIELDS, "default"), "defaults")
    if overrides:
        settings = replace(chosen.settings, **overrides).checked("--presence-threshold")
        sources = {**chosen.sources,
                   **{k: f"flag --{k.replace('_', '-')}" for k in overrides}}
        chosen = SourcedSettings(settings, sources, chosen.origin)
    return chosen


# many keywords: one per `busiseg predict` option, passed through from the command line
def predict_run(model_path: str | Path, inputs: list[str | Path], out_dir: str | Path,
                chosen: SourcedSettings | None = None, *, device: str = "cpu",
                progress: bool | None = None, mask_marks: bool = False,
                overrides: dict | None = None, outputs: Outputs | None = None,
                fallback_eval: Path | None = None,
                command: list[str] | None = None) -> PredictRun:
    """Masks (and overlays, probability maps) for every readable input, predictions.csv and
    predictions.json. Settings: see `resolve_settings`. `mask_marks`: paint burned-in colour
    marks over first, as a model trained with data.burned_marks: mask saw its images."""
    model_path, out_dir, outputs = Path(model_path), Path(out_dir), outputs or Outputs()
    if out_dir.exists() and not out_dir.is_dir():
        raise BusisegError(f"--out {out_dir}: is a file; name a folder for the masks (a new "
                           "one, or an existing folder)")
    predictor = load_predictor(model_path, device)
    chosen = resolve_settings(predictor, model_path, chosen, fallback_eval, overrides)
    settings = chosen.settings
    files, failures, skipped = collect_inputs(inputs)
    _make_folder(out_dir)
    earlier = _read_scores(out_dir / SCORES) if outputs.resume else []
    if outputs.resume:
        done = {p for p in files if (out_dir / mask_name(p)).exists()}
        skipped += [Failure(p, EXISTS) for p in files if p in done]
        todo = [p for p in files if p not in done]
    else:
        todo = files
    written, rows = [], []
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    for path in tqdm(todo, desc="predict", disable=not show or len(todo) < 2):
        try:
            image = load_image(path, mask_marks, predictor.channels)
        except BusisegError as exc:
            failures.append(Failure(path, str(exc).split(": ", 1)[-1]))
            continue
        seg = segment_with_score(predictor.forward, image, predictor.size, predictor.input_mean,
                                 predictor.input_std, settings, predictor.device)
        _write_outputs(out_dir, path, image, seg, outputs)
        written.append(out_dir / mask_name(path))
        rows.append({"image": str(path), "mask": mask_name(path),
                     "lesion_score": round(seg.score, 6), "lesion": int(seg.mask.any()),
                     "confidence": round(seg.confidence, 6), "flagged": int(seg.flagged)})
    now = {r["mask"] for r in rows}
    write_scores(out_dir / SCORES, [r for r in earlier if r.get("mask") not in now] + rows,
                 settings)
    record = out_dir / RECORD
    atomic_write_text(record, json.dumps(run_record(
        predictor, model_path, chosen, outputs, command, len(files),
        [{"image": r["image"], "mask": r["mask"]} for r in rows], skipped, failures, mask_marks),
        indent=2) + "\n")
    return PredictRun(written, failures, skipped, chosen, record)


def _make_folder(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BusisegError(f"--out {out_dir}: cannot make the folder ({first_line(exc)}); "
                           "choose a folder you can write to") from None
    if not os.access(out_dir, os.W_OK):
        raise BusisegError(f"--out {out_dir}: not writable; choose a folder you can write to")


def _write_outputs(out_dir: Path, path: Path, image: np.ndarray, seg, outputs: Outputs) -> None:
    stem = path.stem
    try:
        Image.fromarray(seg.mask.astype(np.uint8) * np.uint8(outputs.mask_value), "L").save(
            out_dir / mask_name(path))
        if outputs.overlays:
            overlay(image, seg.mask).save(out_dir / f"{stem}_overlay.png")
        if outputs.probabilities:
            save_probability_png(seg.probability, out_dir / f"{stem}_prob.png")
    except OSError as exc:
        raise BusisegError(f"--out {out_dir}: cannot write the outputs of {path.name} "
                           f"({first_line(exc)}); free space or choose another folder") from None


def run_record(predictor: Predictor, model_path: Path, chosen: SourcedSettings,
               outputs: Outputs, command: list[str] | None, found: int, written: list[dict],
               skipped: list[Failure], failures: list[Failure], mask_marks: bool) -> dict:
    """predictions.json: enough to redo the run (version, model digest, settings, command) and
    to account for every input. `found`: the images found to predict, before --continue."""
    return {
        "busiseg": busiseg_version(),
        "command": list(command) if command is not None else None,
        "cwd": str(Path.cwd()),  # what the relative paths here are relative to
        "model": {"path": str(model_path.resolve()), "kind": predictor.kind,
                  "digest": predictor.digest,
                  "digest_of": "weights" if predictor.kind == "pt" else "file (sha256)"},
        "device": str(predictor.device),
        "settings": chosen.settings.as_dict(),
        "settings_source": dict(chosen.sources),
        "outputs": {"mask_values": [0, outputs.mask_value], "overlays": outputs.overlays,
                    "probabilities": outputs.probabilities, "continue": outputs.resume,
                    "mask_marks": mask_marks, "scores": SCORES},
        "inputs": {"found": found,
                   "written": written,
                   "skipped": [{"path": str(f.path), "reason": f.reason} for f in skipped],
                   "failed": [{"path": str(f.path), "reason": f.reason} for f in failures]},
    }


def busiseg_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("busiseg")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from busiseg import __version__

        return __version__


def _read_scores(path: Path) -> list[dict]:
    """An earlier run's rows, kept by --continue for the images it does not predict again."""
    import csv

    if not path.is_file():
        return []
    try:
        with open(path, newline="") as fh:
            return [row for row in csv.DictReader(fh) if row.get("mask")]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BusisegError(f"--continue: {path} is unreadable ({first_line(exc)}); move it "
                           "aside, or predict without --continue") from None


def write_scores(path: Path, rows: list[dict], settings: MaskSettings) -> None:
    """Beside the masks, per image: its lesion score (the presence head's probability, or the
    most confident pixel for a model without one), the decision (1: a lesion was drawn) and the
    presence threshold that made it (empty: off); its confidence (`settings.confidence`), the
    review flag (1: a reader should look) and the threshold that set it (empty: none). A row
    kept from an earlier run (--continue) keeps the thresholds that run applied."""
    import csv

    def blank(value: float | None) -> float | str:
        return "" if value is None else value

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["image", "mask", "lesion_score", "lesion",
                                     "presence_threshold", "confidence", "flagged",
                                     "review_threshold"], lineterminator="\n",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows({"presence_threshold": blank(settings.presence_threshold),
                          "review_threshold": blank(settings.review_threshold), **r}
                         for r in rows)


def save_probability_png(probability: np.ndarray, path: Path) -> None:
    """A probability map as a 16-bit grey PNG: value = round(p × 65535), so p = value / 65535
    to within 8e-6, lossless and readable by any image tool (numpy, PIL, ITK, ImageJ)."""
    scaled = np.round(np.clip(probability, 0, 1) * 65535).astype(np.uint16)
    Image.fromarray(scaled).save(path)

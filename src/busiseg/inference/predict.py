"""Segment new images with a trained model (PyTorch or ONNX): a mask PNG at the original size,
and an overlay. The prediction itself is `inference.segment`, the path evaluate scores."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from busiseg.data.images import load_image
from busiseg.errors import BusisegError
from busiseg.inference.onnx_model import load_onnx
from busiseg.inference.segment import Forward, MaskSettings, Stats, as_stats, segment_with_score
from busiseg.modeling.model_file import load_model
from busiseg.runtime.device import place

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class Predictor:
    """A loaded model of either kind, with what feeding it needs."""

    forward: Forward
    size: int
    input_mean: Stats
    input_std: Stats
    device: torch.device
    own_settings: MaskSettings | None  # what an ONNX export carries; a .pt file carries none
    channels: int = 1  # what the model takes: 1 grey, 3 colour (preprocess.channels)


def load_predictor(model_path: str | Path, device: str = "cpu") -> Predictor:
    """A .onnx file runs on ONNX Runtime; anything else must be a busiseg PyTorch model file."""
    model_path = Path(model_path)
    if model_path.suffix.lower() == ".onnx":
        if device != "cpu":
            raise BusisegError(f"--device {device}: ONNX models run on ONNX Runtime's CPU "
                               "provider; use --device cpu, or the .pt model on the GPU")
        forward, meta = load_onnx(model_path)
        return Predictor(forward, int(meta["size"]), as_stats(meta["input_mean"]),
                         as_stats(meta["input_std"]), torch.device("cpu"),
                         MaskSettings.from_metadata(meta), int(meta.get("channels", 1)))
    where, _ = place(device, "--device")
    model, blob = load_model(model_path, where)
    pre = blob["preprocess"]
    return Predictor(model, int(pre["size"]), as_stats(pre["input_mean"]),
                     as_stats(pre["input_std"]), where, None, int(pre.get("channels", 1)))


@dataclass
class Failure:
    path: Path
    reason: str


def collect_inputs(inputs: list[str | Path]) -> tuple[list[Path], list[Failure]]:
    """Directories contribute their image files (masks skipped); missing paths are failures."""
    files, failures = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file()
                           and p.suffix.lower() in SUFFIXES and "_mask" not in p.stem
                           and not p.stem.endswith(("_overlay", "_prob")))  # predict's own
            if not found:
                failures.append(Failure(item, "folder holds no images"))
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            failures.append(Failure(item, "no such file or folder"))
    return files, failures


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


# nine parameters: one per `busiseg predict` option, passed through from the command line
def predict_paths(model_path: Path, inputs: list[str | Path], out_dir: Path,
                  settings: MaskSettings | None = None, device: str = "cpu",
                  progress: bool | None = None, mask_marks: bool = False,
                  overrides: dict | None = None,
                  save_probabilities: bool = False) -> tuple[list[Path], list[Failure]]:
    """Masks and overlays for every readable input. Without `settings`, an ONNX export's own
    (evaluate's choice at export time), else the params defaults. `overrides`: MaskSettings
    fields that replace those settings' (the command line's presence threshold, a number or
    None for off). `save_probabilities`: each
    image's probability map beside its mask, as a 16-bit PNG (`save_probability_png`).
    `mask_marks`: paint burned-in colour marks over first, as a model trained with
    data.burned_marks: mask saw its images."""
    predictor = load_predictor(model_path, device)
    settings = settings or predictor.own_settings or MaskSettings()
    if overrides:
        settings = replace(settings, **overrides).checked("--presence-threshold")
    files, failures = collect_inputs(inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, rows = [], []
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    for path in tqdm(files, desc="predict", disable=not show or len(files) < 2):
        try:
            image = load_image(path, mask_marks, predictor.channels)
        except BusisegError as exc:
            failures.append(Failure(path, str(exc).split(": ", 1)[-1]))
            continue
        seg = segment_with_score(predictor.forward, image, predictor.size, predictor.input_mean,
                                 predictor.input_std, settings, predictor.device)
        stem = path.stem
        Image.fromarray(seg.mask.astype(np.uint8) * 255, "L").save(out_dir / f"{stem}_mask.png")
        overlay(image, seg.mask).save(out_dir / f"{stem}_overlay.png")
        if save_probabilities:
            save_probability_png(seg.probability, out_dir / f"{stem}_prob.png")
        written.append(out_dir / f"{stem}_mask.png")
        rows.append({"image": str(path), "mask": f"{stem}_mask.png",
                     "lesion_score": round(seg.score, 6), "lesion": int(seg.mask.any()),
                     "confidence": round(seg.confidence, 6), "flagged": int(seg.flagged)})
    write_scores(out_dir / SCORES, rows, settings)
    return written, failures


SCORES = "predictions.csv"


def write_scores(path: Path, rows: list[dict], settings: MaskSettings) -> None:
    """Beside the masks, per image: its lesion score (the presence head's probability, or the
    most confident pixel for a model without one), the decision (1: a lesion was drawn) and the
    presence threshold that made it (empty: off); its confidence (`settings.confidence`), the
    review flag (1: a reader should look) and the threshold that set it (empty: none)."""
    import csv

    def blank(value: float | None) -> float | str:
        return "" if value is None else value

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["image", "mask", "lesion_score", "lesion",
                                     "presence_threshold", "confidence", "flagged",
                                     "review_threshold"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "presence_threshold": blank(settings.presence_threshold),
                          "review_threshold": blank(settings.review_threshold)} for r in rows)


def save_probability_png(probability: np.ndarray, path: Path) -> None:
    """A probability map as a 16-bit grey PNG: value = round(p × 65535), so p = value / 65535
    to within 8e-6, lossless and readable by any image tool (numpy, PIL, ITK, ImageJ)."""
    scaled = np.round(np.clip(probability, 0, 1) * 65535).astype(np.uint16)
    Image.fromarray(scaled).save(path)

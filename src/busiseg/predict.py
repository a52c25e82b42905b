"""Segment new images with a trained model file: a mask PNG at the original size, and an overlay."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from busiseg.data import image_to_gray, open_png
from busiseg.errors import BusisegError
from busiseg.evaluate import postprocess
from busiseg.modelio import load_model

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def eval_settings(path: Path) -> dict:
    """Threshold and evaluate-time pieces that the evaluate stage applied to test (its
    metrics/eval.json), so new images are segmented exactly as the reported figures were."""
    try:
        m = json.loads(Path(path).read_text())
        settings = {"threshold": float(m["threshold"]), "tta": bool(m["used_tta"]),
                    "largest_cc": bool(m["used_largest_cc"]),
                    "fill_holes": bool(m["used_fill_holes"])}
    except FileNotFoundError:
        raise BusisegError(f"{path}: not found; run `dvc repro evaluate` first") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BusisegError(f"{path}: not an evaluate metrics file with threshold and used_* keys "
                           f"({type(exc).__name__}: {exc}); re-run `dvc repro evaluate`") from None
    return settings


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
                           and p.suffix.lower() in SUFFIXES and "_mask" not in p.stem)
            if not found:
                failures.append(Failure(item, "folder holds no images"))
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            failures.append(Failure(item, "no such file or folder"))
    return files, failures


def read_gray(path: Path) -> np.ndarray:
    img = open_png(path) if path.suffix.lower() == ".png" else _open_other(path)
    return image_to_gray(img, path)


def _open_other(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is an unreadable input
        raise BusisegError(f"{path}: not a readable image ({exc})") from None
    return img


def predict_one(model: torch.nn.Module, blob: dict, gray: np.ndarray, device: torch.device,
                threshold: float, tta: bool = False, largest_cc: bool = False,
                fill_holes: bool = False) -> np.ndarray:
    """Resize to the training size, predict, bring the probability map back to full size."""
    pre = blob["preprocess"]
    size = int(pre["size"])
    small = Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    x = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255)[None, None]
    x = ((x - pre["input_mean"]) / pre["input_std"]).to(device)
    with torch.inference_mode():
        prob = torch.sigmoid(model(x).float())
        if tta:
            prob = 0.5 * (prob + torch.sigmoid(model(x.flip(-1)).float()).flip(-1))
        prob = torch.nn.functional.interpolate(prob, size=gray.shape, mode="bilinear",
                                               align_corners=False)
    return postprocess(prob[0, 0].cpu().numpy() >= threshold, largest_cc, fill_holes)


def overlay(gray: np.ndarray, mask: np.ndarray) -> Image.Image:
    """Grey image with the lesion tinted red and its outline drawn."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    tint = np.array([255, 40, 40], dtype=np.float32)
    rgb[mask] = 0.65 * rgb[mask] + 0.35 * tint
    edge = mask & ~_erode(mask)
    rgb[edge] = tint
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def _erode(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1, constant_values=False)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def predict_paths(model_path: Path, inputs: list[str | Path], out_dir: Path,
                  threshold: float | None = None, device: str = "cpu",
                  progress: bool | None = None, tta: bool = False, largest_cc: bool = False,
                  fill_holes: bool = False) -> tuple[list[Path], list[Failure]]:
    model, blob = load_model(model_path, device)
    thr = float(blob["threshold"] if threshold is None else threshold)
    if not 0 < thr < 1:
        raise BusisegError(f"--threshold must be in (0, 1), got {thr}")
    files, failures = collect_inputs(inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    for path in tqdm(files, desc="predict", disable=not show or len(files) < 2):
        try:
            gray = read_gray(path)
        except BusisegError as exc:
            failures.append(Failure(path, str(exc).split(": ", 1)[-1]))
            continue
        mask = predict_one(model, blob, gray, torch.device(device), thr, tta, largest_cc,
                           fill_holes)
        stem = path.stem
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(out_dir / f"{stem}_mask.png")
        overlay(gray, mask).save(out_dir / f"{stem}_overlay.png")
        written.append(out_dir / f"{stem}_mask.png")
    return written, failures

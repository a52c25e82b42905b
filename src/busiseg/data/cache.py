"""The tensor cache (data/cache.npz) and the preprocess stage that writes it: decode once,
resize, union the masks, and keep uint8 tensors for training and evaluation.

Training then reads batches straight from memory instead of decoding PNGs every epoch. Workers
return one small resized pair at a time, so peak memory follows the output, not the raw images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from busiseg.data.images import (
    load_image,
    load_mask_union,
    process_map,
    resize_image,
    resize_mask,
)
from busiseg.data.manifest import mask_list
from busiseg.errors import BusisegError, first_line
from busiseg.files import atomic_path


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image: antialiased bilinear. Mask: area-weighted, then thresholded, so it stays binary."""
    return resize_image(image, size), resize_mask(mask, (size, size)).astype(np.uint8)


@dataclass(frozen=True)
class Reading:
    """How each image and its masks are read, as ingest checked them: masks that are closed
    contours to fill (data.mask_kind: outline), burned-in colour marks painted over
    (data.burned_marks: mask), 1 grey or 3 colour channels (preprocess.channels), masks at
    another size resampled to their image's (data.mask_resize: resample)."""

    outline: bool = False
    mask_marks: bool = False
    channels: int = 1
    mask_resize: bool = False

    @classmethod
    def from_params(cls, params) -> Reading:
        return cls(params.data.mask_kind == "outline", params.data.burned_marks == "mask",
                   params.preprocess.channels, params.data.mask_resize == "resample")


def read_pair(root: Path, image: str, masks: list[str], reading: Reading,
              expected: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A case's image and the union of its masks at the original size, read as `reading` says:
    the one reading the cache and every export of the data share. `expected`: the (height,
    width) ingest recorded, so an image changed since is named as such, not as its masks."""
    pixels = load_image(root / image, reading.mask_marks, reading.channels)
    if expected is not None and pixels.shape[:2] != tuple(expected):
        raise BusisegError(f"{root / image}: is {pixels.shape[1]}x{pixels.shape[0]} but the "
                           f"manifest (data/manifest.csv) says {expected[1]}x{expected[0]}; the "
                           "data changed since ingest: run dvc repro")
    return pixels, load_mask_union([root / m for m in masks], pixels.shape[:2], reading.outline,
                                   reading.mask_resize)


def _one(args: tuple[str, str, list[str], int, Reading]) -> tuple[np.ndarray, np.ndarray]:
    raw, image, masks, size, reading = args
    return resize_pair(*read_pair(Path(raw), image, masks, reading), size)


def preprocess(manifest, raw_dir: str | Path, size: int, out_path: str | Path,
               reading: Reading | None = None, workers: int = 0,
               progress: bool = False) -> dict:
    """manifest: rows (dicts) or a DataFrame with case_id, class, image and masks columns; the
    images' second axis is `reading.channels`."""
    reading = reading or Reading()
    channels = reading.channels
    if hasattr(manifest, "to_dict"):
        manifest = manifest.to_dict("records")
    n = len(manifest)
    images = np.zeros((n, channels, size, size), dtype=np.uint8)
    masks = np.zeros((n, 1, size, size), dtype=np.uint8)
    jobs = [(str(raw_dir), r["image"], mask_list(r), size, reading) for r in manifest]
    for i, (img, m) in enumerate(process_map(_one, jobs, workers, desc="preprocess",
                                             progress=progress)):
        images[i], masks[i, 0] = img.transpose(2, 0, 1) if img.ndim == 3 else img, m
    save_cache(out_path, images, masks, [str(r["case_id"]) for r in manifest],
               [str(r["class"]) for r in manifest])
    lesion = masks.reshape(n, -1).mean(axis=1)
    return {
        "n_images": n,
        "size": size,
        "mean_intensity": round(float(images.mean()) / 255, 6),
        "mean_lesion_fraction": round(float(lesion.mean()), 6),
    }


# ---- the cache file ---------------------------------------------------------------------------


@dataclass
class Cache:
    """Images and union masks resized to one size, aligned with the manifest order."""

    images: object  # torch.uint8 N×C×S×S (C: preprocess.channels)
    masks: object  # torch.uint8 N×1×S×S, values 0/1
    case_ids: list[str]

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def indices(self, case_ids: list[str]) -> list[int]:
        pos = {c: i for i, c in enumerate(self.case_ids)}
        missing = [c for c in case_ids if c not in pos]
        if missing:
            raise BusisegError(f"cache has no case '{missing[0]}' (and {len(missing) - 1} more): "
                               "the split and the cache disagree; re-run dvc repro")
        return [pos[c] for c in case_ids]


CACHE_FORMAT = "busiseg-cache-v1"


def save_cache(path: str | Path, images: np.ndarray, masks: np.ndarray, case_ids: list[str],
               classes: list[str]) -> None:
    """One uncompressed .npz: no pickles, loads in a fraction of a second."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, format=np.array(CACHE_FORMAT), images=images, masks=masks,
                 case_ids=np.array(case_ids, dtype=str), classes=np.array(classes, dtype=str))


def load_cache(path: str | Path, size: int | None = None) -> Cache:
    """Tensors for training: uint8 N×C×S×S images and N×1×S×S masks, in manifest order. With
    `size`, a cache of another size is refused: one restored stale would train silently on it."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise BusisegError(f"{path}: tensor cache not found; run the preprocess stage first")
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != CACHE_FORMAT:
                raise ValueError("unknown format")
            images, masks = data["images"], data["masks"]
            case_ids = data["case_ids"].tolist()
    except Exception as exc:  # noqa: BLE001 - any failure to read it means a bad file
        raise BusisegError(f"{path}: not a busiseg tensor cache ({first_line(exc, 120)}); "
                           "delete it and re-run the preprocess stage") from None
    if size is not None and images.shape[-1] != size:
        raise BusisegError(f"{path}: holds {images.shape[-1]}x{images.shape[-1]} images but "
                           f"preprocess.size is {size}; re-run it: dvc repro -f preprocess")
    return Cache(torch.from_numpy(images), torch.from_numpy(masks), case_ids)
